import pytest

from pancreas_gvae.config import Config, flatten, load_config, parse_overrides
from pancreas_gvae.errors import PipelineError


def test_layers_defaults_file_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("model:\n  latent_dim: 7\ntrain:\n  steps: 5\n")
    cfg = load_config(f, ["train.steps=9", "model.channels=[4, 8]", "data.anything=x"])
    assert cfg.model.latent_dim == 7
    assert cfg.train.steps == 9
    assert cfg.model.channels == [4, 8]
    assert cfg.data == {"anything": "x"}


def test_round_trip_through_dict():
    cfg = load_config(overrides=["loss.beta_kl=0.25"])
    again = Config.from_dict(cfg.to_dict())
    assert again == cfg


@pytest.mark.parametrize("bad,match", [
    (["model.nope=1"], "unknown config key 'model.nope'"),
    (["model.kind=diffusion"], "model.kind must be one of"),
    (["loss.adversarial=wgan"], "nonsaturating or hinge"),
    (["loss.d_fakes=rec"], "loss.d_fakes must be both or prior"),
    (["train.steps"], "section.key=value"),
])
def test_bad_overrides_are_named(bad, match):
    with pytest.raises(PipelineError, match=match):
        load_config(overrides=bad)


def test_missing_and_invalid_config_files(tmp_path):
    with pytest.raises(PipelineError, match="not found"):
        load_config(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(PipelineError, match="not valid YAML"):
        load_config(bad)


def test_flatten_and_parse():
    assert parse_overrides(["a.b.c=3"]) == {"a": {"b": {"c": 3}}}
    assert flatten({"a": {"b": 1}, "c": 2}) == {"a.b": 1, "c": 2}


# --- typed values: every key is converted to its dataclass type as it is merged -------------------------

@pytest.mark.parametrize("override,key,value,expected", [
    ("train.steps=abc", "train.steps", "'abc'", "expected an integer"),
    ("train.lr_g=fast", "train.lr_g", "'fast'", "expected a number (float)"),
    ("model.channels=[]", "model.channels", "[]", "expected a non-empty list of positive integers"),
    ("model.disc_channels=[]", "model.disc_channels", "[]", "expected a non-empty list of positive integers"),
    ("train.steps=2.5", "train.steps", "2.5", "expected an integer"),
    ("train.steps=true", "train.steps", "True", "expected an integer"),
    ("train.compile=maybe", "train.compile", "'maybe'", "expected true or false"),
    ("model.channels=[16, x]", "model.channels", "[16, 'x']", "positive integers"),
    ("train.steps=-1", "train.steps", "-1", ">= 0"),
    ("train.lr_g=0", "train.lr_g", "0", "> 0"),
])
def test_bad_values_are_one_line_naming_key_value_and_type(override, key, value, expected):
    with pytest.raises(PipelineError) as err:
        load_config(overrides=[override])
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"config key {key}: got {value}, ")
    assert expected in message


def test_bad_value_in_a_config_file_is_refused_too(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  lr_d: 2e-4\n  batch_size: lots\n")
    with pytest.raises(PipelineError, match=r"config key train\.batch_size: got 'lots', expected an integer"):
        load_config(f)
    f.write_text("train:\n  lr_d: 2e-4\n")  # YAML 1.1 reads 2e-4 (no dot) as a string
    assert load_config(f).train.lr_d == 2e-4


@pytest.mark.parametrize("override,attr,expected", [
    ("train.lr_g=1e-4", ("train", "lr_g"), 1e-4),
    ("train.lr_g=2E-3", ("train", "lr_g"), 2e-3),
    ("train.lr_d=.5", ("train", "lr_d"), 0.5),
    ("train.ema_decay=1", ("train", "ema_decay"), 1.0),
    ("train.steps=1e3", ("train", "steps"), 1000),
    ("train.steps='12'", ("train", "steps"), 12),
    ("model.disc_channels=null", ("model", "disc_channels"), None),
    ("model.encoder_norm=none", ("model", "encoder_norm"), None),
    ("train.compile=yes", ("train", "compile"), True),
    ("train.channels_last='false'", ("train", "channels_last"), False),
    ("tracking.log_model=0", ("tracking", "log_model"), False),
    ("model.channels=[16, 32]", ("model", "channels"), [16, 32]),
    ("model.disc_channels=8,16", ("model", "disc_channels"), [8, 16]),
    ("train.betas=[0, 0.9]", ("train", "betas"), [0.0, 0.9]),
    ("tracking.run_name=2024", ("tracking", "run_name"), "2024"),
])
def test_values_are_converted_to_the_declared_type(override, attr, expected):
    section, key = attr
    value = getattr(getattr(load_config(overrides=[override]), section), key)
    assert value == expected
    assert type(value) is type(expected)
    if isinstance(expected, list):
        assert [type(v) for v in value] == [type(v) for v in expected]


def test_data_section_stays_untyped():
    cfg = load_config(overrides=["data.lr=1e-4", "data.nested.x=[1, a]"])
    assert cfg.data == {"lr": "1e-4", "nested": {"x": [1, "a"]}}


def test_cli_refuses_a_bad_value_before_making_any_data(tmp_path, capsys):
    from pancreas_gvae.pipelines import train_ct

    out = tmp_path / "out"
    code = train_ct.main(["--set", "train.steps=abc", "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err == "error: config key train.steps: got 'abc', expected an integer >= 0"
    assert not out.exists(), "no phantom (or anything else) may be made for a refused config"

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

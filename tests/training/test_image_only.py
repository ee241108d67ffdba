"""Image-only slices (no label) in training: no mask loss or gradient from them, and train_ct.py runs a
cohort that mixes labelled and unlabelled cases (labels.require_label: false)."""

from __future__ import annotations


import pytest
import torch
from mlflow.tracking import MlflowClient

from pancreas_gvae.training import losses as L
from pancreas_gvae.config import load_config
from pancreas_gvae.models import build_model
from pancreas_gvae.training.steps import _with_own_masks
from pancreas_gvae.training.trainer import Trainer, seed_everything

CT_TINY = ["model.in_channels=2", "model.mask_channels=1", "model.image_size=16", "model.channels=[4,8]",
           "model.latent_dim=4", "train.batch_size=4"]


def _trainer(kind, *extra):
    cfg = load_config(overrides=CT_TINY + [f"model.kind={kind}", *extra])
    seed_everything(0)
    return Trainer(cfg, build_model(cfg.model), torch.device("cpu"))


def _batch(n=4):
    x = torch.rand(n, 2, 16, 16, generator=torch.Generator().manual_seed(0))
    x[:, 1] = (x[:, 1] > 0.8).float()
    return x


def test_mask_loss_gives_no_gradient_to_unlabelled_samples():
    logits = torch.randn(2, 1, 8, 8, requires_grad=True)
    target = (torch.rand(2, 1, 8, 8) > 0.5).float()
    loss = L.mask_loss(logits, target, dice_weight=1.0, bce_weight=1.0, weight=torch.tensor([1.0, 0.0]))
    loss.backward()
    assert logits.grad[0].abs().sum() > 0 and torch.equal(logits.grad[1], torch.zeros_like(logits.grad[1]))
    only_first = L.mask_loss(logits[:1], target[:1], dice_weight=1.0, bce_weight=1.0)
    assert torch.allclose(loss, only_first), "the mean is over labelled samples only"


@pytest.mark.parametrize("kind", ["gvae", "vae"])
def test_a_batch_without_labels_adds_no_mask_loss(kind):
    tr = _trainer(kind)
    logs = tr.train_step(_batch(), has_label=torch.zeros(4))
    assert float(logs["recon/mask"]) == 0.0 and float(logs["batch/labelled_share"]) == 0.0
    assert all(torch.isfinite(v) for v in logs.values())


def test_gan_leaves_unlabelled_slices_out_of_ds_real_pairs():
    """Batches that differ only in the (unknown) mask of unlabelled slices give D and G the same update."""
    a, b = _trainer("gan"), _trainer("gan")
    x = _batch()
    y = x.clone()
    y[2:, 1] = 1.0 - y[2:, 1]  # other "labels" where there are none
    flags = torch.tensor([1.0, 1.0, 0.0, 0.0])
    a.train_step(x, has_label=flags)
    b.train_step(y, has_label=flags)
    for pa, pb in zip(a.model.parameters(), b.model.parameters()):
        assert torch.equal(pa, pb)
    c = _trainer("gan")
    c.train_step(y, has_label=torch.ones(4))  # the same slices taken as labelled do change D's update
    assert any(not torch.equal(pa, pc) for pa, pc in zip(a.model.discriminator.parameters(),
                                                         c.model.discriminator.parameters()))


@pytest.mark.parametrize("kind", ["gvae", "vae"])
def test_an_encoder_that_reads_no_masks_takes_nothing_from_the_unknown_mask_of_unlabelled_slices(kind):
    """With ``model.encoder_reads_masks=false`` (the semi-supervised generator's option) batches that differ only
    in the mask channel of unlabelled slices (unknown, whatever it holds) give every parameter the same update;
    an encoder that reads masks takes that channel in (an empty one as "no pancreas here")."""
    x = _batch()
    y = x.clone()
    y[2:, 1] = 1.0 - y[2:, 1]
    flags = torch.tensor([1.0, 1.0, 0.0, 0.0])
    a, b = _trainer(kind, "model.encoder_reads_masks=false"), _trainer(kind, "model.encoder_reads_masks=false")
    assert a.model.encoder.in_channels == 1
    a.train_step(x, has_label=flags)
    b.train_step(y, has_label=flags)
    for pa, pb in zip(a.model.parameters(), b.model.parameters()):
        assert torch.equal(pa, pb)
    c, d = _trainer(kind), _trainer(kind)  # the default encoder reads the mask channel: the updates differ
    c.train_step(x, has_label=flags)
    d.train_step(y, has_label=flags)
    assert any(not torch.equal(pc, pd) for pc, pd in zip(c.model.encoder.parameters(), d.model.encoder.parameters()))


def test_gvae_shows_d_the_reconstructed_mask_of_unlabelled_samples():
    tr = _trainer("gvae")
    x = _batch()
    rec = torch.rand_like(x)
    out = _with_own_masks(tr, x, rec, torch.tensor([1.0, 0.0, 1.0, 0.0]))
    assert torch.equal(out[:, 0], x[:, 0])
    assert torch.equal(out[[0, 2], 1], x[[0, 2], 1]) and torch.equal(out[[1, 3], 1], rec[[1, 3], 1])


def _d_inputs(tr):
    """Every tensor D is called on during ``tr``'s steps (no DiffAugment here: what D sees)."""
    seen = []
    tr.model.discriminator.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().clone()))
    return seen


def test_blind_mode_never_shows_d_a_mask_of_an_unlabelled_row():
    """``loss.unlabelled_masks=blind``: in every D call (real, reconstruction, prior sample, features) the rows of
    image-only slices carry the "unknown" mask and nothing else; labelled rows keep their masks, the real ones
    the real labels. The first mode ("own") shows D the generator's own mask there as real."""
    from pancreas_gvae.training.steps import UNKNOWN_MASK

    flags = torch.tensor([1.0, 0.0, 1.0, 0.0])
    x = _batch()
    tr = _trainer("gvae", "loss.unlabelled_masks=blind")
    seen = _d_inputs(tr)
    tr.train_step(x, has_label=flags)
    assert len(seen) >= 5  # D: real, rec, prior; then features of real and rec, logits of prior
    for t in seen:
        assert torch.all(t[[1, 3], 1] == UNKNOWN_MASK)
        assert not torch.any(t[[0, 2], 1] == UNKNOWN_MASK)  # labelled rows: masks (0/1 real, sigmoid fake)
    assert torch.equal(seen[0][:, 0], x[:, 0]) and torch.equal(seen[0][[0, 2], 1], x[[0, 2], 1])

    own = _trainer("gvae")
    seen_own = _d_inputs(own)
    own.train_step(x, has_label=flags)
    real, rec = seen_own[0], seen_own[1]
    assert torch.equal(real[[1, 3], 1], rec[[1, 3], 1]), "own mode: D's real unlabelled masks are G's"


def test_blind_mode_changes_nothing_when_every_slice_is_labelled():
    """The supervised generators of the downstream experiment train the same in either mode."""
    a, b = _trainer("gvae"), _trainer("gvae", "loss.unlabelled_masks=blind")
    for _ in range(2):
        a.train_step(_batch(), has_label=torch.ones(4))
        b.train_step(_batch(), has_label=torch.ones(4))
    for pa, pb in zip(a.model.parameters(), b.model.parameters()):
        assert torch.equal(pa, pb)


def test_blind_mode_takes_nothing_from_the_unknown_mask_of_unlabelled_slices():
    """With an image-only encoder, batches differing only in unlabelled rows' mask channel update nothing
    differently in blind mode, and the image channel of an unlabelled slice still trains D."""
    x = _batch()
    y = x.clone()
    y[2:, 1] = 1.0 - y[2:, 1]
    flags = torch.tensor([1.0, 1.0, 0.0, 0.0])
    opts = ("model.encoder_reads_masks=false", "loss.unlabelled_masks=blind")
    a, b = _trainer("gvae", *opts), _trainer("gvae", *opts)
    a.train_step(x, has_label=flags)
    b.train_step(y, has_label=flags)
    for pa, pb in zip(a.model.parameters(), b.model.parameters()):
        assert torch.equal(pa, pb)
    z = x.clone()
    z[2:, 0] = 1.0 - z[2:, 0]  # other images in the unlabelled rows: D's update differs
    c = _trainer("gvae", *opts)
    c.train_step(z, has_label=flags)
    assert any(not torch.equal(pa, pc) for pa, pc in zip(a.model.discriminator.parameters(),
                                                         c.model.discriminator.parameters()))


def test_unknown_unlabelled_mask_mode_is_a_clear_error():
    from pancreas_gvae.errors import PipelineError

    with pytest.raises(PipelineError, match="unlabelled_masks"):
        load_config(overrides=CT_TINY + ["loss.unlabelled_masks=maybe"])


def test_train_ct_runs_a_cohort_mixing_labelled_and_image_only_cases(tmp_path):
    from pancreas_gvae.data.ct.phantom import make_phantom_cohort
    from pancreas_gvae.pipelines import train_ct

    root = tmp_path / "cohort"
    make_phantom_cohort(root, cases=3, size=64, seed=0)
    labels = sorted(root.rglob("label*.nii.gz"))
    assert len(labels) == 3
    labels[0].unlink()  # one case without its label
    argv = ["--data-root", str(root), "--out", str(tmp_path / "out"), "--tracking-uri",
            f"sqlite:///{tmp_path / 'mlflow.db'}", "--steps", "2", "--batch-size", "8",
            "--set", "model.channels=[8,16,32]", "--set", "model.latent_dim=8", "--set", "train.log_every=1",
            "--set", "data.nifti_samples=2",
            "--set", "data.monitor={n_samples: 16, n_real: 32, segmenter_steps: 3}", "--set", "train.num_samples=8", "--set", "tracking.log_model=false",
            "--set", "tracking.system_metrics=false", "--set", "data.ct.labels.require_label=false"]
    assert train_ct.main(argv) == 0
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("pancreas-gvae-ct").experiment_id])
    share = [m.value for m in client.get_metric_history(run.info.run_id, "batch/labelled_share")]
    assert share and all(0.0 < v < 1.0 for v in share), share

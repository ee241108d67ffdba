"""Trainer behaviour on tiny synthetic tensors: gradient routing, determinism, exact resume, divergence."""

import copy

import pytest
import torch

from pancreas_gvae.config import load_config
from pancreas_gvae.errors import TrainingDiverged
from pancreas_gvae.models import build_model
from pancreas_gvae.training.batches import TensorBatches
from pancreas_gvae.training.checkpoint import load_checkpoint, save_checkpoint
from pancreas_gvae.training.trainer import Trainer, seed_everything

TINY = ["model.image_size=16", "model.channels=[4,8]", "model.latent_dim=4", "train.batch_size=4"]


def _trainer(kind="gvae", extra=()):
    cfg = load_config(overrides=TINY + [f"model.kind={kind}", *extra])
    seed_everything(cfg.train.seed)
    return Trainer(cfg, build_model(cfg.model), torch.device("cpu"))


def _data(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 16, 16, generator=g)


def _params(module):
    return torch.cat([p.detach().flatten() for p in module.parameters()])


@pytest.mark.parametrize("kind", ["gvae", "vae", "gan"])
def test_one_step_changes_weights_and_reports_finite_losses(kind):
    tr = _trainer(kind)
    before = copy.deepcopy(tr.model.state_dict())
    logs = tr.train_step(_data()[:4])
    assert tr.step == 1
    assert logs and all(torch.isfinite(v) for v in logs.values())
    changed = [k for k, v in tr.model.state_dict().items() if not torch.equal(v, before[k])]
    assert any(k.startswith("generator.") for k in changed)


@pytest.mark.parametrize("d_fakes", ["both", "prior"])
def test_no_adversarial_gradient_reaches_the_encoder(d_fakes):
    """E's update must not depend on the adversarial weight; G's must."""
    a = _trainer("gvae", ["loss.adversarial_weight=0.0", f"loss.d_fakes={d_fakes}"])
    b = _trainer("gvae", ["loss.adversarial_weight=50.0", f"loss.d_fakes={d_fakes}"])
    b.load_state_dict(a.state_dict() | {"config": b.cfg.to_dict()})
    x = _data()[:4]
    a.train_step(x)
    b.train_step(x)
    assert torch.equal(_params(a.model.encoder), _params(b.model.encoder))
    assert not torch.equal(_params(a.model.generator), _params(b.model.generator))


@pytest.mark.parametrize("d_fakes", ["both", "prior"])
def test_d_fakes_sets_what_d_and_gs_adversarial_term_see_as_fake(d_fakes, monkeypatch):
    """``loss.d_fakes``: D's fake side is the reconstruction and the prior sample ("both", Larsen et al.) or the
    prior sample alone ("prior"), and G's adversarial term is taken over the same fakes."""
    from pancreas_gvae.training import steps

    tr = _trainer("gvae", [f"loss.d_fakes={d_fakes}"])
    seen, made, g_terms = [], [], []
    tr.model.discriminator.register_forward_pre_hook(lambda _m, a: seen.append(a[0].detach().clone()))
    tr.model.generator.register_forward_hook(lambda _m, _a, out: made.append(torch.sigmoid(out.detach())))
    real_g_adv = steps.L.g_adversarial
    monkeypatch.setattr(steps.L, "g_adversarial", lambda logits, kind: g_terms.append(len(logits))
                        or real_g_adv(logits, kind))
    x = _data()[:4]
    tr.train_step(x)
    rec, prior = made
    fakes_in_d_update = [rec, prior] if d_fakes == "both" else [prior]
    assert torch.equal(seen[0], x)
    assert len(seen) == 1 + len(fakes_in_d_update) + 3  # D update; then features of real and rec, prior logit
    for got, want in zip(seen[1:], fakes_in_d_update):
        assert torch.equal(got, want)
    assert g_terms == [len(fakes_in_d_update)]


def test_training_is_deterministic_on_cpu():
    data = _data()
    runs = []
    for _ in range(2):
        tr = _trainer()
        batches = TensorBatches(data, batch_size=4, seed=0)
        for step in range(3):
            tr.train_step(batches.batch(step))
        runs.append(_params(tr.model))
    assert torch.equal(runs[0], runs[1])


def test_resume_continues_exactly(tmp_path):
    """N steps + checkpoint + N steps == 2N steps straight (weights, EMA, optimiser)."""
    data = _data()
    batches = TensorBatches(data, batch_size=4, seed=3)
    straight = _trainer()
    for step in range(6):
        straight.train_step(batches.batch(step))

    first = _trainer()
    for step in range(3):
        first.train_step(batches.batch(step))
    path = save_checkpoint(first.state_dict(), tmp_path / "last.pt")
    torch.manual_seed(12345)  # whatever happens in between must not matter
    resumed = _trainer()
    resumed.load_state_dict(load_checkpoint(path))
    for step in range(resumed.step, 6):
        resumed.train_step(batches.batch(step))

    for key, value in straight.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key
    assert torch.equal(_params(straight.ema_generator), _params(resumed.ema_generator))


def test_non_finite_loss_stops_with_clear_message():
    tr = _trainer()
    bad = _data()[:4]
    bad[0, 0, 0, 0] = float("nan")
    before = _params(tr.model)
    with pytest.raises(TrainingDiverged, match="became nan at step 0"):
        tr.train_step(bad)
    assert torch.equal(before, _params(tr.model)), "weights must not be touched by a diverged step"


def test_kl_warmup_ramps_beta():
    tr = _trainer(extra=["loss.kl_warmup_steps=10", "loss.beta_kl=2.0"])
    assert tr.beta() == 0.0
    tr.step = 5
    assert tr.beta() == 1.0
    tr.step = 50
    assert tr.beta() == 2.0


def test_equilibrium_gating_skips_discriminator_update():
    tr = _trainer(extra=["loss.d_gate_loss=1000.0"])
    before = _params(tr.model.discriminator)
    logs = tr.train_step(_data()[:4])
    assert logs["d/skipped"] == 1.0
    # spectral-norm power iteration buffers may move; the trained weights must not
    after = torch.cat([p.detach().flatten() for p in tr.model.discriminator.parameters()])
    assert torch.equal(before, after)


def test_batches_are_a_function_of_step():
    data = torch.arange(20.0).view(20, 1, 1, 1)
    a = TensorBatches(data, batch_size=4, seed=1)
    b = TensorBatches(data, batch_size=4, seed=1)
    assert torch.equal(a.batch(7), b.batch(7))
    epoch0 = torch.cat([a.batch(s) for s in range(5)]).flatten().sort().values
    assert torch.equal(epoch0, torch.arange(20.0)), "an epoch visits every image once"
    assert not torch.equal(a.batch(0), a.batch(5)), "each epoch is a new permutation"

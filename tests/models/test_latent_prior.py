"""The ex-post latent prior: a mixture fitted to training codes, carried by the generator, used by every sampler."""

from __future__ import annotations

import pytest
import torch

from pancreas_gvae.config import load_config
from pancreas_gvae.errors import PipelineError
from pancreas_gvae.models.latent_prior import (COVARIANCES, LatentPrior, draw_codes, encode_codes, prior_codes,
                                               prior_label, with_prior)
from pancreas_gvae.models.networks import Generator
from pancreas_gvae.synthesis.generator import generator_from_checkpoint
from pancreas_gvae.synthesis.slices import prior_batches
from pancreas_gvae.training.batches import DatasetBatches, TensorBatches
from pancreas_gvae.training.checkpoint import load_checkpoint
from pancreas_gvae.training.run import train_run

D = 64


def _two_clusters(n=200):
    g = torch.Generator().manual_seed(0)
    mu = torch.cat([torch.randn(n, D, generator=g) * 0.1 + 2.0, torch.randn(n, D, generator=g) * 0.1 - 2.0])
    return mu, torch.full_like(mu, -6.0)  # posterior variance e^-6 ~ 0.0025


def test_mixture_finds_the_clusters_of_the_codes_and_samples_between_nothing():
    mu, logvar = _two_clusters()
    prior = LatentPrior(D, 2).fit(mu, logvar)
    z = prior.sample(2000, seed=0)
    side = z.mean(1) > 0
    assert 0.45 < side.float().mean() < 0.55  # equal weights
    assert (z.mean(1).abs() > 1.5).all()  # no code lands in the empty middle, where N(0, I) draws would
    within = z[side].std(0).mean()  # spread: the cluster's own (0.1) with the posterior's (0.05) added
    assert 0.09 < within < 0.14, within
    assert (prior_codes(2000, D, 0).mean(1).abs() < 1.0).all()  # the standard prior's draws sit in the middle


def test_sample_i_depends_only_on_seed_and_i():
    prior = LatentPrior(D, 2).fit(*_two_clusters())
    assert torch.equal(prior.sample(10, seed=3), prior.sample(50, seed=3)[:10])
    assert not torch.equal(prior.sample(10, seed=3), prior.sample(10, seed=4))


def test_an_unfitted_prior_or_too_few_codes_are_refused():
    with pytest.raises(PipelineError, match="not been fitted"):  # one line from the CLIs, no traceback
        LatentPrior(D, 2).sample(4, seed=0)
    with pytest.raises(ValueError, match="1 code"):
        LatentPrior(D, 2).fit(torch.zeros(1, D), torch.zeros(1, D))


def test_few_codes_fit_fewer_components_and_never_sample_the_empty_ones():
    mu, logvar = _two_clusters(n=12)  # 24 codes: one component of 16 or more
    prior = LatentPrior(D, 4).fit(mu, logvar)
    assert prior.used_components == 1
    z = prior.sample(500, seed=0)
    assert torch.isfinite(z).all() and (z.mean(0).abs() < 0.5).all()  # the single Gaussian over both clusters
    assert LatentPrior(D, 4).fit(*_two_clusters(n=3)).used_components == 1  # 6 codes: still one Gaussian


def test_every_covariance_type_fits_and_samples_its_own_shape():
    mu, logvar = _two_clusters()
    mu[:, 0] *= 20  # one direction much wider than the rest: a spherical component cannot follow it
    for covariance in COVARIANCES:
        prior = LatentPrior(D, 2).fit(mu, logvar, covariance=covariance)
        cov = prior.scale_tril @ prior.scale_tril.transpose(1, 2)
        off = cov - torch.diag_embed(torch.diagonal(cov, dim1=1, dim2=2))
        assert (off.abs().max() < 1e-6) == (covariance in ("diag", "spherical")), covariance
        assert torch.allclose(cov[0], cov[1]) == (covariance == "tied"), covariance
        z = prior.sample(4000, seed=0)
        assert torch.isfinite(z).all() and (z.mean(1).abs() > 1.0).all(), covariance  # still two clusters
        wide = z[z.mean(1) > 0][:, 0].std() / z[z.mean(1) > 0][:, 1:].std(0).mean()
        assert (wide > 5) == (covariance != "spherical"), (covariance, wide)
    with pytest.raises(ValueError, match="covariance 'banded'"):
        LatentPrior(D, 2).fit(mu, logvar, covariance="banded")


def test_with_prior_copies_the_generator_and_leaves_the_original_alone():
    g = Generator(spatial_dims=2, out_channels=1, image_size=16, channels=[4, 8], latent_dim=D)
    twin = with_prior(g, _two_clusters(), 2, covariance="diag", seed=0)
    assert g.prior is None and twin.prior.is_fitted and twin.prior.used_components == 2
    assert torch.equal(draw_codes(g, 8, D, seed=1), prior_codes(8, D, 1))
    assert not torch.equal(draw_codes(twin, 8, D, seed=1), prior_codes(8, D, 1))
    for (name, a), b in zip(g.state_dict().items(), twin.state_dict().values()):  # same weights
        assert torch.equal(a, b), name
    back = with_prior(twin, _two_clusters(), 0)
    assert back.prior is None and twin.prior is not None
    assert torch.equal(draw_codes(back, 8, D, seed=1), prior_codes(8, D, 1))
    assert [prior_label(0), prior_label(8), prior_label(8, "diag")] == ["N(0,I)", "gmm8", "gmm8-diag"]


def test_encode_codes_batches_in_eval_mode_and_restores_training():
    from pancreas_gvae.models.networks import Encoder

    enc = Encoder(spatial_dims=2, in_channels=1, image_size=16, channels=[4, 8], latent_dim=D)
    enc.train()
    x = torch.rand(10, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    mu, logvar = encode_codes(enc, x, batch_size=3)
    assert enc.training and mu.shape == logvar.shape == (10, D)
    enc.eval()
    with torch.no_grad():
        ref = enc(x)
    assert torch.allclose(mu, ref[0], atol=1e-5) and torch.allclose(logvar, ref[1], atol=1e-5)


def test_samplers_use_the_generators_prior_and_n01_without_one():
    plain = Generator(spatial_dims=2, out_channels=2, image_size=16, channels=[4, 8], latent_dim=D)
    assert torch.equal(draw_codes(plain, 8, D, seed=1), prior_codes(8, D, 1))
    fitted = Generator(spatial_dims=2, out_channels=2, image_size=16, channels=[4, 8], latent_dim=D,
                       prior_components=2)
    fitted.prior.fit(*_two_clusters())
    [(z, _)] = list(prior_batches(fitted, 8, latent_dim=D, seed=1))
    assert torch.equal(z, fitted.prior.sample(8, seed=1))


def test_a_gan_keeps_n01_under_the_same_setting():
    from pancreas_gvae.models import build_model

    for kind, has_prior in (("gan", False), ("vae", True), ("gvae", True)):
        cfg = load_config(overrides=[f"model.kind={kind}", "model.latent_prior_components=2"])
        assert (build_model(cfg.model).generator.prior is not None) == has_prior, kind
    with pytest.raises(PipelineError, match="latent_prior_components"):
        load_config(overrides=["model.latent_prior_components=-1"])


TINY = ["model.image_size=16", "model.channels=[4,8]", "model.latent_dim=4", "train.batch_size=4",
        "train.log_every=1", "train.sample_every=3", "train.checkpoint_every=2", "train.num_samples=4",
        "tracking.log_model=false", "tracking.system_metrics=false"]


def test_training_refits_the_prior_into_the_shipped_generator_and_checkpoint(tmp_path):
    cfg = load_config(overrides=TINY + ["train.steps=4", "model.latent_prior_components=2",
                                        f"tracking.tracking_uri=sqlite:///{tmp_path / 'm.db'}"])
    data = torch.rand(64, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    result = train_run(cfg, TensorBatches(data, batch_size=4, seed=0), data[:4], out_dir=tmp_path / "out",
                       run_name="prior", progress=False)
    ema_prior = result.trainer.ema_generator.prior
    assert ema_prior.is_fitted
    for name, value in result.trainer.model.generator.prior.state_dict().items():
        assert torch.equal(value, ema_prior.state_dict()[name]), name
    # the prior is the one fitted to the final weights' codes
    with torch.no_grad():
        model = result.trainer.model.eval()
        mu, logvar = model.encoder(data)
    expected = LatentPrior(4, 2).fit(mu, logvar, seed=0)
    assert torch.allclose(expected.means, ema_prior.means, atol=1e-5)
    state = load_checkpoint(result.checkpoint)
    assert int(state["ema"]["module.prior.fitted"]) == 1
    generator, _ = generator_from_checkpoint(result.checkpoint)  # strict load: the buffers are part of G
    assert torch.equal(generator.prior.sample(5, seed=0), ema_prior.sample(5, seed=0))


def test_ct_fit_sample_leaves_the_batches_unchanged(tmp_path):
    phantom = pytest.importorskip("pancreas_gvae.data.ct.phantom")
    from pancreas_gvae.data.ct.prepare import prepare_dataset
    from pancreas_gvae.training.ct import batch_to_input, batch_with_label_flags
    from pancreas_gvae.transforms.slice_dataset import CTSliceDataset

    phantom.make_phantom_cohort(tmp_path / "tcia", cases=2, size=48, slices=16)
    df = prepare_dataset(tmp_path / "tcia", tmp_path / "prepared", progress=False)

    def batches():
        ds = CTSliceDataset(tmp_path / "prepared", df, size=32, pos_fraction=0.5, fit="crop", seed=0)
        return DatasetBatches(ds, batch_size=4, to_tensor=batch_to_input)

    plain = batches()
    expected = [plain.batch(s) for s in range(6)]
    mixed = batches()
    seen = [mixed.batch(0), mixed.batch(1)]
    sample = mixed.fit_sample(8, seed=0)
    seen += [mixed.batch(s) for s in range(2, 6)]
    assert sample.shape == (8, 2, 32, 32)
    for a, b in zip(expected, seen):
        assert torch.equal(a, b)
    # semi-supervised: the prior is fitted to the slices whose mask is known
    semi = CTSliceDataset(tmp_path / "prepared", df, size=32, pos_fraction=0.5, fit="crop", seed=0,
                          withhold_labels=[df["case_id"].iloc[1]])
    labelled = DatasetBatches(semi, batch_size=4, to_tensor=batch_with_label_flags).fit_sample(1000, seed=0)
    assert labelled.shape[0] == 16 and len(semi.slices) == 32

"""Issue 5: train GVAE, VAE and GAN with one budget and score them on held-out data (tables: ``tables.py``).

The metric definitions are those of ``/work/shared/GVAE.md`` as implemented in
:mod:`pancreas_gvae.evaluation.metrics`; this module only decides *what* each metric is computed on:

- **Held-out data.** MNIST / Fashion-MNIST: the test split of :func:`pancreas_gvae.data.mnist.load_dataset`;
  a seeded permutation (seed 0, the same for every model and seed) gives ``n_eval`` evaluation images and
  ``n_val`` disjoint validation images (only for the Parzen bandwidth). CT: an external cohort
  (``--test-data-root``: train on one cohort, score on another) or the prepared cases split **by case**
  (never by slice); held-out slices are drawn, each at most once, with the training draw's pancreas share
  (``sampling.pos_fraction``), so models are scored against the distribution they were trained on.
- **Samples** come from the trainer's EMA generator (``Trainer.ema_generator``, the sampling network of
  the project), ``sigmoid(G(z))``, ``z`` from the generator's prior (``N(0, I)``, or the mixture fitted to training
  codes when ``model.latent_prior_components`` > 0) seeded by the run seed: ``n_samples`` of them (default
  2,000, at least as many as evaluation images), so FD/KID and precision/recall rest on enough samples.
  KID averages 100 subsets of half the smaller set (at most 1,000), so its spread (``kid_feature_sd``) is real.
- **The mask channel (CT).** Share of samples with a pancreas mask against the held-out share, shape
  realism (area, solidity, eccentricity, components: normalised 1-D Wasserstein distances and their mean)
  and intensity under the mask (:mod:`pancreas_gvae.evaluation.metrics.masks`); **label fidelity**: a UNet trained on
  the training cases' real slices predicts on the synthetic images, Dice against the synthetic masks;
  **TSTR**: the same UNet recipe trained on synthetic pairs only, Dice on the held-out real slices, next to
  the real-trained one (:mod:`pancreas_gvae.segmentation.unet`).
- **Encoder metrics** (reconstruction, ELBO, KL, IWAE) use the live encoder and generator in ``eval()``
  mode (the pair that was trained together); reconstructions decode the posterior mean. The **prior gap**
  (``prior_gap_kl_nats``, with ``agg_posterior_var``) compares a Gaussian fitted to the codes of the
  *training* images (the memorisation reference set) with N(0, I): where it is large, prior samples decode
  from regions the decoder rarely saw in training (:func:`pancreas_gvae.evaluation.metrics.aggregate_posterior`).
- **Image metrics on CT** (pixel MMD, SSIM, MS-SSIM, MSE/L1 in HU, Parzen, memorisation, features) use
  the CT channel only; the pancreas-mask channel enters the likelihood metrics (ELBO, IWAE) only.
- **Likelihoods.** MNIST / Fashion: Bernoulli decoder on binarised held-out images (stochastic
  binarisation, seed 0), so IWAE and ELBO are log-likelihood bounds in nats per image. CT: Gaussian decoder
  with fixed sigma (``loss.gaussian_sigma``) on all channels: a density on continuous pixels, only
  comparable between models at the same sigma. Parzen-window log-likelihood (pixels, bandwidth chosen on
  the validation images) is computed for **every** model from its samples, so that one likelihood-like
  column exists for the GAN; its known weakness is in :mod:`pancreas_gvae.evaluation.metrics.likelihood`.
- **Feature space.** MNIST / Fashion: the in-project :class:`~pancreas_gvae.evaluation.metrics.SmallClassifier`
  trained on the training split (its features for MMD/FID/KID/precision/recall, its logits for mode
  coverage). CT: the in-project :class:`~pancreas_gvae.evaluation.metrics.SliceAutoencoder` trained on the
  training cases' slices (CT channel). One network per dataset invocation, shared by every model and
  seed; values are relative, comparable only under that network.

Metrics that do not apply (ELBO, KL, IWAE, reconstruction for the GAN; mode coverage on CT) are left
blank (NaN in memory, empty in the CSV), never zero.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

import torch

from pancreas_gvae.evaluation import metrics as M
from pancreas_gvae.synthesis.slices import generate


class MetricSpec(NamedTuple):
    column: str
    higher_is_better: bool
    label: str
    encoder_only: bool = False


# Column order of results.csv; direction used for "best" in results.md.
METRICS: tuple[MetricSpec, ...] = (
    MetricSpec("mmd2_pixel", False, "MMD² pixel"),
    MetricSpec("mmd2_feature", False, "MMD² feature"),
    MetricSpec("recon_ssim", True, "recon SSIM", True),
    MetricSpec("diversity_ms_ssim", False, "MS-SSIM among samples (diversity)"),
    MetricSpec("loglik_iwae_nats", True, "log-lik IWAE (nats)", True),
    MetricSpec("loglik_parzen_nats", True, "log-lik Parzen (nats)"),
    MetricSpec("recon_mse", False, "recon MSE", True),
    MetricSpec("recon_l1", False, "recon L1", True),
    MetricSpec("elbo_nats", True, "ELBO (nats)", True),
    MetricSpec("kl_nats", False, "KL (nats)", True),
    MetricSpec("prior_gap_kl_nats", False, "KL(aggregate posterior of training slices ‖ N(0,I)) (nats)", True),
    MetricSpec("fid_feature", False, "Fréchet distance (features)"),
    MetricSpec("kid_feature", False, "kernel distance (features)"),
    # Held-out reconstructions against the held-out slices: what decoding codes of real slices can give at best,
    # so the floor for any prior fitted to those codes (models/latent_prior.py), next to fid_feature.
    MetricSpec("fid_recon_feature", False, "Fréchet distance of held-out reconstructions (features)", True),
    MetricSpec("precision", True, "precision"),
    MetricSpec("recall", True, "recall"),
    MetricSpec("modes_covered", True, "modes covered (of 10)"),
    MetricSpec("mode_kl_to_real", False, "KL(sample classes ‖ real classes)"),
    MetricSpec("memo_near_copy_frac", False, "near-copy fraction"),
    MetricSpec("memo_median_nn_ratio", True, "median NN-distance ratio"),
    MetricSpec("kid_feature_sd", False, "KID sd over subsets"),
    MetricSpec("mask_share_gap", False, "|share of samples with a mask - real share|"),
    MetricSpec("mask_shape_score", False, "mask shape distance (mean of normalised W1)"),
    MetricSpec("mask_intensity_w1", False, "intensity under mask, W1"),
    MetricSpec("fidelity_dice", True, "label fidelity Dice"),
    MetricSpec("tstr_dice", True, "TSTR Dice (synthetic-trained UNet on real)"),
    MetricSpec("tstr_ratio", True, "TSTR / real-trained Dice"),
)
# Filled from pancreas_gvae.evaluation.metrics.masks / segmentation results (their keys -> our columns).
MASK_COLUMNS = {"mask/shape_score": "mask_shape_score", "mask/intensity_w1": "mask_intensity_w1"}
METRIC_COLUMNS = [m.column for m in METRICS]
ID_COLUMNS = ["dataset", "model", "seed"]
INFO_COLUMNS = ["steps", "batch_size", "settings", "n_eval", "n_samples", "mask_share_fake", "mask_share_real",
                "real_dice", "iwae_k", "agg_posterior_var",
                "likelihood", "recon_units",
                "feature_net", "run_id", "train_seconds", "train_seconds_cum", "eval_seconds"]
COLUMNS = ID_COLUMNS + METRIC_COLUMNS + INFO_COLUMNS


@dataclass
class SegmentationRefs:
    """The real-trained segmenter and real slices for label fidelity and TSTR (CT with a mask channel)."""

    segmenter: torch.nn.Module
    real_train: object  # segmentation.SliceSet of the training cases
    real_test: object  # segmentation.SliceSet of the held-out cases
    steps: int
    pixel_mm: float
    real_dice: float  # the segmenter's Dice on real_test: TSTR's reference
    augment: bool = False  # segmentation.ClassicAugmentation in the segmenter's and TSTR's training


@dataclass
class EvalData:
    """Everything a model is evaluated against; the same object for every model and seed of a dataset."""

    dataset: str
    test: torch.Tensor  # (n_eval, C, H, W) held-out, [0, 1]
    val: torch.Tensor  # disjoint held-out images for the Parzen bandwidth
    memo_train: torch.Tensor  # training images for the memorisation check
    feature_fn: Callable[[torch.Tensor], torch.Tensor]  # image channel(s) -> (B, F)
    feature_net: str  # description for the table
    logits_fn: Callable[[torch.Tensor], torch.Tensor] | None = None  # mode coverage (labelled data)
    num_classes: int = 0
    image_channels: slice = field(default_factory=lambda: slice(None))  # CT: slice(0, 1)
    window: tuple[float, float] | None = None  # HU window for reconstruction errors (CT)
    likelihood: str = "bernoulli"  # bernoulli (binarised images) | gaussian
    sigma: float = 0.1
    n_samples: int = 0  # prior samples per model (0: as many as test images)
    mask_channels: int = 0  # CT: 1, the trailing pancreas mask channel
    segmentation: SegmentationRefs | None = None
    notes: dict[str, str] = field(default_factory=dict)

    @property
    def sample_count(self) -> int:
        """Prior samples drawn per model: ``n_samples``, at least as many as test images."""
        return max(self.n_samples, self.test.shape[0])

    def img(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, self.image_channels]


@torch.no_grad()
def _batched(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    return torch.cat([fn(x[i:i + batch_size]) for i in range(0, x.shape[0], batch_size)])


def generate_samples(generator: torch.nn.Module, n: int, latent_dim: int, *, seed: int,
                     device: torch.device | str = "cpu", batch_size: int = 500) -> torch.Tensor:
    """``sigmoid(G(z))`` for ``n`` prior draws (:func:`~pancreas_gvae.synthesis.slices.generate`), on the CPU.

    The evaluation draws from its own seed stream, ``seed * 7919 + 17``, so its samples are not the training
    job's previews; the generator's train/eval mode is left as it was.
    """
    was_training = generator.training
    try:
        return generate(generator, n, latent_dim=latent_dim, seed=int(seed) * 7919 + 17, device=device,
                        batch_size=batch_size)
    finally:
        generator.train(was_training)


def _mean(t: torch.Tensor) -> float:
    return float(t.double().mean())


def evaluate_model(model, ema_generator: torch.nn.Module, data: EvalData, *, latent_dim: int, seed: int,
                   iwae_k: int = 100, device: torch.device | str = "cpu") -> dict[str, float]:
    """All metric columns for one trained model (NaN where a metric does not apply)."""
    row = {c: math.nan for c in METRIC_COLUMNS}
    test, n = data.test, data.test.shape[0]
    n_fake = data.sample_count
    samples = generate_samples(ema_generator, n_fake, latent_dim, seed=seed, device=device)
    ti, si = data.img(test), data.img(samples)

    # Sample quality and diversity (every model).
    row["mmd2_pixel"] = float(M.mmd2_gaussian(ti, si, seed=0))
    f_real = M.extract_features(data.feature_fn, ti)
    f_fake = M.extract_features(data.feature_fn, si)
    row["mmd2_feature"] = float(M.mmd2_gaussian(f_real, f_fake, seed=0))
    row["fid_feature"] = M.frechet_distance_features(f_real, f_fake)
    kid = M.kernel_distance(f_real, f_fake, n_subsets=100, subset_size=max(2, min(1000, n // 2, n_fake // 2)), seed=0)
    row["kid_feature"], row["kid_feature_sd"] = kid.mean, kid.std
    pr = M.precision_recall(f_real, f_fake, k=3)
    row["precision"], row["recall"] = pr.precision, pr.recall
    row["diversity_ms_ssim"] = _mean(M.ms_ssim_diversity(si, n_pairs=min(1000, n_fake * (n_fake - 1) // 2), seed=0))
    if data.mask_channels:
        row.update(mask_columns(test, samples, data, seed=seed))
    if data.logits_fn is not None:
        ref = M.class_histogram(M.extract_features(data.logits_fn, ti), data.num_classes)
        mc = M.mode_coverage(M.extract_features(data.logits_fn, si), num_classes=data.num_classes, reference=ref)
        row["modes_covered"], row["mode_kl_to_real"] = float(mc.n_covered), float(mc.kl_to_reference)
    memo = M.memorisation_check(si, data.img(data.memo_train), heldout=ti, seed=0)
    row["memo_near_copy_frac"] = _mean(memo.near_copy.float())
    row["memo_median_nn_ratio"] = float(memo.pixel.ratios.median())
    parzen = M.parzen_estimate(ti, data.img(data.val), si)
    row["loglik_parzen_nats"] = _mean(parzen.log_likelihood)

    # Encoder metrics (GVAE, VAE).
    if getattr(model, "encoder", None) is not None:
        was_training = model.training
        model.eval()
        with torch.no_grad():
            def encode(x):
                mu, logvar = model.encode(x.to(device))
                return mu.float().cpu(), logvar.float().cpu()

            if data.likelihood == "bernoulli":
                x_lik = M.binarize(test, seed=0)
                decode = lambda z: model.decode_logits(z.to(device)).float().cpu()  # noqa: E731
            else:
                x_lik = test
                decode = lambda z: model.decode(z.to(device)).float().cpu()  # noqa: E731
            recon = _batched(lambda x: model.reconstruct(x.to(device)).float().cpu(), test)
            ri = data.img(recon)
            row["fid_recon_feature"] = M.frechet_distance_features(f_real, M.extract_features(data.feature_fn, ri))
            row["recon_ssim"] = _mean(M.reconstruction_ssim(ti, ri))
            err = M.reconstruction_error(ti, ri, window=data.window)
            row["recon_mse"], row["recon_l1"] = _mean(err.mse), _mean(err.l1)
            terms = M.elbo(x_lik, encode, decode, likelihood=data.likelihood, sigma=data.sigma, seed=0)
            row["elbo_nats"], row["kl_nats"] = _mean(terms.elbo), _mean(terms.kl)
            gap = M.aggregate_posterior(data.memo_train, encode)
            row["prior_gap_kl_nats"], row["agg_posterior_var"] = gap.kl_nats, gap.variance
            row["loglik_iwae_nats"] = _mean(M.iwae_bound(x_lik, encode, decode, k=iwae_k,
                                                          likelihood=data.likelihood, sigma=data.sigma, seed=0))
        model.train(was_training)
    return row


def mask_columns(test: torch.Tensor, samples: torch.Tensor, data: EvalData, *, seed: int) -> dict[str, float]:
    """Mask realism, label fidelity and TSTR of ``samples`` (CT image + mask) against the held-out slices."""
    from pancreas_gvae.segmentation import scoring
    from pancreas_gvae.segmentation import unet as S

    k = data.mask_channels
    real_img, real_mask = test[:, :1], (test[:, -k:][:, :1] > 0.5).float()
    fake_img, fake_mask = samples[:, :1], (samples[:, -k:][:, :1] > 0.5).float()
    scores = M.mask_scores(real_img, real_mask, fake_img, fake_mask)
    out = {col: scores.get(key, math.nan) for key, col in MASK_COLUMNS.items()}
    out["mask_share_fake"] = scores.get("mask/share_fake", math.nan)
    out["mask_share_real"] = scores.get("mask/share_real", math.nan)
    refs = data.segmentation
    if refs is not None:
        synthetic = S.SliceSet(fake_img.contiguous(), fake_mask.contiguous(), ["synthetic"] * len(samples))
        out["fidelity_dice"] = scoring.label_fidelity(refs.segmenter, synthetic, pixel_mm=refs.pixel_mm)["fidelity/dice"]
        tstr = scoring.tstr(synthetic, refs.real_train, refs.real_test, steps=refs.steps, batch_size=16, seed=seed,
                      pixel_mm=refs.pixel_mm, real_model=refs.segmenter, augment=refs.augment)
        out["tstr_dice"], out["tstr_ratio"] = tstr["tstr/dice_synthetic"], tstr["tstr/ratio"]
        out["real_dice"] = refs.real_dice
    return out

"""Issue 5: train GVAE, VAE and GAN with one budget, evaluate them on held-out data, tabulate.

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
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import pandas as pd
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
INFO_COLUMNS = ["steps", "batch_size", "n_eval", "n_samples", "mask_share_fake", "mask_share_real", "real_dice",
                "iwae_k", "agg_posterior_var",
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


# --------------------------------------------------------------------------- tables


def results_frame(rows: list[dict]) -> pd.DataFrame:
    """Rows as a frame with every column of :data:`COLUMNS` (missing metrics NaN)."""
    frame = pd.DataFrame(rows)
    if {"mask_share_fake", "mask_share_real"} <= set(frame.columns):  # the gap is derived, never stored alone
        frame["mask_share_gap"] = (frame["mask_share_fake"] - frame["mask_share_real"]).abs()
    for c in COLUMNS:
        if c not in frame.columns:
            frame[c] = math.nan
    extra = [c for c in frame.columns if c not in COLUMNS]
    return frame[COLUMNS + extra]


def summarise(frame: pd.DataFrame) -> pd.DataFrame:
    """Mean, sd and n per (dataset, model) for every metric column; NaN cells are not counted. Rows of
    several training budgets (a ``steps`` column with more than one value) are summarised per budget, the
    budget named in ``dataset`` ("mnist, 2000 steps"), so every table compares models at equal steps."""
    out = []
    frame = frame.copy()
    if "steps" in frame.columns and frame["steps"].nunique() > 1:
        frame["dataset"] = [f"{d}, {int(n)} steps" for d, n in zip(frame["dataset"], frame["steps"])]
        frame = frame.sort_values(["dataset"], kind="stable", key=lambda c: c.map(_budget_order(frame)))
    for (dataset, model), g in frame.groupby(["dataset", "model"], sort=False):
        rec = {"dataset": dataset, "model": model, "seeds": len(g)}
        for c in METRIC_COLUMNS:
            v = pd.to_numeric(g[c], errors="coerce").dropna() if c in g else pd.Series(dtype=float)
            rec[f"{c}:mean"] = float(v.mean()) if len(v) else math.nan
            rec[f"{c}:sd"] = float(v.std(ddof=1)) if len(v) > 1 else math.nan
            rec[f"{c}:n"] = int(len(v))
        out.append(rec)
    return pd.DataFrame(out)


def _budget_order(frame: pd.DataFrame) -> dict[str, tuple]:
    """Sort key of the per-budget table names: by dataset (first seen first), then by steps."""
    first = {d: i for i, d in enumerate(dict.fromkeys(n.rsplit(", ", 1)[0] for n in frame["dataset"]))}
    return {n: (first[n.rsplit(", ", 1)[0]], int(n.rsplit(", ", 1)[1].split()[0])) for n in frame["dataset"]}


def best_per_column(summary: pd.DataFrame) -> dict[tuple[str, str], set[str]]:
    """``{(dataset, column): {best model(s)}}`` by mean, in each metric's direction (ties all best)."""
    best: dict[tuple[str, str], set[str]] = {}
    for dataset, g in summary.groupby("dataset", sort=False):
        for spec in METRICS:
            means = g.set_index("model")[f"{spec.column}:mean"].dropna()
            if means.empty:
                continue
            target = means.max() if spec.higher_is_better else means.min()
            best[(dataset, spec.column)] = set(means[np.isclose(means, target, rtol=1e-12, atol=0)].index)
    return best


def _fmt(x: float) -> str:
    if x is None or not np.isfinite(x):
        return "inf" if x is not None and np.isinf(x) else ""
    a = abs(x)
    if a != 0 and (a >= 1e4 or a < 1e-3):
        return f"{x:.3g}"
    if a >= 100:
        return f"{x:.1f}"
    return f"{x:.4f}" if a < 1 else f"{x:.3f}"


def render_markdown(frame: pd.DataFrame, *, title: str = "Results", notes: list[str] | None = None,
                    columns: list[str] | None = None, runs: bool = False) -> str:
    """results.md: one table per dataset, rows = models, cells ``mean ± sd (n)``, best per column in bold;
    ``columns``: only these metric columns (default: every one with a value); ``runs``: then every run as a row
    (:func:`render_runs`)."""
    specs = _metric_specs(columns)
    summary = summarise(frame)
    best = best_per_column(summary)
    lines = [f"# {title}", ""]
    lines += ["Cells: mean ± sd over seeds (n = number of seeds with a value; sd blank for n = 1). "
              "**Bold**: best model in the column (by mean, in the stated direction). "
              "Blank: the metric does not apply to the model.", ""]
    lines += [f"- {n}" for n in (notes or [])]
    if notes:
        lines.append("")
    directions = ", ".join(f"{m.column} {'↑' if m.higher_is_better else '↓'}" for m in specs)
    lines += [f"Directions: {directions}.", ""]
    for dataset, g in summary.groupby("dataset", sort=False):
        cols = [m for m in specs if g[f"{m.column}:n"].sum() > 0]
        lines += [f"## {dataset}", ""]
        header = ["model", "seeds"] + [f"{m.column} {'↑' if m.higher_is_better else '↓'}" for m in cols]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "|".join(["---"] * len(header)) + "|")
        for _, r in g.iterrows():
            cells = [str(r["model"]), str(int(r["seeds"]))]
            for m in cols:
                n = int(r[f"{m.column}:n"])
                if n == 0:
                    cells.append("")
                    continue
                mean, sd = r[f"{m.column}:mean"], r[f"{m.column}:sd"]
                cell = _fmt(mean) + (f" ± {_fmt(sd)}" if n > 1 else "") + f" (n={n})"
                if r["model"] in best.get((dataset, m.column), set()):
                    cell = f"**{cell}**"
                cells.append(cell)
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    if runs:
        lines += [render_runs(frame, columns=columns), ""]
    return "\n".join(lines)


def _metric_specs(columns: list[str] | None) -> list[MetricSpec]:
    if columns is None:
        return list(METRICS)
    by_name = {m.column: m for m in METRICS}
    unknown = [c for c in columns if c not in by_name]
    if unknown:
        raise ValueError(f"unknown metric column(s) {unknown}; known: {', '.join(by_name)}")
    return [by_name[c] for c in columns]


def render_runs(frame: pd.DataFrame, *, columns: list[str] | None = None) -> str:
    """Every run as one row: model, seed, steps, cumulative training seconds and the metric columns (``columns``,
    default every one with a value), sorted by dataset and model (first seen first), seed and steps, so a learning
    curve and its seeds read down the table as they were measured."""
    specs = [m for m in _metric_specs(columns) if m.column in frame and frame[m.column].notna().any()]
    frame = frame.copy()
    for c in ("dataset", "model"):
        frame[f"_{c}_order"] = frame[c].map({v: i for i, v in enumerate(dict.fromkeys(frame[c]))})
    frame = frame.sort_values([c for c in ("_dataset_order", "_model_order", "seed", "steps") if c in frame],
                              kind="stable")
    ids = [c for c in ("dataset", "model", "seed", "steps", "train_seconds_cum") if c in frame]
    header = ids + [f"{m.column} {'↑' if m.higher_is_better else '↓'}" for m in specs]
    lines = ["## Every run", "", "| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    for _, r in frame.iterrows():
        cells = [str(r[c]) if c in ("dataset", "model") else
                 (f"{float(r[c]):.0f}" if pd.notna(r[c]) else "") for c in ids]
        cells += [_fmt(float(r[m.column])) for m in specs]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_curves(curves: dict[str, tuple[list[float], list[float]]], path: str | Path, *, xlabel: str, ylabel: str,
                title: str = "", styles: dict[str, dict] | None = None) -> Path:
    """One line per entry of ``curves`` (label -> (x, y)): a learning curve as PNG; ``styles`` gives matplotlib
    keywords per label (colour, marker)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.6))
    for label, (x, y) in curves.items():
        ax.plot(x, y, **{"marker": "o", **(styles or {}).get(label, {})}, markersize=3, label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path

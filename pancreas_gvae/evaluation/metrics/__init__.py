"""Evaluation metrics of GVAE.md: the article's six, and what the article lacks.

Pure, tensor-level functions, independent of the model classes (a model enters as callables:
``encode(x) -> (mu, logvar)``, ``decode(z) -> logits or mean``, ``feature_fn(x) -> (B, F)``).
Each module's docstring carries the mathematics and the caveats.

| metric (GVAE.md) | function | module |
|---|---|---|
| MMD, pixel / feature space | :func:`mmd2_gaussian`, :func:`mmd2_features` | :mod:`.mmd` |
| SSIM (reconstruction), MS-SSIM diversity | :func:`reconstruction_ssim`, :func:`ms_ssim_diversity` | :mod:`.ssim` |
| reconstruction error (MSE, L1; HU) | :func:`reconstruction_error`, :func:`to_data_units` | :mod:`.ssim` |
| log-likelihood: IWAE bound / Parzen (GAN) | :func:`iwae_bound`, :func:`parzen_estimate` | :mod:`.likelihood` |
| ELBO | :func:`elbo` | :mod:`.likelihood` |
| KL | :func:`encoder_kl`, :func:`kl_standard_normal` | :mod:`.likelihood` |
| Fréchet distance, kernel distance | :func:`frechet_distance_features`, :func:`kernel_distance` | :mod:`.fidelity` |
| precision / recall (k-NN manifolds) | :func:`precision_recall` | :mod:`.fidelity` |
| mode coverage | :func:`mode_coverage` | :mod:`.fidelity` |
| prior hole: KL of the aggregate posterior to N(0, I) | :func:`aggregate_posterior` | :mod:`.prior_gap` |
| memorisation | :func:`memorisation_check` | :mod:`.memorisation` |
| mask channel: share, shape, intensity under the mask | :func:`mask_scores`, :func:`mask_shape_distance` | :mod:`.masks` |
| feature networks (in-project) | :func:`train_classifier`, :func:`train_slice_autoencoder` | :mod:`.feature_nets` |
"""

from pancreas_gvae.evaluation.metrics.feature_nets import (
    SliceAutoencoder,
    SmallClassifier,
    accuracy,
    extract_features,
    train_classifier,
    train_slice_autoencoder,
)
from pancreas_gvae.evaluation.metrics.fidelity import (
    KernelDistance,
    ModeCoverage,
    PrecisionRecall,
    class_histogram,
    feature_statistics,
    frechet_distance,
    frechet_distance_features,
    kernel_distance,
    knn_radii,
    mode_coverage,
    precision_recall,
)
from pancreas_gvae.evaluation.metrics.likelihood import (
    ELBOTerms,
    ParzenResult,
    binarize,
    decoder_log_likelihood,
    elbo,
    encoder_kl,
    iwae_bound,
    kl_standard_normal,
    parzen_estimate,
    parzen_log_likelihood,
    select_parzen_bandwidth,
)
from pancreas_gvae.evaluation.metrics.masks import (
    SHAPE_FEATURES,
    intensity_under_mask_distance,
    mask_scores,
    mask_shape_distance,
    mask_shape_features,
    mask_share,
)
from pancreas_gvae.evaluation.metrics.memorisation import (
    MemorisationResult,
    MemorisationSpace,
    memorisation_check,
    nearest_neighbours,
)
from pancreas_gvae.evaluation.metrics.mmd import (
    DEFAULT_BANDWIDTH_FACTORS,
    gaussian_bandwidths,
    median_heuristic,
    mmd2_features,
    mmd2_gaussian,
    pairwise_sq_distances,
    subsample,
    unbiased_mmd2,
)
from pancreas_gvae.evaluation.metrics.prior_gap import AggregatePosterior, aggregate_posterior
from pancreas_gvae.evaluation.metrics.ssim import (
    MSSSIMSettings,
    ReconstructionError,
    ms_ssim_diversity,
    ms_ssim_settings,
    reconstruction_error,
    reconstruction_ssim,
    to_data_units,
)

__all__ = [
    "AggregatePosterior",
    "DEFAULT_BANDWIDTH_FACTORS",
    "ELBOTerms",
    "KernelDistance",
    "MSSSIMSettings",
    "MemorisationResult",
    "MemorisationSpace",
    "ModeCoverage",
    "ParzenResult",
    "PrecisionRecall",
    "ReconstructionError",
    "SHAPE_FEATURES",
    "SliceAutoencoder",
    "SmallClassifier",
    "accuracy",
    "aggregate_posterior",
    "binarize",
    "class_histogram",
    "decoder_log_likelihood",
    "elbo",
    "encoder_kl",
    "extract_features",
    "feature_statistics",
    "frechet_distance",
    "frechet_distance_features",
    "gaussian_bandwidths",
    "intensity_under_mask_distance",
    "iwae_bound",
    "kernel_distance",
    "kl_standard_normal",
    "knn_radii",
    "mask_scores",
    "mask_shape_distance",
    "mask_shape_features",
    "mask_share",
    "median_heuristic",
    "memorisation_check",
    "mmd2_features",
    "mmd2_gaussian",
    "mode_coverage",
    "ms_ssim_diversity",
    "ms_ssim_settings",
    "nearest_neighbours",
    "pairwise_sq_distances",
    "parzen_estimate",
    "parzen_log_likelihood",
    "precision_recall",
    "reconstruction_error",
    "reconstruction_ssim",
    "select_parzen_bandwidth",
    "subsample",
    "to_data_units",
    "train_classifier",
    "train_slice_autoencoder",
    "unbiased_mmd2",
]

"""Data-preparation settings for CT (``configs/data/default.yaml``), as dataclasses.

The defaults here equal the YAML file (a test keeps them in step), so library code can run without a file.
:func:`config_hash` fingerprints every setting that changes what goes into the cache; the cache of a case
is reused only when its stored hash matches.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pancreas_gvae.config import Config, read_yaml_mapping
from pancreas_gvae.errors import PipelineError

# Bump when the cache layout or the preprocessing code changes what it writes.
# 2: image-only cases (``has_label`` in meta.json, no label.npy), input intensity mapping.
CACHE_FORMAT_VERSION = 2

_DUPLICATE_NOTE = "duplicate of PANCREAS_0002 (same scan, cropped differently; removed in collection version 2)"

@dataclass
class LabelConfig:
    """Which label values mean "pancreas", per layout (``--pancreas-label`` overrides them)."""

    tcia: list[int] = field(default_factory=lambda: [1])
    msd: list[int] = field(default_factory=lambda: [1, 2])  # 1 pancreas + 2 tumour: both pancreas tissue
    folder: list[int] = field(default_factory=lambda: [1])
    require_label: bool = True  # a case without a label is excluded (missing_label); false: prepared image-only

@dataclass
class CheckConfig:
    """Thresholds of the per-case checks (reasons in :mod:`pancreas_gvae.data.ct.checks`)."""

    min_slices: int = 8
    slice_gap_tolerance: float = 0.1  # allowed relative deviation of a slice gap from the median interval
    max_tilt_degrees: float = 1.0  # slice stacking direction vs. slice normal, and GantryDetectorTilt
    max_oblique_degrees: float = 10.0  # "axial" = slice normal within this angle of the S-I axis
    extent_tolerance_mm: float = 2.0  # label and image must cover the same box in world space
    label_median_hu: list[float] = field(default_factory=lambda: [-30.0, 250.0])
    max_air_fraction: float = 0.02  # fraction of label voxels below -500 HU
    max_fat_fraction: float = 0.30  # fraction of label voxels below -50 HU
    min_label_voxels: int = 10
    hu_outlier_range: list[float] = field(default_factory=lambda: [-4096.0, 32767.0])  # voxels outside: noted

INTENSITY_KINDS = ("hu", "display")


@dataclass
class InputIntensityConfig:
    """What the stored voxel values of a cohort mean (``preprocess.input_intensity``), mapped before the checks.

    ``kind: hu``: Hounsfield units as stored (DICOM after its rescale; most NIfTI). ``kind: display``: display
    values, e.g. an 8-bit export: ``display_range`` [d0, d1] shows the HU ``window`` [lo, hi] (below lo is d0,
    above hi is d1); with a known window the values are mapped back to HU (clipped to the window) and the HU
    checks run on the window's terms; ``window: null`` (unknown) keeps the display values and skips the checks
    that need true HU (noted per case).
    """

    kind: str = "hu"
    window: list[float] | None = None  # display: the HU window the display values cover; null: unknown
    display_range: list[float] = field(default_factory=lambda: [0.0, 255.0])  # display: stored value of lo, hi

    @property
    def true_hu(self) -> bool:
        """Whether the values after the mapping are HU (possibly clipped to a window)."""
        return self.kind == "hu" or self.window is not None

    @property
    def hu_floor(self) -> float:
        """The lowest HU the data can hold (air is clipped to it); -inf for HU as stored."""
        return float(self.window[0]) if self.kind == "display" and self.window is not None else float("-inf")

    def describe(self) -> str:
        """The manifest's ``input_intensity``: ``hu``, ``display [-125, 275] HU as 0..255``, ``display (unknown
        window) 0..255``."""
        if self.kind == "hu":
            return "hu"
        d0, d1 = self.display_range
        if self.window is None:
            return f"display (unknown window) {d0:g}..{d1:g}"
        return f"display [{self.window[0]:g}, {self.window[1]:g}] HU as {d0:g}..{d1:g}"


@dataclass
class PreprocessConfig:
    """The deterministic chain (cached): input intensity, orientation, body crop, spacing, HU window."""

    input_intensity: InputIntensityConfig = field(default_factory=InputIntensityConfig)
    orientation: str = "RAS"
    spacing: list[float | None] = field(default_factory=lambda: [1.0, 1.0, None])  # mm; None keeps the source
    hu_window: list[float] = field(default_factory=lambda: [-125.0, 275.0])  # -> [0, 1], clipped
    body_threshold_hu: float = -500.0  # CropForegroundd keeps the box of voxels above this
    body_margin: int = 4  # voxels around the body box
    cache_dtype: str = "float16"  # image dtype on disk: float16 | float32

@dataclass
class SamplingConfig:
    """The random part, run per epoch on the cache (see transforms/slice_dataset.py)."""

    slice_size: int = 128
    fit: str = "resize"  # resize: a fov_mm square resized to slice_size | crop: slice_size patch at cache resolution
    fov_mm: float | None = 400.0  # resize: same mm per pixel for every case; None fits each whole slice
    # resize: where the fov_mm square sits. image: the slice centre. pancreas: the slice's pancreas centroid
    # (slices without pancreas: the case's; image-only cases: the slice centre), moved by a seeded uniform
    # offset of up to centre_jitter_mm per axis: a localised view that resolves the pancreas (see docs/data.md).
    centre: str = "image"
    centre_jitter_mm: float = 0.0
    context_slices: int = 0  # 2.5D: this many neighbours on each side as extra channels
    pos_fraction: float | None = 0.5  # fraction of samples with pancreas; None: every slice once
    samples_per_epoch: int | None = None  # None: number of slices in the selected cases
    patch_size: list[int] = field(default_factory=lambda: [16, 96, 96])  # (slices, rows, cols) for 3D patches
    patch_pos: float = 1.0
    patch_neg: float = 1.0
    patch_num_samples: int = 4

SLICE_SET_PATTERN = r"^(.*?)[-_](\d+)$"


@dataclass
class SliceSetConfig:
    """The 2D slice-set layout (``--layout slices``): a folder of 2D images + masks, one case per patient.

    The defaults fit the NIH Pancreas-CT 2D set (``images/<patient>-<index>.jpg``, ``masks/<same>.png``,
    ``manifest.csv`` with ``slice, patient, source_index``). A slice set stores no spacing: ``pixel_mm`` is an
    assumption (NIH in-plane spacing is 0.66-0.98 mm) and the slice axis gets a nominal 1 mm.
    """

    images: str = "images"  # folder of 2D images (PNG, JPEG, .npy), relative to the data root
    masks: str = "masks"  # folder of masks with the images' stems (PNG, .npy); --labels overrides it
    manifest: str | None = "manifest.csv"  # optional CSV, one row per slice; absent: patient_pattern on the stem
    patient_column: str = "patient"
    slice_column: str = "slice"  # the slice's file stem
    order_column: str | None = "source_index"  # slice order within a patient; null or absent: by name
    image_column: str = "image"  # optional manifest columns with image / mask paths relative to the data root
    mask_column: str = "mask"
    patient_pattern: str = SLICE_SET_PATTERN  # without a manifest: group 1 of this regex on the stem = patient
    pixel_mm: float = 0.8  # assumed in-plane pixel size (mm): none is stored in such sets
    mask_values: list[int] | None = None  # null: any nonzero mask value is pancreas; else these values
    rows_towards: str = "posterior"  # image rows run towards: posterior (radiological display) | anterior (flipped)


@dataclass
class DataConfig:
    labels: LabelConfig = field(default_factory=LabelConfig)
    exclude_cases: dict[str, str] = field(
        default_factory=lambda: {"PANCREAS_0025": _DUPLICATE_NOTE, "PANCREAS_0070": _DUPLICATE_NOTE}
    )
    checks: CheckConfig = field(default_factory=CheckConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    slice_set: SliceSetConfig = field(default_factory=SliceSetConfig)

    def pancreas_values(self, layout: str, override: int | list[int] | None = None) -> list[int]:
        """Label values mapped to pancreas for ``layout``; ``override`` (the CLI flag) wins.

        ``slices``: the slice-set reader maps each mask to 0/1 itself (``slice_set.mask_values``, which the
        flag replaces), so the chain sees 1 = pancreas.
        """
        if override is not None:
            values = [override] if isinstance(override, int) else list(override)
        elif layout == "slices":
            values = [1]
        else:
            values = list(getattr(self.labels, layout))
        if not values or any(int(v) <= 0 for v in values):
            raise PipelineError(f"pancreas label values must be positive integers, got {values}")
        return sorted({int(v) for v in values})

def _build(cls, data: dict[str, Any], where: str):
    """Dataclass ``cls`` from a dict, naming unknown keys instead of ignoring them."""
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(data) - set(known)
    if unknown:
        raise PipelineError(f"unknown data config key(s) in {where}: {', '.join(sorted(unknown))}")
    kwargs = {}
    for name, value in data.items():
        sub = known[name].default_factory if known[name].default_factory is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(sub) and isinstance(value, dict):
            kwargs[name] = _build(sub, value, f"{where}.{name}")
        else:
            kwargs[name] = value
    return cls(**kwargs)

def load_data_config(path: str | Path | None = None) -> DataConfig:
    """Read a data config YAML (missing keys keep their defaults); ``None`` gives the defaults."""
    if path is None:
        return DataConfig()
    return data_config_from_dict(read_yaml_mapping(path, "data config"), where=Path(path).name)

def data_config_from_dict(data: dict[str, Any], *, where: str = "data config") -> DataConfig:
    """A validated :class:`DataConfig` from a mapping (e.g. the ``data.ct`` section of a training config)."""
    cfg = _build(DataConfig, data, where)
    validate(cfg)
    return cfg

def data_config(cfg: Config) -> DataConfig:
    """``cfg.data["ct"]`` as the data layer's :class:`DataConfig` (unknown keys are named)."""
    return data_config_from_dict(dict(cfg.data.get("ct", {})), where="data.ct")


def check_model_matches_data(cfg: Config, data: DataConfig) -> None:
    s = data.sampling
    channels = 1 + 2 * s.context_slices + 1  # CT (+ neighbours) + pancreas mask
    m = cfg.model
    if m.image_size != s.slice_size:
        raise PipelineError(f"model.image_size ({m.image_size}) must equal data.ct.sampling.slice_size "
                            f"({s.slice_size}); set both")
    if m.in_channels != channels or m.mask_channels != 1:
        raise PipelineError(f"model.in_channels must be {channels} (CT, {2 * s.context_slices} neighbour slice(s), "
                            f"mask) and model.mask_channels 1; got {m.in_channels} and {m.mask_channels}")


def validate(cfg: DataConfig) -> None:
    p, s = cfg.preprocess, cfg.sampling
    if len(p.spacing) != 3:
        raise PipelineError(f"preprocess.spacing needs 3 values (x, y, z; null keeps), got {p.spacing}")
    if p.hu_window[0] >= p.hu_window[1]:
        raise PipelineError(f"preprocess.hu_window must be [low, high], got {p.hu_window}")
    ii = p.input_intensity
    if ii.kind not in INTENSITY_KINDS:
        raise PipelineError(f"preprocess.input_intensity.kind must be hu or display, got {ii.kind!r}")
    if ii.kind == "hu" and ii.window is not None:
        raise PipelineError("preprocess.input_intensity.window is for kind: display (HU as stored has no window)")
    for name, pair in (("window", ii.window), ("display_range", ii.display_range)):
        if pair is not None and (len(pair) != 2 or not float(pair[0]) < float(pair[1])):
            raise PipelineError(f"preprocess.input_intensity.{name} must be [low, high], got {pair}")
    lo, hi = cfg.checks.hu_outlier_range
    if not lo < hi:
        raise PipelineError(f"checks.hu_outlier_range must be [low, high], got {cfg.checks.hu_outlier_range}")
    if p.cache_dtype not in ("float16", "float32"):
        raise PipelineError(f"preprocess.cache_dtype must be float16 or float32, got {p.cache_dtype}")
    if s.fit not in ("resize", "crop"):
        raise PipelineError(f"sampling.fit must be resize or crop, got {s.fit}")
    if s.centre not in ("image", "pancreas"):
        raise PipelineError(f"sampling.centre must be image or pancreas, got {s.centre}")
    if s.centre == "pancreas" and not (s.fit == "resize" and s.fov_mm):
        raise PipelineError("sampling.centre=pancreas needs sampling.fit=resize with a sampling.fov_mm")
    if not 0.0 <= float(s.centre_jitter_mm) <= 1000.0:
        raise PipelineError(f"sampling.centre_jitter_mm must be in [0, 1000] mm, got {s.centre_jitter_mm}")
    if s.pos_fraction is not None and not 0.0 <= s.pos_fraction <= 1.0:
        raise PipelineError(f"sampling.pos_fraction must be in [0, 1] or null, got {s.pos_fraction}")
    ss = cfg.slice_set
    try:
        px = float(ss.pixel_mm)
    except (TypeError, ValueError):
        px = float("nan")
    if not px > 0:
        raise PipelineError(f"slice_set.pixel_mm must be a positive number of mm, got {ss.pixel_mm!r}")
    if ss.rows_towards not in ("posterior", "anterior"):
        raise PipelineError(f"slice_set.rows_towards must be posterior or anterior, got {ss.rows_towards!r}")
    try:
        pattern = re.compile(str(ss.patient_pattern))
    except re.error as err:
        raise PipelineError(f"slice_set.patient_pattern is not a valid regular expression: {err}") from None
    if pattern.groups < 1:
        raise PipelineError(f"slice_set.patient_pattern needs a group for the patient, got {ss.patient_pattern!r}")
    if ss.mask_values is not None and (not isinstance(ss.mask_values, list) or not ss.mask_values
                                       or any(isinstance(v, bool) or not isinstance(v, int) or v <= 0
                                              for v in ss.mask_values)):
        raise PipelineError(f"slice_set.mask_values must be null (any nonzero) or a list of positive integers, "
                            f"got {ss.mask_values!r}")


def check_slice_set_settings(cfg: DataConfig) -> None:
    """Settings a 2D slice set cannot honour: neighbouring slices of a patient in such a set are not adjacent."""
    if cfg.sampling.context_slices:
        raise PipelineError(f"sampling.context_slices must be 0 for a 2D slice set (got "
                            f"{cfg.sampling.context_slices}): its slices of one patient are not neighbours")
    if cfg.preprocess.spacing[2] is not None:
        raise PipelineError(f"preprocess.spacing[2] must be null for a 2D slice set (got "
                            f"{cfg.preprocess.spacing[2]}): resampling across its slices would blend unrelated slices")

def fit_options(cfg: DataConfig) -> dict[str, Any]:
    """How a slice is fitted to the model's grid (``fit``, ``fov_mm``, ``centre``, ``centre_jitter_mm``): the one
    set of keyword arguments that training, evaluation, segmentation and the memorisation check all pass on."""
    s = cfg.sampling
    return {"fit": s.fit, "fov_mm": s.fov_mm, "centre": s.centre, "centre_jitter_mm": float(s.centre_jitter_mm)}


def slice_spacing_mm(cfg: DataConfig) -> tuple[float, float] | None:
    """(x, y) mm per pixel of the sampled 2D slices: ``fov_mm / slice_size`` for ``fit=resize`` with a field of
    view, the cache's in-plane spacing for ``fit=crop``; ``None`` where it varies per case."""
    s = cfg.sampling
    if s.fit == "resize":
        return (float(s.fov_mm) / s.slice_size,) * 2 if s.fov_mm else None
    x, y = cfg.preprocess.spacing[:2]
    return (float(x), float(y)) if x and y else None

def config_hash(cfg: DataConfig, pancreas_values: list[int], layout: str | None = None) -> str:
    """Short hash of everything that decides a cached case: checks, preprocessing, label mapping, format.

    The ``slice_set`` section counts for the ``slices`` layout only (volume layouts keep their hashes).
    """
    payload = {
        "format": CACHE_FORMAT_VERSION,
        "checks": dataclasses.asdict(cfg.checks),
        "preprocess": dataclasses.asdict(cfg.preprocess),
        "pancreas_values": sorted(int(v) for v in pancreas_values),
    }
    if layout == "slices":
        payload["slice_set"] = dataclasses.asdict(cfg.slice_set)
    text = json.dumps(_numbers_as_float(payload), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]

def _numbers_as_float(value: Any) -> Any:
    """YAML ``-30`` and the default ``-30.0`` are the same setting: hash them alike."""
    if isinstance(value, dict):
        return {k: _numbers_as_float(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_numbers_as_float(v) for v in value]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return value

"""One resolved configuration per run: dataclasses, YAML files and ``key=value`` overrides.

The config is logged whole to MLflow and stored in every checkpoint, so a run can
always be rebuilt from what it recorded.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from pancreas_gvae.errors import PipelineError

MODEL_KINDS = ("gvae", "vae", "gan")
GENERATOR_UPSAMPLE = ("transposed", "nearest")


@dataclass
class ModelConfig:
    kind: str = "gvae"  # gvae | vae | gan
    spatial_dims: int = 2
    in_channels: int = 1  # image channels, masks included
    mask_channels: int = 0  # trailing channels that are label masks (CT: 1)
    image_size: int = 28
    channels: list[int] = field(default_factory=lambda: [32, 64])  # one stride-2 level each
    disc_channels: list[int] | None = None  # defaults to ``channels``
    latent_dim: int = 32
    num_res_units: int = 0  # MONAI ResidualUnits after each level
    encoder_norm: str | None = "batch"
    # False: E reads the image channels only, not the masks. For semi-supervised training, where an unlabelled
    # slice's all-zero mask channel ("unknown") would otherwise read to E as "no pancreas here".
    encoder_reads_masks: bool = True
    generator_norm: str | None = "batch"
    # How G doubles its resolution: "transposed" (stride-2 transposed convolution, DCGAN) or "nearest"
    # (nearest-neighbour upsampling, then a 3x3 convolution: no checkerboard, Odena et al. 2016; ~4x the
    # FLOPs of those levels).
    generator_upsample: str = "transposed"
    # Where sampled codes come from: 0 = N(0, I); K >= 1 = a K-component Gaussian mixture fitted to the codes of
    # training images at every checkpoint (ex-post density, pancreas_gvae/models/latent_prior.py). GVAE and VAE
    # only: a GAN has no codes of training images, so it keeps N(0, I) (one --set serves all three in evaluate.py).
    latent_prior_components: int = 0
    discriminator_norm: str | None = None  # spectral norm is the default stabiliser for D
    spectral_norm: bool = True

    @property
    def prior_components(self) -> int:
        """Mixture components of the generator's fitted latent prior: 0 (N(0, I)) for a GAN."""
        return int(self.latent_prior_components) if self.kind in ("gvae", "vae") else 0


@dataclass
class LossConfig:
    beta_kl: float = 1.0  # weight of KL(q(z|x)||N(0,I)), summed over z and divided by pixels
    kl_warmup_steps: int = 0  # linear ramp of beta from 0
    feature_recon: float = 1.0  # || D_l(x) - D_l(G(z_e)) ||^2
    pixel_l1: float = 1.0  # small pixel anchor
    recon_weight_g: float = 1.0  # weight of the reconstruction terms in G's loss
    adversarial: str = "nonsaturating"  # nonsaturating | hinge
    adversarial_weight: float = 0.1
    r1_gamma: float = 0.0  # R1 penalty on real images
    mask_dice: float = 1.0  # mask channel: Dice + BCE
    mask_bce: float = 1.0
    vae_likelihood: str = "bernoulli"  # bernoulli | gaussian (VAE baseline and ELBO)
    gaussian_sigma: float = 0.1
    d_gate_loss: float | None = None  # skip D's update while its loss is below this
    # How the GVAE's D sees an image-only slice (semi-supervised training; labelled slices are unaffected):
    # "own": with the generator's reconstructed mask (detached) as its real mask (the first semi mode; D is then
    #   told that masks G made are real, so it cannot push back on mask artefacts);
    # "blind": its mask channels set to "unknown" (0.5), and the reconstruction and the prior sample of the same
    #   batch row blinded alike, so D judges (image, mask) pairs against labelled slices only and images alone on
    #   the rest, at the same share for real and fake; no mask G made is ever shown to D as real.
    unlabelled_masks: str = "own"
    # What the GVAE's D is shown as fake, and what G's adversarial term is taken over: "both" the reconstruction
    # and the prior sample (Larsen et al. 2016, GVAE.md), or "prior" the prior sample alone (reconstructions are
    # then held to the data by the reconstruction terms only, and D's whole fake side is the samples we export).
    d_fakes: str = "both"
    diffaugment: str = ""  # DiffAugment policies for D, e.g. "translation,cutout,color" (pancreas_gvae/training/diffaugment.py)


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 64
    lr_g: float = 2e-4
    lr_d: float = 2e-4
    betas: list[float] = field(default_factory=lambda: [0.5, 0.999])
    grad_clip: float = 10.0
    ema_decay: float = 0.995
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16
    channels_last: bool = True  # CUDA only
    compile: bool = False
    log_every: int = 10
    sample_every: int = 200
    checkpoint_every: int = 200
    num_samples: int = 64


def default_tracking_uri() -> str:
    """``$MLFLOW_TRACKING_URI`` (as MLflow itself reads it), else a sqlite store in the working directory."""
    return os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"


@dataclass
class TrackingConfig:
    # MLFLOW_TRACKING_URI (as in MLflow itself) or a sqlite store in the working directory.
    tracking_uri: str = field(default_factory=default_tracking_uri)
    experiment: str = "pancreas-gvae"
    run_name: str | None = None
    log_model: bool = True
    register_name: str | None = None
    system_metrics: bool = True  # CPU/GPU/memory in MLflow's system metrics tab (needs psutil)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    data: dict[str, Any] = field(default_factory=dict)  # dataset-specific, owned by the pipeline

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "Config":
        cfg = cls()
        _merge(cfg, raw or {}, prefix="")
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Rules across keys and choices; each key's type and range is checked as it is merged (convert_value)."""
        m = self.model
        if m.kind not in MODEL_KINDS:
            raise PipelineError(f"model.kind must be one of {', '.join(MODEL_KINDS)}, got {m.kind!r}")
        if m.spatial_dims not in (2, 3):
            raise PipelineError(f"model.spatial_dims must be 2 or 3, got {m.spatial_dims}")
        factor = 2 ** len(m.channels)
        if m.image_size % factor:
            raise PipelineError(
                f"model.image_size {m.image_size} must be divisible by 2**len(model.channels) = {factor}; "
                "use fewer levels in model.channels or another image size"
            )
        if not 0 <= m.mask_channels < m.in_channels:
            raise PipelineError("model.mask_channels must be smaller than model.in_channels")
        if m.generator_upsample not in GENERATOR_UPSAMPLE:
            raise PipelineError(
                f"model.generator_upsample must be one of {', '.join(GENERATOR_UPSAMPLE)}, got {m.generator_upsample!r}"
            )
        if self.loss.adversarial not in ("nonsaturating", "hinge"):
            raise PipelineError(f"loss.adversarial must be nonsaturating or hinge, got {self.loss.adversarial!r}")
        from pancreas_gvae.training.diffaugment import parse_policy

        try:
            parse_policy(self.loss.diffaugment)
        except ValueError as err:
            raise PipelineError(f"loss.diffaugment: {err}") from None
        if self.loss.diffaugment and m.spatial_dims != 2:
            raise PipelineError("loss.diffaugment is implemented for 2D models (model.spatial_dims 2)")
        if self.loss.unlabelled_masks not in ("own", "blind"):
            raise PipelineError(f"loss.unlabelled_masks must be own or blind, got {self.loss.unlabelled_masks!r}")
        if self.loss.d_fakes not in ("both", "prior"):
            raise PipelineError(f"loss.d_fakes must be both or prior, got {self.loss.d_fakes!r}")
        if self.loss.vae_likelihood not in ("bernoulli", "gaussian"):
            raise PipelineError(f"loss.vae_likelihood must be bernoulli or gaussian, got {self.loss.vae_likelihood!r}")


def _merge(target: Any, raw: dict[str, Any], prefix: str) -> None:
    hints = {} if isinstance(target, dict) else typing.get_type_hints(type(target))
    for key, value in raw.items():
        name = f"{prefix}{key}"
        if isinstance(target, dict):  # the free ``data`` section: untyped, owned by the pipelines
            target[key] = value
            continue
        if key not in hints:
            raise PipelineError(f"unknown config key {name!r}")
        current = getattr(target, key)
        if dataclasses.is_dataclass(current) or isinstance(current, dict):
            if not isinstance(value, dict):
                raise PipelineError(f"config key {name!r} is a section; give it a mapping")
            _merge(current, value, prefix=f"{name}.")
        else:
            setattr(target, key, convert_value(name, value, hints[key]))


# Value checks beyond the type, per key: (accepts the converted value, what the key expects). Cross-key
# rules (image_size against channels, mask_channels against in_channels, choices) are in Config.validate.
_POSITIVE_INTS = (lambda v: len(v) > 0 and all(c > 0 for c in v), "a non-empty list of positive integers")
_AT_LEAST_0 = (lambda v: v >= 0, "a number >= 0")
_RANGES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "model.in_channels": (lambda v: v >= 1, "a positive integer"),
    "model.mask_channels": (lambda v: v >= 0, "an integer >= 0"),
    "model.image_size": (lambda v: v >= 1, "a positive integer"),
    "model.channels": _POSITIVE_INTS,
    "model.disc_channels": _POSITIVE_INTS,
    "model.latent_dim": (lambda v: v >= 1, "a positive integer"),
    "model.num_res_units": (lambda v: v >= 0, "an integer >= 0"),
    "model.latent_prior_components": (lambda v: v >= 0, "an integer >= 0"),
    **{f"loss.{k}": _AT_LEAST_0 for k in ("beta_kl", "feature_recon", "pixel_l1", "recon_weight_g",
                                          "adversarial_weight", "r1_gamma", "mask_dice", "mask_bce")},
    "loss.kl_warmup_steps": (lambda v: v >= 0, "an integer >= 0"),
    "loss.gaussian_sigma": (lambda v: v > 0, "a number (float) > 0"),
    "train.steps": (lambda v: v >= 0, "an integer >= 0"),
    "train.batch_size": (lambda v: v >= 1, "an integer >= 1"),
    "train.lr_g": (lambda v: v > 0, "a number (float) > 0"),
    "train.lr_d": (lambda v: v > 0, "a number (float) > 0"),
    "train.betas": (lambda v: len(v) == 2 and all(0 <= b < 1 for b in v), "a list of two numbers in [0, 1)"),
    "train.grad_clip": (lambda v: v >= 0, "a number >= 0 (0: no clipping)"),
    "train.ema_decay": (lambda v: 0 <= v <= 1, "a number in [0, 1]"),
    "train.seed": (lambda v: v >= 0, "an integer >= 0"),
    **{f"train.{k}": (lambda v: v >= 1, "an integer >= 1")
       for k in ("log_every", "sample_every", "checkpoint_every", "num_samples")},
}

_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")
_NULL = ("null", "none", "~", "")


class _Refused(ValueError):
    pass


def convert_value(name: str, value: Any, hint: Any) -> Any:
    """``value`` of config key ``name`` as its annotated type ``hint``, or one line naming key, value and type.

    Our own, small on purpose: values reach the dataclasses as YAML-parsed scalars (config files and
    ``--set`` text), where YAML 1.1 reads ``1e-4`` as a string and ``no`` as False, and the dataclass
    annotations are the whole schema; a validation library (pydantic & co.) would be a dependency the
    project otherwise does without, for the handful of types used here.
    """
    check, what = _RANGES.get(name, (None, None))
    try:
        converted = _convert(value, hint)
        if converted is None or check is None or check(converted):
            return converted
    except _Refused:
        pass
    if what is None:
        what = _describe(hint)
    elif _optional_of(hint) is not None:
        what += " or null"
    raise PipelineError(f"config key {name}: got {value!r}, expected {what}")


def _optional_of(hint: Any) -> Any:
    """``X`` for ``X | None``, else None."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(hint)) == 2:
            return args[0]
    return None


def _convert(value: Any, hint: Any) -> Any:
    optional = _optional_of(hint)
    if optional is not None:
        if value is None or (isinstance(value, str) and value.strip().lower() in _NULL):
            return None
        return _convert(value, optional)
    if typing.get_origin(hint) is list:
        (item,) = typing.get_args(hint)
        if isinstance(value, str):  # "16,32" as well as the YAML list [16, 32]
            value = value.split(",") if value.strip() else []
        if not isinstance(value, (list, tuple)):
            raise _Refused
        return [_convert(v, item) for v in value]
    text = value.strip() if isinstance(value, str) else None
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if text is not None and text.lower() in _TRUE + _FALSE:
            return text.lower() in _TRUE
    elif hint is int and not isinstance(value, bool):
        if isinstance(value, int):
            return value
        try:
            return int(text)  # "12"
        except (TypeError, ValueError):
            pass
        try:
            number = float(text if text is not None else value)
        except (TypeError, ValueError):
            raise _Refused from None
        if number.is_integer():  # 3.0, "1e5"; not 2.5
            return int(number)
    elif hint is float and not isinstance(value, bool):
        try:
            number = float(text if text is not None else value)  # YAML 1.1 leaves "1e-4" a string
        except (TypeError, ValueError):
            raise _Refused from None
        if not math.isnan(number):
            return number
    elif hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):  # run_name=2024
            return str(value)
    elif hint not in (int, float):
        raise TypeError(f"pancreas_gvae.config cannot convert values to {hint!r}")
    raise _Refused


def _describe(hint: Any) -> str:
    optional = _optional_of(hint)
    if optional is not None:
        return f"{_describe(optional)} or null"
    if typing.get_origin(hint) is list:
        (item,) = typing.get_args(hint)
        return {int: "a list of integers", float: "a list of numbers"}.get(item, f"a list of {_describe(item)}")
    return {int: "an integer", float: "a number (float)", bool: "true or false", str: "a string"}.get(
        hint, getattr(hint, "__name__", str(hint)))


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["train.steps=100", "model.channels=[16,32]"]`` -> nested dict; values parsed as YAML."""
    nested: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise PipelineError(f"override {item!r} must look like section.key=value")
        dotted, text = item.split("=", 1)
        node = nested
        *parents, leaf = dotted.strip().split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(text)
    return nested


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                base: dict[str, Any] | None = None) -> Config:
    """Defaults <- ``base`` <- YAML file <- ``overrides``; validated."""
    raw: dict[str, Any] = {}
    for layer in (base or {}, read_yaml_mapping(path) if path else {}, parse_overrides(overrides or [])):
        raw = deep_update(raw, layer)
    return Config.from_dict(raw)


def deep_update(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for key, value in b.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_update(out[key], value)
        else:
            out[key] = value
    return out


def read_yaml_mapping(path: str | Path, what: str = "config file") -> dict[str, Any]:
    """A YAML file that must hold a mapping; every problem is a :class:`PipelineError` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{what} not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise PipelineError(f"{what} {path} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise PipelineError(f"{what} {path} must hold a mapping at the top level")
    return data


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dict -> ``{"model.latent_dim": 32, ...}`` for MLflow params."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out

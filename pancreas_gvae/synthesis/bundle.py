"""The generator as a MONAI Bundle: ``G(z)`` -> synthetic CT slices, each with its pancreas mask.

:func:`export_bundle` writes (MONAI Bundle specification, https://docs.monai.io/en/latest/mb_specification.html)::

    OUT/
      configs/metadata.json    versions, task, network_data_format (z in, logits out; image + mask post-processed)
      configs/inference.json   rebuild G from its kwargs, load models/model.pt, sample, post-process, SaveImaged
      configs/logging.conf     INFO to stdout (MONAI's ConfigWorkflow looks for it next to the config)
      models/model.pt          the generator's state_dict (tensors only: loads with ``weights_only=True``)
      docs/README.md           what it is, the synthetic-data statement, how to run it
      docs/license.txt

and, from the bundle folder::

    python -m monai.bundle run --config_file configs/inference.json --num_samples 8 --seed 1

writes ``samples/synthetic_0000_image.nii.gz`` (CT; int16 HU when the bundle has a window) and
``samples/synthetic_0000_mask.nii.gz`` (uint8, 0/1), with the training pixel spacing in the affine.

The config needs this package installed (``_target_: pancreas_gvae.models.networks.Generator``) and calls
:mod:`pancreas_gvae.synthesis.bundle_runtime` for what MONAI config syntax cannot express cleanly. The generator
and the slice geometry come from :mod:`pancreas_gvae.synthesis.generator`.
"""

from __future__ import annotations

import importlib.metadata
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from pancreas_gvae.config import Config, ModelConfig
from pancreas_gvae.errors import PipelineError
from pancreas_gvae.models.networks import Generator
from pancreas_gvae.synthesis.generator import generator_kwargs, load_strict

DEFAULT_NAME = "pancreas_gvae_generator"
BUNDLE_VERSION = "0.1.0"
# The current MONAI bundle metadata schema. ``monai.bundle verify_metadata`` downloads it (needs network).
SCHEMA_URL = ("https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/"
              "meta_schema_20240725.json")
GENERATOR_TARGET = f"{Generator.__module__}.{Generator.__qualname__}"


def _prior_words(m) -> str:
    """Where the bundle's codes come from, for its metadata and README."""
    if m.prior_components:
        return (f"drawn from the {m.prior_components}-component Gaussian mixture fitted to the codes of the "
                "training images and stored in the network (network.prior; the bundle's sampler uses it)")
    return "standard normal N(0, I)"


def export_bundle(generator: torch.nn.Module, config: Config, out_dir: str | Path, *,
                  spacing: Sequence[float] | None = None, window: Sequence[float] | None = None,
                  name: str = DEFAULT_NAME, num_samples: int = 16, seed: int = 0,
                  overwrite: bool = False) -> Path:
    """Write ``generator`` (built from ``config.model``) as a MONAI Bundle folder ``out_dir``; returns it.

    Args:
        spacing: mm per pixel of the training slices (one value per spatial dim), written into the NIfTI affine.
        window: ``(low, high)`` HU window the CT channel was scaled from; the bundle maps ``[0, 1]`` back to HU.
        name: bundle name (metadata ``name``, README title).
        num_samples, seed: defaults of the bundle's ``inference.json`` (overridable at run time).
        overwrite: write into a non-empty ``out_dir`` (files of the bundle are replaced).
    """
    m = config.model
    kwargs = generator_kwargs(m)
    state = {k: v.detach().cpu().clone() for k, v in generator.state_dict().items()}
    rebuilt = Generator(**kwargs)
    load_strict(rebuilt, state, what="the generator")
    spacing_ = _check_spacing(spacing, m.spatial_dims)
    window_ = _check_window(window)
    if num_samples < 1:
        raise PipelineError(f"num_samples must be at least 1, got {num_samples}")

    rebuilt.eval()
    with torch.no_grad():
        shape = tuple(rebuilt(torch.zeros(1, m.latent_dim)).shape)
    expected = (1, m.in_channels, *[m.image_size] * m.spatial_dims)
    if shape != expected:  # a guard against a config/network drift, not expected to trigger
        raise PipelineError(f"the generator returns {shape}, the config promises {expected}")

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise PipelineError(f"--out {out} is a file; give a folder for the bundle")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise PipelineError(f"bundle folder {out} is not empty; choose another folder or pass overwrite (--overwrite)")
    for sub in ("configs", "models", "docs"):
        (out / sub).mkdir(parents=True, exist_ok=True)

    from pancreas_gvae.training.checkpoint import save_checkpoint  # atomic write

    save_checkpoint(state, out / "models" / "model.pt")
    layout = _Layout.of(m)
    meta = _metadata(config, layout, spacing=spacing_, window=window_, name=name)
    _write_json(out / "configs" / "metadata.json", meta)
    _write_json(out / "configs" / "inference.json",
                _inference_config(kwargs, layout, spacing=spacing_, window=window_, num_samples=num_samples, seed=seed))
    (out / "configs" / "logging.conf").write_text(LOGGING_CONF)
    (out / "docs" / "README.md").write_text(_readme(name, config, layout, spacing_, window_, num_samples))
    (out / "docs" / "license.txt").write_text(LICENSE_TXT)
    return out


def _check_spacing(spacing: Sequence[float] | None, dims: int) -> list[float] | None:
    if spacing is None:
        return None
    values = [float(s) for s in spacing]
    if len(values) == 1:
        values = values * dims
    if len(values) != dims or not all(v > 0 for v in values):
        raise PipelineError(f"spacing needs {dims} positive values (mm per pixel, one per spatial dim), "
                            f"got {list(spacing)}")
    return values


def _check_window(window: Sequence[float] | None) -> list[float] | None:
    if window is None:
        return None
    values = [float(w) for w in window]
    if len(values) != 2 or not values[0] < values[1]:
        raise PipelineError(f"window must be (low, high) in HU with low < high, got {list(window)}")
    return values


class _Layout(NamedTuple):
    """Which output channel is what: CT (image) channels first, mask channels last (``model.mask_channels``)."""

    postfixes: list[str]  # SplitDimd output postfix per channel
    image_key: str
    mask_keys: list[str]
    image_channel: int
    mask_channel_ids: list[int]
    channels: int
    spatial_shape: list[int]

    @classmethod
    def of(cls, m: ModelConfig) -> "_Layout":
        n_img = m.in_channels - m.mask_channels
        centre = (n_img - 1) // 2  # 2.5D: the CT channels are the slice and its neighbours, the slice in the middle
        postfixes = ["image" if i == centre else f"context{i}" for i in range(n_img)]
        masks = ["mask"] if m.mask_channels == 1 else [f"mask{i}" for i in range(m.mask_channels)]
        return cls(postfixes + masks, "pred_image", [f"pred_{p}" for p in masks], centre,
                   list(range(n_img, m.in_channels)), m.in_channels, [m.image_size] * m.spatial_dims)


def _pkg_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _metadata(config: Config, layout: _Layout, *, spacing, window, name: str) -> dict[str, Any]:
    import monai

    m = config.model
    has_mask = bool(layout.mask_keys)
    # Only the current key: MONAI renames the deprecated ``optional_packages_version`` onto this one on read.
    # itk: SaveImaged's writer; fire: the ``python -m monai.bundle`` command line.
    required = {k: v for k in ("pancreas-gvae", "itk", "fire") if (v := _pkg_version(k))}
    ct_range = window if window else [0.0, 1.0]
    n_img = layout.channels - len(layout.mask_channel_ids)
    if has_mask:
        channel_def = {str(i): f"CT, {'centre slice' if i == layout.image_channel else 'context slice'} "
                       "(sigmoid -> windowed intensity in [0, 1])" for i in range(n_img)}
    else:
        channel_def = {str(i): "image (sigmoid -> intensity in [0, 1])" for i in range(n_img)}
    channel_def.update({str(i): "pancreas mask (sigmoid -> probability)" for i in layout.mask_channel_ids})
    post: dict[str, Any] = {
        "image": {
            "type": "image", "format": "hounsfield" if window else "magnitude", "num_channels": 1,
            "spatial_shape": layout.spatial_shape, "dtype": "int16" if window else "float32", "value_range": ct_range,
            "is_patch_data": False, "channel_def": {"0": "CT" if has_mask else "image"},
            "pixel_spacing_mm": spacing, "hu_window": window,
        }
    }
    if has_mask:
        post["mask"] = {
            "type": "image", "format": "segmentation", "num_channels": 1, "spatial_shape": layout.spatial_shape,
            "dtype": "uint8", "value_range": [0, 1], "is_patch_data": False,
            "channel_def": {"0": "background", "1": "pancreas"}, "threshold": 0.5,
        }
    what = "axial CT slices with pancreas masks" if has_mask else "images"
    return {
        "schema": SCHEMA_URL,
        "version": BUNDLE_VERSION,
        "changelog": {BUNDLE_VERSION: "exported from a pancreas-gvae training checkpoint"},
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__,
        "required_packages_version": required,
        "name": name,
        "task": f"Unconditional synthesis of {what} ({m.spatial_dims}D, {m.image_size} px) from a latent code",
        "description": (
            f"Generator of a {m.kind.upper()} (encoder + generator + discriminator built from MONAI blocks). "
            f"z of size {m.latent_dim} ({_prior_words(m)}) -> logits of {m.in_channels} channel(s); sigmoid gives "
            f"{'the CT intensity and the pancreas-mask probability' if has_mask else 'the image intensity'}. "
            "All outputs are SYNTHETIC: "
            "they show no real patient and are not for diagnosis."
        ),
        "authors": "pancreas-gvae contributors",
        "copyright": "Copyright (c) pancreas-gvae contributors",
        "data_type": "nibabel",
        "image_classes": ("CT (windowed intensity; HU after post-processing when a window is given)" if has_mask
                          else "single-channel image, intensity in [0, 1]"),
        "label_classes": "pancreas mask: 0 background, 1 pancreas" if has_mask else "none",
        "pred_classes": "synthetic CT slice and its pancreas mask" if has_mask else "synthetic image",
        "intended_use": ("Research only: synthetic, labelled training data (augmentation, privacy-preserving "
                         "sharing, method development). Not a medical device; not for clinical use."),
        "references": ["Larsen et al., Autoencoding beyond pixels using a learned similarity metric, ICML 2016"],
        "network_data_format": {
            "inputs": {
                "z": {
                    "type": "vector", "format": "latent", "num_channels": m.latent_dim, "spatial_shape": [],
                    "dtype": "float32", "value_range": [], "is_patch_data": False,
                    "channel_def": {}, "distribution": _prior_words(m),
                }
            },
            "outputs": {
                "pred": {
                    "type": "image", "format": "logits", "num_channels": m.in_channels,
                    "spatial_shape": layout.spatial_shape, "dtype": "float32", "value_range": [],
                    "is_patch_data": False, "channel_def": channel_def,
                }
            },
            "post_processed_outputs": post,
        },
        "training_config": config.to_dict(),
    }


def _inference_config(kwargs: dict[str, Any], layout: _Layout, *, spacing, window,
                      num_samples: int, seed: int) -> dict[str, Any]:
    def save(key: str, postfix: str, dtype: str) -> dict[str, Any]:
        # ITKWriter with squeeze_end_dims=False: MONAI 1.6.1's NibabelWriter fails on squeezed 2D single-channel
        # images (spatial_ndim becomes 1); ITK writes a 2D slice as H x W x 1 with the spacing in the header.
        return {"_target_": "SaveImaged", "keys": key, "output_dir": "@output_dir", "output_postfix": postfix,
                "output_ext": ".nii.gz", "output_dtype": f"$np.{dtype}", "resample": False,
                "separate_folder": False, "squeeze_end_dims": False, "writer": "ITKWriter", "print_log": False}

    transforms: list[dict[str, Any]] = [
        {"_target_": "Activationsd", "keys": "pred", "sigmoid": True},
        {"_target_": "SplitDimd", "keys": "pred", "dim": 0, "keepdim": True, "update_meta": False,
         "output_postfixes": layout.postfixes},
        # [0, 1] -> HU; the identity when hu_window is null
        {"_target_": "ScaleIntensityRanged", "keys": layout.image_key, "a_min": 0.0, "a_max": 1.0,
         "b_min": "$float(@hu_window[0]) if @hu_window else 0.0",
         "b_max": "$float(@hu_window[1]) if @hu_window else 1.0", "clip": False},
    ]
    if window:  # whole HU in int16, as CT is stored (and as the training job writes its synthetic slices)
        transforms.append({"_target_": "Lambdad", "keys": layout.image_key, "func": "$torch.round"})
    transforms.append(save(layout.image_key, "image", "int16" if window else "float32"))
    if layout.mask_keys:
        transforms[2:2] = [{"_target_": "AsDiscreted", "keys": layout.mask_keys, "threshold": "@mask_threshold"}]
        transforms += [save(k, k[len("pred_"):], "uint8") for k in layout.mask_keys]
    return {
        "imports": ["$import torch", "$import numpy as np", "$import pancreas_gvae.synthesis.bundle_runtime as pgb"],
        "bundle_root": ".",
        "model_path": "$@bundle_root + '/models/model.pt'",
        "output_dir": "$@bundle_root + '/samples'",
        "device": "$torch.device('cuda' if torch.cuda.is_available() else 'cpu')",
        "num_samples": int(num_samples),
        "seed": int(seed),
        "batch_size": 64,
        "name_prefix": "synthetic",
        "spacing": spacing,
        "hu_window": window,
        "mask_threshold": 0.5,
        "network_def": {"_target_": GENERATOR_TARGET, **kwargs},
        "network": "$@network_def.to(@device)",
        "samples": ("$pgb.synthesize(@network, num_samples=@num_samples, seed=@seed, batch_size=@batch_size, "
                    "device=@device, spacing=@spacing, name_prefix=@name_prefix)"),
        "postprocessing": {"_target_": "Compose", "transforms": transforms},
        "run": [
            "$@network.load_state_dict(torch.load(@model_path, map_location=@device, weights_only=True))",
            "$@network.eval()",
            "$pgb.write_samples(@samples, @postprocessing, output_dir=@output_dir)",
        ],
    }


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=4) + "\n")


def _readme(name: str, config: Config, layout: _Layout, spacing, window, num_samples: int) -> str:
    m = config.model
    size = " x ".join(str(s) for s in layout.spatial_shape)
    mask = bool(layout.mask_keys)
    outputs = ("`samples/synthetic_0000_image.nii.gz` (CT) and `samples/synthetic_0000_mask.nii.gz` "
               "(uint8 pancreas mask, 0/1)" if mask else "`samples/synthetic_0000_image.nii.gz`")
    return f"""# {name}

The generator of a {m.kind.upper()} (pancreas-gvae) as a MONAI Bundle. It maps a latent code
`z` ({m.latent_dim} values; {_prior_words(m)}) to a {size}
{"axial CT slice and its pancreas mask" if mask else "image"}.

**All images this bundle writes are synthetic.** They depict no real patient, carry no patient
identifiers, and must not be used for diagnosis or treatment. Research use only. A generative model can
reproduce features of its training images; check memorisation (the project's metrics) before sharing
samples outside the group that may see the training data.

## Run

From this folder, with the `pancreas-gvae` package installed (`pip install .` in the project repository;
the command line also needs `pip install fire`):

```bash
python -m monai.bundle run --config_file configs/inference.json
python -m monai.bundle run --config_file configs/inference.json --num_samples 100 --seed 1 --output_dir /tmp/synth
```

From elsewhere add `--bundle_root /path/to/bundle` (paths in the config are relative to it). In Python:
`monai.bundle.run(config_file="configs/inference.json", num_samples=8)`.

Writes {outputs}, numbered from 0. Sample `i` depends only on `seed` (default 0) and `i`, not on
`batch_size` or the device the latent codes are decoded on (up to floating point).

| key | default | meaning |
|---|---|---|
| `num_samples` | {num_samples} | how many samples |
| `seed` | 0 | seed of the latent codes |
| `output_dir` | `<bundle_root>/samples` | where the NIfTI files go |
| `batch_size` | 64 | latent codes decoded at once |
| `device` | CUDA if available, else CPU | |
| `spacing` | {spacing} | mm per pixel written into the NIfTI affine (null: 1 mm) |
| `hu_window` | {window} | CT `[0, 1]` -> HU as `low + x * (high - low)`, written as int16 (null: float `[0, 1]`) |
| `mask_threshold` | 0.5 | mask probability -> 0/1 |

## Contents

* `models/model.pt`: the generator's state_dict (the EMA weights of training when exported by
  `pipelines/export_bundle.py`); the network is `{GENERATOR_TARGET}` with the kwargs in `network_def`.
* `configs/metadata.json`: versions, `network_data_format` (input `z`, output `pred` = logits, post-processed
  `image` and `mask`) and the full training config (`training_config`).
* `configs/inference.json`: the MONAI ConfigWorkflow above.

## Data and licence

Weights: Apache-2.0 (`docs/license.txt`). The model was trained on the data named in `training_config.data`;
that data's own terms of use (for example TCIA's data usage policy) apply to it and may apply to this model.
"""


LOGGING_CONF = """[loggers]
keys=root

[handlers]
keys=consoleHandler

[formatters]
keys=fullFormatter

[logger_root]
level=INFO
handlers=consoleHandler

[handler_consoleHandler]
class=StreamHandler
level=INFO
formatter=fullFormatter
args=(sys.stdout,)

[formatter_fullFormatter]
format=%(asctime)s - %(name)s - %(levelname)s - %(message)s
"""

LICENSE_TXT = """Copyright (c) pancreas-gvae contributors

Licensed under the Apache License, Version 2.0 (the "License"); you may not use these files except in
compliance with the License. You may obtain a copy of the License at

    http://www.apache.org/licenses/LICENSE-2.0

Unless required by applicable law or agreed to in writing, software distributed under the License is
distributed on an "AS IS" BASIS, WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
See the License for the specific language governing permissions and limitations under the License.

The training data are not part of this bundle; their own terms of use apply to them.
"""



"""Export a trained generator as a MONAI Bundle (``configs/``, ``models/model.pt``, ``docs/``)."""

from pancreas_gvae.export.bundle import (
    export_bundle,
    generator_from_checkpoint,
    generator_kwargs,
    generator_state_from_checkpoint,
    infer_geometry,
    synthesize,
    write_samples,
)

__all__ = [
    "export_bundle",
    "generator_from_checkpoint",
    "generator_kwargs",
    "generator_state_from_checkpoint",
    "infer_geometry",
    "synthesize",
    "write_samples",
]

"""Export the EMA generator of a training checkpoint as a MONAI Bundle that writes synthetic NIfTI slices.

    python pipelines/export_bundle.py --checkpoint outputs/ct/checkpoints/last.pt --out bundles/pancreas_gvae
    cd bundles/pancreas_gvae && python -m monai.bundle run --config_file configs/inference.json --num_samples 8

Pixel spacing and HU window are taken from the checkpoint's config (data.sampling / data.preprocess) where
it records them; --spacing / --window override that, --no-window keeps the CT channel in [0, 1].
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pancreas_gvae.errors import PipelineError, run_cli
from pancreas_gvae.synthesis.bundle import DEFAULT_NAME, export_bundle
from pancreas_gvae.synthesis.generator import generator_from_checkpoint, infer_geometry


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, required=True, help="training checkpoint (OUT/checkpoints/last.pt)")
    p.add_argument("--out", type=Path, required=True, help="bundle folder to write (must be empty or new)")
    p.add_argument("--spacing", type=float, nargs="+", metavar="MM",
                   help="mm per pixel of the training slices, one value or one per spatial dim")
    p.add_argument("--window", type=float, nargs=2, metavar=("LOW", "HIGH"),
                   help="HU window the CT channel was scaled from, e.g. --window -125 275")
    p.add_argument("--no-window", action="store_true", help="keep the CT channel in [0, 1] (no HU conversion)")
    p.add_argument("--weights", choices=["ema", "model"], default="ema",
                   help="ema: the EMA generator (default); model: the raw generator")
    p.add_argument("--name", default=DEFAULT_NAME, help=f"bundle name (default {DEFAULT_NAME})")
    p.add_argument("--num-samples", type=int, default=16, help="default num_samples of the bundle (default 16)")
    p.add_argument("--seed", type=int, default=0, help="default seed of the bundle (default 0)")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")
    return p.parse_args(argv)


@run_cli
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.window is not None and args.no_window:
        raise PipelineError("give --window or --no-window, not both")
    generator, config = generator_from_checkpoint(args.checkpoint, weights=args.weights)
    found = infer_geometry(config)
    spacing = args.spacing if args.spacing is not None else found.spacing
    window = None if args.no_window else args.window if args.window is not None else found.window
    window_flags = args.window is not None or args.no_window
    for note in found.notes:
        if ("spacing" in note and args.spacing is None) or ("window" in note and not window_flags):
            print(f"using {note}")
    if spacing is None:
        print("no pixel spacing known: the NIfTI files get 1 mm pixels (give --spacing)")
    if window is None and config.model.mask_channels and not args.no_window:
        print("no HU window known: the CT channel stays in [0, 1] (give --window LOW HIGH)")
    out = export_bundle(generator, config, args.out, spacing=spacing, window=window, name=args.name,
                        num_samples=args.num_samples, seed=args.seed, overwrite=args.overwrite)
    m = config.model
    print(f"exported the {args.weights} generator ({m.kind}, latent {m.latent_dim}, {m.in_channels} channel(s), "
          f"{m.image_size} px) to {out}")
    print(f"  run it: cd {out} && python -m monai.bundle run --config_file configs/inference.json --num_samples 8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

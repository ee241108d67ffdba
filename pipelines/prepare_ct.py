"""Prepare a CT cohort for training: checks, world-space label pairing, preprocessing cache, manifest.

    python pipelines/prepare_ct.py --data-root DIR --out DIR [--labels DIR] [--layout auto|tcia|msd|folder|slices]
        [--pancreas-label N[,N...]] [--workers N] [--config configs/data/default.yaml] [--force] [--wait SECONDS]

Writes ``OUT/manifest.csv`` (one row per case, ``ok`` or ``excluded`` with a reason) and ``OUT/cache/``;
a re-run reuses every case whose cache matches the config and the source files. One run at a time per
output folder: a second one waits ``--wait`` seconds for the first, then stops naming it. See docs/data.md.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pancreas_gvae.data.ct.discovery import LAYOUTS
from pancreas_gvae.data.ct.manifest import MANIFEST_NAME, format_summary
from pancreas_gvae.errors import PipelineError, run_cli

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "data" / "default.yaml"


def _label_values(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers like 7 or 1,2; got {text!r}") from None
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"label values must be positive integers, got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", required=True, type=Path, help="folder with the cohort (see --layout)")
    p.add_argument("--out", required=True, type=Path, help="output folder: manifest.csv and cache/")
    p.add_argument("--labels", type=Path, default=None,
                   help="labels folder (TCIA: TCIA_pancreas_labels-02-05-2017, found beside the data if omitted; "
                        "slices: the masks folder, default DIR/masks)")
    p.add_argument("--layout", choices=LAYOUTS, default="auto",
                   help="tcia (Pancreas-CT/PANCREAS_NNNN), msd (dataset.json, imagesTr, labelsTr), "
                        "folder (one sub-folder or NIfTI file per case), slices (2D images/ + masks/ + a patient "
                        "key, one case per patient; see configs/data/nih_slices.yaml); auto detects it")
    p.add_argument("--pancreas-label", type=_label_values, default=None, metavar="N[,N]",
                   help="label value(s) meaning pancreas in multi-organ maps (e.g. 7; slices: mask values); "
                        "default from the config")
    p.add_argument("--workers", type=int, default=1, help="parallel processes (default 1)")
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG,
                   help="data config YAML (default configs/data/default.yaml)")
    p.add_argument("--force", action="store_true", help="redo every case even when its cache is current")
    p.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                   help="wait this long for another run preparing the same --out (default 0: stop at once; "
                        "-1: no limit)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("-v", "--verbose", action="store_true", help="log details")
    return p


@run_cli
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    from pancreas_gvae.data.ct.prepare import prepare_dataset  # heavy imports (torch, MONAI, ITK) after --help

    df = prepare_dataset(args.data_root, args.out, labels=args.labels, layout=args.layout,
                         pancreas_label=args.pancreas_label, config=args.config, workers=args.workers,
                         force=args.force, progress=not args.no_progress, wait_s=args.wait)
    print(format_summary(df))
    print(f"manifest: {args.out / MANIFEST_NAME}")
    if not (df["status"] == "ok").any():
        raise PipelineError("no case passed the checks; see the reasons above", exit_code=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

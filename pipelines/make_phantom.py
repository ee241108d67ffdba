"""Write a synthetic phantom cohort in the TCIA Pancreas-CT layout (DICOM series + NIH-style labels).

    python pipelines/make_phantom.py --out data/phantom --cases 4 --size 64 --seed 0

Layout: OUT/Pancreas-CT/PANCREAS_0001/<study>/<series>/1-001.dcm ... and
OUT/TCIA_pancreas_labels-02-05-2017/label0001.nii.gz. The same seed gives byte-identical files.
Geometry and conventions: see pancreas_gvae/data/ct/phantom.py.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from pancreas_gvae.data.ct.phantom import label_path, render_phantom_case, write_phantom_case
from pancreas_gvae.errors import PipelineError, run_cli


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="cohort folder to write into")
    p.add_argument("--cases", type=int, default=4, help="number of cases (default 4)")
    p.add_argument("--size", type=int, default=64, help="rows = columns per slice (default 64; real data: 512)")
    p.add_argument("--slices", type=int, help="slices per case (default: an 80 mm slab, 32-53 slices)")
    p.add_argument("--slice-interval", type=float, help="mm between slices (default: the slice thickness)")
    p.add_argument("--seed", type=int, default=0, help="random seed; case n depends only on (seed, n)")
    p.add_argument("--start-index", type=int, default=1, help="number of the first case (default 1)")
    p.add_argument("--overwrite", action="store_true", help="replace cases that already exist")
    return p.parse_args(argv)


@run_cli
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.cases < 1:
        raise PipelineError(f"--cases must be at least 1, got {args.cases}")
    last = args.start_index + args.cases - 1
    if args.start_index < 1 or last > 9999:
        raise PipelineError(f"case numbers must stay within 1..9999, got {args.start_index}..{last}")
    t0 = time.perf_counter()
    for index in range(args.start_index, args.start_index + args.cases):
        case = render_phantom_case(index, size=args.size, slices=args.slices, seed=args.seed,
                                   slice_interval=args.slice_interval)
        series_dir, _ = write_phantom_case(case, args.out, overwrite=args.overwrite)
        g, r = case.geometry, case.pancreas_instances()
        print(f"{case.case_id}: {g.slices} slices of {g.size}x{g.size}, pixel {g.pixel_spacing:.4g} mm, "
              f"thickness {g.slice_thickness:g} mm, pancreas on instances {r.start}-{r.stop - 1} -> "
              f"{series_dir.relative_to(args.out)}")
    print(f"wrote {args.cases} cases to {args.out} (labels in {label_path(args.out, args.start_index).parent.name}/) "
          f"in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

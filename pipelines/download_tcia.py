"""Download the TCIA Pancreas-CT collection (CT series only) through the NBIA REST API, resumably.

    python pipelines/download_tcia.py --collection Pancreas-CT --out data/tcia
    python pipelines/download_tcia.py --out data/tcia --patients PANCREAS_0001,PANCREAS_0002

Writes OUT/Pancreas-CT/<PatientID>/<StudyInstanceUID>/<SeriesInstanceUID>/*.dcm and OUT/series.csv
(PatientID <-> study <-> series <-> image count). Run it again to resume: complete series are skipped.
PANCREAS_0025 and PANCREAS_0070 (duplicates of PANCREAS_0002, removed in version 2) are skipped unless
--include-duplicates is given, so a full download keeps 80 cases. Exit status 1 if any series failed.
Labels are not served by this API: fetch TCIA_pancreas_labels-02-05-2017 separately from the
collection page.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pancreas_gvae.data.ct.tcia import DEFAULT_BASE_URL, DEFAULT_COLLECTION, download_collection
from pancreas_gvae.errors import run_cli


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--collection", default=DEFAULT_COLLECTION, help=f"TCIA collection (default {DEFAULT_COLLECTION})")
    p.add_argument("--out", type=Path, required=True, help="download folder")
    p.add_argument("--base-url", default=DEFAULT_BASE_URL, help=f"NBIA API root (default {DEFAULT_BASE_URL})")
    p.add_argument("--patients", help="comma-separated PatientIDs, e.g. PANCREAS_0001,PANCREAS_0002 (default all)")
    p.add_argument("--include-duplicates", action="store_true",
                   help="also fetch PANCREAS_0025 and PANCREAS_0070 (duplicates of PANCREAS_0002)")
    p.add_argument("--attempts", type=int, default=3, help="downloads tried per series before giving up (default 3)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds without data before a request fails")
    p.add_argument("--retry-delay", type=float, default=2.0, help="seconds before a retry, times the attempt number")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


@run_cli
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    patients = args.patients.split(",") if args.patients else None
    report = download_collection(args.out, collection=args.collection, base_url=args.base_url, patients=patients,
                                 include_duplicates=args.include_duplicates, attempts=args.attempts,
                                 timeout=args.timeout, retry_delay=args.retry_delay, progress=not args.no_progress)
    print(report.summary())
    print(f"series table: {args.out / 'series.csv'}")
    return 0 if report.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())

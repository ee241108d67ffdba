"""Patient-level splits for the segmentation experiment, and its leakage guard.

:func:`split_cases` - a fixed case-level train / test split from a seed (never by slice: neighbouring slices of
one patient are near-copies); :func:`subset_cases` - the data fraction as a subset of the *training* cases (at
least one).

Leakage guard: a generator used for augmentation must only have seen training cases. The experiment
(:mod:`pancreas_gvae.segmentation.experiment`) trains each from a manifest restricted to its cases
(:func:`restrict_manifest`) and writes the case lists to ``split.json`` beside its checkpoint (a local
file: case ids are TCIA PatientIDs and never go to MLflow); :func:`check_generator_split` refuses a
checkpoint whose ``split.json`` names a test case, and reports "unverified" when there is none.
"""


from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from pancreas_gvae.errors import DataError, PipelineError

SPLIT_NAME = "split.json"


# ----------------------------------------------------------------------------- splits


@dataclass
class CaseSplit:
    train: list[str]
    test: list[str]
    seed: int = 0

    def __post_init__(self) -> None:
        overlap = set(self.train) & set(self.test)
        if overlap:
            raise PipelineError(f"{len(overlap)} case(s) on both sides of the train / test split")

    def to_json(self) -> dict[str, Any]:
        return {"seed": self.seed, "train": list(self.train), "test": list(self.test)}


def ok_cases(manifest: pd.DataFrame) -> list[str]:
    return sorted(manifest.loc[manifest["status"] == "ok", "case_id"].astype(str))


def split_cases(case_ids: Sequence[str], *, test_fraction: float = 0.4, seed: int = 0) -> CaseSplit:
    """A seeded, case-level split: ``max(1, round(test_fraction * n))`` test cases, the rest train (>= 1)."""
    ids = sorted(set(map(str, case_ids)))
    if len(ids) < 2:
        raise DataError(f"need at least 2 usable cases for a train / test split, got {len(ids)}")
    if not 0.0 < test_fraction < 1.0:
        raise PipelineError(f"test_fraction must be in (0, 1), got {test_fraction}")
    n_test = min(len(ids) - 1, max(1, round(test_fraction * len(ids))))
    perm = np.random.default_rng([seed, 7919]).permutation(len(ids))
    test = sorted(ids[i] for i in perm[:n_test])
    train = sorted(ids[i] for i in perm[n_test:])
    return CaseSplit(train=train, test=test, seed=seed)


def n_cases_for(fraction: float, n_train: int) -> int:
    if not 0.0 < fraction <= 1.0:
        raise PipelineError(f"fractions must be in (0, 1], got {fraction}")
    return max(1, min(n_train, round(fraction * n_train)))


def subset_cases(train: Sequence[str], fraction: float, seed: int) -> list[str]:
    """``fraction`` of the training cases (at least one), drawn with ``seed``; nested across fractions."""
    train = sorted(train)
    k = n_cases_for(fraction, len(train))
    perm = np.random.default_rng([seed, 104729]).permutation(len(train))
    return sorted(train[i] for i in perm[:k])


def restrict_manifest(manifest: pd.DataFrame, cases: Sequence[str]) -> pd.DataFrame:
    """The manifest with only ``cases`` left (what the generator may see)."""
    keep = manifest["case_id"].astype(str).isin(set(cases))
    return manifest[keep].reset_index(drop=True)


def write_split(split: CaseSplit, folder: str | Path) -> Path:
    path = Path(folder) / SPLIT_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(split.to_json(), indent=2))
    return path


def check_generator_split(checkpoint: str | Path, split: CaseSplit) -> str:
    """``ok`` if the generator's recorded training cases avoid every test case, ``unverified`` without a record.

    Raises when a test case of this split was in the generator's training data (leakage).
    """
    ckpt = Path(checkpoint)
    for folder in (ckpt.parent, ckpt.parent.parent):
        path = folder / SPLIT_NAME
        if path.is_file():
            seen = set(json.loads(path.read_text())["train"])
            leaked = seen & set(split.test)
            if leaked:
                raise PipelineError(f"the generator at {ckpt} was trained on {len(leaked)} of this split's "
                                    f"test case(s) (see {path}): synthetic slices would leak the test set. "
                                    "Train the generator on this split's training cases only (a new --out)")
            return "ok"
    return "unverified"

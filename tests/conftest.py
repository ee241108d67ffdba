"""Shared fixtures: the real data in ../shared/data, skipped with a reason where absent."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


def _shared(sub: str) -> Path:
    path = SHARED_DATA / sub
    if not path.exists():
        pytest.skip(f"real data not found at {path} (expected ../shared/data beside the project)")
    return path


@pytest.fixture
def mnist_dir() -> Path:
    return _shared("mnist")


@pytest.fixture
def fashion_dir() -> Path:
    return _shared("fashion-mnist")


@pytest.fixture
def ct_dir() -> Path:
    return _shared("ct")

"""The review notebooks: committed clean, and they run top to bottom on a tiny phantom run.

One session-scoped fixture makes the data both notebooks read: a 4-case phantom cohort whose last case
lacks its label (so the data review has an excluded case to show), prepared, and a 2-step CT run in a
temporary sqlite store with its artifacts in a temporary folder.
"""

from __future__ import annotations

import re
from pathlib import Path

import mlflow
import nbformat
import pytest
from mlflow.tracking import MlflowClient
from nbclient import NotebookClient

from pancreas_gvae.data.ct.phantom import label_path, make_phantom_cohort
from pancreas_gvae.pipelines import train_ct

REPO = Path(__file__).resolve().parents[2]
NOTEBOOKS = REPO / "notebooks"
NAMES = ["01_data_review.ipynb", "02_synthetic_review.ipynb"]
# text each executed notebook must show (the fixture's excluded case; the memorisation summary)
EXPECTED = {"01_data_review.ipynb": ["PANCREAS_0004", "missing_label"], "02_synthetic_review.ipynb": ["near-copies"]}
EXPERIMENT = "pancreas-gvae-ct"
TINY = ["--set", "data.phantom.size=64", "--batch-size", "8", "--set", "model.channels=[8,16,32]",
        "--set", "model.latent_dim=8", "--set", "train.log_every=1", "--set", "train.sample_every=1",
        "--set", "train.checkpoint_every=2", "--set", "data.nifti_samples=4",
        "--set", "data.monitor={n_samples: 16, n_real: 32, segmenter_steps: 3}", "--set", "train.num_samples=8",
        "--set", "tracking.system_metrics=false", "--set", "tracking.log_model=false"]


def _read(name: str) -> nbformat.NotebookNode:
    return nbformat.read(NOTEBOOKS / name, as_version=4)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> dict[str, str]:
    """Environment variables that point both notebooks at a tiny prepared cohort and MLflow run."""
    root = tmp_path_factory.mktemp("notebook-data")
    out = root / "out"
    make_phantom_cohort(out / "phantom", cases=4, size=64, seed=0)
    label_path(out / "phantom", 4).unlink()  # PANCREAS_0004 is excluded: missing_label
    uri = f"sqlite:///{root / 'mlflow.db'}"
    # artifacts in the temporary folder, not in ./mlruns of the working directory
    MlflowClient(uri).create_experiment(EXPERIMENT, artifact_location=(root / "artifacts").as_uri())
    previous = mlflow.get_tracking_uri() if mlflow.is_tracking_uri_set() else None
    try:
        assert train_ct.main(["--out", str(out), "--tracking-uri", uri, *TINY, "--steps", "2"]) == 0
    finally:
        mlflow.set_tracking_uri(previous)
    return {"PGVAE_PREPARED": str(out / "prepared"), "PGVAE_TRACKING_URI": uri, "PGVAE_EXPERIMENT": EXPERIMENT,
            "PGVAE_DOWNLOAD_DIR": str(root / "review"), "PGVAE_CASES_SHOWN": "2", "PGVAE_SLICES_PER_CASE": "2",
            "PGVAE_MAX_REAL_SLICES": "200", "PGVAE_N_PAIRS": "3"}


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs_top_to_bottom(name, tiny_run, monkeypatch):
    for key, value in tiny_run.items():
        monkeypatch.setenv(key, value)  # the kernel inherits this process's environment
    nb = _read(name)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    errors = [f"{o.ename}: {o.evalue}" for o in outputs if o.output_type == "error"]
    assert not errors, errors
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 2, "the notebook drew no figures"
    text = "\n".join(o.get("text", "") + o.get("data", {}).get("text/plain", "") for o in outputs)
    assert all(s in text for s in EXPECTED[name]), text[-3000:]


@pytest.mark.parametrize("name", NAMES)
def test_committed_notebook_is_clean(name):
    nb = _read(name)
    nbformat.validate(nb)
    assert nb.metadata.kernelspec.name == "python3"
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [], f"{name}: a cell was committed with outputs (clear them)"
            assert cell.execution_count is None, f"{name}: a cell was committed with an execution count"


@pytest.mark.parametrize("name", NAMES)
def test_settings_are_environment_variables_documented_in_the_readme(name):
    """Every PGVAE_* variable a notebook reads is read in its first code cell and listed in notebooks/README.md."""
    code = [cell.source for cell in _read(name).cells if cell.cell_type == "code"]
    used = set(re.findall(r"\bPGVAE_[A-Z_]+\b", "\n".join(code)))
    assert used and used == set(re.findall(r"\bPGVAE_[A-Z_]+\b", code[0]))
    readme = (NOTEBOOKS / "README.md").read_text()
    assert not used - set(re.findall(r"\bPGVAE_[A-Z_]+\b", readme)), "undocumented settings"

"""run_cli: a stopped command (Ctrl-C or SIGTERM) runs its own clean-up, so MLflow runs end and tables stay whole."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest

from pancreas_gvae.atomic import write_csv

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(os.name != "posix", reason="POSIX signals")
def test_sigterm_runs_the_commands_clean_up_and_exits_143(tmp_path):
    """Python's default for SIGTERM skips every ``finally``: an MLflow run opened by the command would stay
    RUNNING forever. Under run_cli the command's ``finally`` runs, an MLflow run ends (not RUNNING), exit 143."""
    script = tmp_path / "job.py"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    script.write_text(textwrap.dedent(f"""
        import time
        from pathlib import Path

        import mlflow

        from pancreas_gvae.errors import run_cli

        @run_cli
        def main():
            mlflow.set_tracking_uri({uri!r})
            with mlflow.start_run(run_name="long-job"):
                try:
                    print("ready", flush=True)
                    time.sleep(120)
                finally:
                    Path({str(tmp_path / 'cleaned')!r}).write_text("yes")

        raise SystemExit(main())
    """))
    # mlflow.set_experiment (earlier tests, in this process) exports MLFLOW_EXPERIMENT_ID for child processes;
    # that id means nothing in the job's own store
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=REPO, env=env)
    first = proc.stdout.readline().strip()
    if first != "ready":
        out, err = proc.communicate(timeout=60)
        pytest.fail(f"the job did not start (rc {proc.returncode}): {first}{out}\n{err}")
    time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "terminated (SIGTERM)" in err and "Traceback" not in err, err
    assert (tmp_path / "cleaned").read_text() == "yes"
    import mlflow

    runs = mlflow.MlflowClient(tracking_uri=uri).search_runs(
        [mlflow.MlflowClient(tracking_uri=uri).get_experiment_by_name("Default").experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"]


def test_the_sigterm_handler_is_only_installed_for_the_command():
    from pancreas_gvae.errors import run_cli

    seen = []

    @run_cli
    def main():
        seen.append(signal.getsignal(signal.SIGTERM))

    before = signal.getsignal(signal.SIGTERM)
    assert main() == 0
    assert signal.getsignal(signal.SIGTERM) is before
    if before is signal.SIG_DFL:
        assert callable(seen[0]) and seen[0] is not signal.SIG_DFL


def test_write_csv_never_leaves_half_a_table(tmp_path, monkeypatch):
    path = tmp_path / "dice.csv"
    write_csv(pd.DataFrame({"arm": ["real"], "dice": [0.5]}), path)

    def boom(self, *args, **kwargs):
        raise KeyboardInterrupt  # as a stop mid-write would

    monkeypatch.setattr(pd.DataFrame, "to_csv", boom)
    with pytest.raises(KeyboardInterrupt):
        write_csv(pd.DataFrame({"arm": ["real", "real+classic"], "dice": [0.5, 0.6]}), path)
    monkeypatch.undo()
    assert pd.read_csv(path).to_dict("records") == [{"arm": "real", "dice": 0.5}]
    assert [p.name for p in tmp_path.iterdir()] == ["dice.csv"]  # no temporary file left behind

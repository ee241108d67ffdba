import pytest
import torch

from pancreas_gvae.errors import PipelineError
from pancreas_gvae.training import checkpoint as ckpt


def test_atomic_write_keeps_old_file_when_save_fails(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    ckpt.save_checkpoint({"step": 1}, path)

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.torch, "save", boom)
    with pytest.raises(OSError):
        ckpt.save_checkpoint({"step": 2}, path)
    monkeypatch.undo()
    assert ckpt.load_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"], "no temporary file may be left behind"


def test_unreadable_checkpoint_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(PipelineError, match="could not be read"):
        ckpt.load_checkpoint(bad)
    with pytest.raises(PipelineError, match="not found"):
        ckpt.load_checkpoint(tmp_path / "absent.pt")


def test_round_trip_tensors(tmp_path):
    state = {"w": torch.arange(3.0), "rng": torch.get_rng_state()}
    out = ckpt.load_checkpoint(ckpt.save_checkpoint(state, tmp_path / "sub" / "c.pt"))
    assert torch.equal(out["w"], state["w"])


def test_orphan_temporaries_of_killed_writers_are_removed(tmp_path):
    import os
    import subprocess
    import sys

    from pancreas_gvae.training.checkpoint import remove_orphan_temporaries

    path = tmp_path / "checkpoints" / "last.pt"
    ckpt.save_checkpoint({"step": 1}, path)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    (path.parent / f"last.pt.{dead}.abc123.tmp").write_bytes(b"half")  # a killed writer's leftover
    (path.parent / "last.pt.k9x2.tmp").write_bytes(b"half")  # an older run's name, without a pid
    live = path.parent / f"last.pt.{os.getpid()}.def456.tmp"  # a writer still running
    live.write_bytes(b"in progress")
    assert sorted(remove_orphan_temporaries(path)) == [f"last.pt.{dead}.abc123.tmp", "last.pt.k9x2.tmp"]
    assert live.exists() and path.exists()

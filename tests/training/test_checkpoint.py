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

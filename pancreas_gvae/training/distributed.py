"""Several processes under ``torchrun``: process-group setup and the few collectives the trainer needs.

Every helper is a no-op in a single process, so the same code runs with and without
``torchrun``. See docs/multi-gpu.md for how a run is launched and what each rank does.

Why no ``DistributedDataParallel`` wrapper: its reducer hooks ``.backward()`` and assumes one
backward per forward over all parameters, while a GVAE step routes different losses into
E, G and D with ``torch.autograd.grad`` (which DDP's hooks never see) and calls D several
times; the VAE and GAN steps use the same routing, so one mechanism serves all three. The
trainer instead averages the gradients it hands to each optimiser with one coalesced
all-reduce per optimiser step (:func:`average_gradients`: flattened into DDP-sized
buckets, launched asynchronously, then waited on), averages the
BatchNorm statistics after each step (:func:`average_norm_stats`) and starts every
rank from rank 0's weights (:func:`broadcast_module`); everything else that is state
(Adam moments, EMA generator, spectral-norm vectors) is then a deterministic function
of identical inputs and stays identical on every rank (checked in tests/training/test_ddp.py).
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from pancreas_gvae.errors import PipelineError

# Set by torchrun (and by ``torch.distributed.run``) for every worker process.
_TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0)) if is_distributed() else 0


def is_main_process() -> bool:
    return rank() == 0


def _default_device(device: str) -> torch.device:
    kind = device.split(":")[0]
    if kind not in ("auto", "cpu", "cuda"):
        raise PipelineError(f"device must be auto, cpu or cuda, got {device!r}")
    if kind == "cpu" or (kind == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise PipelineError("--device cuda was asked for, but no CUDA device is available; use --device cpu")
    return torch.device("cuda", torch.cuda.current_device())


def init_distributed(device: str = "auto", *, timeout: datetime.timedelta | None = None) -> torch.device:
    """Join the process group that ``torchrun`` set up; return this process's device.

    Not launched by torchrun: nothing to join, returns the default device (``cuda:0`` when
    CUDA is there and ``device`` allows it, else ``cpu``). Under torchrun, CUDA training
    uses ``cuda:LOCAL_RANK`` (made the current device) with NCCL for CUDA tensors and gloo
    for the few CPU-side collectives (RNG states in checkpoints, barriers); CPU training
    uses gloo. Calling it again returns the same device.
    """
    if not launched_by_torchrun():
        return _default_device(device)
    missing = [name for name in _TORCHRUN_ENV if name not in os.environ]
    if missing:
        raise PipelineError(f"RANK/WORLD_SIZE are set but {', '.join(missing)} are not: launch several "
                            "processes with `torchrun --nproc_per_node=N ...`")
    rank_, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    use_cuda = _default_device(device).type == "cuda"
    if use_cuda:
        if local >= torch.cuda.device_count():
            raise PipelineError(f"LOCAL_RANK {local} but only {torch.cuda.device_count()} CUDA device(s) are "
                                "visible: use --nproc_per_node <= the number of GPUs (or check CUDA_VISIBLE_DEVICES)")
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    if not is_distributed():
        kwargs: dict[str, Any] = {"device_id": dev} if use_cuda else {}
        if timeout is not None:
            kwargs["timeout"] = timeout
        dist.init_process_group(backend="cpu:gloo,cuda:nccl" if use_cuda else "gloo", init_method="env://",
                                rank=rank_, world_size=world, **kwargs)
    return dev


def cleanup() -> None:
    """Leave the process group (safe to call when there is none)."""
    if is_distributed():
        dist.destroy_process_group()


@contextlib.contextmanager
def session(device: str = "auto", *, timeout: datetime.timedelta | None = None) -> Iterator[torch.device]:
    """``with session() as device:`` = :func:`init_distributed` ... :func:`cleanup`."""
    dev = init_distributed(device, timeout=timeout)
    try:
        yield dev
    finally:
        cleanup()


def require_process_group() -> None:
    """Refuse to train N unsynchronised copies when torchrun started N processes but nobody joined the group."""
    if launched_by_torchrun() and int(os.environ["WORLD_SIZE"]) > 1 and not is_distributed():
        raise PipelineError("launched by torchrun with WORLD_SIZE > 1, but the process group was not initialised: "
                            "call pancreas_gvae.training.distributed.init_distributed() first in the pipeline")


def print0(*args, **kwargs) -> None:
    """``print`` on rank 0 only."""
    if is_main_process():
        print(*args, **kwargs)


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (a collective: all ranks must call it)."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


BUCKET_BYTES = 25 * 2**20  # DDP's default bucket_cap_mb


def buckets(tensors: Sequence[torch.Tensor], cap_bytes: int = BUCKET_BYTES) -> list[list[torch.Tensor]]:
    """Consecutive groups of one dtype and device, each at most ``cap_bytes`` (a larger tensor alone)."""
    out: list[list[torch.Tensor]] = []
    size = 0
    for t in tensors:
        nbytes = t.numel() * t.element_size()
        last = out[-1] if out else None
        if last is None or size + nbytes > cap_bytes or (t.dtype, t.device) != (last[0].dtype, last[0].device):
            out.append([t])
            size = nbytes
        else:
            last.append(t)
            size += nbytes
    return out


def _coalesced_(tensors: Sequence[torch.Tensor], collective, divide_by: int = 1) -> None:
    """Run ``collective(flat) -> work`` on flat bucket copies of ``tensors`` (all launched, then waited),
    divide by ``divide_by``, copy back."""
    pending = []
    for bucket in buckets(tensors):
        flat = torch.cat([t.detach().reshape(-1) for t in bucket])
        pending.append((bucket, flat, collective(flat)))
    for bucket, flat, work in pending:
        work.wait()
        if divide_by != 1:
            flat /= divide_by
        offset = 0
        for t in bucket:
            t.detach().copy_(flat[offset: offset + t.numel()].view_as(t))
            offset += t.numel()


def _all_reduce_mean_(tensors: Sequence[torch.Tensor]) -> None:
    """Average ``tensors`` in place across ranks, one all-reduce per 25 MB bucket.

    All-reduce hands every rank the same reduced buffer (ring/tree reduce, then the
    result is copied out, never reduced again per rank), so the averages are bitwise
    identical on every rank, even though they may differ in the last bit from a
    single-process sum taken in another order.
    """
    if not tensors:
        return
    _coalesced_(tensors, lambda flat: dist.all_reduce(flat, op=dist.ReduceOp.SUM, async_op=True),
                divide_by=world_size())


def average_gradients(params: Iterable[torch.nn.Parameter]) -> None:
    """All-reduce and average gradients across ranks in one flat buffer.

    Every rank must pass gradients for the same parameters in the same order (true for
    ``torch.autograd.grad``, which returns one per input). Averaged gradients are identical
    on every rank, so clipping, Adam and the EMA then take identical steps everywhere.
    """
    if not is_distributed():
        return
    _all_reduce_mean_([p.grad for p in params if p.grad is not None])


def average_norm_stats(module: nn.Module) -> None:
    """Average BatchNorm/InstanceNorm running statistics across ranks (call once per step).

    Each rank normalises with its own shard's batch statistics, so running means and
    variances drift apart. Averaged rather than broadcast from rank 0 (DDP's
    ``broadcast_buffers``): the update r <- (1-m) r + m * stat is linear, so the averaged
    running mean is exactly the running mean of the global batch's means (equal shards),
    and the averaged variance pools the shards' variances; rank 0's alone would use
    1/world of the data. One small all-reduce per step. ``num_batches_tracked`` is not
    touched: every rank calls each network the same number of times, so it is equal.
    Spectral-norm vectors (``_u``, ``_v``) are deliberately left alone: they are updated
    from the weights only, which are identical, so they stay identical (verified in tests).
    """
    if not is_distributed():
        return
    stats = []
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats and m.running_mean is not None:
            stats += [m.running_mean, m.running_var]
    _all_reduce_mean_(stats)


def any_across_ranks(flags: Sequence[bool], device: torch.device | str = "cpu") -> list[bool]:
    """Element-wise OR of ``flags`` over all ranks (a collective)."""
    if not is_distributed():
        return list(flags)
    t = torch.tensor([float(f) for f in flags], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return [bool(v > 0) for v in t.tolist()]


def mean_across_ranks(value: torch.Tensor) -> torch.Tensor:
    """The mean of a tensor over all ranks (a collective; returns a new tensor)."""
    if not is_distributed():
        return value
    out = value.detach().clone().float()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / world_size()


def broadcast_module(module: torch.nn.Module) -> None:
    """Make every rank start from rank 0's parameters and buffers (spectral-norm vectors included)."""
    if not is_distributed():
        return
    _coalesced_(list(module.parameters()) + list(module.buffers()),
                lambda flat: dist.broadcast(flat, src=0, async_op=True))

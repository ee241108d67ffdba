"""CT training throughput (issue 4): the GVAE against a MONAI AutoencoderKL + PatchDiscriminator.

    python benchmarks/bench_train_ct.py [--sizes 64,128,256] [--steps N] [--warmup K]
                                        [--batch-size B] [--repeats R] [--device cpu|cuda]

Per resolution, the GVAE (configs/ct_<size>.yaml, one full ``Trainer.train_step``: D update,
E/G update, EMA) and a reference of similar parameter count are trained on the same synthetic
2-channel batch (windowed CT + binary mask), same batch size, same resolution. The reference
is trained as in MONAI's 2D AutoencoderKL tutorial: L1 reconstruction + KL (weight 1e-6) +
least-squares patch adversarial loss (weight 0.01), G step then D step, Adam 1e-4 / 5e-4. Its
perceptual loss is left out: it needs downloaded LPIPS weights. The tutorial's adversarial
warm-up epochs are not modelled: every reference step is a full post-warm-up step.

Every measurement runs in a fresh spawned process, so peak memory starts clean: on CPU the
peak RSS (``ru_maxrss``) minus the RSS just before the model is built; on CUDA
``torch.cuda.max_memory_allocated``. GVAE and reference children alternate ``--repeats``
times. Each process's figure comes from its fastest timed step (other processes sharing the
machine only add time); images/s is given as mean (min-max) over the processes, and the ratio
GVAE/reference per repeat pair.

On CUDA (default sizes 256,512, bf16 autocast) it also gives model FLOP utilisation (FLOPs of
one training step counted with FlopCounterMode / step time / ``--peak-tflops``) and sampling
slices/s of the EMA generator at 512 (batch 64, no grad).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from monai.losses import PatchAdversarialLoss
from monai.networks.nets import AutoencoderKL, PatchDiscriminator
from torch.utils.flop_counter import FlopCounterMode

from _common import header, markdown_table
from pancreas_gvae.config import load_config
from pancreas_gvae.models import build_model
from pancreas_gvae.training.trainer import Trainer, seed_everything

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

# MONAI reference per resolution: tutorial layout (no attention), sized to the GVAE's parameter count.
REFERENCE = {
    64: dict(channels=(32, 64, 128), num_res_blocks=1, disc_channels=32, disc_layers=3),
    128: dict(channels=(32, 64, 128, 128), num_res_blocks=1, disc_channels=32, disc_layers=3),
    256: dict(channels=(64, 128, 256, 512), num_res_blocks=2, disc_channels=64, disc_layers=4),
    512: dict(channels=(64, 128, 256, 512), num_res_blocks=2, disc_channels=64, disc_layers=4),
}
KL_WEIGHT, ADV_WEIGHT = 1e-6, 0.01  # MONAI 2D AutoencoderKL tutorial
# (batch, steps, warmup) when not given: the config's batch, except 256 on CPU (a few steps, small batch).
# Other sizes: the config's batch, 5 steps, 2 warm-up.
DEFAULTS = {
    "cpu": {64: (32, 4, 1), 128: (32, 2, 1), 256: (2, 2, 1)},
    "cuda": {256: (32, 20, 5), 512: (16, 20, 5)},
}


def synthetic_batch(batch: int, size: int, device: torch.device) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    ct = torch.rand(batch, 1, size, size, generator=g)
    mask = (torch.rand(batch, 1, size, size, generator=g) > 0.9).float()
    x = torch.cat([ct, mask], dim=1).to(device)
    return x.contiguous(memory_format=torch.channels_last) if device.type == "cuda" else x


def build_gvae(size: int, batch: int, device: torch.device):
    precision = "bf16" if device.type == "cuda" else "fp32"
    cfg = load_config(CONFIGS / f"ct_{size}.yaml", [f"train.batch_size={batch}", f"train.device={device.type}",
                                                    f"train.precision={precision}", "train.compile=false"])
    seed_everything(0)
    trainer = Trainer(cfg, build_model(cfg.model), device)
    return trainer.model, trainer.train_step, trainer


def build_reference(size: int, device: torch.device):
    r = REFERENCE[size]
    torch.manual_seed(0)
    ae = AutoencoderKL(spatial_dims=2, in_channels=2, out_channels=2, channels=r["channels"], latent_channels=3,
                       num_res_blocks=r["num_res_blocks"], attention_levels=(False,) * len(r["channels"]),
                       with_encoder_nonlocal_attn=False, with_decoder_nonlocal_attn=False).to(device)
    disc = PatchDiscriminator(spatial_dims=2, num_layers_d=r["disc_layers"], channels=r["disc_channels"],
                              in_channels=2, out_channels=1).to(device)
    if device.type == "cuda":  # same treatment as the Trainer gives the GVAE
        torch.backends.cudnn.benchmark = True
        ae, disc = ae.to(memory_format=torch.channels_last), disc.to(memory_format=torch.channels_last)
    opt_g = torch.optim.Adam(ae.parameters(), lr=1e-4)
    opt_d = torch.optim.Adam(disc.parameters(), lr=5e-4)
    adv = PatchAdversarialLoss(criterion="least_squares")
    autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")  # noqa: E731

    def step(x: torch.Tensor) -> dict[str, float]:
        ae.train(), disc.train()
        opt_g.zero_grad(set_to_none=True)
        with autocast():
            recon, z_mu, z_sigma = ae(x)
            recons_loss = F.l1_loss(recon.float(), x.float())
            kl = 0.5 * torch.sum(z_mu.pow(2) + z_sigma.pow(2) - torch.log(z_sigma.pow(2)) - 1, dim=[1, 2, 3])
            kl = torch.sum(kl) / kl.shape[0]
            logits_fake = disc(recon.contiguous().float())[-1]
            loss_g = (recons_loss + KL_WEIGHT * kl
                      + ADV_WEIGHT * adv(logits_fake, target_is_real=True, for_discriminator=False))
        loss_g.backward()
        opt_g.step()
        opt_d.zero_grad(set_to_none=True)
        with autocast():
            logits_fake = disc(recon.contiguous().detach())[-1]
            loss_fake = adv(logits_fake, target_is_real=False, for_discriminator=True)
            logits_real = disc(x.contiguous().detach())[-1]
            loss_real = adv(logits_real, target_is_real=True, for_discriminator=True)
            loss_d = ADV_WEIGHT * (loss_fake + loss_real) * 0.5
        loss_d.backward()
        opt_d.step()
        return {"loss/g": loss_g.item(), "loss/d": loss_d.item()}  # the tutorial logs .item() every step

    return torch.nn.ModuleList([ae, disc]), step, None


def measure(spec: dict) -> dict:
    """One configuration in a fresh process: images/s, peak memory, and on CUDA FLOPs and sampling."""
    device = torch.device(spec["device"])
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    rss0 = current_rss_kib()  # everything is imported by now
    if cuda:
        torch.cuda.init()
        torch.cuda.reset_peak_memory_stats()
    build = build_gvae if spec["model"] == "gvae" else (lambda s, b, d: build_reference(s, d))
    modules, step, trainer = build(spec["size"], spec["batch"], device)
    x = synthetic_batch(spec["batch"], spec["size"], device)
    out = {"flops": count_flops(step, x)}  # the first warm-up step, counted
    for _ in range(spec["warmup"] - 1):
        step(x)
    times = []
    for _ in range(spec["steps"]):
        sync()
        start = time.perf_counter()
        step(x)
        sync()
        times.append(time.perf_counter() - start)
    # The best step, as timeit recommends: other processes on the machine only ever add time.
    seconds = min(times)
    out.update(params=sum(p.numel() for p in modules.parameters()), step_s=seconds, ips=spec["batch"] / seconds)
    if cuda:
        out["peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    else:
        out["peak_mib"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
    if spec.get("sample_batch") and trainer is not None:
        out["sample_sps"] = sampling_rate(trainer, spec["sample_batch"], device)
    return out


def current_rss_kib() -> float:
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1024
    except OSError:  # not Linux: the peak so far, which right after the imports is about the current size
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


class _GlobalOnly:
    """Stands in for FlopCounterMode's module tracker: its backward hooks break ``torch.autograd.grad``
    with respect to leaf tensors (pytorch/pytorch#131753), which is how the GVAE step takes its
    gradients. Only the total is needed, so every FLOP goes to "Global"."""

    parents = {"Global"}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def count_flops(step, x: torch.Tensor) -> int:
    counter = FlopCounterMode(display=False)
    counter.mod_tracker = _GlobalOnly()
    with counter:
        step(x)
    return counter.get_total_flops()


@torch.no_grad()
def sampling_rate(trainer, batch: int, device: torch.device, iters: int = 20) -> float:
    """Slices/s of the EMA generator: z ~ N(0, I) -> sigmoid(G(z)), bf16 on CUDA, no grad."""
    G = trainer.ema_generator.eval()
    z = torch.randn(batch, trainer.model.latent_dim, device=device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        for _ in range(3):
            torch.sigmoid(G(z))
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(iters):
            torch.sigmoid(G(z))
        if device.type == "cuda":
            torch.cuda.synchronize()
    return iters * batch / (time.perf_counter() - start)


def in_fresh_process(ctx, spec: dict) -> dict:
    with ctx.Pool(1) as pool:
        return pool.apply(measure, (spec,))


def spread(values: list[float], fmt: str) -> str:
    if len(values) == 1:
        return format(values[0], fmt)
    return f"{format(statistics.mean(values), fmt)} ({format(min(values), fmt)}-{format(max(values), fmt)})"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default=None, help="comma-separated; default 64,128,256 on CPU, 256,512 on CUDA")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default per size)")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed steps first, >= 1: the first is the FLOP-counted one (default per size)")
    p.add_argument("--batch-size", type=int, default=None, help="default: the config's (on CPU at 256: 2)")
    p.add_argument("--repeats", type=int, default=2, help="fresh-process measurements per model and size")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak for MFU (H100/H200: 989)")
    args = p.parse_args()
    if args.warmup is not None and args.warmup < 1:
        p.error("--warmup must be >= 1 (the first warm-up step is the FLOP-counted one)")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda asked for, but no CUDA device is available")
    defaults = DEFAULTS[args.device]
    sizes = [int(s) for s in (args.sizes or ",".join(map(str, defaults))).split(",")]
    for s in sizes:
        if s not in REFERENCE or not (CONFIGS / f"ct_{s}.yaml").is_file():
            p.error(f"size {s}: needs configs/ct_{s}.yaml and a REFERENCE entry ({sorted(REFERENCE)})")
    print(header())
    ctx = mp.get_context("spawn")
    cuda = args.device == "cuda"
    rows, extra = [], []
    for size in sizes:
        batch, steps, warmup = defaults.get(size) or (load_config(CONFIGS / f"ct_{size}.yaml").train.batch_size, 5, 2)
        batch, steps, warmup = args.batch_size or batch, args.steps or steps, args.warmup or warmup
        runs: dict[str, list[dict]] = {"gvae": [], "reference": []}
        for _ in range(args.repeats):
            for model in runs:  # alternate, so load changes hit both models alike
                spec = dict(model=model, size=size, batch=batch, steps=steps, warmup=warmup, device=args.device,
                            sample_batch=64 if cuda and model == "gvae" and size == 512 else 0)
                runs[model].append(in_fresh_process(ctx, spec))
        ratios = [g["ips"] / r["ips"] for g, r in zip(runs["gvae"], runs["reference"])]
        for model, name in (("gvae", "GVAE"), ("reference", "MONAI AutoencoderKL+PatchD")):
            rs = runs[model]
            row = {"size": f"{size}²", "model": name, "params": f"{rs[0]['params']:,}", "batch": batch,
                   "steps": f"{warmup}+{steps}", "images/s": spread([r["ips"] for r in rs], ".3g"),
                   "peak MiB": f"{max(r['peak_mib'] for r in rs):.0f}",
                   "GVAE/ref": spread(ratios, ".2f") if model == "gvae" else ""}
            row["GFLOP/img"] = f"{rs[0]['flops'] / batch / 1e9:.3g}"
            row["GFLOP/s"] = spread([r["flops"] / r["step_s"] / 1e9 for r in rs], ".3g")
            if cuda:
                row["MFU %"] = spread([100 * r["flops"] / r["step_s"] / (args.peak_tflops * 1e12) for r in rs], ".1f")
                if "sample_sps" in rs[0]:
                    extra.append(f"sampling at {size}² (EMA generator, batch 64, bf16, no grad): "
                                 f"{spread([r['sample_sps'] for r in rs], '.0f')} slices/s")
            rows.append(row)
    memory = "torch.cuda.max_memory_allocated" if cuda else "peak RSS (ru_maxrss) minus RSS before the model is built"
    print(f"\ntraining throughput, device {args.device} ({'bf16 autocast' if cuda else 'fp32'}), "
          f"{args.repeats} fresh process(es) per cell, steps = warm-up + timed, images/s (real images "
          f"consumed) from each process's fastest timed step, as mean (min-max) over processes, GVAE/ref "
          f"paired per repeat; peak memory: {memory}:\n")
    columns = ["size", "model", "params", "batch", "steps", "images/s", "GVAE/ref", "peak MiB", "GFLOP/img",
               "GFLOP/s"]
    print(markdown_table(rows, columns + (["MFU %"] if cuda else [])))
    print("\nGFLOP/img: FlopCounterMode count of one training step (the first warm-up step) / batch; "
          "GFLOP/s: that count / fastest timed step"
          + (f"; MFU = GFLOP/s / {args.peak_tflops:g} TFLOP/s" if cuda else ""))
    for line in extra:
        print(line)


if __name__ == "__main__":
    main()

"""Prior holes: do codes of real slices fill N(0, I)? Prints the aggregate-posterior figures of a checkpoint and
renders real slices | their posterior decodes | N(0, I) decodes | mixture-prior decodes, one row each.

The GVAE's decoder is trained on codes of real slices (and, through D, on prior samples). When the codes of
real slices spread wider than the prior, or the encoder is very confident, prior samples decode from regions
the decoder barely saw: a "prior hole" (Rosca et al. 2018; Dai & Wipf 2019). This script measures that on the
training slices of a prepared cohort and shows what the same decoder makes of codes drawn from a Gaussian
mixture fitted to the real codes instead (ex-post density estimation, Ghosh et al. 2020): the checkpoint's own
latent prior when it was trained with ``model.latent_prior_components`` > 0, else one fitted here with
``--components`` (1: a single Gaussian). With ``--score`` it also prints the training run's mask monitor
(:class:`pancreas_gvae.training.ct.MaskMonitor`: mask share, shape and intensity scores, and label fidelity by a
UNet trained on the cohort's real slices) for the EMA generator's samples under each of the two priors: the
same weights, only the codes differ.

    python benchmarks/diagnose_prior.py CHECKPOINT PREPARED_DIR [--out prior.png] [--n 16] [--seed 0] [--components 8]

PREPARED_DIR is an evaluate/train output's ``prepared`` folder (manifest.csv + cache/); every ok slice of it is
encoded (for the docs figures: the training run's own prepared folder).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from pancreas_gvae.config import Config
from pancreas_gvae.data.ct.config import data_config, fit_options
from pancreas_gvae.evaluation.metrics import aggregate_posterior
from pancreas_gvae.models import build_model
from pancreas_gvae.models.latent_prior import LatentPrior, prior_codes
from pancreas_gvae.training.checkpoint import load_checkpoint
from pancreas_gvae.transforms.slice_dataset import CTSliceDataset, read_slices


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", type=Path)
    p.add_argument("prepared", type=Path)
    p.add_argument("--out", type=Path, default=Path("prior.png"))
    p.add_argument("--n", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--components", type=int, default=8, help="mixture components when the checkpoint has no prior")
    p.add_argument("--score", action="store_true", help="mask monitor scores of samples under each prior")
    args = p.parse_args(argv)

    state = load_checkpoint(args.checkpoint)
    cfg = Config.from_dict(state["config"])
    model = build_model(cfg.model)
    model.load_state_dict(state["model"])
    model.eval()
    dc = data_config(cfg)
    ds = CTSliceDataset(args.prepared / "cache", args.prepared / "manifest.csv", size=dc.sampling.slice_size,
                        pos_fraction=None, seed=args.seed, **fit_options(dc))
    batch = read_slices(ds)
    x = torch.cat([batch["image"], batch["label"]], dim=1)
    with torch.no_grad():
        gap = aggregate_posterior(x, model.encode)
        mu, logvar = model.encode(x)  # once: the reconstructions and a mixture fitted here both use these codes
        recon = model.decode(mu)
        l1 = (recon[:, 0] - x[:, 0]).abs().mean()
        eig = torch.linalg.eigvalsh(gap.covariance)
        z = prior_codes(args.n, model.latent_dim, args.seed)
        mixture = model.generator.prior
        if mixture is None:
            mixture = LatentPrior(model.latent_dim, args.components).fit(mu, logvar, seed=args.seed)
            name = f"mixture prior, K={args.components} (fitted here)"
        else:
            name = f"the run's mixture prior, K={mixture.components}"
        rows = {"real slices": x[: args.n], "their posterior means decoded": recon[: args.n],
                "prior N(0, I)": model.decode(z), name: model.decode(mixture.sample(args.n, args.seed))}
    print(f"checkpoint step {state.get('step')}, {len(x)} slices, latent {model.latent_dim}")
    print(f"KL(aggregate posterior fit || N(0,I)) = {gap.kl_nats:.1f} nats; mean variance {gap.variance:.3f} "
          f"(prior 1); mean posterior sigma^2 {gap.posterior_variance:.4f}; "
          f"covariance eigenvalues min/median/max {eig.min():.3f}/{eig.median():.3f}/{eig.max():.3f}; "
          f"reconstruction L1 (CT channel, [0, 1]) {l1:.4f}")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(rows), args.n, figsize=(args.n, 1.15 * len(rows)))
    for r, (name, imgs) in enumerate(rows.items()):
        for i in range(args.n):
            ax = axes[r, i]
            ax.imshow(imgs[i, 0], cmap="gray", vmin=0, vmax=1)
            if imgs.shape[1] > 1:
                ax.contour(imgs[i, -1] > 0.5, levels=[0.5], colors="r", linewidths=0.6)
            ax.axis("off")
        axes[r, 0].set_title(name, fontsize=8, loc="left")
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=80)
    print(f"wrote {args.out}")
    if args.score:
        _score(state, cfg, args.prepared, mixture)
    return 0


SCORES = ("fidelity/dice", "fidelity/hd95", "mask/share_fake", "mask/share_real", "mask/shape_score", "mask/area_w1",
          "mask/intensity_w1")


def _score(state: dict, cfg: Config, prepared: Path, mixture: LatentPrior) -> None:
    """The run's own mask monitor on the EMA generator's samples, codes from N(0, I) and from ``mixture``."""
    from types import SimpleNamespace

    from pancreas_gvae.data.ct.manifest import read_manifest
    from pancreas_gvae.synthesis.generator import generator_from_state
    from pancreas_gvae.training import ct

    monitor = ct.mask_monitor(prepared, read_manifest(prepared), data_config(cfg), cfg)
    ema, _ = generator_from_state(state)
    for name, prior in (("N(0, I)", None), (f"mixture ({mixture.components})", mixture)):
        ema.prior = prior
        scores = monitor(SimpleNamespace(ema_generator=ema, device="cpu"))
        print(f"{name:>14}: " + ", ".join(f"{k} {scores[k]:.3f}" for k in SCORES if k in scores))


if __name__ == "__main__":
    raise SystemExit(main())

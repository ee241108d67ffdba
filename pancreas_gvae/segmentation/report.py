"""The downstream experiment's report (``dice.csv`` -> ``summary.csv``, ``summary.md``, ``dice.png``,
``paired.png``): every arm against ``real+classic`` by paired Dice differences on the same (fraction, fold,
seed), with intervals over pairs and over fold means and an exact sign test. The experiment itself is
:mod:`pancreas_gvae.segmentation.experiment`."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

BASELINE = "real+classic"


def _t_interval(values: pd.Series) -> tuple[float, float]:
    """95 % t interval of the mean of ``values`` (NaN with fewer than 2)."""
    from scipy import stats

    n, mean = len(values), values.mean()
    half = stats.t.ppf(0.975, n - 1) * values.std(ddof=1) / math.sqrt(n) if n > 1 else math.nan
    return mean - half, mean + half


def paired_summary(df: pd.DataFrame, reference: str = BASELINE) -> pd.DataFrame:
    """Per (fraction, arm): Dice mean / sd / n over (fold, seed), and the paired difference to ``reference``
    on the same (fraction, fold, seed), with three ways to judge it:

    * ``ci95_low/high``: a 95 % t interval over the (fold, seed) pairs (blank with fewer than 2). It treats
      the pairs as independent, but seeds of one fold share its test patients, so it is somewhat narrow;
    * ``fold_ci95_low/high``: the pairs averaged per fold first, then a t interval over the ``n_folds`` fold
      means: the test patients are the unit, the honest interval when folds are few (blank below 2 folds,
      e.g. with an external test cohort);
    * ``n_positive`` of ``n_pairs`` and ``sign_p``: an exact two-sided sign test (ties dropped), which
      assumes no normality."""
    from scipy import stats

    rows = []
    for (fraction, arm), g in df.groupby(["fraction", "arm"], sort=True):
        d = g["dice"].astype(float)
        row = {"fraction": fraction, "arm": arm, "n": len(g), "dice_mean": d.mean(),
               "dice_sd": d.std(ddof=1) if len(d) > 1 else math.nan}
        ref = df[(df["fraction"] == fraction) & (df["arm"] == reference)].set_index(["fold", "seed"])["dice"]
        pairs = g.set_index(["fold", "seed"])["dice"].astype(float).sub(ref.astype(float)).dropna()
        n = len(pairs)
        row[f"diff_vs_{reference}"] = pairs.mean() if n else math.nan
        row["ci95_low"], row["ci95_high"] = _t_interval(pairs)
        row["n_pairs"] = n
        per_fold = pairs.groupby(level="fold").mean()
        row["fold_ci95_low"], row["fold_ci95_high"] = _t_interval(per_fold)
        row["n_folds"] = len(per_fold)
        row["n_positive"], n_negative = int((pairs > 0).sum()), int((pairs < 0).sum())
        row["sign_p"] = stats.binomtest(row["n_positive"], row["n_positive"] + n_negative).pvalue \
            if row["n_positive"] + n_negative else math.nan
        rows.append(row)
    return pd.DataFrame(rows)


def pair_differences(df: pd.DataFrame, fraction: float, reference: str = BASELINE) -> pd.DataFrame:
    """Each arm's Dice minus ``reference``'s on the same (fold, seed) at ``fraction``: rows (fold, seed), a
    column per arm other than ``reference`` (NaN where a pair is missing; no column without the reference)."""
    wide = df[df["fraction"] == fraction].pivot_table(index=["fold", "seed"], columns="arm", values="dice",
                                                      aggfunc="first")
    if reference not in wide:
        return wide.iloc[:, :0]
    return wide.drop(columns=reference).sub(wide[reference], axis=0)


def summary_markdown(df: pd.DataFrame, reference: str = BASELINE, *, summary: pd.DataFrame | None = None) -> str:
    """``summary.md``: per fraction, each arm's Dice and its paired difference to ``reference`` (mean, the 95 %
    t interval over pairs and over fold means, the sign count and its test: see :func:`paired_summary`), then
    every (fold, seed) pair's difference."""
    s = paired_summary(df, reference) if summary is None else summary
    diff = f"diff_vs_{reference}"

    def interval(r, low: str, high: str) -> str:
        ok = r["arm"] != reference and math.isfinite(r[low])
        return f"[{r[low]:+.3f}, {r[high]:+.3f}]" if ok else "–"

    out = ["95 % CI over pairs treats the (fold, seed) pairs as independent; seeds of one fold share its test",
           "patients, so the interval over fold means (n = folds) is the one to trust when folds are few.", ""]
    for fraction, g in s.groupby("fraction", sort=True):
        out += [f"## {fraction:g} of training patients labelled", "",
                f"| arm | n | Dice mean ± sd | paired diff. to {reference} | 95 % CI over pairs "
                "| 95 % CI over fold means | pairs > 0 (sign test p) |", "|---|---|---|---|---|---|---|"]
        for r in g.to_dict("records"):
            sd = f" ± {r['dice_sd']:.3f}" if math.isfinite(r["dice_sd"]) else ""
            sign = "–" if r["arm"] == reference else f"{r['n_positive']} of {r['n_pairs']}" + (
                f" (p = {r['sign_p']:.3g})" if math.isfinite(r["sign_p"]) else "")
            fold_ci = interval(r, "fold_ci95_low", "fold_ci95_high")
            if fold_ci != "–":
                fold_ci += f", {r['n_folds']} folds"
            out.append(f"| {r['arm']} | {r['n']} | {r['dice_mean']:.3f}{sd} | {r[diff]:+.3f} | "
                       f"{interval(r, 'ci95_low', 'ci95_high')} | {fold_ci} | {sign} |")
        pairs = pair_differences(df, fraction, reference)
        arms = list(pairs.columns)
        if arms:
            out += ["", "| fold, seed | " + " | ".join(arms) + " |", "|---|" + "---|" * len(arms)]
            for (fold, seed), r in pairs.iterrows():
                out.append(f"| {fold}, {seed} | " + " | ".join("" if pd.isna(v) else f"{v:+.3f}" for v in r) + " |")
        out.append("")
    return "\n".join(out)


def write_report(df: pd.DataFrame, out: Path, *, title: str = "") -> list[Path]:
    """``summary.csv``, ``summary.md``, ``dice.png`` and ``paired.png`` of the rows ``df`` (``dice.csv``) into
    ``out``."""
    summary = paired_summary(df)
    summary.to_csv(out / "summary.csv", index=False)
    (out / "summary.md").write_text(summary_markdown(df, summary=summary))
    plot_dice_vs_fraction(summary, out / "dice.png", title=title)
    plot_paired_differences(df, summary, out / "paired.png", title=title)
    return [out / n for n in ("dice.csv", "summary.csv", "summary.md", "dice.png", "paired.png")]


def plot_paired_differences(df: pd.DataFrame, summary: pd.DataFrame, path: Path, reference: str = BASELINE, *,
                            title: str = "") -> Path:
    """Per fraction, each arm's Dice minus ``reference``'s on the same (fold, seed): one dot per pair, coloured
    by fold, with the mean and the 95 % interval over fold means (:func:`paired_summary`). The spread the
    means hide is what decides whether an arm can be trusted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fractions = sorted(df["fraction"].unique())
    fig, axes = plt.subplots(1, len(fractions), figsize=(3.2 + 2.4 * len(fractions), 4.2), squeeze=False)
    for ax, fraction in zip(axes[0], fractions):
        pairs = pair_differences(df, fraction, reference)
        arms = list(pairs.columns)
        rows = summary[summary["fraction"] == fraction].set_index("arm")
        for x, arm in enumerate(arms):
            diff = pairs[arm].dropna()
            folds = diff.index.get_level_values("fold")
            jitter = np.linspace(-0.15, 0.15, len(diff)) if len(diff) > 1 else np.zeros(1)
            ax.scatter(x + jitter, diff.to_numpy(), c=[f"C{int(f) % 10}" for f in folds], s=18, zorder=3)
            r = rows.loc[arm]
            low, high = r["fold_ci95_low"], r["fold_ci95_high"]
            if math.isfinite(low):
                ax.plot([x, x], [low, high], color="black", lw=1, zorder=2)
            ax.plot([x - 0.25, x + 0.25], [r[f"diff_vs_{reference}"]] * 2, color="black", lw=2, zorder=4)
        ax.axhline(0, color="grey", lw=0.8, ls="--")
        ax.set_xticks(range(len(arms)))
        ax.set_xticklabels(arms, rotation=30, ha="right", fontsize=7)
        ax.set_title(f"{fraction:g} labelled", fontsize=9)
        ax.grid(alpha=0.3, axis="y")
    axes[0][0].set_ylabel(f"Dice minus {reference} (same fold, seed)")
    fig.suptitle((title + "\n" if title else "") + "dots: (fold, seed) pairs, colour = fold; bar: mean; "
                 "line: 95 % CI over fold means", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_dice_vs_fraction(summary: pd.DataFrame, path: Path, *, title: str = "") -> Path:
    """Dice (mean ± sd over (fold, seed)) against the labelled fraction, a line per arm, from
    :func:`paired_summary`'s table."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for arm, g in summary.groupby("arm", sort=False):
        g = g.sort_values("fraction")
        ax.errorbar(g["fraction"], g["dice_mean"], yerr=g["dice_sd"].fillna(0), marker="o", capsize=3,
                    label=arm, linestyle="--" if arm.startswith("tstr") else "-")
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(NullFormatter())  # only the fractions that were run are labelled
    ax.set_xticks(sorted(summary["fraction"].unique()))
    ax.set_xticklabels([f"{f:g}" for f in sorted(summary["fraction"].unique())])
    ax.set_xlabel("fraction of labelled training patients")
    ax.set_ylabel("Dice on test patients (mean ± sd)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path

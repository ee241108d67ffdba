"""The evaluation's tables and curves: rows of ``results.csv`` as a frame, mean ± sd per model and budget with the
best per column marked, every run as a row, and learning-curve plots. What each metric is and what it is computed
on: :mod:`pancreas_gvae.evaluation.compare`, which scores the models; this module only tabulates its rows."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from pancreas_gvae.evaluation.compare import COLUMNS, METRIC_COLUMNS, METRICS, MetricSpec


def results_frame(rows: list[dict]) -> pd.DataFrame:
    """Rows as a frame with every column of :data:`COLUMNS` (missing metrics NaN)."""
    frame = pd.DataFrame(rows)
    if {"mask_share_fake", "mask_share_real"} <= set(frame.columns):  # the gap is derived, never stored alone
        frame["mask_share_gap"] = (frame["mask_share_fake"] - frame["mask_share_real"]).abs()
    for c in COLUMNS:
        if c not in frame.columns:
            frame[c] = math.nan
    extra = [c for c in frame.columns if c not in COLUMNS]
    return frame[COLUMNS + extra]


def summarise(frame: pd.DataFrame) -> pd.DataFrame:
    """Mean, sd and n per (dataset, model) for every metric column; NaN cells are not counted. Rows of
    several training budgets (a ``steps`` column with more than one value) are summarised per budget, the
    budget named in ``dataset`` ("mnist, 2000 steps"), so every table compares models at equal steps."""
    out = []
    frame = frame.copy()
    if "steps" in frame.columns and frame["steps"].nunique() > 1:
        frame["dataset"] = [f"{d}, {int(n)} steps" for d, n in zip(frame["dataset"], frame["steps"])]
        frame = frame.sort_values(["dataset"], kind="stable", key=lambda c: c.map(_budget_order(frame)))
    for (dataset, model), g in frame.groupby(["dataset", "model"], sort=False):
        rec = {"dataset": dataset, "model": model, "seeds": len(g)}
        for c in METRIC_COLUMNS:
            v = pd.to_numeric(g[c], errors="coerce").dropna() if c in g else pd.Series(dtype=float)
            rec[f"{c}:mean"] = float(v.mean()) if len(v) else math.nan
            rec[f"{c}:sd"] = float(v.std(ddof=1)) if len(v) > 1 else math.nan
            rec[f"{c}:n"] = int(len(v))
        out.append(rec)
    return pd.DataFrame(out)


def _first_seen(values) -> dict:
    """``{value: rank}`` in order of first appearance: rows keep the order in which they were measured."""
    return {v: i for i, v in enumerate(dict.fromkeys(values))}


def _heading(spec: MetricSpec) -> str:
    return f"{spec.column} {'↑' if spec.higher_is_better else '↓'}"


def _budget_order(frame: pd.DataFrame) -> dict[str, tuple]:
    """Sort key of the per-budget table names: by dataset (first seen first), then by steps."""
    first = _first_seen(n.rsplit(", ", 1)[0] for n in frame["dataset"])
    return {n: (first[n.rsplit(", ", 1)[0]], int(n.rsplit(", ", 1)[1].split()[0])) for n in frame["dataset"]}


def best_per_column(summary: pd.DataFrame) -> dict[tuple[str, str], set[str]]:
    """``{(dataset, column): {best model(s)}}`` by mean, in each metric's direction (ties all best); a column
    with fewer than two models valued has no best."""
    best: dict[tuple[str, str], set[str]] = {}
    for dataset, g in summary.groupby("dataset", sort=False):
        for spec in METRICS:
            means = g.set_index("model")[f"{spec.column}:mean"].dropna()
            if len(means) < 2:  # no value, or one model alone (e.g. at a budget only it was run to): no "best"
                continue
            target = means.max() if spec.higher_is_better else means.min()
            best[(dataset, spec.column)] = set(means[np.isclose(means, target, rtol=1e-12, atol=0)].index)
    return best


def _fmt(x: float) -> str:
    if x is None or not np.isfinite(x):
        return "inf" if x is not None and np.isinf(x) else ""
    a = abs(x)
    if a != 0 and (a >= 1e4 or a < 1e-3):
        return f"{x:.3g}"
    if a >= 100:
        return f"{x:.1f}"
    return f"{x:.4f}" if a < 1 else f"{x:.3f}"


def render_markdown(frame: pd.DataFrame, *, title: str = "Results", notes: list[str] | None = None,
                    columns: list[str] | None = None, runs: bool = False) -> str:
    """results.md: one table per dataset, rows = models, cells ``mean ± sd (n)``, best per column in bold;
    ``columns``: only these metric columns (default: every one with a value); ``runs``: then every run as a row
    (:func:`render_runs`)."""
    specs = metric_specs(columns)
    summary = summarise(frame)
    best = best_per_column(summary)
    lines = [f"# {title}", ""]
    lines += ["Cells: mean ± sd over seeds (n = number of seeds with a value; sd blank for n = 1). "
              "**Bold**: best model in the column (by mean, in the stated direction; none where one model is alone). "
              "Blank: the metric does not apply to the model.", ""]
    lines += [f"- {n}" for n in (notes or [])]
    if notes:
        lines.append("")
    directions = ", ".join(_heading(m) for m in specs)
    lines += [f"Directions: {directions}.", ""]
    for dataset, g in summary.groupby("dataset", sort=False):
        cols = [m for m in specs if g[f"{m.column}:n"].sum() > 0]
        lines += [f"## {dataset}", ""]
        header = ["model", "seeds"] + [_heading(m) for m in cols]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "|".join(["---"] * len(header)) + "|")
        for _, r in g.iterrows():
            cells = [str(r["model"]), str(int(r["seeds"]))]
            for m in cols:
                n = int(r[f"{m.column}:n"])
                if n == 0:
                    cells.append("")
                    continue
                mean, sd = r[f"{m.column}:mean"], r[f"{m.column}:sd"]
                cell = _fmt(mean) + (f" ± {_fmt(sd)}" if n > 1 else "") + f" (n={n})"
                if r["model"] in best.get((dataset, m.column), set()):
                    cell = f"**{cell}**"
                cells.append(cell)
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    if runs:
        lines += [render_runs(frame, columns=columns), ""]
    return "\n".join(lines)


def metric_specs(columns: list[str] | None) -> list[MetricSpec]:
    """The METRICS named in ``columns`` (all of them for None); ValueError naming any unknown one."""
    if columns is None:
        return list(METRICS)
    by_name = {m.column: m for m in METRICS}
    unknown = [c for c in columns if c not in by_name]
    if unknown:
        raise ValueError(f"unknown metric column(s) {unknown}; known: {', '.join(by_name)}")
    return [by_name[c] for c in columns]


def render_runs(frame: pd.DataFrame, *, columns: list[str] | None = None) -> str:
    """Every run as one row: model, seed, steps, cumulative training seconds and the metric columns (``columns``,
    default every one with a value), sorted by dataset and model (first seen first), seed and steps, so a learning
    curve and its seeds read down the table as they were measured."""
    specs = [m for m in metric_specs(columns) if m.column in frame and frame[m.column].notna().any()]
    frame = frame.copy()
    for c in ("dataset", "model"):
        frame[f"_{c}_order"] = frame[c].map(_first_seen(frame[c]))
    frame = frame.sort_values([c for c in ("_dataset_order", "_model_order", "seed", "steps") if c in frame],
                              kind="stable")
    ids = [c for c in ("dataset", "model", "seed", "steps", "train_seconds_cum") if c in frame]
    header = ids + [_heading(m) for m in specs]
    lines = ["## Every run", "", "| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    for _, r in frame.iterrows():
        cells = [str(r[c]) if c in ("dataset", "model") else
                 (f"{float(r[c]):.0f}" if pd.notna(r[c]) else "") for c in ids]
        cells += [_fmt(float(r[m.column])) for m in specs]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_curves(curves: dict[str, tuple[list[float], list[float]]], path: str | Path, *, xlabel: str, ylabel: str,
                title: str = "", styles: dict[str, dict] | None = None) -> Path:
    """One line per entry of ``curves`` (label -> (x, y)): a learning curve as PNG; ``styles`` gives matplotlib
    keywords per label (colour, marker)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.6))
    for label, (x, y) in curves.items():
        ax.plot(x, y, **{"marker": "o", **(styles or {}).get(label, {})}, markersize=3, label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path

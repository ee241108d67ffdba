"""The ``--set [MODEL:]KEY=VALUE`` overrides of a command that trains several models (``pipelines/evaluate.py``):
an unprefixed override applies to every model, a ``MODEL:`` one to that model only, so models with their own loss
weights share one command, one output folder and one held-out set-up; a re-run into that folder must give each of
its models the overrides its finished rows were made with."""

from __future__ import annotations

from pathlib import Path

from pancreas_gvae.errors import PipelineError


def _scope(item: str) -> tuple[str | None, str]:
    """``(MODEL, KEY=VALUE)`` of a ``MODEL:KEY=VALUE`` override, ``(None, item)`` of an unprefixed one (a ':' in a
    value, e.g. a sqlite:/// URI, is not a prefix)."""
    scope, sep, rest = item.partition(":")
    return (None, item) if not sep or "=" in scope else (scope, rest)


def model_sets(overrides: list[str], model: str | None) -> list[str]:
    """The ``--set`` overrides that apply to ``model``: the unprefixed ones and its ``MODEL:`` ones, unprefixed
    (``None``: the unprefixed ones only)."""
    scoped = [_scope(item) for item in overrides]
    return [rest for scope, rest in scoped if scope is None or scope == model]


def check_model_sets(overrides: list[str], models: list[str]) -> None:
    """Refuse a ``MODEL:`` prefix naming no model of the command, and one on a ``data.`` key: the data, the
    held-out set, the feature network and the judge are prepared once and shared by every model."""
    for item in overrides:
        scope, rest = _scope(item)
        if scope is None:
            continue
        if scope not in models:
            raise PipelineError(f"--set {item}: {scope!r} is not one of --models {','.join(models)}")
        if rest.startswith("data."):
            raise PipelineError(f"--set {item}: the data is shared by every model of a command; set data.* "
                                "without a model prefix")


def check_resumed_sets(rows: list[dict], overrides: list[str], models: list[str], table: Path) -> None:
    """Refuse to resume an ``--out`` whose rows of a model of this command were made with other ``--set``
    overrides: a finished row is kept, not recomputed, and the model's checkpoint would train on under a second
    config, so the table would silently mix two settings (a row without a ``settings`` column, from a table older
    than it, is not checked)."""
    for row in rows:
        model = str(row["model"]).split("@")[0]  # gvae@gmm8: the GVAE's weights under another prior
        if model not in models or "settings" not in row:
            continue
        before = row["settings"] if isinstance(row["settings"], str) else ""  # pandas reads an empty cell as NaN
        now = " ".join(model_sets(overrides, model))
        if sorted(before.split()) != sorted(now.split()):
            raise PipelineError(f"{table}: {row['model']} seed {row['seed']} at {row['steps']} steps was made with "
                                f"--set {before or '(none)'!r}, this command gives {model} --set {now or '(none)'!r}; "
                                "finished rows are not recomputed: give the same --set, or a new --out")

"""The ``--set [MODEL:]KEY=VALUE`` overrides of a command that trains several models (``pipelines/evaluate.py``):
an unprefixed override applies to every model, a ``MODEL:`` one to that model only, so models with their own loss
weights share one command, one output folder and one held-out set-up."""

from __future__ import annotations

from pancreas_gvae.errors import PipelineError


def model_sets(overrides: list[str], model: str | None) -> list[str]:
    """The ``--set`` overrides that apply to ``model``: the unprefixed ones and its ``MODEL:`` ones, unprefixed
    (``None``: the unprefixed ones only)."""
    out = []
    for item in overrides:
        scope, sep, rest = item.partition(":")
        if not sep or "=" in scope:  # no prefix (a ':' in a value, e.g. a sqlite:/// URI, is not one)
            out.append(item)
        elif scope == model:
            out.append(rest)
    return out


def check_model_sets(overrides: list[str], models: list[str]) -> None:
    """Refuse a ``MODEL:`` prefix naming no model of the command, and one on a ``data.`` key: the data, the
    held-out set, the feature network and the judge are prepared once and shared by every model."""
    for item in overrides:
        scope, sep, rest = item.partition(":")
        if not sep or "=" in scope:
            continue
        if scope not in models:
            raise PipelineError(f"--set {item}: {scope!r} is not one of --models {','.join(models)}")
        if rest.startswith("data."):
            raise PipelineError(f"--set {item}: the data is shared by every model of a command; set data.* "
                                "without a model prefix")

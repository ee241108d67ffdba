"""The ``--set [MODEL:]KEY=VALUE`` overrides of a command that trains several models (``pipelines/evaluate.py``):
an unprefixed override applies to every model, a ``MODEL:`` one to that model only, so models with their own loss
weights share one command, one output folder and one held-out set-up."""

from __future__ import annotations

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

r"""Memorisation check: is any synthetic sample a (near-)copy of a training image?

For each synthetic sample :math:`s_j` the nearest training image :math:`t_{i^*(j)}` and its Euclidean
distance :math:`d_j = \min_i \lVert s_j - t_i\rVert` are found (pixel space; optionally also in a feature
space). "Near" needs a scale: how close do *independent* real images come to the training set? That
reference distribution is either

- ``heldout`` given: each held-out real image's distance to its nearest training image (the right
  reference: images the model never saw, from the same patients' distribution), or
- otherwise the training set's leave-one-out nearest-neighbour distances
  :math:`\min_{i' \ne i} \lVert t_i - t_{i'}\rVert` (smaller than held-out distances where the training set
  holds near-duplicates, e.g. adjacent CT slices of one patient, so it is the stricter reference).
- ``case_index`` given (the case of each training image, for CT slices): each training slice's distance to
  the nearest slice of *another* case (``other_case``; neighbouring slices of one patient are near-duplicates,
  so they must not set the scale), or leave-one-out when there is a single case (``leave_one_out``).

Per sample this module returns :math:`d_j`, :math:`i^*(j)`, the ratio
:math:`\rho_j = d_j / \operatorname{median}(\text{reference})`, the percentile of :math:`d_j` within the
reference distribution (fraction of reference distances :math:`\le d_j`; a near-copy sits below
essentially all of them), and the flag ``near_copy`` =
:math:`\rho_j \le` ``threshold`` (default 1/3: a sample a third as far from its nearest training image
as a typical unseen real image; a threshold of 1/3 is also what Carlini et al. 2023 use, for a
related, per-sample ratio). An exact copy has :math:`d_j = 0`. Report the number and fraction
flagged, the smallest ratios, and look at the flagged pairs.

Limitation (Theis et al. 2016): a pixel-space nearest neighbour misses copies that are
shifted by a pixel or slightly re-windowed, which look identical but are far in Euclidean distance; the
optional feature-space check (a network with pooled, shift-tolerant features) reduces, but does not
remove, that blind spot. Passing the check is evidence against verbatim copying, not a privacy proof.

Cost: one chunked nearest-neighbour search of ``(M, D)`` queries against ``(N, D)`` training images
(the squared distances by matrix products, ``chunk_size`` rows and columns at a time), plus one for
the reference; ``max_reference`` subsamples the reference queries (seeded). The distance of each
selected pair is recomputed directly (:math:`\lVert s_j - t_{i^*}\rVert`), so an exact copy reports 0.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np
import torch

from pancreas_gvae.evaluation.metrics.mmd import pairwise_sq_distances, subsample

__all__ = ["MemorisationResult", "MemorisationSpace", "memorisation_check", "nearest_neighbours"]


def _flat(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    x = torch.as_tensor(x)
    if x.ndim < 2:
        raise ValueError(f"expected a set (N, ...), got shape {tuple(x.shape)}")
    return x.reshape(x.shape[0], -1).to(dtype)


@torch.no_grad()
def nearest_neighbours(
    queries: torch.Tensor,
    reference: torch.Tensor,
    *,
    exclude_self: bool = False,
    exclude_index: torch.Tensor | None = None,
    chunk_size: int = 2048,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Euclidean distance ``(M,)`` float64 and index ``(M,)`` int64 of each query's nearest reference row.

    ``exclude_self``: ``queries`` *is* ``reference`` and row ``i`` must not match itself (leave-one-out;
    by index, so true duplicates still count). ``exclude_index`` ``(M,)``: more generally, the reference
    row each query may not match (e.g. queries ``= reference[rows]``, ``exclude_index = rows``). The
    search runs in ``dtype`` on matrix-product distances; the returned distances are recomputed
    exactly, in float64, for the selected pairs.
    """
    q, r = _flat(queries, dtype), _flat(reference, dtype)
    if q.shape[1] != r.shape[1]:
        raise ValueError(f"queries and reference differ in dimension: {q.shape[1]} and {r.shape[1]}")
    if exclude_self:
        if q.shape[0] != r.shape[0]:
            raise ValueError("exclude_self needs queries to be the reference set itself")
        exclude_index = torch.arange(q.shape[0])
    if exclude_index is not None:
        exclude_index = torch.as_tensor(exclude_index).long().flatten().to(q.device)
        if exclude_index.numel() != q.shape[0]:
            raise ValueError(f"exclude_index must have one entry per query ({q.shape[0]}), got {exclude_index.numel()}")
    if r.shape[0] < (2 if exclude_index is not None else 1):
        raise ValueError("reference set too small")
    q_sq, r_sq = q.pow(2).sum(1), r.pow(2).sum(1)
    best_d = torch.full((q.shape[0],), float("inf"), dtype=dtype, device=q.device)
    best_i = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
    for i in range(0, q.shape[0], chunk_size):
        qi = q[i : i + chunk_size]
        for j in range(0, r.shape[0], chunk_size):
            d = pairwise_sq_distances(
                qi, r[j : j + chunk_size], a_sq=q_sq[i : i + chunk_size], b_sq=r_sq[j : j + chunk_size]
            )
            if exclude_index is not None:
                cols = exclude_index[i : i + chunk_size] - j
                ok = (cols >= 0) & (cols < d.shape[1])
                d[torch.arange(d.shape[0], device=d.device)[ok], cols[ok]] = float("inf")
            v, idx = d.min(1)
            better = v < best_d[i : i + chunk_size]
            best_d[i : i + chunk_size] = torch.where(better, v, best_d[i : i + chunk_size])
            best_i[i : i + chunk_size] = torch.where(better, idx + j, best_i[i : i + chunk_size])
    ref_rows = torch.as_tensor(reference).reshape(r.shape[0], -1)[best_i.to(torch.as_tensor(reference).device)]
    exact = (torch.as_tensor(queries).reshape(q.shape[0], -1).double() - ref_rows.double().to(q.device)).norm(dim=1)
    return exact.cpu(), best_i.cpu()


class MemorisationSpace(NamedTuple):
    """Memorisation statistics in one space (pixels or features); per-sample tensors are ``(M,)``."""

    distances: torch.Tensor  # float64, distance of each sample to its nearest training image
    indices: torch.Tensor  # int64, index of that training image
    ratios: torch.Tensor  # distances / reference_scale
    percentiles: torch.Tensor  # fraction of reference distances <= each sample's distance
    near_copy: torch.Tensor  # bool, ratios <= threshold
    reference_distances: torch.Tensor  # real-to-real nearest-training distances (held-out or leave-one-out)
    reference_scale: float  # median of reference_distances
    reference_kind: str  # "heldout", "train_leave_one_out", "other_case" or "leave_one_out" (one case)

    def summary(self) -> dict[str, float | int | str]:
        """The numbers a report needs: reference, near-copy count, smallest and typical ratios."""
        r = self.ratios.double()
        ref = self.reference_distances.double() / self.reference_scale
        return {
            "reference_kind": self.reference_kind,
            "reference_median_distance": round(self.reference_scale, 6),
            "reference_queries": int(self.reference_distances.numel()),
            "near_copies": int(self.near_copy.sum()),
            "min_ratio": round(float(r.min()), 6),
            "p05_ratio": round(float(torch.quantile(r, 0.05)), 6),
            "median_ratio": round(float(r.median()), 6),
            "reference_p05_ratio": round(float(torch.quantile(ref, 0.05)), 6),
        }


class MemorisationResult(NamedTuple):
    """Pixel-space result, optional feature-space result, and ``near_copy`` = flagged in either space."""

    pixel: MemorisationSpace
    feature: MemorisationSpace | None
    near_copy: torch.Tensor  # (M,) bool
    threshold: float


def _other_case_reference(train: torch.Tensor, case_index: np.ndarray, *, max_reference: int | None, seed: int,
                          chunk_size: int, dtype: torch.dtype) -> tuple[torch.Tensor, str]:
    """Each (sampled) training row's distance to the nearest row of another case; leave-one-out for one case."""
    rows = np.arange(len(train))
    if max_reference is not None and max_reference < len(rows):
        rows = np.sort(np.random.default_rng(seed).choice(rows, size=max_reference, replace=False))
    cases = np.unique(case_index)
    if len(cases) < 2:
        rows_t = torch.as_tensor(rows)
        ref, _ = nearest_neighbours(train[rows_t], train, exclude_index=rows_t, chunk_size=chunk_size, dtype=dtype)
        return ref, "leave_one_out"
    out = []
    for c in cases:
        query = rows[case_index[rows] == c]
        if len(query):
            others = torch.as_tensor(np.flatnonzero(case_index != c))
            d, _ = nearest_neighbours(train[torch.as_tensor(query)], train[others], chunk_size=chunk_size, dtype=dtype)
            out.append(d)
    return torch.cat(out), "other_case"


def _space(
    samples: torch.Tensor,
    train: torch.Tensor,
    heldout: torch.Tensor | None,
    case_index: np.ndarray | None,
    threshold: float,
    max_reference: int | None,
    seed: int,
    chunk_size: int,
    dtype: torch.dtype,
) -> MemorisationSpace:
    dist, idx = nearest_neighbours(samples, train, chunk_size=chunk_size, dtype=dtype)
    if case_index is not None:
        ref, kind = _other_case_reference(train, case_index, max_reference=max_reference, seed=seed,
                                          chunk_size=chunk_size, dtype=dtype)
    elif heldout is not None:
        queries = subsample(heldout, max_reference, seed=seed)
        ref, _ = nearest_neighbours(queries, train, chunk_size=chunk_size, dtype=dtype)
        kind = "heldout"
    else:
        if max_reference is not None and max_reference < train.shape[0]:
            # leave-one-out for a random subset of training rows, each searched against the full set
            perm = torch.randperm(train.shape[0], generator=torch.Generator().manual_seed(seed))[:max_reference]
            ref, _ = nearest_neighbours(train[perm], train, exclude_index=perm, chunk_size=chunk_size, dtype=dtype)
        else:
            ref, _ = nearest_neighbours(train, train, exclude_self=True, chunk_size=chunk_size, dtype=dtype)
        kind = "train_leave_one_out"
    scale = float(ref.median())
    if scale <= 0:
        raise ValueError(
            "the median real-to-real nearest-neighbour distance is 0 (duplicated images): "
            "deduplicate the training set or pass held-out images"
        )
    ratios = dist / scale
    sorted_ref = ref.sort().values
    percentiles = torch.searchsorted(sorted_ref, dist, right=True).double() / sorted_ref.numel()
    return MemorisationSpace(dist, idx, ratios, percentiles, ratios <= threshold, ref, scale, kind)


@torch.no_grad()
def memorisation_check(
    samples: torch.Tensor,
    train: torch.Tensor,
    *,
    heldout: torch.Tensor | None = None,
    case_index: np.ndarray | None = None,
    feature_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    threshold: float = 1.0 / 3.0,
    max_reference: int | None = 2000,
    seed: int = 0,
    chunk_size: int = 2048,
    batch_size: int = 500,
    dtype: torch.dtype = torch.float32,
) -> MemorisationResult:
    """Nearest training image of every synthetic sample, and whether it is a near-copy (module docstring).

    ``samples`` ``(M, ...)``, ``train`` ``(N, ...)``, ``heldout`` ``(H, ...)``: images on the same scale
    (e.g. [0, 1]); flattened. ``feature_fn``: optional network features (applied in batches of
    ``batch_size``); the same check then also runs in that space. ``max_reference``: at most this many
    reference queries (held-out images, or training rows for leave-one-out), seeded by ``seed``.
    ``case_index`` ``(N,)``: the case of each training image; the reference is then other-case (module docstring).
    """
    if threshold <= 0:
        raise ValueError(f"threshold must be > 0, got {threshold}")
    if case_index is not None:
        case_index = np.asarray(case_index)
        if len(case_index) != len(train):
            raise ValueError("case_index needs one entry per training image")
    args = (threshold, max_reference, seed, chunk_size, dtype)
    pixel = _space(samples, train, heldout, case_index, *args)
    feature = None
    if feature_fn is not None:
        from pancreas_gvae.evaluation.metrics.feature_nets import extract_features

        def feats(x: torch.Tensor | None) -> torch.Tensor | None:
            return None if x is None else extract_features(feature_fn, x, batch_size=batch_size)

        feature = _space(feats(samples), feats(train), feats(heldout), case_index, *args)
    near = pixel.near_copy | feature.near_copy if feature is not None else pixel.near_copy
    return MemorisationResult(pixel, feature, near, threshold)

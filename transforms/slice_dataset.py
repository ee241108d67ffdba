"""2D (or 2.5D) axial slice samples from the preprocessed store, with pancreas oversampling.

Only the random part runs per sample: one (or ``2 * context_slices + 1``) slices are read from the memory-
mapped cache, fitted to ``size x size`` and returned as tensors. Which slices an epoch visits is drawn from
``(seed, epoch)``, so a run is reproducible; call :meth:`CTSliceDataset.set_epoch` between epochs.

Image-only cases (prepared with ``labels.require_label: false``) are served with an all-zero label and
``has_label`` 0; their slices are never counted as pancreas slices, so oversampling draws them with the
slices without pancreas (``pos_fraction`` is the share of slices known to hold pancreas).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from pancreas_gvae.errors import DataError
from pancreas_gvae.transforms.cache import META_NAME, cache_root, load_cached_case

FIT_MODES = ("resize", "crop")


def _ok_cases(root: Path, manifest: pd.DataFrame | str | Path | None) -> dict[str, str | None]:
    """case id -> expected config hash (None: no manifest, take what the cache holds)."""
    if manifest is None:
        return {p.name: None for p in sorted(root.iterdir()) if (p / META_NAME).is_file()}
    if not isinstance(manifest, pd.DataFrame):
        from pancreas_gvae.data.ct.manifest import read_manifest

        manifest = read_manifest(manifest)
    ok = manifest[manifest["status"] == "ok"]
    hashes = ok["config_hash"] if "config_hash" in ok else [None] * len(ok)
    return {str(c): (str(h) if h else None) for c, h in sorted(zip(ok["case_id"], hashes))}


def list_slices(cache_dir: str | Path, manifest: pd.DataFrame | str | Path | None = None, *,
                cases: Iterable[str] | None = None) -> pd.DataFrame:
    """Every (case, slice) of the ok cases: ``case_id, slice, pancreas_voxels, has_pancreas, has_label``.

    Reads only ``meta.json`` files. ``cases`` restricts to a subset (split by case, never by slice, so that
    neighbouring slices of one patient do not end up on both sides of a split).
    """
    root = cache_root(cache_dir)
    expected = _ok_cases(root, manifest)
    if cases is not None:
        wanted = set(cases)
        expected = {c: h for c, h in expected.items() if c in wanted}
    frames = []
    for cid, chash in expected.items():
        meta_path = root / cid / META_NAME
        if not meta_path.is_file():
            raise DataError(f"case {cid} is in the manifest but not in the cache {root} (re-run prepare_ct)")
        meta = json.loads(meta_path.read_text())
        if chash is not None and meta.get("config_hash") != chash:
            raise DataError(f"cache of {cid} was made with another config than the manifest says (re-run prepare_ct)")
        voxels = np.asarray(meta["slice_voxels"], dtype=np.int64)
        frames.append(pd.DataFrame({"case_id": cid, "slice": np.arange(len(voxels)), "pancreas_voxels": voxels,
                                    "has_label": bool(meta.get("has_label", True))}))
    if not frames:
        raise DataError(f"no prepared case in {root}")
    df = pd.concat(frames, ignore_index=True)
    df["has_pancreas"] = df["pancreas_voxels"] > 0
    return df[["case_id", "slice", "pancreas_voxels", "has_pancreas", "has_label"]]


def _refuse_context_for_slice_sets(root: Path, case_ids: Iterable[str], context_slices: int) -> None:
    """2.5D context needs neighbouring slices; a 2D slice set's stacked slices of a patient are not neighbours."""
    for cid in case_ids:
        meta = json.loads((root / cid / META_NAME).read_text())
        if meta.get("layout", (meta.get("row") or {}).get("layout")) == "slices":
            raise DataError(f"context_slices={context_slices} needs neighbouring slices, but case {cid} is a 2D slice "
                            f"set (its slices are not adjacent); set sampling.context_slices to 0")


class CTSliceDataset(Dataset):
    """Axial slice samples ``{"image": (C, size, size) float32 in [0, 1], "label": (1, size, size) float32 0/1,
    "has_label": () float32 1 or 0 (image-only case: the label is all zero and means "unknown"), "case_id", "slice"}``.

    Args:
        cache_dir: the prepare output folder or its ``cache/`` sub-folder.
        manifest: manifest DataFrame or path (only ``ok`` cases are used); None: every cached case.
        size: output height and width in pixels.
        pos_fraction: share of samples drawn from slices with pancreas (oversampling), the rest from the
            other slices (image-only cases included); None: every slice once per epoch in random order.
        context_slices: 2.5D: this many neighbours on each side as extra channels (edges repeat the end slice);
            refused for cases of a 2D slice set (``--layout slices``), whose slices are not neighbours.
        seed: with the epoch, decides which slices are visited and every random crop.
        samples_per_epoch: epoch length; None: the number of slices.
        cases: restrict to these case ids (the train / validation split).
        fit: ``resize``: a ``fov_mm`` square around the slice centre (padded), resized to ``size`` (same mm
            per pixel for every case); ``crop``: a ``size`` patch at cache resolution, centred on a pancreas
            pixel for pancreas slices (RandCropByPosNegLabeld's rule) and random elsewhere.
        fov_mm: field of view for ``resize``; None fits the whole slice (longest side), scale then varies.
        centre: where the ``resize`` square sits: ``image`` (slice centre) or ``pancreas`` (the slice's pancreas
            centroid; the case's for slices without pancreas; the slice centre for image-only cases).
        centre_jitter_mm: ``pancreas`` only: a uniform offset of up to this many mm per axis, seeded by
            (seed, epoch, index), so the pancreas is not pinned to the centre pixel.
        withhold_labels: cases whose masks are withheld (semi-supervised training with few labelled
            patients): their items carry an all-zero label and ``has_label`` 0, and their slices are drawn as
            "other" slices (which of them hold pancreas is not known either). With ``centre=pancreas`` the
            window is still placed from the withheld mask: it stands in for the box a coarse localisation
            stage would give an unlabelled scan (docs/data.md).
    """

    def __init__(self, cache_dir: str | Path, manifest: pd.DataFrame | str | Path | None = None, *,
                 size: int = 128, pos_fraction: float | None = 0.5, context_slices: int = 0, seed: int = 0,
                 samples_per_epoch: int | None = None, cases: Iterable[str] | None = None, fit: str = "resize",
                 fov_mm: float | None = 400.0, centre: str = "image", centre_jitter_mm: float = 0.0,
                 withhold_labels: Iterable[str] = ()):
        if fit not in FIT_MODES:
            raise ValueError(f"fit must be one of {FIT_MODES}, got {fit!r}")
        if centre not in ("image", "pancreas") or (centre == "pancreas" and not (fit == "resize" and fov_mm)):
            raise ValueError(f"centre must be image, or pancreas with fit=resize and a fov_mm; got {centre!r}")
        if pos_fraction is not None and not 0.0 <= pos_fraction <= 1.0:
            raise ValueError(f"pos_fraction must be in [0, 1] or None, got {pos_fraction}")
        self.root = cache_root(cache_dir)
        self.slices = list_slices(self.root, manifest, cases=cases)
        self.withheld = set(map(str, withhold_labels)) & set(self.slices["case_id"])
        if self.withheld:
            hidden = self.slices["case_id"].isin(self.withheld)
            self.slices.loc[hidden, ["has_label", "has_pancreas"]] = False
            self.slices.loc[hidden, "pancreas_voxels"] = 0
        self.case_ids = sorted(self.slices["case_id"].unique())
        if context_slices:
            _refuse_context_for_slice_sets(self.root, self.case_ids, context_slices)
        self.size, self.context, self.seed, self.fit, self.fov_mm = int(size), int(context_slices), seed, fit, fov_mm
        self.centre, self.jitter_mm = centre, float(centre_jitter_mm)
        self._case_centres: dict[str, tuple[float, float] | None] = {}
        self.pos_fraction = pos_fraction
        self.samples_per_epoch = samples_per_epoch or len(self.slices)
        self._pos = np.flatnonzero(self.slices["has_pancreas"].to_numpy())
        self._neg = np.flatnonzero(~self.slices["has_pancreas"].to_numpy())
        if pos_fraction and len(self._pos) == 0 and self.slices["has_label"].all():
            raise DataError("pos_fraction > 0 but no slice of the selected cases holds pancreas")
        self._case_col = self.slices["case_id"].to_numpy()
        self._slice_col = self.slices["slice"].to_numpy()
        self._label_col = self.slices["has_label"].to_numpy()
        self._open: dict[str, Any] = {}
        self.epoch = 0
        self.order = self._draw(0)

    @classmethod
    def from_config(cls, cache_dir: str | Path, cfg, manifest: pd.DataFrame | str | Path | None = None, *,
                    cases: Iterable[str] | None = None, seed: int = 0,
                    withhold_labels: Iterable[str] = ()) -> CTSliceDataset:
        """The dataset as ``cfg.sampling`` (a :class:`~pancreas_gvae.data.ct.config.DataConfig`) describes it."""
        from pancreas_gvae.data.ct.config import fit_options

        s = cfg.sampling
        return cls(cache_dir, manifest, size=s.slice_size, pos_fraction=s.pos_fraction,
                   context_slices=s.context_slices, seed=seed, samples_per_epoch=s.samples_per_epoch,
                   cases=cases, withhold_labels=withhold_labels, **fit_options(cfg))

    # -------------------------------------------------------------- epoch plan

    def _draw(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, epoch])
        n = self.samples_per_epoch
        if self.pos_fraction is None:
            base = np.arange(len(self.slices))
            reps = -(-n // len(base))
            return np.concatenate([rng.permutation(base) for _ in range(reps)])[:n]
        n_pos = int(round(self.pos_fraction * n)) if len(self._pos) else 0  # image-only cases alone: no positives
        n_neg = n - n_pos
        if n_neg and len(self._neg) == 0:
            n_pos, n_neg = n, 0  # nothing without pancreas to draw from
        picks = [self._pick(rng, self._pos, n_pos), self._pick(rng, self._neg, n_neg)]
        return rng.permutation(np.concatenate(picks))

    @staticmethod
    def _pick(rng: np.random.Generator, pool: np.ndarray, n: int) -> np.ndarray:
        if n == 0:
            return np.empty(0, dtype=np.int64)
        if n <= len(pool):
            return rng.choice(pool, size=n, replace=False)
        return np.concatenate([rng.permutation(pool) for _ in range(n // len(pool))] +
                              [rng.choice(pool, size=n % len(pool), replace=False)])

    def set_epoch(self, epoch: int) -> None:
        """Draw the slices of ``epoch`` (same seed and epoch: same slices, same crops)."""
        self.epoch = int(epoch)
        self.order = self._draw(self.epoch)

    def __len__(self) -> int:
        return len(self.order)

    # -------------------------------------------------------------- samples

    def _case(self, case_id: str):
        case = self._open.get(case_id)
        if case is None:
            case = self._open[case_id] = load_cached_case(self.root / case_id, mmap=True)
        return case

    def __getstate__(self):
        # DataLoader workers reopen the memory maps instead of pickling the arrays.
        state = dict(self.__dict__)
        state["_open"] = {}
        return state

    def __getitem__(self, index: int) -> dict[str, Any]:
        row = int(self.order[index])
        case_id, k = str(self._case_col[row]), int(self._slice_col[row])
        case = self._case(case_id)
        depth = case.image.shape[0]
        ks = np.clip(np.arange(k - self.context, k + self.context + 1), 0, depth - 1)
        image = torch.from_numpy(np.asarray(case.image[ks], dtype=np.float32))  # (C, rows, cols)
        label = torch.from_numpy(np.asarray(case.label[k:k + 1], dtype=np.float32))
        if self.fit == "resize":
            centre = self._centre(case_id, case, label, index, case.spacing[1:]) if self.centre == "pancreas" else None
            image, label = fit_slice(image, label, case.spacing[1:], self.size, self.fov_mm, centre)
        else:
            image, label = self._crop(image, label, index)
        if case_id in self.withheld:
            label = torch.zeros_like(label)
        return {"image": image.contiguous(), "label": label.contiguous(),
                "has_label": torch.tensor(float(self._label_col[row])), "case_id": case_id, "slice": k}

    # Plain torch below: MONAI's array transforms cost milliseconds per call on one slice (MetaTensor
    # bookkeeping), more than the arithmetic; the per-sample path must stay far below the cost of a load.

    def _centre(self, case_id: str, case, label: torch.Tensor, index: int, spacing) -> tuple[float, float] | None:
        """(row, col) in cache pixels of the window centre for ``centre=pancreas``, jittered; None: slice centre."""
        fg = torch.nonzero(label[0])
        if len(fg):
            rc = fg.float().mean(0).tolist()
        else:
            if case_id not in self._case_centres:  # once per case: the centroid of its whole label volume
                vol = np.argwhere(np.asarray(case.label) > 0)
                self._case_centres[case_id] = tuple(vol[:, 1:].mean(0).tolist()) if len(vol) else None
            rc = self._case_centres[case_id]
            if rc is None:
                return None
        if self.jitter_mm > 0:
            rng = np.random.default_rng([self.seed, self.epoch, index, 7])
            dy, dx = rng.uniform(-self.jitter_mm, self.jitter_mm, size=2)
            rc = [rc[0] + dy / float(spacing[0]), rc[1] + dx / float(spacing[1])]
        return float(rc[0]), float(rc[1])

    def _crop(self, image: torch.Tensor, label: torch.Tensor, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """RandCropByPosNegLabeld's rule in 2D: centre on a random pancreas pixel, or anywhere on other slices."""
        s = self.size
        image, label = _center_fit(image, (max(s, image.shape[-2]), max(s, image.shape[-1]))), \
            _center_fit(label, (max(s, label.shape[-2]), max(s, label.shape[-1])))
        h, w = image.shape[-2:]
        rng = np.random.default_rng([self.seed, self.epoch, index])
        fg = torch.nonzero(label[0])
        if len(fg):
            cy, cx = (int(v) for v in fg[rng.integers(len(fg))])
        else:
            cy, cx = int(rng.integers(h)), int(rng.integers(w))
        y0 = min(max(cy - s // 2, 0), h - s)
        x0 = min(max(cx - s // 2, 0), w - s)
        return image[:, y0:y0 + s, x0:x0 + s], label[:, y0:y0 + s, x0:x0 + s]


def read_slices(ds: CTSliceDataset, rows: Sequence[int] | None = None, *, max_slices: int | None = None,
                seed: int = 0) -> dict[str, Any]:
    """The project's one "load these slices" helper: rows of ``ds.slices`` as stacked float32 tensors.

    ``rows`` default to every slice of the dataset's cases in (case, slice) order; ``max_slices`` keeps a
    seeded random subset (in order). Each slice is read from the memory-mapped cache and fitted to the
    dataset's slice size before it is stacked, so no whole volume is ever held. Returns ``image``
    ``(N, C, H, W)``, ``label`` ``(N, 1, H, W)``, ``has_label`` ``(N,)``, ``case_id`` (list) and ``slice``
    ``(N,)``. Sets ``ds.order`` to the rows read.
    """
    if rows is None:
        rows = sorted(range(len(ds.slices)), key=lambda r: (ds.slices["case_id"].iat[r], ds.slices["slice"].iat[r]))
    rows = np.asarray(rows, dtype=np.int64)
    if max_slices is not None and max_slices < len(rows):
        rows = np.sort(np.random.default_rng(seed).choice(rows, size=max_slices, replace=False))
    ds.order = rows
    items = [ds[i] for i in range(len(rows))]
    if not items:
        raise DataError("no slice to load")
    return {"image": torch.stack([it["image"] for it in items]).float(),
            "label": torch.stack([it["label"] for it in items]).float(),
            "has_label": torch.stack([it["has_label"] for it in items]),
            "case_id": [str(it["case_id"]) for it in items],
            "slice": np.asarray([it["slice"] for it in items], dtype=np.int64)}


def fit_slice(image: torch.Tensor, label: torch.Tensor, spacing, size: int, fov_mm: float | None,
              centre_rc: tuple[float, float] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(C, H, W)`` image and ``(1, H, W)`` mask -> ``size x size``: a centred ``fov_mm`` square (or the whole
    slice, aspect kept, when ``fov_mm`` is None), area-resized; the mask is thresholded at 0.5.
    ``centre_rc``: the square's centre (row, col) in input pixels instead of the slice centre (zero beyond it)."""
    s = size
    h, w = image.shape[-2:]
    if fov_mm:
        bh, bw = max(1, round(fov_mm / spacing[0])), max(1, round(fov_mm / spacing[1]))
    else:
        bh = bw = max(h, w)
    if centre_rc is not None and fov_mm:
        return _fit_box(image, label, (round(centre_rc[0] - bh / 2), round(centre_rc[1] - bw / 2)), (bh, bw), s)
    # Crop what lies inside the box, resize that, then pad the small result: padding the full-resolution
    # slice first would allocate (and page-fault) megabytes per sample.
    ch, cw = min(h, bh), min(w, bw)
    sy, sx = (h - ch) // 2, (w - cw) // 2
    oh, ow = max(1, round(ch * s / bh)), max(1, round(cw * s / bw))
    region = (slice(None), slice(sy, sy + ch), slice(sx, sx + cw))
    img = F.interpolate(image[region][None], size=(oh, ow), mode="area")[0]
    lab = F.interpolate(label[region][None], size=(oh, ow), mode="area")[0] >= 0.5  # smoother than nearest
    return _center_fit(img, (s, s)), _center_fit(lab.float(), (s, s))


def _fit_box(image: torch.Tensor, label: torch.Tensor, origin: tuple[int, int], box: tuple[int, int],
             s: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``box`` (rows, cols) whose top-left input pixel is ``origin`` (may lie outside the slice) resized to
    ``s x s``: what lies inside is area-resized and placed where it belongs, the rest is zero."""
    (y0, x0), (bh, bw) = origin, box
    h, w = image.shape[-2:]
    ys, ye, xs, xe = max(y0, 0), min(y0 + bh, h), max(x0, 0), min(x0 + bw, w)
    img, lab = image.new_zeros((image.shape[0], s, s)), label.new_zeros((label.shape[0], s, s))
    if ye <= ys or xe <= xs:
        return img, lab
    dy0, dy1 = round((ys - y0) * s / bh), round((ye - y0) * s / bh)
    dx0, dx1 = round((xs - x0) * s / bw), round((xe - x0) * s / bw)
    if dy1 <= dy0 or dx1 <= dx0:
        return img, lab
    region = (slice(None), slice(ys, ye), slice(xs, xe))
    img[:, dy0:dy1, dx0:dx1] = F.interpolate(image[region][None], size=(dy1 - dy0, dx1 - dx0), mode="area")[0]
    lab[:, dy0:dy1, dx0:dx1] = (F.interpolate(label[region][None], size=(dy1 - dy0, dx1 - dx0),
                                              mode="area")[0] >= 0.5).to(label.dtype)
    return img, lab


def _center_fit(x: torch.Tensor, box: tuple[int, int]) -> torch.Tensor:
    """Centre crop and/or zero-pad the last two dims to ``box`` (0 = below the HU window: air / fat)."""
    h, w = x.shape[-2:]
    bh, bw = box
    if (h, w) == (bh, bw):
        return x
    out = x.new_zeros((*x.shape[:-2], bh, bw))
    sy, sx = max((h - bh) // 2, 0), max((w - bw) // 2, 0)  # source offset (crop)
    dy, dx = max((bh - h) // 2, 0), max((bw - w) // 2, 0)  # destination offset (pad)
    ch, cw = min(h, bh), min(w, bw)
    out[..., dy:dy + ch, dx:dx + cw] = x[..., sy:sy + ch, sx:sx + cw]
    return out



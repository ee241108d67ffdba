"""Prepare a CT cohort: discover cases, check and preprocess each one, cache it, write the manifest.

Each case runs inside its own try/except: whatever goes wrong becomes a manifest row with status
``excluded`` and a named reason, and the other cases carry on. A re-run reuses every case whose cache
entry has the same config hash and source fingerprint (resume), so only new or changed cases are redone.
One run at a time per output folder (``OUT/.lock``, see :mod:`pancreas_gvae.data.ct.outlock`); a case without a
label is excluded (``missing_label``) unless ``labels.require_label`` is false, then it is prepared image-only.
A 2D slice set (``--layout slices``) gives one case per patient: :mod:`pancreas_gvae.data.ct.slice_sets` reads and
stacks its slices, then the same chain and cache run.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import multiprocessing
import os
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from pancreas_gvae.data.ct.checks import CaseExcluded
from pancreas_gvae.data.ct.config import DataConfig, check_slice_set_settings, config_hash, load_data_config, validate
from pancreas_gvae.data.ct.dicom_series import candidate_files, scan_dicom_files
from pancreas_gvae.data.ct.cases import CaseSource
from pancreas_gvae.data.ct.discovery import discover, mark_missing_labels
from pancreas_gvae.data.ct.manifest import MANIFEST_NAME, dims, redact, redacted_stderr, relative, to_frame, write_manifest
from pancreas_gvae.data.ct.outlock import locked_output
from pancreas_gvae.data.ct.slice_sets import file_stamp
from pancreas_gvae.errors import DataError, PipelineError

log = logging.getLogger(__name__)


def source_fingerprint(case: CaseSource) -> str:
    """Hash of the names, sizes and modification times of a case's files: a changed source redoes the case."""
    if case.kind == "slices":
        from pancreas_gvae.data.ct.slice_sets import slice_fingerprint

        return slice_fingerprint(case)
    paths: list[Path] = []
    if case.image is not None:
        paths += candidate_files(case.image) if case.image.is_dir() else [case.image]
    if case.label is not None:
        paths.append(case.label)
    h = hashlib.sha256()
    for p in paths:
        h.update(file_stamp(p))
    return h.hexdigest()[:16]


def _base_row(case: CaseSource, root: Path, chash: str) -> dict[str, Any]:
    return {
        "case_id": case.case_id,
        "layout": case.layout,
        "status": "excluded",
        "reason": "",
        "notes": "; ".join(case.notes),
        "has_label": case.label is not None,
        "image_path": relative(case.image, root),  # the case folder, never the study/series folders below it
        "label_path": relative(case.label, root),
        "config_hash": chash,
        "from_cache": False,
    }


def _roots(case: CaseSource, data_root: Path, cache_dir: Path) -> list[Path]:
    """Folders whose absolute paths are cut from every message: the data root, the label's folder, the cache."""
    return [data_root, cache_dir, *([case.label.parent] if case.label is not None else [])]


def prepare_case(case: CaseSource, cache_dir: Path, cfg: DataConfig, pancreas_values: list[int], chash: str,
                 data_root: Path, fingerprint: str = "") -> dict[str, Any]:
    """Check, preprocess and cache one case; always returns its manifest row (never raises on bad data).

    What the readers print on stderr (ITK, GDCM, codecs, warnings) comes out afterwards with paths redacted.
    """
    with redacted_stderr(_roots(case, data_root, cache_dir), prefix=f"{case.case_id}: "):
        return _prepare_case(case, cache_dir, cfg, pancreas_values, chash, data_root, fingerprint)


def _prepare_case(case: CaseSource, cache_dir: Path, cfg: DataConfig, pancreas_values: list[int], chash: str,
                  data_root: Path, fingerprint: str) -> dict[str, Any]:
    from pancreas_gvae.transforms.cache import case_dir, remove_cached_case, save_cached_case, update_cache_meta  # heavy imports
    from pancreas_gvae.transforms.ct import QC_KEY, build_preprocess_chain, unwrap_exclusion

    start = time.perf_counter()
    row = _base_row(case, data_root, chash)
    row["input_intensity"] = cfg.preprocess.input_intensity.describe()
    roots = _roots(case, data_root, cache_dir)
    notes = list(case.notes)
    has_label = case.label is not None
    try:
        if case.excluded is not None:
            raise CaseExcluded(*case.excluded)
        label_src: Any = str(case.label) if has_label else None
        if case.kind == "slices":
            from monai.data import MetaTensor
            import torch

            from pancreas_gvae.data.ct.slice_stacks import read_slice_case

            stack = read_slice_case(case, cfg, has_label=has_label)
            notes += stack.notes
            if stack.excluded is not None:
                raise stack.excluded
            row.update(n_slices=len(stack.names), source_slices=" ".join(stack.names))
            affine = torch.as_tensor(stack.affine, dtype=torch.float64)
            image_src: Any = MetaTensor(torch.from_numpy(stack.image)[None], affine=affine)
            if has_label:
                label_src = MetaTensor(torch.from_numpy(stack.label)[None], affine=affine.clone())
        elif case.kind == "dicom":
            series = scan_dicom_files(candidate_files(case.image), cfg.checks)
            notes += series.notes
            row.update(slice_thickness=series.thickness, slice_interval=round(series.interval, 4),
                       n_slices=len(series.files), vendor=series.manufacturer)
            image_src = series.files
        else:
            image_src = str(case.image)
        source = {"image": image_src, **({"label": label_src} if has_label else {})}
        data = build_preprocess_chain(cfg, pancreas_values, has_label=has_label)(source)
        qc = data.get(QC_KEY, {})
        notes += qc.get("notes", [])
        if case.kind == "nifti":
            row.update(slice_interval=round(qc["spacing"][2], 4), n_slices=qc["shape"][2])
        row.update(shape=dims(qc["shape"]), spacing=dims(qc["spacing"], "{:.4g}"),
                   hu_min=qc["hu_min"], hu_max=qc["hu_max"])
        if has_label:
            row.update(label_voxels=qc["label_voxels"], label_median_hu=round(qc["label_median_hu"], 1),
                       label_air_fraction=round(qc["label_air_fraction"], 4),
                       label_fat_fraction=round(qc["label_fat_fraction"], 4))
        image = data["image"]
        label = data["label"].numpy()[0] if has_label else None
        row.update(status="ok", notes=redact("; ".join(notes), roots))
        meta = {"config_hash": chash, "fingerprint": fingerprint, "layout": case.layout}
        stored = save_cached_case(cache_dir, case.case_id, image.numpy()[0], label,
                                  image.affine.numpy(), meta, dtype=cfg.preprocess.cache_dtype)
        hits = np.flatnonzero(stored["slice_voxels"])
        row.update(cache_shape=dims(stored["shape"]), cache_spacing=dims(stored["spacing"], "{:.4g}"),
                   cache_path=relative(case_dir(cache_dir, case.case_id), cache_dir.parent),
                   pancreas_slices=f"{hits[0]}-{hits[-1]}" if hits.size else "",
                   pancreas_slice_count=int(hits.size))
        row["seconds"] = round(time.perf_counter() - start, 2)
        update_cache_meta(cache_dir, case.case_id, row=row)  # the row makes the entry resumable
        return row
    except Exception as err:  # noqa: BLE001 - one broken case must not stop the others
        excluded = unwrap_exclusion(err)
        if excluded is not None:
            reason = str(excluded)
        else:
            root = err
            while root.__cause__ is not None:
                root = root.__cause__
            reason = f"error: {type(root).__name__}: {str(root).splitlines()[0] if str(root) else ''}"
            log.debug("case %s failed:\n%s", case.case_id, redact(traceback.format_exc(), roots))
        row.update(status="excluded", reason=redact(reason, roots),
                   notes=redact("; ".join(notes), roots), seconds=round(time.perf_counter() - start, 2))
        remove_cached_case(cache_dir, case.case_id)  # never leave a stale "ok" cache (renamed aside, then deleted)
        return row


def _init_worker(threads: int) -> None:
    import itk
    import torch

    torch.set_num_threads(threads)
    itk.MultiThreaderBase.SetGlobalDefaultNumberOfThreads(threads)


def _make_out_dir(out_dir: Path) -> Path:
    """``out_dir/cache``, created; a usage error (one line, exit 2) when ``out_dir`` is a file or not creatable."""
    if out_dir.exists() and not out_dir.is_dir():
        raise PipelineError(f"--out {out_dir} is an existing file, not a folder; give a folder for {MANIFEST_NAME} "
                            f"and cache/")
    cache_dir = out_dir / "cache"
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # a parent is a file, no permission, read-only file system
        raise PipelineError(f"--out {out_dir}: cannot create the output folder ({err.strerror or err})") from None
    return cache_dir


def prepare_dataset(data_root: str | Path, out_dir: str | Path, *, labels: str | Path | None = None,
                    layout: str = "auto", pancreas_label: int | list[int] | None = None,
                    config: DataConfig | str | Path | None = None, workers: int = 1, force: bool = False,
                    progress: bool = True, wait_s: float = 0.0) -> pd.DataFrame:
    """Prepare every case under ``data_root`` into ``out_dir`` (``cache/`` + ``manifest.csv``); returns the manifest.

    ``pancreas_label`` overrides the layout's label values (e.g. 7 for TotalSegmentator maps); ``force``
    ignores existing cache entries; ``workers > 1`` prepares cases in parallel processes. Another run holding
    ``out_dir`` is waited for up to ``wait_s`` seconds (< 0: no limit), then a :class:`PipelineError` names it.
    """
    cfg = config if isinstance(config, DataConfig) else load_data_config(config)
    validate(cfg)
    if workers < 1:
        raise PipelineError(f"--workers must be at least 1, got {workers}")
    found = discover(data_root, labels=labels, layout=layout, exclude_cases=cfg.exclude_cases,
                     slice_set=cfg.slice_set)
    if cfg.labels.require_label:
        mark_missing_labels(found.cases)
    if not found.cases:
        raise DataError(f"no cases found under {found.root} (layout {found.layout})")
    values = cfg.pancreas_values(found.layout, pancreas_label)
    if found.layout == "slices":
        check_slice_set_settings(cfg)
        if pancreas_label is not None:  # the slice reader maps masks to 0/1: the flag selects the mask values
            cfg = copy.deepcopy(cfg)
            cfg.slice_set.mask_values = values
            values = [1]
    chash = config_hash(cfg, values, found.layout)
    out_dir = Path(out_dir)
    cache_dir = _make_out_dir(out_dir)
    with locked_output(out_dir, wait_s):
        return _prepare_locked(found, out_dir, cache_dir, cfg, values, chash, workers, force, progress)


def _prepare_locked(found, out_dir: Path, cache_dir: Path, cfg: DataConfig, values: list[int], chash: str,
                    workers: int, force: bool, progress: bool) -> pd.DataFrame:
    from pancreas_gvae.transforms.cache import clean_orphans, read_cache_meta

    root = found.root
    orphans = clean_orphans(cache_dir)
    for p in [*out_dir.glob(f".{MANIFEST_NAME}.tmp-*"), *out_dir.glob(f"{MANIFEST_NAME}.tmp")]:  # + the old name
        p.unlink(missing_ok=True)
        orphans.append(p.name)
    if orphans:
        log.info("removed %d leftover(s) of an interrupted run: %s", len(orphans), ", ".join(sorted(orphans)[:5]))
    unlabelled = sum(c.label is None and c.excluded is None for c in found.cases)
    log.info("layout %s: %d case(s)%s, pancreas label value(s) %s, config %s", found.layout, len(found.cases),
             f" ({unlabelled} image-only, without a label)" if unlabelled else "", values, chash)

    rows: list[dict[str, Any]] = []
    todo: list[tuple[CaseSource, str]] = []
    for case in found.cases:
        if case.excluded is not None:
            log.info("%s left out: %s: %s", case.case_id, *case.excluded)
        fp = source_fingerprint(case) if case.excluded is None else ""
        meta = None if force or case.excluded is not None else read_cache_meta(cache_dir, case.case_id)
        if meta and meta.get("config_hash") == chash and meta.get("fingerprint") == fp and "row" in meta:
            rows.append({**meta["row"], "from_cache": True})
        else:
            todo.append((case, fp))

    bar = tqdm(total=len(todo), desc="prepare CT", unit="case", disable=not progress or not todo)
    if workers == 1 or len(todo) <= 1:
        for case, fp in todo:
            rows.append(prepare_case(case, cache_dir, cfg, values, chash, root, fp))
            bar.update()
    else:
        threads = max(1, (os.cpu_count() or 1) // workers)
        # spawn, not fork: forking a process whose torch/OpenMP threads already ran can deadlock the child.
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_worker,
                                 initargs=(threads,)) as pool:
            futures = {pool.submit(prepare_case, case, cache_dir, cfg, values, chash, root, fp): case
                       for case, fp in todo}
            for fut in as_completed(futures):
                case = futures[fut]
                try:
                    rows.append(fut.result())
                except Exception as err:  # noqa: BLE001 - a crashed worker (e.g. killed for memory) excludes its case
                    row = _base_row(case, root, chash)
                    row["reason"] = redact(f"error: worker failed: {type(err).__name__}: {err}",
                                           _roots(case, root, cache_dir))
                    rows.append(row)
                bar.update()
    bar.close()

    df = to_frame(rows)
    write_manifest(df, out_dir)
    return df

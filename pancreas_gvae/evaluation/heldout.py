"""Held-out data, feature networks and batch sources for ``pipelines/evaluate.py``.

``settings`` is any object with the evaluation command's attributes (``dataset``, ``data_dir``,
``data_root``, ``labels``, ``layout``, ``pancreas_label``, ``out``, ``n_eval``, ``n_val``,
``feature_steps``, ``n_memo``, ``test_fraction``): the parsed command line, or a namespace in a notebook.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from pancreas_gvae.evaluation import metrics as M
from pancreas_gvae.errors import PipelineError
from pancreas_gvae.evaluation.compare import EvalData, SegmentationRefs

def mnist_eval_data(args):
    from pancreas_gvae.data.mnist import load_dataset, to_tensor
    from pancreas_gvae.training.batches import TensorBatches

    if args.data_dir is None:
        raise PipelineError("--data-dir is required for mnist / fashion-mnist")
    splits = load_dataset(args.data_dir, args.dataset)
    train = to_tensor(splits["train"].images)
    train_y = torch.from_numpy(np.asarray(splits["train"].labels, dtype=np.int64))
    test_all = to_tensor(splits["test"].images)
    perm = torch.randperm(len(test_all), generator=torch.Generator().manual_seed(0))
    n_eval, n_val = split_sizes(args, len(test_all))
    test, val = test_all[perm[:n_eval]], test_all[perm[n_eval:n_eval + n_val]]
    t0 = time.perf_counter()
    clf = M.train_classifier(train, train_y, steps=args.feature_steps, seed=0, num_classes=10)
    test_y = torch.from_numpy(np.asarray(splits["test"].labels, dtype=np.int64))
    acc = M.accuracy(clf, test_all, test_y)
    feature_net = f"SmallClassifier ({args.feature_steps} steps, seed 0, test acc {acc:.3f})"
    print(f"{args.dataset}: {len(train)} train, {n_eval} eval + {n_val} val held-out; feature net: {feature_net} "
          f"in {time.perf_counter() - t0:.0f} s")
    memo = train[torch.randperm(len(train), generator=torch.Generator().manual_seed(1))[:args.n_memo]]
    data = EvalData(args.dataset, test=test, val=val, memo_train=memo, feature_fn=clf.features,
                    feature_net=feature_net, logits_fn=clf.logits, num_classes=10, likelihood="bernoulli",
                    n_samples=int(getattr(args, "n_samples", 0) or 0),
                    notes={"held_out": f"test split ({splits['test'].source}), seeded subset",
                           "memorisation_reference": f"{len(memo)} of {len(train)} training images"})
    return data, (lambda cfg: TensorBatches(train, batch_size=cfg.train.batch_size, seed=cfg.train.seed)), test


def split_sizes(args, available: int) -> tuple[int, int]:
    """(evaluation, Parzen-validation) sizes; when too few held-out images exist, 2/3 and 1/3 of them."""
    n_eval = args.n_eval
    n_val = args.n_val or max(2, n_eval // 2)
    if n_eval + n_val > available:
        if available < 6:
            raise PipelineError(f"only {available} held-out images/slices: too few to evaluate")
        n_eval = min(n_eval, available * 2 // 3)
        n_val = min(n_val, available - n_eval)
    return n_eval, n_val


def prepare_cohort(ct, root, prepared, data_cfg, *, labels, layout, pancreas_label) -> tuple[object, list[str]]:
    """Prepare (or reuse) a cohort's store; returns its manifest and the sorted ids of its ok cases."""
    manifest = ct.prepare(root, prepared, data_cfg, labels=labels, layout=layout, pancreas_label=pancreas_label,
                          workers=1)
    return manifest, sorted(manifest.loc[manifest["status"] == "ok", "case_id"].astype(str))


def prepare_main_cohort(ct, args, cfg, data_cfg) -> tuple[Path, object, list[str]]:
    """``args.data_root`` (default: the embedded phantom cohort under OUT/phantom) prepared into OUT/prepared:
    ``(prepared, manifest, ok case ids)``; ``args`` carries ``out, data_root, labels, layout, pancreas_label``."""
    root = args.data_root or ct.ensure_phantom(args.out / "phantom", cfg.data.get("phantom", {}))
    prepared = args.out / "prepared"
    manifest, cases = prepare_cohort(ct, root, prepared, data_cfg, labels=args.labels, layout=args.layout,
                                     pancreas_label=args.pancreas_label)
    return prepared, manifest, cases


def ct_eval_data(args, cfg):
    """Held-out CT data: an external cohort (``args.test_data_root``) or a case-level split of the one cohort.

    Held-out slices are drawn with the training draw's pancreas share; the feature network (FD/KID,
    precision/recall) and the segmenter (label fidelity, TSTR's real arm) are trained on training-case
    slices only.
    """
    from pancreas_gvae.segmentation import scoring, splits
    from pancreas_gvae.segmentation import unet as S
    from pancreas_gvae.data.ct.config import check_model_matches_data, data_config, fit_options
    from pancreas_gvae.training import ct
    from pancreas_gvae.transforms.slice_dataset import CTSliceDataset

    data_cfg = data_config(cfg)
    check_model_matches_data(cfg, data_cfg)
    prepared, manifest, cases = prepare_main_cohort(ct, args, cfg, data_cfg)
    external = getattr(args, "test_data_root", None)
    if external is not None:
        test_prepared = args.out / "prepared-test"
        man_test, test_cases = prepare_cohort(ct, external, test_prepared, data_cfg, labels=args.test_labels,
                                               layout=args.test_layout, pancreas_label=args.test_pancreas_label)
        if not cases or not test_cases:
            raise PipelineError(f"no usable case in the {'training' if not cases else 'test'} cohort")
        train_cases, man_train = cases, manifest
        split_note = (f"external test cohort: {len(test_cases)} case(s) of --test-data-root; "
                      f"training on all {len(cases)} case(s) of --data-root")
    else:
        if len(cases) < 2:
            raise PipelineError(f"a held-out split by case needs >= 2 usable cases; {len(cases)} in {prepared}")
        split = splits.split_cases(cases, test_fraction=args.test_fraction, seed=0)
        train_cases, test_cases = list(split.train), list(split.test)
        test_prepared = prepared
        man_train = splits.restrict_manifest(manifest, train_cases)
        man_test = splits.restrict_manifest(manifest, test_cases)
        split_note = f"{len(test_cases)} held-out case(s) of {len(cases)} (split by case, seed 0)"
    pos_fraction = data_cfg.sampling.pos_fraction
    ds_test = CTSliceDataset.from_config(test_prepared, data_cfg, man_test, seed=0)
    n_eval, n_val = split_sizes(args, len(ds_test.slices))
    rows, share_note = ct.draw_like_training(ds_test, n_eval + n_val, pos_fraction, seed=0)
    n_eval, n_val = split_sizes(args, len(rows))
    held = ct.slices_at(ds_test, rows)
    test, val = held[:n_eval], held[n_eval:n_eval + n_val]
    ds_train = CTSliceDataset.from_config(prepared, data_cfg, man_train, seed=0)
    train_rows = np.random.default_rng(1).permutation(len(ds_train.slices))[:args.n_memo]
    train_slices = ct.slices_at(ds_train, train_rows)
    t0 = time.perf_counter()
    ae = M.train_slice_autoencoder(train_slices[:, :1], steps=args.feature_steps, seed=0)
    feature_net = f"SliceAutoencoder ({args.feature_steps} steps, seed 0, {len(train_slices)} train-case slices)"
    segmentation = None
    seg_steps = int(getattr(args, "seg_steps", 0) or 0)
    if seg_steps > 0:
        fit, size = fit_options(data_cfg), data_cfg.sampling.slice_size
        real_train = S.load_slices(prepared, man_train, train_cases, size=size, **fit)
        real_test = S.load_slices(test_prepared, man_test, test_cases, size=size, **fit)
        # The recipe of segmentation.tstr's real arm (batch 16, its pancreas oversampling), trained once.
        augment = bool(getattr(args, "seg_augment", False))
        segmenter, _ = S.train_unet(real_train, None, steps=seg_steps, batch_size=16, ratio=0.0, seed=0,
                                    augment=augment)
        pixel_mm = scoring.slice_pixel_mm(data_cfg)
        real_dice = scoring.evaluate_model(segmenter, real_test, pixel_mm=pixel_mm)["dice"]
        segmentation = SegmentationRefs(segmenter, real_train, real_test, seg_steps, pixel_mm, real_dice, augment)
    print(f"ct: {len(train_cases)} train case(s), {len(test_cases)} held-out case(s); {n_eval} eval + {n_val} val "
          f"held-out slices, {share_note}; feature net {feature_net}"
          + (f"; segmenter {seg_steps} steps{' (classic augmentation)' if segmentation.augment else ''}, real held-out "
             f"Dice {segmentation.real_dice:.3f}" if segmentation else "")
          + f" ({time.perf_counter() - t0:.0f} s)")
    data = EvalData("ct" if args.data_root else "ct-phantom", test=test, val=val, memo_train=train_slices,
                    feature_fn=ae.features, feature_net=feature_net, image_channels=slice(0, 1),
                    window=tuple(data_cfg.preprocess.hu_window), likelihood="gaussian",
                    sigma=float(cfg.loss.gaussian_sigma), n_samples=int(getattr(args, "n_samples", 0) or 0),
                    mask_channels=int(cfg.model.mask_channels), segmentation=segmentation,
                    notes={"held_out": split_note, "held_out_draw": share_note,
                           "train_cases": str(len(train_cases)),
                           "memorisation_reference": f"{len(train_slices)} slices of the training cases"})
    return data, (lambda c: ct.slice_batches(prepared, man_train, data_cfg, c)), test

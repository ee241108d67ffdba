"""Held-out data, feature networks and batch sources for ``pipelines/evaluate.py``.

``settings`` is any object with the evaluation command's attributes (``dataset``, ``data_dir``,
``data_root``, ``labels``, ``layout``, ``pancreas_label``, ``out``, ``n_eval``, ``n_val``,
``feature_steps``, ``n_memo``, ``test_fraction``): the parsed command line, or a namespace in a notebook.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from pancreas_gvae import metrics as M
from pancreas_gvae.errors import PipelineError
from pancreas_gvae.evaluation import EvalData

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


def take_slices(ds, n: int) -> torch.Tensor:
    from pancreas_gvae.training.ct import stack_inputs

    ds.pos_fraction = None  # every slice once, in a seeded order
    ds.samples_per_epoch = len(ds.slices)
    ds.set_epoch(0)
    return stack_inputs(ds, n)


def ct_eval_data(args, cfg):
    from pancreas_gvae.training import ct
    from transforms.slice_dataset import CTSliceDataset

    data_cfg = ct.data_config(cfg)
    ct.check_model_matches_data(cfg, data_cfg)
    data_root = args.data_root or args.out / "phantom"
    if args.data_root is None:
        ct.ensure_phantom(data_root, cfg.data.get("phantom", {}))
    prepared = args.out / "prepared"
    manifest = ct.prepare(data_root, prepared, data_cfg, labels=args.labels, layout=args.layout,
                          pancreas_label=args.pancreas_label, workers=1)
    cases = sorted(manifest.loc[manifest["status"] == "ok", "case_id"].astype(str))
    if len(cases) < 2:
        raise PipelineError(f"a held-out split by case needs >= 2 usable cases; {len(cases)} under {data_root}")
    rng = np.random.default_rng(0)
    order = [cases[i] for i in rng.permutation(len(cases))]
    n_test = min(len(cases) - 1, max(1, round(args.test_fraction * len(cases))))
    test_cases, train_cases = sorted(order[:n_test]), sorted(order[n_test:])
    man_train = manifest[manifest["case_id"].astype(str).isin(train_cases)]
    man_test = manifest[manifest["case_id"].astype(str).isin(test_cases)]
    held = take_slices(CTSliceDataset.from_config(prepared, data_cfg, man_test, seed=0), 10**9)
    held = held[torch.randperm(len(held), generator=torch.Generator().manual_seed(0))]
    n_eval, n_val = split_sizes(args, len(held))
    test, val = held[:n_eval], held[n_eval:n_eval + n_val]
    train_slices = take_slices(CTSliceDataset.from_config(prepared, data_cfg, man_train, seed=0), args.n_memo)
    t0 = time.perf_counter()
    ae = M.train_slice_autoencoder(train_slices[:, :1], steps=args.feature_steps, seed=0)
    feature_net = f"SliceAutoencoder ({args.feature_steps} steps, seed 0, {len(train_slices)} train-case slices)"
    print(f"ct: {len(train_cases)} train case(s), {len(test_cases)} held-out case(s); {n_eval} eval + {n_val} val "
          f"held-out slices; feature net {feature_net} in {time.perf_counter() - t0:.0f} s")
    data = EvalData("ct" if args.data_root else "ct-phantom", test=test, val=val, memo_train=train_slices,
                    feature_fn=ae.features, feature_net=feature_net, image_channels=slice(0, 1),
                    window=tuple(data_cfg.preprocess.hu_window), likelihood="gaussian",
                    sigma=float(cfg.loss.gaussian_sigma),
                    notes={"held_out": f"{len(test_cases)} held-out case(s) of {len(cases)} (split by case, seed 0)",
                           "train_cases": str(len(train_cases)),
                           "memorisation_reference": f"{len(train_slices)} slices of the training cases"})
    return data, (lambda c: ct.slice_batches(prepared, man_train, data_cfg, c)), test

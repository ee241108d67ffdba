"""Memorisation check: exact copies are flagged, distant samples are not; chunked search equals brute force."""

from __future__ import annotations

import pytest
import torch

from pancreas_gvae.evaluation.metrics.memorisation import memorisation_check, nearest_neighbours


def _train(n: int = 60, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=g)


def test_nearest_neighbours_match_brute_force_for_any_chunk():
    g = torch.Generator().manual_seed(1)
    q, r = torch.randn(17, 5, generator=g), torch.randn(23, 5, generator=g)
    d_ref = torch.cdist(q.double(), r.double())
    for chunk in (1, 4, 100):
        d, i = nearest_neighbours(q, r, chunk_size=chunk)
        torch.testing.assert_close(d, d_ref.min(1).values)
        assert torch.equal(i, d_ref.argmin(1))


def test_leave_one_out_excludes_self_by_index():
    x = torch.tensor([[0.0], [1.0], [3.0], [3.0]])  # a true duplicate (rows 2, 3) still counts
    d, i = nearest_neighbours(x, x, exclude_self=True, chunk_size=3)
    assert d.tolist() == [1.0, 1.0, 0.0, 0.0]
    assert i.tolist() == [1, 0, 3, 2]
    d2, i2 = nearest_neighbours(x[[1, 2]], x, exclude_index=torch.tensor([1, 2]))
    assert d2.tolist() == [1.0, 0.0] and i2.tolist() == [0, 3]


def test_flags_an_exact_copy_and_not_a_distant_sample():
    train = _train()
    heldout = _train(40, seed=1)
    copy = train[7:8].clone()
    distant = train[3:4] + 5.0
    samples = torch.cat([copy, distant])
    res = memorisation_check(samples, train, heldout=heldout)
    assert res.near_copy.tolist() == [True, False]
    assert res.pixel.indices[0] == 7
    assert float(res.pixel.distances[0]) == 0.0  # recomputed exactly, not via the matrix-product form
    assert float(res.pixel.ratios[0]) == 0.0 and float(res.pixel.ratios[1]) > 1.0
    assert float(res.pixel.percentiles[0]) == 0.0 and float(res.pixel.percentiles[1]) == 1.0
    assert res.pixel.reference_kind == "heldout" and res.pixel.reference_distances.shape == (40,)
    assert res.pixel.reference_scale == pytest.approx(float(res.pixel.reference_distances.median()))
    assert res.feature is None


def test_near_copy_threshold_and_leave_one_out_reference():
    train = _train()
    scale = float(nearest_neighbours(train, train, exclude_self=True)[0].median())
    g = torch.Generator().manual_seed(2)
    direction = torch.randn(1, 1, 8, 8, generator=g)
    direction /= direction.norm()
    near = train[5:6] + 0.2 * scale * direction  # ratio 0.2
    mid = train[9:10] + 0.5 * scale * direction  # ratio 0.5
    res = memorisation_check(torch.cat([near, mid]), train, max_reference=None)
    assert res.pixel.reference_kind == "train_leave_one_out"
    torch.testing.assert_close(res.pixel.ratios, torch.tensor([0.2, 0.5], dtype=torch.float64), rtol=1e-4, atol=1e-4)
    assert res.near_copy.tolist() == [True, False]
    looser = memorisation_check(torch.cat([near, mid]), train, threshold=0.6, max_reference=None)
    assert looser.near_copy.tolist() == [True, True]
    sub = memorisation_check(torch.cat([near, mid]), train, max_reference=20, seed=0)
    assert sub.pixel.reference_distances.shape == (20,)


def test_feature_space_check_runs_alongside():
    train = _train()
    samples = torch.cat([train[:2].clone(), train[2:4] + 3.0])
    res = memorisation_check(samples, train, feature_fn=lambda b: b.flatten(1)[:, :10] * 2.0)
    assert res.feature is not None
    assert res.feature.indices[:2].tolist() == [0, 1]
    assert res.near_copy.tolist() == [True, True, False, False]


def test_duplicated_training_set_without_heldout_is_an_error():
    train = torch.zeros(10, 4)
    with pytest.raises(ValueError, match="duplicated"):
        memorisation_check(torch.ones(2, 4), train)

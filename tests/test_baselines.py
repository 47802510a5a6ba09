from __future__ import annotations

import pytest
import torch

from obsdiff_lite.baselines import dsnot_prune, magnitude_prune, wanda_prune


def _weight(out=16, d=32, seed=0, dtype=torch.float32):
    return torch.randn(out, d, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _per_row_magnitude_reference(W, sparsity):
    """Each row loses its int(d * sparsity) smallest |w|."""
    k = int(W.shape[1] * sparsity)
    keep = torch.ones_like(W, dtype=torch.bool)
    for r in range(W.shape[0]):
        keep[r, W[r].abs().argsort()[:k]] = False
    return keep


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9])
def test_magnitude_keeps_largest_weights_globally(sparsity):
    W = _weight()
    new, keep = magnitude_prune(W, sparsity)
    assert int((~keep).sum()) == int(W.numel() * sparsity)
    if 0 < sparsity:
        assert W[keep].abs().min() >= W[~keep].abs().max()
    assert torch.equal(new, W * keep)
    # global, not per row: the per-row counts differ for random weights
    if sparsity == 0.5:
        assert len(set((~keep).sum(1).tolist())) > 1


def test_wanda_per_row_sparsity_is_exact():
    W = _weight(seed=1)
    norm = torch.rand(32, generator=torch.Generator().manual_seed(2)) + 0.1
    for sparsity in (0.25, 0.5, 0.7):
        new, keep = wanda_prune(W, norm, sparsity)
        per_row = (~keep).sum(1)
        # Each row loses floor(32 s) or one more; the layer loses exactly int(numel s).
        assert set(per_row.tolist()) <= {int(32 * sparsity), int(32 * sparsity) + 1}
        assert int(per_row.sum()) == int(W.numel() * sparsity)
        assert (new[~keep] == 0).all() and torch.equal(new[keep], W[keep])


def test_wanda_remainder_goes_to_rows_with_lowest_next_score():
    W = _weight(seed=4)
    norm = torch.ones(32)
    _, keep = wanda_prune(W, norm, 0.7)  # 22.4 per row: 6 of 16 rows lose a 23rd weight
    scores = W.abs().sort(dim=1).values[:, 22]
    extra_rows = ((~keep).sum(1) == 23).nonzero().flatten()
    assert len(extra_rows) == int(W.numel() * 0.7) - 16 * 22
    assert set(extra_rows.tolist()) == set(scores.argsort()[: len(extra_rows)].tolist())


def test_wanda_with_uniform_norm_is_per_row_magnitude():
    W = _weight(seed=3)
    expected = _per_row_magnitude_reference(W, 0.5)
    for scale in (1.0, 3.7):
        _, keep = wanda_prune(W, torch.full((32,), scale), 0.5)
        assert torch.equal(keep, expected)


def test_wanda_uses_input_norm():
    W = torch.ones(4, 8)
    W[:, 0] = 0.01  # tiny weights on a high-norm input: Wanda keeps them, magnitude drops them
    norm = torch.ones(8)
    norm[0] = 1000.0
    _, keep_w = wanda_prune(W, norm, 0.5)
    _, keep_m = magnitude_prune(W, 0.5)
    assert keep_w[:, 0].all() and not keep_m[:, 0].any()


@pytest.mark.parametrize("n, m", [(2, 4), (4, 8)])
def test_n_m_validity(n, m):
    W = _weight(seed=4)
    norm = torch.rand(32, generator=torch.Generator().manual_seed(5)) + 0.1
    for new, keep in (magnitude_prune(W, n=n, m=m), wanda_prune(W, norm, n=n, m=m)):
        assert ((new == 0).reshape(16, 32 // m, m).sum(-1) >= n).all()
        assert ((~keep).reshape(16, 32 // m, m).sum(-1) == n).all()
    # magnitude N:M drops the n smallest |w| of each group
    _, keep = magnitude_prune(W, n=n, m=m)
    groups, kept = W.abs().reshape(16, -1, m), keep.reshape(16, -1, m)
    kept_min = torch.where(kept, groups, torch.inf).amin(-1)
    dropped_max = torch.where(~kept, groups, -torch.inf).amax(-1)
    assert (kept_min >= dropped_max).all()


def test_dtype_preserved_and_input_untouched():
    W = _weight(seed=6, dtype=torch.bfloat16)
    W_copy = W.clone()
    new, keep = magnitude_prune(W, n=2, m=4)
    new2, _ = wanda_prune(W, torch.ones(32), 0.5)
    assert new.dtype == new2.dtype == torch.bfloat16
    assert torch.equal(W, W_copy)


def test_validation_is_shared_with_obs():
    W = _weight(d=6)
    with pytest.raises(ValueError, match="in_features=6.*2:4"):
        magnitude_prune(W, n=2, m=4)
    with pytest.raises(ValueError, match="sparsity"):
        wanda_prune(W, torch.ones(6), 1.5)
    with pytest.raises(ValueError, match="input_norm"):
        wanda_prune(W, torch.ones(5), 0.5)
    for bad in (float("nan"), -1.0, float("inf")):  # NaN scores would sort into an arbitrary mask
        with pytest.raises(ValueError, match="finite norms >= 0"):
            wanda_prune(W, torch.tensor([1.0, 1.0, bad, 1.0, 1.0, 1.0]), 0.5)
    ones = torch.ones(6)
    broken = W.clone()
    broken[0, 0] = float("nan")
    pruners = (lambda w: magnitude_prune(w), lambda w: wanda_prune(w, ones), lambda w: dsnot_prune(w, ones, ones, ones))
    for prune_weight in pruners:
        with pytest.raises(ValueError, match="NaN/inf before pruning"):  # a NaN score sorts anywhere: arbitrary mask
            prune_weight(broken)
        with pytest.raises(ValueError, match="floating point"):
            prune_weight((W * 10).long())
    with pytest.raises(ValueError, match="input_var finite and >= 0"):
        dsnot_prune(W, ones, -ones, ones, 0.5)
    with pytest.raises(ValueError, match="input_mean must be finite"):
        dsnot_prune(W, ones * float("nan"), ones, ones, 0.5)



def _dsnot_problem(out=24, d=32, seed=3):
    """Weights and inputs with non-zero, differently signed means (DSnoT's expected error is then not zero)."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out, d, generator=g)
    x = torch.randn(500, d, generator=g) * torch.exp(torch.randn(d, generator=g)) + 2 * torch.randn(d, generator=g)
    mean, var, norm = x.mean(0), x.var(0, unbiased=False), x.pow(2).mean(0).sqrt()
    return W, x, mean, var, norm


def _expected_error(W, keep, mean):
    """Per row: sum over pruned j of w_j E[x_j], the output change DSnoT drives to zero."""
    return ((W * ~keep) * mean).sum(1)


@pytest.mark.parametrize("pattern", [dict(sparsity=0.5), dict(sparsity=0.7), dict(n=2, m=4), dict(n=4, m=8)])
def test_dsnot_shrinks_every_rows_expected_error_and_keeps_the_budget(pattern):
    W, x, mean, var, norm = _dsnot_problem()
    _, wanda_keep = wanda_prune(W, norm, **pattern)
    new, keep = dsnot_prune(W, mean, var, norm, threshold=0.0, **pattern)
    assert torch.equal(new, W * keep)
    assert torch.equal(keep.sum(1), wanda_keep.sum(1))  # the same number of weights per row
    if "m" in pattern:
        pruned = (~keep).reshape(W.shape[0], -1, pattern["m"]).sum(-1)
        assert bool((pruned == pattern["n"]).all())  # swaps stay inside their group
    before, after = _expected_error(W, wanda_keep, mean).abs(), _expected_error(W, keep, mean).abs()
    assert bool((after <= before + 1e-5).all())
    assert float(after.sum()) < 0.5 * float(before.sum())
    assert not torch.equal(keep, wanda_keep)


def test_dsnot_without_cycles_or_signal_is_wanda():
    W, x, mean, var, norm = _dsnot_problem()
    _, wanda_keep = wanda_prune(W, norm, 0.5)
    assert torch.equal(dsnot_prune(W, mean, var, norm, 0.5, max_cycles=0)[1], wanda_keep)
    assert torch.equal(dsnot_prune(W, torch.zeros_like(mean), var, norm, 0.5)[1], wanda_keep)  # zero-mean inputs
    big = float(_expected_error(W, wanda_keep, mean).abs().max()) + 1
    assert torch.equal(dsnot_prune(W, mean, var, norm, 0.5, threshold=big)[1], wanda_keep)  # already small enough
    with pytest.raises(ValueError, match="input_mean"):
        dsnot_prune(W, mean[:-1], var, norm, 0.5)
    with pytest.raises(ValueError, match="max_cycles"):
        dsnot_prune(W, mean, var, norm, 0.5, max_cycles=-1)

from __future__ import annotations

import pytest
import torch

from obsdiff_lite.hessian import HessianAccumulator, input_variance, wanda_input_norm

D = 6


def _batches(seed: int = 0):
    """A few batches of different shapes/dtypes with their timestep weights."""
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(2, 5, D, generator=g), 1.2),
        (torch.randn(3, D, generator=g, dtype=torch.float64), 0.8),
        (torch.randn(4, 2, 3, D, generator=g).to(torch.bfloat16), 1.0),
        (3.0 * torch.randn(7, D, generator=g), 0.5),
    ]


def _closed_form(batches):
    """H = 2 sum_t a_t X_t^T X_t / sum_t a_t rows_t and the weighted mean of x^2, in float64."""
    num = torch.zeros(D, D, dtype=torch.float64)
    sq = torch.zeros(D, dtype=torch.float64)
    den = 0.0
    for x, a in batches:
        x = x.reshape(-1, D).double()
        num += 2 * a * x.T @ x
        sq += a * (x * x).sum(0)
        den += a * x.shape[0]
    return num / den, sq / den, den


def _accumulate(batches, dtype=torch.float32, track_mean=False):
    acc = HessianAccumulator(D, dtype=dtype, track_mean=track_mean)
    for x, a in batches:
        acc.add_batch(x, a)
    return acc


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_accumulation_matches_closed_form(dtype, tol):
    batches = _batches()
    acc = _accumulate(batches, dtype)
    H, mean_sq, den = _closed_form(batches)
    assert acc.hessian.dtype == dtype and acc.hessian.shape == (D, D)
    torch.testing.assert_close(acc.hessian.double(), H, rtol=tol, atol=tol)
    assert acc.weight_sum == pytest.approx(den)
    assert acc.num_rows == 10 + 3 + 24 + 7
    torch.testing.assert_close(acc.act_sq_sum.double() / acc.weight_sum, mean_sq, rtol=tol, atol=tol)


def test_weights_matter():
    batches = _batches()
    equal = _accumulate([(x, 1.0) for x, _ in batches])
    weighted = _accumulate(batches)
    assert not torch.allclose(equal.hessian, weighted.hessian, rtol=1e-3)


def test_scaling_all_weights_changes_nothing():
    batches = _batches()
    a = _accumulate(batches)
    b = _accumulate([(x, 10.0 * w) for x, w in batches])
    torch.testing.assert_close(a.hessian, b.hessian, rtol=1e-5, atol=1e-6)


def test_batch_splitting_invariance():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(30, D, generator=g)
    whole = HessianAccumulator(D)
    whole.add_batch(x, 0.7)
    split = HessianAccumulator(D)
    for chunk in (x[:4], x[4:5], x[5:19], x[19:]):
        split.add_batch(chunk, 0.7)
    torch.testing.assert_close(split.hessian, whole.hessian, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(split.act_sq_sum, whole.act_sq_sum, rtol=1e-5, atol=1e-6)
    assert split.weight_sum == pytest.approx(whole.weight_sum)


def test_merge_equals_single_accumulator():
    batches = _batches()
    left = _accumulate(batches[:1], torch.float64)
    right = _accumulate(batches[1:], torch.float64)
    merged = left.merge(right)
    assert merged is left
    full = _accumulate(batches, torch.float64)
    torch.testing.assert_close(merged.hessian, full.hessian, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(merged.act_sq_sum, full.act_sq_sum, rtol=1e-12, atol=1e-12)
    assert merged.weight_sum == pytest.approx(full.weight_sum)
    assert merged.num_rows == full.num_rows


def test_merge_with_empty_and_across_dtypes():
    batches = _batches()
    full = _accumulate(batches)
    empty = HessianAccumulator(D, dtype=torch.float64)
    empty.merge(full)
    torch.testing.assert_close(empty.hessian, full.hessian.double())
    before = full.hessian.clone()
    full.merge(HessianAccumulator(D))
    assert torch.equal(full.hessian, before)
    with pytest.raises(ValueError, match="width"):
        full.merge(HessianAccumulator(D + 1))


def test_state_dict_round_trip():
    acc = _accumulate(_batches())
    clone = HessianAccumulator.from_state(acc.state_dict())
    assert torch.equal(clone.hessian, acc.hessian) and torch.equal(clone.act_sq_sum, acc.act_sq_sum)
    assert (clone.weight_sum, clone.num_rows) == (acc.weight_sum, acc.num_rows)
    clone.add_batch(torch.ones(2, D))
    assert not torch.equal(clone.hessian, acc.hessian)  # independent storage


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_activations_raise_with_layer_name(bad):
    acc = HessianAccumulator(D, name="blocks.3.attn.to_q")
    x = torch.randn(4, D)
    x[2, 1] = bad
    with pytest.raises(ValueError, match=r"blocks\.3\.attn\.to_q.*NaN/inf"):
        acc.add_batch(x)
    assert acc.weight_sum == 0.0 and torch.count_nonzero(acc.hessian) == 0  # untouched


def test_float32_overflow_is_detected_and_name_override():
    acc = HessianAccumulator(D)
    with pytest.raises(ValueError, match="'mlp.fc1'.*NaN/inf"):
        acc.add_batch(torch.full((2, D), 1e300, dtype=torch.float64), name="mlp.fc1")


def test_bad_arguments():
    acc = HessianAccumulator(D)
    with pytest.raises(ValueError, match="expected in_features=6"):
        acc.add_batch(torch.randn(3, D + 1))
    with pytest.raises(ValueError, match="timestep_weight"):
        acc.add_batch(torch.randn(3, D), -1.0)
    with pytest.raises(ValueError, match="dtype"):
        HessianAccumulator(D, dtype=torch.float16)


def test_zero_weight_and_empty_batches_are_no_ops():
    acc = HessianAccumulator(D)
    acc.add_batch(torch.randn(5, D), 0.0)
    acc.add_batch(torch.randn(0, D), 1.0)
    assert acc.weight_sum == 0.0 and acc.num_rows == 0
    with pytest.raises(ValueError, match="no calibration"):
        wanda_input_norm(acc)


def test_input_mean_and_variance_closed_form():
    """DSnoT's statistics: the timestep-weighted mean of x and E[x^2] - E[x]^2, through batches, merge and state."""
    shift = torch.linspace(-2.0, 3.0, D)  # non-zero means, one per feature
    batches = [(x + shift.to(x.dtype), a) for x, a in _batches(5)]
    _, mean_sq, den = _closed_form(batches)
    mean = sum(a * x.reshape(-1, D).double().sum(0) for x, a in batches) / den
    acc = _accumulate(batches, torch.float64, track_mean=True)
    torch.testing.assert_close(acc.input_mean, mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(input_variance(acc), mean_sq - mean**2, rtol=1e-10, atol=1e-10)
    merged = _accumulate(batches[:2], torch.float64, True).merge(_accumulate(batches[2:], torch.float64, True))
    torch.testing.assert_close(merged.input_mean, mean, rtol=1e-12, atol=1e-12)
    assert torch.equal(HessianAccumulator.from_state(acc.state_dict()).input_mean, acc.input_mean)
    with pytest.raises(ValueError, match="no calibration activations"):
        input_variance(HessianAccumulator(D, track_mean=True))
    # Without track_mean (the default: OBS calibration) there is no mean to read, save or merge in.
    plain = _accumulate(batches, torch.float64)
    assert "input_mean" not in plain.state_dict()
    with pytest.raises(ValueError, match="track_mean"):
        plain.input_mean
    with pytest.raises(ValueError, match="without input mean"):
        acc.merge(plain)
    torch.testing.assert_close(plain.hessian, acc.hessian, rtol=0, atol=0)  # the Hessian does not depend on it


def test_wanda_norm_closed_form():
    batches = _batches(3)
    acc = _accumulate(batches, torch.float64)
    H, mean_sq, _ = _closed_form(batches)
    norm = wanda_input_norm(acc)
    torch.testing.assert_close(norm, mean_sq.sqrt(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(norm, (torch.diagonal(H) / 2).sqrt(), rtol=1e-12, atol=1e-12)


def test_accumulator_keeps_its_device_and_dtype():
    acc = HessianAccumulator(D, device="cpu", dtype=torch.float32)
    acc.add_batch(torch.randn(3, D, dtype=torch.float64), 1.0)
    assert acc.hessian.device.type == "cpu" and acc.hessian.dtype == torch.float32
    assert torch.allclose(acc.hessian, acc.hessian.T)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_activations_are_exact_in_tf32(dtype):
    """The premise of TF32 Hessians: fp16/bf16 values cast to float32 have zeros in the 13 low mantissa bits
    that TF32 drops, so the products are exact; float32 activations are not, and keep IEEE matmuls."""
    from obsdiff_lite.hessian import tf32_is_exact_for

    info = torch.finfo(dtype)
    values = torch.cat([torch.randn(100_000) * s for s in (1e-3, 1.0, 1e3)])
    values = torch.cat([values, torch.tensor([info.max, info.tiny, info.smallest_normal / 7, -info.max])])
    bits = values.to(dtype).float().view(torch.int32)
    assert int((bits & 0x1FFF).count_nonzero()) == 0
    assert tf32_is_exact_for(dtype) and not tf32_is_exact_for(torch.float32)
    assert int((torch.randn(1000).view(torch.int32) & 0x1FFF).count_nonzero()) > 900  # float32 would be rounded


@pytest.mark.parametrize("width", [127, 128, 130, 256, 333])
def test_block_upper_gram_with_reads_between_batches_matches_closed_form(width):
    """Wide inputs are accumulated on the block upper triangle and mirrored when read; reading between batches
    (which mirrors) and merging must not change the result."""
    from obsdiff_lite.hessian import gram_block_size

    g = torch.Generator().manual_seed(width)
    batches = [(torch.randn(rows, width, generator=g, dtype=torch.float64), a) for rows, a in ((9, 1.2), (40, 0.8), (3, 1.0))]
    expected = sum(2 * a * x.T @ x for x, a in batches) / sum(a * x.shape[0] for x, a in batches)
    acc = HessianAccumulator(width, dtype=torch.float64)
    for x, a in batches:
        acc.add_batch(x, a)
        torch.testing.assert_close(acc.hessian, acc.hessian.T, rtol=1e-12, atol=1e-12)  # read (mirror) every batch
    torch.testing.assert_close(acc.hessian, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(acc.act_sq_sum / acc.weight_sum, torch.diagonal(expected) / 2, rtol=1e-12, atol=1e-12)
    unread = HessianAccumulator(width, dtype=torch.float64)
    for x, a in batches:
        unread.add_batch(x, a)
    torch.testing.assert_close(unread.hessian, expected, rtol=1e-12, atol=1e-12)
    left, right = HessianAccumulator(width, dtype=torch.float64), HessianAccumulator(width, dtype=torch.float64)
    left.add_batch(*batches[0])
    for x, a in batches[1:]:
        right.add_batch(x, a)
    torch.testing.assert_close(left.merge(right).hessian, expected, rtol=1e-12, atol=1e-12)
    assert gram_block_size(width) == (width if width < 128 else -(-width // 4))


def test_unchecked_batches_are_caught_by_is_finite_and_all_finite():
    from obsdiff_lite.hessian import all_finite

    good, bad = HessianAccumulator(D, name="ok"), HessianAccumulator(D, name="blocks.1.ff.net.2")
    good.add_batch(torch.randn(4, D), check_finite=False)
    x = torch.randn(4, D)
    x[1, 3] = float("nan")
    bad.add_batch(x, check_finite=False)
    assert bool(good.is_finite()) and not bool(bad.is_finite())
    assert all_finite([good]) and not all_finite([good, bad])
    good.raise_if_not_finite()
    with pytest.raises(ValueError, match=r"blocks\.1\.ff\.net\.2.*NaN/inf"):
        bad.raise_if_not_finite()


def test_float32_square_overflow_is_refused_before_the_state_changes():
    acc = HessianAccumulator(D, name="ff.net.2")
    acc.add_batch(torch.randn(3, D))
    before = acc.hessian.clone()
    x = torch.randn(3, D)
    x[0, 0] = 1e20  # finite in float32, but x^2 is not
    with pytest.raises(ValueError, match="'ff.net.2'.*overflow"):
        acc.add_batch(x)
    assert torch.equal(acc.hessian, before) and acc.num_rows == 3


@pytest.mark.parametrize("width", [64, 130, 256, 333])
def test_gram_upper_products_counts_what_add_gram_upper_computes(width):
    from obsdiff_lite.hessian import add_gram_upper_, gram_block_size, gram_upper_products

    target = torch.full((width, width), float("nan"))
    add_gram_upper_(target, torch.ones(1, width), beta=0.0, alpha=1.0, block=gram_block_size(width))
    assert gram_upper_products(width) == int(torch.isfinite(target).sum())


def test_drift_accumulation_matches_closed_form():
    """drift = 2 sum_t a_t (X_dense - X)^T X / sum_t a_t rows_t over batches of different step weights."""
    from obsdiff_lite.hessian import DriftAccumulator

    g = torch.Generator().manual_seed(3)
    batches = [(torch.randn(5, 7, 6, generator=g, dtype=torch.float64), a) for a in (1.2, 0.9, 0.8)]
    dense = [(x + 0.3 * torch.randn(x.shape, generator=g, dtype=torch.float64), a) for x, a in batches]
    acc = DriftAccumulator(6, dtype=torch.float64)
    for (x, a), (xd, _) in zip(batches, dense):
        acc.add_batch(xd, x, a)
    num = sum(a * 2 * (xd - x).reshape(-1, 6).T @ x.reshape(-1, 6) for (x, a), (xd, _) in zip(batches, dense))
    den = sum(a * 35 for _, a in batches)
    assert torch.allclose(acc.drift, num / den, rtol=1e-12, atol=1e-12)
    assert acc.num_rows == 105 and acc.weight_sum == pytest.approx(den)
    # The same inputs on both sides: no drift at all, exactly.
    same = DriftAccumulator(6, dtype=torch.float64)
    same.add_batch(batches[0][0], batches[0][0], 1.0)
    assert not same.drift.any()


def test_drift_refuses_mismatched_rows_and_bad_weights():
    from obsdiff_lite.hessian import DriftAccumulator

    acc = DriftAccumulator(4, name="blocks.0.ff")
    with pytest.raises(ValueError, match="same shape.*blocks.0.ff|blocks.0.ff.*same shape"):
        acc.add_batch(torch.zeros(3, 4), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="timestep_weight"):
        acc.add_batch(torch.zeros(3, 4), torch.zeros(3, 4), float("nan"))

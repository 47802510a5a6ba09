from __future__ import annotations

import math

import pytest
import torch

from obsdiff_lite.schedules import WEIGHTINGS, plot_timestep_weights, timestep_weights

# OBS-Diff paper, log-decrease weights for T = 25, alpha in [0.8, 1.2] (Eq. 4).
PAPER_LOG_DECREASE_T25 = [
    1.2000, 1.1949, 1.1896, 1.1841, 1.1783, 1.1723, 1.1659, 1.1592, 1.1521, 1.1445,
    1.1365, 1.1279, 1.1187, 1.1088, 1.0980, 1.0861, 1.0730, 1.0584, 1.0418, 1.0227,
    1.0000, 0.9723, 0.9365, 0.8861, 0.8000,
]
DECREASING = ("linear-decrease", "log-decrease", "cosine", "exponential")
INCREASING = ("linear-increase", "log-increase")


def test_log_decrease_matches_paper_values():
    w = timestep_weights("log-decrease", 25)
    assert w.shape == (25,)
    torch.testing.assert_close(w, torch.tensor(PAPER_LOG_DECREASE_T25, dtype=w.dtype), atol=1e-4, rtol=0)


def test_log_decrease_is_eq4_formula():
    T, lo, hi = 13, 0.5, 2.0
    expected = [lo + (hi - lo) / math.log(T) * math.log(T - t + 1) for t in range(1, T + 1)]
    torch.testing.assert_close(timestep_weights("log-decrease", T, lo, hi), torch.tensor(expected, dtype=torch.float64))


def test_log_increase_is_reverse_of_log_decrease():
    torch.testing.assert_close(timestep_weights("log-increase", 25), timestep_weights("log-decrease", 25).flip(0))


def test_weightings_constant_lists_every_strategy():
    assert set(WEIGHTINGS) == {"uniform", *DECREASING, *INCREASING}
    for name in WEIGHTINGS:
        w = timestep_weights(name, 10)
        assert w.dtype == torch.float64 and w.shape == (10,) and torch.isfinite(w).all()


def test_uniform_is_all_ones():
    assert torch.equal(timestep_weights("uniform", 7), torch.ones(7, dtype=torch.float64))


@pytest.mark.parametrize("name", DECREASING)
def test_decreasing_strategies_are_strictly_monotone_with_endpoints(name):
    w = timestep_weights(name, 25, 0.8, 1.2)
    assert (w[1:] - w[:-1] < 0).all(), w
    assert w[0].item() == pytest.approx(1.2, abs=1e-12)
    assert w[-1].item() == pytest.approx(0.8, abs=1e-12)


@pytest.mark.parametrize("name", INCREASING)
def test_increasing_strategies_are_strictly_monotone_with_endpoints(name):
    w = timestep_weights(name, 25, 0.8, 1.2)
    assert (w[1:] - w[:-1] > 0).all(), w
    assert w[0].item() == pytest.approx(0.8, abs=1e-12)
    assert w[-1].item() == pytest.approx(1.2, abs=1e-12)


def test_linear_is_evenly_spaced():
    w = timestep_weights("linear-decrease", 5, 1.0, 2.0)
    torch.testing.assert_close(w, torch.tensor([2.0, 1.75, 1.5, 1.25, 1.0], dtype=torch.float64))


def test_equal_alphas_give_constant_weights():
    for name in WEIGHTINGS[1:]:
        torch.testing.assert_close(timestep_weights(name, 6, 0.9, 0.9), torch.full((6,), 0.9, dtype=torch.float64))


def test_single_step_has_no_division_by_zero():
    for name in DECREASING:
        assert timestep_weights(name, 1).tolist() == [1.2]
    for name in INCREASING:
        assert timestep_weights(name, 1).tolist() == [0.8]
    assert timestep_weights("uniform", 1).tolist() == [1.0]


def test_bad_strategy_lists_valid_choices():
    with pytest.raises(ValueError, match="log-decrease") as exc:
        timestep_weights("log-decreasing", 25)
    assert "uniform" in str(exc.value) and "cosine" in str(exc.value)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_steps=0), "num_steps"),
        (dict(num_steps=-3), "num_steps"),
        (dict(alpha_min=1.5, alpha_max=1.2), "alpha_min"),
        (dict(alpha_min=-0.1), "non-negative"),
        (dict(alpha_min=float("nan")), "finite"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    args = dict(strategy="log-decrease", num_steps=25) | kwargs
    with pytest.raises(ValueError, match=match):
        timestep_weights(**args)


def test_exponential_needs_positive_alpha_min():
    with pytest.raises(ValueError, match="alpha_min > 0"):
        timestep_weights("exponential", 5, 0.0, 1.0)
    assert timestep_weights("linear-decrease", 3, 0.0, 1.0)[-1].item() == 0.0


def test_plot_returns_axes_with_one_line_per_strategy():
    import matplotlib  # a declared dependency: a missing one must fail, not skip

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ax = plot_timestep_weights(num_steps=10)
    try:
        assert len(ax.get_lines()) == len(WEIGHTINGS)
        ax2 = plot_timestep_weights(["uniform", "log-decrease"], ax=None)
        assert len(ax2.get_lines()) == 2
    finally:
        plt.close("all")

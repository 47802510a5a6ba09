"""Timestep weights alpha_t for the timestep-aware Hessian (OBS-Diff, Sec. 3.2, Eq. 4).

Index 0 of every returned tensor is the FIRST (noisiest) denoising step.  The
weights only matter relative to each other: the Hessian is a weighted *mean*,
so multiplying all weights by a constant changes nothing.

Paper strategies: ``uniform``, ``linear-increase``, ``linear-decrease``,
``log-increase``, ``log-decrease`` (the paper's default, Eq. 4).
Additions not in the paper: ``cosine`` and ``exponential`` (both decay from
``alpha_max`` at the first step to ``alpha_min`` at the last step).
"""
from __future__ import annotations

import math

import torch

WEIGHTINGS: tuple[str, ...] = (
    "uniform",
    "linear-increase",
    "linear-decrease",
    "log-increase",
    "log-decrease",
    "cosine",
    "exponential",
)


def _check_args(strategy: str, num_steps: int, alpha_min: float, alpha_max: float) -> None:
    """Raise ValueError for an unknown strategy or an invalid step count / alpha range."""
    if strategy not in WEIGHTINGS:
        raise ValueError(
            f"unknown timestep weighting {strategy!r}; valid choices are: {', '.join(WEIGHTINGS)}"
        )
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be an integer >= 1, got {num_steps!r}")
    if not (math.isfinite(alpha_min) and math.isfinite(alpha_max)):
        raise ValueError(f"alpha_min/alpha_max must be finite, got {alpha_min}, {alpha_max}")
    if alpha_min < 0 or alpha_max < 0:
        raise ValueError(
            f"timestep weights must be non-negative, got alpha_min={alpha_min}, alpha_max={alpha_max}"
        )
    if alpha_min > alpha_max:
        raise ValueError(
            f"alpha_min ({alpha_min}) must be <= alpha_max ({alpha_max}); "
            "use an '-increase' or '-decrease' strategy to choose the direction"
        )
    if strategy == "exponential" and alpha_min == 0 and alpha_max > 0:
        raise ValueError(
            "the 'exponential' weighting decays geometrically and needs alpha_min > 0; "
            f"valid choices for alpha_min = 0 are: {', '.join(w for w in WEIGHTINGS if w != 'exponential')}"
        )


def _log_decrease(num_steps: int, alpha_min: float, alpha_max: float) -> torch.Tensor:
    """Paper Eq. 4: alpha_t = a_min + (a_max - a_min) / ln T * ln(T - t + 1), t = 1..T."""
    t = torch.arange(1, num_steps + 1, dtype=torch.float64)
    return alpha_min + (alpha_max - alpha_min) / math.log(num_steps) * torch.log(num_steps - t + 1)


def timestep_weights(
    strategy: str,
    num_steps: int,
    alpha_min: float = 0.8,
    alpha_max: float = 1.2,
) -> torch.Tensor:
    """Return float64 weights [num_steps] (index 0 = first/noisiest step); T=1 gives the strategy's first-step value."""
    # T = 1 convention: Eq. 4 is 0/0 there, so every strategy returns the value it
    # would take at its first step (a_max for decreasing ones, a_min for increasing
    # ones, 1.0 for uniform).  A single weight has no effect on a weighted mean.
    _check_args(strategy, num_steps, alpha_min, alpha_max)
    if strategy == "uniform":
        return torch.ones(num_steps, dtype=torch.float64)
    decreasing = not strategy.endswith("-increase")
    if num_steps == 1:
        return torch.tensor([alpha_max if decreasing else alpha_min], dtype=torch.float64)

    # s runs 0 -> 1 from the first to the last denoising step.
    s = torch.linspace(0.0, 1.0, num_steps, dtype=torch.float64)
    span = alpha_max - alpha_min
    if strategy in ("linear-increase", "linear-decrease"):
        w = alpha_max - span * s
    elif strategy in ("log-increase", "log-decrease"):
        w = _log_decrease(num_steps, alpha_min, alpha_max)
    elif strategy == "cosine":
        w = alpha_min + span * 0.5 * (1.0 + torch.cos(math.pi * s))
    else:  # exponential: geometric interpolation a_max * (a_min / a_max) ** s
        w = alpha_max * (alpha_min / alpha_max) ** s if alpha_max > 0 else torch.zeros_like(s)
    return w if decreasing else w.flip(0)


def plot_timestep_weights(
    strategies: list[str] | tuple[str, ...] | None = None,
    num_steps: int = 25,
    alpha_min: float = 0.8,
    alpha_max: float = 1.2,
    ax=None,
):
    """Plot weight vs. denoising step for the given strategies (default: all) and return the Axes."""
    import matplotlib.pyplot as plt  # lazy: plotting is optional

    if ax is None:
        _, ax = plt.subplots(figsize=(6, 3.5))
    steps = list(range(1, num_steps + 1))
    for name in strategies if strategies is not None else WEIGHTINGS:
        ax.plot(steps, timestep_weights(name, num_steps, alpha_min, alpha_max).tolist(), marker=".", label=name)
    ax.set_xlabel("denoising step (1 = noisiest)")
    ax.set_ylabel(r"timestep weight $\alpha_t$")
    ax.set_title(f"Timestep weightings (T={num_steps})")
    ax.legend(fontsize="small")
    return ax

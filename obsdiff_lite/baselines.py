"""Pruning baselines without weight updates: magnitude, Wanda and DSnoT.

The fourth baseline, SparseGPT, is `obs.sparsify_weight(s)` with a Hessian
accumulated under *uniform* timestep weights (the caller chooses the weights);
it needs no code of its own.

Every function returns (new_weight, keep_mask): pruned entries are exactly 0.0
and keep_mask is a bool tensor of the same shape.  N:M means n of every m
consecutive inputs of each row are pruned.
"""
from __future__ import annotations

import torch
from torch import Tensor

from obsdiff_lite.obs import check_sparsity_args, check_weight


def _lowest_k_mask(scores: Tensor, k: int) -> Tensor:
    """Bool mask marking the k lowest entries along the last dim (stable, so ties pick lower indices)."""
    pruned = torch.zeros_like(scores, dtype=torch.bool)
    if k > 0:
        idx = torch.sort(scores, dim=-1, stable=True).indices[..., :k]
        pruned.scatter_(-1, idx, True)
    return pruned


def _nm_prune_mask(scores: Tensor, n: int, m: int) -> Tensor:
    """Bool mask [out, in] marking the n lowest scores in every group of m consecutive inputs."""
    rows, cols = scores.shape
    groups = scores.reshape(rows, cols // m, m)
    return _lowest_k_mask(groups, n).reshape(rows, cols)


def _apply(weight: Tensor, pruned: Tensor) -> tuple[Tensor, Tensor]:
    """Zero the pruned entries and return (weight in its own dtype, keep mask)."""
    keep = ~pruned
    return weight.detach().masked_fill(pruned, 0.0), keep


def magnitude_prune(weight: Tensor, sparsity: float = 0.5, n: int = 0, m: int = 0) -> tuple[Tensor, Tensor]:
    """Prune the smallest |w| over the whole matrix (unstructured) or per m-group per row (N:M)."""
    check_weight(weight)
    check_sparsity_args(weight.shape[1], sparsity, n, m)
    scores = weight.detach().abs().float()
    if m > 0:
        return _apply(weight, _nm_prune_mask(scores, n, m))
    k = int(scores.numel() * sparsity)
    return _apply(weight, _lowest_k_mask(scores.flatten(), k).reshape(weight.shape))


def wanda_prune(
    weight: Tensor, input_norm: Tensor, sparsity: float = 0.5, n: int = 0, m: int = 0
) -> tuple[Tensor, Tensor]:
    """Wanda: prune lowest |W_ij| * ||X_j|| per output row (unstructured) or per m-group per row (N:M)."""
    check_weight(weight)
    if tuple(input_norm.shape) != (weight.shape[1],):
        raise ValueError(
            f"input_norm has shape {tuple(input_norm.shape)}, expected ({weight.shape[1]},) = in_features"
        )
    if not (bool(torch.isfinite(input_norm).all()) and bool((input_norm >= 0).all())):  # NaN scores sort arbitrarily
        raise ValueError("input_norm must hold finite norms >= 0 (e.g. hessian.wanda_input_norm)")
    check_sparsity_args(weight.shape[1], sparsity, n, m)
    scores = weight.detach().abs().float() * input_norm.detach().to(weight.device, torch.float32).unsqueeze(0)
    if m > 0:
        return _apply(weight, _nm_prune_mask(scores, n, m))
    # Every row loses floor(cols * s) weights; the remainder up to int(numel * s) goes, one weight each,
    # to the rows whose next-lowest score is smallest, so the layer hits the requested sparsity exactly
    # even when cols * s is fractional (narrow layers).
    rows, cols = scores.shape
    k = int(cols * sparsity)
    pruned = _lowest_k_mask(scores, k)
    extra = int(rows * cols * sparsity) - rows * k
    if extra > 0 and k < cols:
        next_score = torch.sort(scores, dim=-1, stable=True).values[:, k]
        for row in torch.sort(next_score, stable=True).indices[:extra].tolist():
            pruned[row] = _lowest_k_mask(scores[row], k + 1)
    return _apply(weight, pruned)


DSNOT_CYCLES = 50  # DSnoT's default number of prune-and-grow cycles
DSNOT_THRESHOLD = 0.1  # DSnoT's default: rows whose expected output error is this small stop


def dsnot_prune(
    weight: Tensor, input_mean: Tensor, input_var: Tensor, input_norm: Tensor, sparsity: float = 0.5, n: int = 0,
    m: int = 0, max_cycles: int = DSNOT_CYCLES, threshold: float = DSNOT_THRESHOLD,
) -> tuple[Tensor, Tensor]:
    """DSnoT (Zhang et al., ICLR 2024): Wanda's mask, then per row one pruned weight grown and one kept weight pruned
    per cycle, so that the row's expected output error sum_{j pruned} w_j E[x_j] shrinks; weights are not updated.

    Grown: the pruned weight whose revival cuts the error most per unit of input variance (w_j E[x_j] / Var[x_j]).
    Pruned: the least important kept weight by Wanda's |w_j| ||x_j|| among those whose removal also pushes the
    error towards zero (for N:M: any kept weight of the grown weight's group, which keeps the pattern). A swap is
    made only when it shrinks |error|; a row stops after its first refused swap, once its |error| is at most
    ``threshold``, or after ``max_cycles``. Each weight moves at most once. Sparsity per row is unchanged.
    """
    _, keep = wanda_prune(weight, input_norm, sparsity, n, m)
    cols = weight.shape[1]
    for label, stat in (("input_mean", input_mean), ("input_var", input_var)):
        if tuple(stat.shape) != (cols,):
            raise ValueError(f"{label} has shape {tuple(stat.shape)}, expected ({cols},) = in_features")
    if not (bool(torch.isfinite(input_mean).all()) and bool(torch.isfinite(input_var).all())
            and bool((input_var >= 0).all())):
        raise ValueError("input_mean must be finite and input_var finite and >= 0 (e.g. hessian.input_variance)")
    if max_cycles < 0 or not threshold >= 0:
        raise ValueError(f"need max_cycles >= 0 and threshold >= 0, got {max_cycles} and {threshold}")
    w = weight.detach().float()
    device = w.device
    contribution = w * input_mean.detach().to(device, torch.float32).unsqueeze(0)  # E[w_j x_j] per weight
    per_variance = contribution / input_var.detach().to(device, torch.float32).clamp_min(1e-12).unsqueeze(0)
    importance = w.abs() * input_norm.detach().to(device, torch.float32).unsqueeze(0)
    pruned = ~keep
    error = (contribution * pruned).sum(1)  # dense minus sparse expected output, per row
    can_grow, can_prune = pruned.clone(), keep.clone()
    group = torch.arange(cols, device=device) // m if m else None
    active = error.abs() > threshold
    rows = torch.arange(w.shape[0], device=device)
    inf = torch.tensor(float("inf"), device=device)
    for _ in range(max_cycles):
        if not bool(active.any()):
            break
        sign = torch.sign(error).unsqueeze(1)
        grow_score = torch.where(can_grow, sign * per_variance, -inf)
        grow = grow_score.argmax(1)
        if group is None:
            prunable = can_prune & (sign * contribution < 0)
        else:
            prunable = can_prune & (group.unsqueeze(0) == group[grow].unsqueeze(1))
        prune_score = torch.where(prunable, importance, inf)
        drop = prune_score.argmin(1)
        new_error = error - contribution[rows, grow] + contribution[rows, drop]
        swap = (active & (grow_score[rows, grow] > 0) & torch.isfinite(prune_score[rows, drop])
                & (new_error.abs() < error.abs()))
        r = rows[swap]
        pruned[r, grow[swap]] = False
        pruned[r, drop[swap]] = True
        can_grow[r, grow[swap]] = False
        can_prune[r, drop[swap]] = False
        error = torch.where(swap, new_error, error)
        active = swap & (error.abs() > threshold)
    return _apply(weight, pruned)

"""Pruning baselines without weight updates: magnitude and Wanda.

The third baseline, SparseGPT, is `obs.sparsify_weight(s)` with a Hessian
accumulated under *uniform* timestep weights (the caller chooses the weights);
it needs no code of its own.

Both functions return (new_weight, keep_mask): pruned entries are exactly 0.0
and keep_mask is a bool tensor of the same shape.  N:M means n of every m
consecutive inputs of each row are pruned.
"""
from __future__ import annotations

import torch
from torch import Tensor

from obsdiff_lite.obs import check_sparsity_args


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
    if weight.ndim != 2:
        raise ValueError(f"weight must be 2-D [out, in], got shape {tuple(weight.shape)}")
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
    if weight.ndim != 2:
        raise ValueError(f"weight must be 2-D [out, in], got shape {tuple(weight.shape)}")
    if tuple(input_norm.shape) != (weight.shape[1],):
        raise ValueError(
            f"input_norm has shape {tuple(input_norm.shape)}, expected ({weight.shape[1]},) = in_features"
        )
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

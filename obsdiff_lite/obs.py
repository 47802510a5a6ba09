"""Optimal Brain Surgeon pruning of one linear layer, SparseGPT scheme (OBS-Diff, Sec. 3.1).

Conventions: weight is [out_features, in_features]; hessian is [in, in] and is
the (timestep-weighted) mean of 2 x x^T from hessian.HessianAccumulator; n:m
means "n of every m consecutive inputs are pruned" (2:4 = 50 %).

The solver follows SparseGPT's `fasterprune`: columns are processed left to
right in blocks; inside a block every pruned weight's error is propagated to
the later columns of the block immediately, and to the columns after the
block in one lazy batched update `W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]`.
Using the upper Cholesky factor of H^-1 makes every step an exact OBS update
restricted to the columns that are not processed yet. Linears that share an
input (and so H) are solved in one call, `sparsify_weights`: their rows are
independent, so they go through one column loop with one Cholesky factor.

That left-to-right pass never revisits a column: once column i is done, the
weights kept in it stay as they were when the later columns were pruned. So for
the mask it chooses, its weights are not the least-squares optimum. `refit_kept_weights`
(beyond the paper; `--refit`) solves that optimum, with the mask fixed, by
conjugate gradients over all rows at once.

The left-to-right pass also chooses each column's mask once, greedily. `admm_sparsify_weights`
(beyond the paper; `--solver admm`) starts from the OBS result and lets the mask and the weights
move together: ADMM on the same layer loss, alternating an exact least-squares step with a
projection onto the sparse pattern under a growing penalty, then the re-fit on the final mask.

The layer loss takes the layer's own inputs as the target's inputs too, so each layer
repairs only its own pruning. `dense_target_weights` (beyond the paper; `--dense-targets`)
moves W to the least-squares fit of the dense model's outputs from the pruned model's
inputs; OBS on the moved weights with the usual H then minimises ||W x_dense - W' x||.
"""
from __future__ import annotations

import itertools
import logging
import math
import re

import torch
from torch import Tensor

from obsdiff_lite.hessian import ieee_fp32_matmul

logger = logging.getLogger(__name__)

_PATTERN_RE = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")
_MIN_RETRY_DAMP = 1e-4
REFIT_ITERS = 100  # conjugate-gradient cap for --refit; tiny-sd3's layers reach the float32 tolerance in 30-120
REFIT_TOL = {torch.float32: 1e-5, torch.float64: 1e-12}  # relative residual per row at which the re-fit stops
# --solver admm: iteration cap, start penalty (relative to the unit diagonal of the normalised Hessian), and its growth
# factor every ADMM_RHO_EVERY iterations; it stops early once no mask entry changed for ADMM_PATIENCE iterations.
# benchmarks/admm_settings.py measures the layer errors of other caps and start penalties on the tiny models.
ADMM_ITERS, ADMM_RHO, ADMM_RHO_GROWTH, ADMM_RHO_EVERY, ADMM_PATIENCE = 100, 0.03, 1.3, 5, 20


def _layer(name: str) -> str:
    """Format an optional layer name for messages."""
    return f" of layer {name!r}" if name else ""


def _row_segments(weights: list[Tensor]) -> list[tuple[int, int]]:
    """The (first, end) rows of each weight in the stacked [sum of out_i, in] matrix of one input group."""
    ends = list(itertools.accumulate(w.shape[0] for w in weights))
    return list(zip([0, *ends[:-1]], ends))


def _half_quadratic(D: Tensor, H: Tensor) -> float:
    """trace(D H D^T) / 2; with D = W - W' and H = mean 2 x x^T, the layer error mean ||D x||^2."""
    return float(((D @ H) * D).sum() / 2)


def check_weight(weight: Tensor, name: str = "") -> None:
    """Refuse a weight that no pruning can treat: not 2-D [out, in], not floating point, or holding NaN/inf."""
    if weight.ndim != 2:
        raise ValueError(f"weight{_layer(name)} must be 2-D [out, in], got shape {tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise ValueError(f"weight{_layer(name)} must be floating point, got {weight.dtype}")
    if not bool(torch.isfinite(weight.detach()).all()):  # NaN scores sort arbitrarily; NaN weights spread in OBS
        raise ValueError(f"weight{_layer(name)} contains NaN/inf before pruning")


def cast_weight(weight: Tensor, dtype: torch.dtype, name: str = "") -> Tensor:
    """``weight`` in the model's ``dtype``; refuses values it cannot hold (an update beyond float16's 65504 is inf)."""
    out = weight.to(dtype)
    if not bool(torch.isfinite(out).all()):
        raise ValueError(f"the updated weights{_layer(name)} do not fit {str(dtype).replace('torch.', '')} (largest "
                         f"|w| = {float(weight.abs().max()):.3g}); prune in float32 or bfloat16 (--dtype) or pass a "
                         "larger --damp")
    return out


def parse_pattern(pattern: str) -> tuple[str, int, int]:
    """Parse "unstructured" -> ("unstructured", 0, 0) and "N:M" -> ("nm", N, M) with 0 < N < M."""
    text = str(pattern).strip().lower()
    if text == "unstructured":
        return ("unstructured", 0, 0)
    match = _PATTERN_RE.match(text)
    if match is None:
        raise ValueError(
            f"cannot parse sparsity pattern {pattern!r}; expected 'unstructured', 'N:M' "
            "(N of every M consecutive weights pruned, e.g. '2:4' or '4:8') or 'structured' (heads and FFN neurons)"
        )
    n, m = int(match.group(1)), int(match.group(2))
    if not 0 < n < m:
        raise ValueError(
            f"invalid N:M pattern {pattern!r}: need 0 < N < M (N pruned out of every M), e.g. '2:4' or '4:8'"
        )
    return ("nm", n, m)


def check_sparsity_args(in_features: int, sparsity: float, n: int = 0, m: int = 0, name: str = "") -> None:
    """Raise ValueError unless sparsity is in [0, 1) or n:m is a valid pattern for this layer width."""
    if n == 0 and m == 0:
        if not (isinstance(sparsity, (int, float)) and 0.0 <= sparsity < 1.0):
            raise ValueError(f"sparsity must be in [0, 1), got {sparsity!r}")
        return
    if not 0 < n < m:
        raise ValueError(f"invalid N:M pattern {n}:{m}: need 0 < N < M (N pruned out of every M), e.g. 2:4")
    if in_features % m != 0:
        raise ValueError(
            f"{f'layer {name!r}' if name else 'this layer'} has in_features={in_features}, which is not "
            f"divisible by M={m}, so the {n}:{m} pattern cannot be applied; exclude this layer "
            "or use unstructured sparsity"
        )


def damped_hessian(hessian: Tensor, damp: float) -> Tensor:
    """H + damp * mean|diag H| * I with dead inputs' zero diagonal set to 1 first: the matrix the OBS solve inverts."""
    H = hessian.clone()
    diag = torch.diagonal(H)
    diag[diag == 0] = 1.0
    diag.add_(damp * diag.abs().mean())
    return H


def prepare_inverse_hessian(
    hessian: Tensor, damp: float = 0.01, max_tries: int = 6, name: str = ""
) -> tuple[Tensor, dict]:
    """Return (upper Cholesky factor of (H + damp*mean|diag H|*I)^-1, info), retrying with 10x damp."""
    if hessian.ndim != 2 or hessian.shape[0] != hessian.shape[1]:
        raise ValueError(f"Hessian{_layer(name)} must be square [d, d], got shape {tuple(hessian.shape)}")
    if not (math.isfinite(damp) and damp >= 0):
        raise ValueError(f"damp must be finite and >= 0, got {damp}")
    if max_tries < 1:
        raise ValueError(f"max_tries must be >= 1, got {max_tries}")
    work = torch.float64 if hessian.dtype == torch.float64 else torch.float32
    H = hessian.detach().to(work)
    if not bool(torch.isfinite(H).all()):
        raise ValueError(f"Hessian{_layer(name)} contains NaN/inf; check the calibration activations")
    # 2 X^T X has a non-negative diagonal and is symmetric; anything else would be damped into a meaningless solve.
    smallest = float(torch.diagonal(H).min())
    if smallest < 0:
        raise ValueError(f"Hessian{_layer(name)} has negative diagonal entries (smallest {smallest:.3g}), so it is not "
                         "2 X^T X of any inputs; pass the Gram matrix of the layer's inputs")
    scale, asymmetry = float(H.abs().max()), float((H - H.T).abs().max())
    if scale == 0:  # every input dead: OBS would zero the whole layer whatever sparsity was asked for
        raise ValueError(f"Hessian{_layer(name)} is all zero: no calibration input reached the layer (or every input "
                         "was exactly 0), so there is nothing to solve on; check the calibration")
    if asymmetry > 1e-4 * scale:
        raise ValueError(f"Hessian{_layer(name)} is not symmetric (largest |H - H^T| is {asymmetry / scale:.2g} of its "
                         "largest entry); pass 2 X^T X, or (H + H^T) / 2")
    dead = torch.diagonal(H) == 0

    tried = []
    d = damp
    for attempt in range(max_tries):
        tried.append(d)
        Hd = damped_hessian(H, d)  # a copy: the caller's Hessian is never changed
        L, err = torch.linalg.cholesky_ex(Hd)
        if int(err) == 0:
            Hinv = torch.cholesky_inverse(L)
            U, err = torch.linalg.cholesky_ex(Hinv, upper=True)
            if int(err) == 0 and bool(torch.isfinite(U).all()):
                if attempt > 0:
                    logger.warning(
                        "Hessian%s is not positive definite with damp=%g; Cholesky succeeded with "
                        "damp=%g after %d retries. Pass --damp %g to skip the retries, or add "
                        "calibration prompts to make the Hessian better conditioned.",
                        _layer(name), damp, d, attempt, d,
                    )
                return U, {"damp_used": d, "retries": attempt, "dead_inputs": int(dead.sum())}
        d = max(10.0 * d, _MIN_RETRY_DAMP)
    raise ValueError(
        f"Cholesky of the Hessian{_layer(name)} failed for every damp in {tried}; the Hessian is "
        "badly conditioned or corrupted. Check the calibration activations, add calibration "
        "prompts, pass a larger --damp, or exclude this layer."
    )


def dense_target_weights(
    weight: Tensor, hessian: Tensor, drift: Tensor, damp: float = 0.01, name: str = ""
) -> tuple[Tensor, dict]:
    """The dense weights moved to absorb upstream drift: W + W drift (H + damp)^-1 (beyond the paper; --dense-targets).

    OBS-Diff's layer loss ||W x - W' x|| takes the layer's own (already drifted) inputs x as the target's inputs too,
    so each layer repairs only its own pruning. Asking instead for the dense model's output, ||W x_dense - W' x||,
    also repairs what earlier pruned layers changed in x. Its unconstrained minimiser solves W' H = W (H + drift)
    with H = mean 2 x x^T and drift = mean 2 (x_dense - x) x^T; call it W~. The cross term vanishes at W~, so
    ||W x_dense - W' x||^2 = ||W~ x - W' x||^2 + const for every W': OBS on W~ with the usual H minimises the
    dense-target loss, with every mask and N:M pattern unchanged. Same damping (and retries) as the OBS solve;
    with no drift W~ is W exactly.
    """
    if tuple(drift.shape) != tuple(hessian.shape) or weight.shape[1] != hessian.shape[0]:
        raise ValueError(f"weight{_layer(name)} {tuple(weight.shape)}, Hessian {tuple(hessian.shape)} and drift "
                         f"{tuple(drift.shape)} do not fit: need [out, d], [d, d], [d, d]")
    work = torch.float64 if hessian.dtype == torch.float64 else torch.float32
    device = weight.device
    D = drift.detach().to(device, work)
    if not bool(torch.isfinite(D).all()):
        raise ValueError(f"input drift{_layer(name)} contains NaN/inf; check the dense copy's activations")
    W = weight.detach().to(work)
    correction = W @ D
    if not bool(correction.any()):
        return weight.clone(), {"dense_target_shift": 0.0}
    U, _ = prepare_inverse_hessian(hessian.detach().to(device, work), damp=damp, name=name)
    with ieee_fp32_matmul(device):
        moved = W + (correction @ U.T) @ U  # (H + damp)^-1 = U^T U, U the upper Cholesky factor of the inverse
    shift = float((moved - W).norm() / W.norm().clamp_min(torch.finfo(work).tiny))
    return moved.to(weight.dtype), {"dense_target_shift": shift}


def refit_kept_weights(
    original: Tensor, weight: Tensor, hessian: Tensor, keep: Tensor, max_iters: int = REFIT_ITERS,
    tol: float | None = None,
) -> tuple[Tensor, dict]:
    """argmin over W with W[~keep] = 0 of trace((W - original) H (W - original)^T), by CG started at ``weight``.

    Each row is an independent least-squares problem on its kept inputs, H_KK w_K = (H original_r)_K; the rows
    run as one batched Jacobi-preconditioned conjugate-gradient loop (one [rows, d] @ [d, d] matmul per step),
    which stops when every row's residual is below ``tol`` (default ``REFIT_TOL`` of the dtype) relative to its
    right-hand side, or after ``max_iters`` steps. ``hessian`` should be positive definite (pass the damped one).
    CG only lowers the objective from its start, so the result is never worse than ``weight`` (in floating point
    this is checked, and ``weight`` kept if it were).
    """
    tol = REFIT_TOL.get(weight.dtype, REFIT_TOL[torch.float32]) if tol is None else tol
    if max_iters < 0 or not tol > 0:
        raise ValueError(f"need max_iters >= 0 and tol > 0, got {max_iters} and {tol}")
    mask = keep.to(weight.dtype)
    W = weight * mask
    B = (original @ hessian) * mask
    R = B - (W @ hessian) * mask
    b_norm = B.norm(dim=1).clamp_min(torch.finfo(W.dtype).tiny)
    del B  # the planner (plan.REFIT_WEIGHT_COPIES) counts the buffers alive in the loop
    inv_diag = 1.0 / torch.diagonal(hessian)
    Z = R * inv_diag
    P = Z.clone()
    rz = (R * Z).sum(1)
    iters, residual = 0, float((R.norm(dim=1) / b_norm).max())
    while iters < max_iters and residual > tol:
        AP = (P @ hessian) * mask
        curvature = (P * AP).sum(1)
        alpha = torch.where(curvature > 0, rz / curvature, torch.zeros_like(rz))
        W.addcmul_(alpha.unsqueeze(1), P)
        R.addcmul_(alpha.unsqueeze(1), AP, value=-1.0)
        Z = R * inv_diag
        rz_next = (R * Z).sum(1)
        beta = torch.where(rz > 0, rz_next / rz, torch.zeros_like(rz))
        P = Z + beta.unsqueeze(1) * P
        rz = rz_next
        iters += 1
        residual = float((R.norm(dim=1) / b_norm).max())

    improved = bool(torch.isfinite(W).all()) and (_half_quadratic(W - original, hessian)
                                                  <= _half_quadratic(weight * mask - original, hessian))
    return (W if improved else weight * mask), {"refit_iters": iters, "refit_residual": residual,
                                                  "refit_kept_start": not improved}


def obs_single_removal(weight_row: Tensor, hinv: Tensor, q: int) -> tuple[Tensor, float]:
    """Textbook OBS: zero w_q, update the row by -w_q/[H^-1]_qq * H^-1[:, q]; return (row, w_q^2/[H^-1]_qq)."""
    # The saliency w_q^2 / [H^-1]_qq (paper's form) equals dw^T H dw of the update;
    # with H = 2 X X^T the squared output error ||dw X||^2 is saliency / 2.
    w_q = weight_row[q]
    d = hinv[q, q]
    new_row = weight_row - (w_q / d) * hinv[:, q]
    new_row[q] = 0.0
    return new_row, float(w_q * w_q / d)


def sparsify_weight(
    weight: Tensor,
    hessian: Tensor,
    sparsity: float = 0.5,
    n: int = 0,
    m: int = 0,
    block_size: int = 128,
    damp: float = 0.01,
    keep_mask: Tensor | None = None,
    name: str = "",
    refit_iters: int = 0,
) -> tuple[Tensor, Tensor, dict]:
    """OBS-prune weight [out, in] given H [in, in]; return (weight in input dtype, bool keep-mask, stats)."""
    return sparsify_weights([weight], hessian, sparsity, n, m, block_size, damp,
                            None if keep_mask is None else [keep_mask], [name], refit_iters)[0]


def sparsify_weights(
    weights: list[Tensor],
    hessian: Tensor,
    sparsity: float = 0.5,
    n: int = 0,
    m: int = 0,
    block_size: int = 128,
    damp: float = 0.01,
    keep_masks: list[Tensor] | None = None,
    names: list[str] | None = None,
    refit_iters: int = 0,
) -> list[tuple[Tensor, Tensor, dict]]:
    """OBS-prune weights [out_i, in] that share one H [in, in] (one input group) in one solve; per weight as above.

    The rows of all weights go through one column loop (on a GPU the loop's kernel launches, not its arithmetic,
    dominate the solve) and H^-1's Cholesky factor is computed once. Masks are chosen per weight and the lazy
    block updates run per weight, so every result is bit-identical to solving that weight alone.
    """
    # Unstructured: per block, prune the int(numel * sparsity) lowest w^2 / diag(U)^2 of each weight
    # (U = upper Cholesky factor of H^-1).  N:M: per group of m columns, prune the n
    # lowest per row (block_size is rounded down to a multiple of m).  keep_masks
    # (bool [out, in] each) override sparsity/n/m and fix the masks.  Dead inputs
    # (zero Hessian diagonal) are zeroed first, so they count towards the budget.
    # With uniform timestep weights in the Hessian this is SparseGPT, except that
    # exactly int(numel * sparsity) weights per block are pruned (SparseGPT's
    # `score <= thresh` prunes one more, plus ties).
    # stats["recon_error"] = trace(dW H dW^T) / 2 with the undamped H, i.e. the mean
    # over calibration rows of ||dW x||^2 when H = mean(2 x x^T).
    # refit_iters > 0 (beyond the paper): afterwards the kept weights are re-fitted by least squares
    # (refit_kept_weights) on the same damped H; the masks stay; stats["recon_error_obs"] is the error before.
    names = list(names) if names is not None else [""] * len(weights)
    if not weights or len(names) != len(weights):
        raise ValueError(f"need one or more weights and one name per weight, got {len(weights)} and {len(names)}")
    name = ", ".join(n_ for n_ in names if n_)
    for weight, layer in zip(weights, names):
        check_weight(weight, layer)
    cols = weights[0].shape[1]
    if any(w.shape[1] != cols for w in weights):
        raise ValueError(f"weights{_layer(name)} share one Hessian but have different in_features "
                         f"{[w.shape[1] for w in weights]}")
    if tuple(hessian.shape) != (cols, cols):
        raise ValueError(
            f"Hessian{_layer(name)} has shape {tuple(hessian.shape)}, expected ({cols}, {cols}) for in_features={cols}"
        )
    if keep_masks is not None:
        if len(keep_masks) != len(weights):
            raise ValueError(f"need one keep_mask per weight, got {len(keep_masks)} for {len(weights)}")
        for mask, weight in zip(keep_masks, weights):
            if tuple(mask.shape) != tuple(weight.shape):
                raise ValueError(f"keep_mask has shape {tuple(mask.shape)}, expected {tuple(weight.shape)}")
        n = m = 0
    else:
        check_sparsity_args(cols, sparsity, n, m, name)
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    if refit_iters < 0:
        raise ValueError(f"refit_iters must be >= 0, got {refit_iters}")
    if m > 0:  # N:M groups must not straddle blocks
        block_size = max(m, block_size - block_size % m)

    device = weights[0].device
    work = torch.float64 if hessian.dtype == torch.float64 else torch.float32
    H = hessian.detach().to(device, work)
    W0 = torch.cat([w.detach().to(device, work) for w in weights]) if len(weights) > 1 else weights[0].detach().to(work)
    segments = _row_segments(weights)
    Hinv, info = prepare_inverse_hessian(H, damp=damp, name=name)
    dead = torch.diagonal(H) == 0

    W = W0.clone()
    W[:, dead] = 0.0
    rows = W.shape[0]
    pruned = torch.zeros(rows, cols, dtype=torch.bool, device=device)
    if keep_masks is not None:
        pruned = ~torch.cat([mask.to(device=device, dtype=torch.bool) for mask in keep_masks])
    hinv_diag = torch.diagonal(Hinv)

    with ieee_fp32_matmul(device):
        for i1 in range(0, cols, block_size):
            i2 = min(i1 + block_size, cols)
            count = i2 - i1
            W1 = W[:, i1:i2].clone()
            Q1 = torch.zeros_like(W1)
            Err1 = torch.zeros_like(W1)
            Hinv1 = Hinv[i1:i2, i1:i2]
            d1 = hinv_diag[i1:i2]
            mask1 = pruned[:, i1:i2].clone()

            if keep_masks is None and m == 0:
                for a, b in segments:  # each weight keeps its own budget
                    scores = (W1[a:b] * W1[a:b] / (d1 * d1).unsqueeze(0)).flatten()
                    k = int(scores.numel() * sparsity)
                    order = torch.sort(scores, stable=True).indices[:k]
                    mask1[a:b] = mask1[a:b].flatten().index_fill(0, order, True).reshape(b - a, count)

            for i in range(count):
                if m > 0 and i % m == 0:
                    scores = W1[:, i:i + m] ** 2 / (d1[i:i + m] ** 2).unsqueeze(0)
                    low = torch.topk(scores, n, dim=1, largest=False).indices
                    mask1.scatter_(1, i + low, True)
                w = W1[:, i]
                q = torch.where(mask1[:, i], torch.zeros_like(w), w)
                Q1[:, i] = q
                err = (w - q) / Hinv1[i, i]
                W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
                Err1[:, i] = err

            W[:, i1:i2] = Q1
            pruned[:, i1:i2] = mask1
            for a, b in segments:  # per weight: the same matmul shapes as solving it alone
                W[a:b, i2:] -= Err1[a:b] @ Hinv[i1:i2, i2:]

        if not bool(torch.isfinite(W).all()):
            raise ValueError(
                f"OBS update{_layer(name)} produced NaN/inf (damp={info['damp_used']}); "
                "pass a larger --damp or add calibration prompts"
            )
        keep = ~pruned & ~dead.unsqueeze(0)
        W[~keep] = 0.0

        def recon_error(Wx: Tensor, a: int, b: int) -> float:
            return _half_quadratic(W0[a:b] - Wx[a:b], H)  # H is undamped: prepare_inverse_hessian copies

        refit = {}
        if refit_iters > 0:
            W_obs, obs_errors = W, [recon_error(W, a, b) for a, b in segments]
            W, refit = refit_kept_weights(W0, W, damped_hessian(H, info["damp_used"]), keep, refit_iters)
        results = []
        for i, ((a, b), weight) in enumerate(zip(segments, weights)):
            recon = recon_error(W, a, b)
            kept_obs = bool(refit) and recon > obs_errors[i]
            if kept_obs:  # CG minimised the damped loss; on the undamped one a layer must not end worse than OBS
                W[a:b], recon = W_obs[a:b], obs_errors[i]
            base = _half_quadratic(W0[a:b], H)
            kept = keep[a:b]
            stats = {
                "sparsity": 1.0 - float(kept.sum()) / kept.numel(),
                "recon_error": recon,
                "recon_error_rel": recon / base if base > 0 else 0.0,
                "damp_used": info["damp_used"],
                "retries": info["retries"],
                "dead_inputs": info["dead_inputs"],
            }
            if refit:
                stats |= refit | {"recon_error_obs": obs_errors[i],
                                  "refit_kept_start": refit["refit_kept_start"] or kept_obs}
            results.append((W[a:b].to(weight.dtype), kept, stats))
    return results


def _sparse_keep(scores: Tensor, sparsity: float, n: int, m: int, segments: list[tuple[int, int]]) -> Tensor:
    """Keep-mask of the highest ``scores``: per weight (row segment) all but int(numel * sparsity), or per row
    all but the n lowest of every m consecutive columns."""
    rows, cols = scores.shape
    if m > 0:
        low = torch.topk(scores.reshape(rows, cols // m, m), n, dim=2, largest=False).indices
        return ~torch.zeros(rows, cols // m, m, dtype=torch.bool, device=scores.device).scatter_(
            2, low, True).reshape(rows, cols)
    keep = torch.ones_like(scores, dtype=torch.bool)
    for a, b in segments:
        k = int((b - a) * cols * sparsity)
        order = torch.sort(scores[a:b].flatten(), stable=True).indices[:k]
        keep[a:b] = keep[a:b].flatten().index_fill(0, order, False).reshape(b - a, cols)
    return keep


def _obs_fallback(starts: list[tuple[Tensor, Tensor, dict]], iters: int) -> list[tuple[Tensor, Tensor, dict]]:
    """The OBS results, marked as kept by ADMM (``admm_kept_obs``) after ``iters`` iterations."""
    return [(w, k, s | {"recon_error_obs": s["recon_error"], "admm_iters": iters, "admm_mask_changed": 0.0,
                        "admm_kept_obs": True}) for w, k, s in starts]


def admm_sparsify_weights(
    weights: list[Tensor],
    hessian: Tensor,
    sparsity: float = 0.5,
    n: int = 0,
    m: int = 0,
    block_size: int = 128,
    damp: float = 0.01,
    names: list[str] | None = None,
    iters: int = ADMM_ITERS,
    rho: float = ADMM_RHO,
) -> list[tuple[Tensor, Tensor, dict]]:
    """OBS, then ADMM on mask and weights together, then the re-fit; per weight the better of that and OBS.

    Beyond the paper (``--solver admm``). The layer loss trace((W' - W) H (W' - W)^T) is minimised over W' in the
    sparse set (per weight int(numel * sparsity) zeros, or n of every m per row) by ADMM in coordinates where the
    damped H has unit diagonal (so weights are compared like Wanda's |w| * ||x||): a least-squares step towards
    the sparse copy Z (one eigendecomposition of H serves every penalty), a projection of that step onto the pattern
    (Z), a dual update, with the penalty (starting at ``rho``) growing until the mask settles, at most ``iters`` steps. It starts from the OBS solution, ends with
    ``refit_kept_weights`` on the final mask, and a weight whose undamped layer error would end above OBS's keeps
    the OBS result. Returns what ``sparsify_weights`` returns, with ``recon_error_obs``, ``admm_iters``,
    ``admm_mask_changed`` (share of entries whose keep/prune decision differs from OBS's) and ``admm_kept_obs``.
    The weights of one input group share the iterations (the loop stops when no mask entry of any of them changed
    for a while), so unlike ``sparsify_weights`` solving them together is not bit-identical to solving each alone.
    """
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 0:
        raise ValueError(f"ADMM iterations must be an integer >= 0, got {iters!r}")
    if not (isinstance(rho, (int, float)) and math.isfinite(rho) and rho > 0):
        raise ValueError(f"the ADMM start penalty must be a finite number > 0, got {rho!r}")
    starts = sparsify_weights(weights, hessian, sparsity, n, m, block_size, damp, names=names)
    names = list(names) if names is not None else [""] * len(weights)
    name = ", ".join(n_ for n_ in names if n_)
    device = weights[0].device
    work = torch.float64 if hessian.dtype == torch.float64 else torch.float32
    H = hessian.detach().to(device, work)
    dead = torch.diagonal(H) == 0
    W0 = torch.cat([w.detach().to(device, work) for w in weights])
    segments = _row_segments(weights)
    obs_keep = torch.cat([keep for _, keep, _ in starts])
    Hd = damped_hessian(H, starts[0][2]["damp_used"])

    with ieee_fp32_matmul(device):
        scale = torch.sqrt(torch.diagonal(Hd))
        Hn = Hd / scale.unsqueeze(0) / scale.unsqueeze(1)
        eig, Q = torch.linalg.eigh(Hn)
        if not (bool(torch.isfinite(eig).all()) and float(eig.min()) > 0):
            logger.warning("ADMM%s: the damped Hessian's eigendecomposition is not usable (smallest eigenvalue %g); "
                           "keeping the OBS result. Pass a larger --damp to use ADMM here.", _layer(name),
                           float(eig.min()))
            return _obs_fallback(starts, 0)
        target = (W0 * scale) @ Hn  # the least-squares step's right-hand side, in normalised coordinates
        Z = torch.cat([w.detach().to(device, work) for w, _, _ in starts]) * scale
        U = torch.zeros_like(Z)
        keep, done, stable = obs_keep, 0, 0
        X = V = None
        while done < iters and stable < ADMM_PATIENCE:
            X = ((target + rho * (Z - U)) @ Q / (eig + rho)) @ Q.T
            V = X + U
            scores = V.abs()
            scores[:, dead] = -1.0  # inputs that never fire are pruned first, as in OBS
            new_keep = _sparse_keep(scores, sparsity, n, m, segments)
            stable = stable + 1 if torch.equal(new_keep, keep) else 0
            keep = new_keep
            Z = V * keep
            U = V - Z
            done += 1
            if done % ADMM_RHO_EVERY == 0:
                rho *= ADMM_RHO_GROWTH
                U /= ADMM_RHO_GROWTH  # U is the dual scaled by 1/rho
        del X, V, U, target, Hn, Q
        keep = keep & ~dead.unsqueeze(0)
        W, refit = refit_kept_weights(W0, (Z / scale) * keep, Hd, keep)
        if not bool(torch.isfinite(W).all()):
            logger.warning("ADMM%s produced NaN/inf (damp=%g); keeping the OBS result. Pass a larger --damp to use "
                           "ADMM here.", _layer(name), starts[0][2]["damp_used"])
            return _obs_fallback(starts, done)
    results = []
    for (a, b), weight, (w_obs, k_obs, stats) in zip(segments, weights, starts):
        recon = _half_quadratic(W0[a:b] - W[a:b], H)
        kept_obs = recon > stats["recon_error"]
        changed = float((keep[a:b] != k_obs).float().mean())
        new_stats = stats | {"recon_error_obs": stats["recon_error"], "admm_iters": done, "admm_mask_changed": changed,
                             "admm_kept_obs": kept_obs, "refit_iters": refit["refit_iters"]}
        if kept_obs:
            results.append((w_obs, k_obs, new_stats))
            continue
        base = _half_quadratic(W0[a:b], H)
        kept = keep[a:b]
        new_stats |= {"sparsity": 1.0 - float(kept.sum()) / kept.numel(), "recon_error": recon,
                      "recon_error_rel": recon / base if base > 0 else 0.0}
        results.append((W[a:b].to(weight.dtype), kept, new_stats))
    return results

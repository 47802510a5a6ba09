"""Timestep-weighted Hessian accumulation for one linear layer (OBS-Diff, Sec. 3.2).

For a layer y = W x, the layer-wise reconstruction loss ||W x - W' x||^2 has
Hessian H = 2 x x^T with respect to each output row.  OBS-Diff weights every
calibration row collected at denoising step t by alpha_t, so after all batches

    H = 2 * sum_t alpha_t sum_{rows x at t} x x^T  /  sum_t alpha_t * rows_t

i.e. a weighted mean of 2 x x^T.  It is kept as a running mean (old H scaled by
W_old / W_new, new batch added with weight alpha / W_new) so that it never
grows with the number of calibration rows.

Cost. For an MMDiT block the Hessians take more multiply-adds per token than the
block's linears themselves (the FFN-down input is 4x wider, so its X^T X costs 16 d^2
against 4 d^2 for the layer), so calibration time is mostly X^T X.  Two savings,
both exact: H is symmetric, so only its upper block triangle is computed per batch
(about 5/8 of the products for 4 column blocks) and mirrored once when read; and the
running-mean rescale is fused into the matmul (one addmm_ per block, no temporary).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import torch
from torch import Tensor


@contextlib.contextmanager
def ieee_fp32_matmul(device: torch.device, tf32: bool = False) -> Iterator[None]:
    """Within the block, CUDA float32 matmuls on `device` use full IEEE precision (or TF32 if ``tf32``)."""
    if device.type != "cuda":
        yield
        return
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):  # torch >= 2.9
        old = matmul.fp32_precision
        matmul.fp32_precision = "tf32" if tf32 else "ieee"
        try:
            yield
        finally:
            matmul.fp32_precision = old
    else:
        old = matmul.allow_tf32
        matmul.allow_tf32 = tf32
        try:
            yield
        finally:
            matmul.allow_tf32 = old


def tf32_is_exact_for(dtype: torch.dtype) -> bool:
    """True when TF32 matmul inputs lose nothing: fp16 and bf16 carry at most TF32's 10 mantissa bits.

    Then X^T X in TF32 multiplies exactly and accumulates in float32, like IEEE float32, at tensor-core
    speed (8x on an H100); for float32 activations it would round the inputs, so IEEE is kept.
    """
    return dtype in (torch.float16, torch.bfloat16)


def gram_block_size(in_features: int) -> int:
    """Column block for the upper-triangular X^T X: a quarter of the width from 128 features on, else the width.

    Four blocks compute 10 of 16 block products; more blocks save little more and shrink the matmuls.
    """
    return in_features if in_features < 128 else -(-in_features // 4)


def gram_upper_products(in_features: int) -> int:
    """Entries of X^T X per input row that ``add_gram_upper_`` computes (of in_features^2): its cost per row."""
    d, block = in_features, gram_block_size(in_features)
    return sum(min(block, d - i) * (d - i) for i in range(0, d, block))


def add_gram_upper_(target: Tensor, x: Tensor, beta: float, alpha: float, block: int) -> None:
    """target <- beta * target + alpha * x^T x on the block upper triangle only (blocks below it are left stale)."""
    d = x.shape[1]
    for i in range(0, d, block):
        target[i:i + block, i:].addmm_(x[:, i:i + block].T, x[:, i:], beta=beta, alpha=alpha)


def mirror_upper_(target: Tensor, block: int) -> Tensor:
    """Copy the block upper triangle onto the stale blocks below it, making ``target`` symmetric; returns it."""
    d = target.shape[0]
    for i in range(0, d - block, block):
        target[i + block:, i:i + block].copy_(target[i:i + block, i + block:].T)
    return target


def _layer(name: str) -> str:
    """Format an optional layer name for error messages."""
    return f" of layer {name!r}" if name else ""


def _step_weight(timestep_weight: float) -> float:
    """The step weight alpha_t as a float; refuses NaN, inf and negative values (every accumulator's check)."""
    alpha = float(timestep_weight)
    if not math.isfinite(alpha) or alpha < 0:
        raise ValueError(f"timestep_weight must be finite and >= 0, got {timestep_weight}")
    return alpha


@dataclass
class HessianAccumulator:
    """Running timestep-weighted mean of 2 x x^T over calibration rows (its diagonal gives Wanda's norms), and with
    ``track_mean`` of x itself (DSnoT's expected inputs; off by default, so OBS calibration does not pay for it)."""

    in_features: int
    device: torch.device | str = "cpu"
    dtype: torch.dtype = torch.float32
    name: str = ""
    track_mean: bool = False
    weight_sum: float = field(init=False, default=0.0)
    num_rows: int = field(init=False, default=0)
    _state: Tensor = field(init=False, repr=False)  # valid on the block upper triangle; see `hessian`
    _mean: Tensor | None = field(init=False, repr=False)  # weighted mean of x, [d], with track_mean
    _lower_stale: bool = field(init=False, repr=False, default=False)

    def __post_init__(self) -> None:
        """Validate the configuration and allocate zeroed state."""
        if self.in_features < 1:
            raise ValueError(f"in_features must be >= 1, got {self.in_features}")
        if self.dtype not in (torch.float32, torch.float64):
            raise ValueError(f"Hessian dtype must be torch.float32 or torch.float64, got {self.dtype}")
        self.device = torch.device(self.device)
        d = self.in_features
        self._state = torch.zeros(d, d, dtype=self.dtype, device=self.device)
        self._mean = torch.zeros(d, dtype=self.dtype, device=self.device) if self.track_mean else None
        self._block = gram_block_size(d)

    @property
    def hessian(self) -> Tensor:
        """The symmetric [d, d] Hessian (the accumulator's own storage: in-place edits change the accumulator)."""
        if self._lower_stale:
            mirror_upper_(self._state, self._block)
            self._lower_stale = False
        return self._state

    @property
    def input_mean(self) -> Tensor:
        """Timestep-weighted mean of the inputs x, shape [d] (the accumulator's own storage); needs ``track_mean``."""
        if self._mean is None:
            raise ValueError(f"the accumulator{_layer(self.name)} was built without track_mean=True, so it has no "
                             "input mean (calibrate(..., track_mean=True) collects it)")
        return self._mean

    @property
    def act_sq_sum(self) -> Tensor:
        """Weighted sum of x_j^2 per input feature: diag(H) * weight_sum / 2 (derived, not stored)."""
        return torch.diagonal(self._state) * (self.weight_sum / 2.0)  # diagonal blocks are never stale

    def is_finite(self) -> Tensor:
        """0-d bool tensor on the Hessian's device: False once any non-finite activation was added (no host sync).

        A NaN/inf input, or a float32 overflow of x^2, makes a diagonal entry NaN/inf, and the running mean keeps it so.
        """
        return torch.isfinite(torch.diagonal(self._state)).all()

    def raise_if_not_finite(self, name: str | None = None) -> None:
        """Raise ValueError naming the layer when non-finite activations reached this Hessian."""
        if not bool(self.is_finite()):
            raise ValueError(
                f"activations{_layer(self.name if name is None else name)} contain NaN/inf (after casting to "
                f"{self.dtype}); check the model's dtype/overflow or the calibration prompts"
            )

    def add_batch(self, inputs: Tensor, timestep_weight: float = 1.0, name: str | None = None,
                  check_finite: bool = True) -> None:
        """Fold inputs [..., d] into the running mean, every row weighted by timestep_weight.

        With ``check_finite`` (default) non-finite inputs raise before the state changes (one host sync on a GPU);
        calibration hooks pass False and call ``is_finite`` once per transformer call instead.
        """
        name = self.name if name is None else name
        if inputs.shape[-1] != self.in_features:
            raise ValueError(
                f"activations{_layer(name)} have {inputs.shape[-1]} features, "
                f"expected in_features={self.in_features}"
            )
        alpha = _step_weight(timestep_weight)
        # Compute in the accumulator dtype on the input's device; only [d, d] crosses devices.
        x = inputs.detach().reshape(-1, self.in_features)
        tf32 = tf32_is_exact_for(x.dtype) and self.dtype == torch.float32
        if x.dtype != self.dtype:
            x = x.to(self.dtype)
        rows = x.shape[0]
        if rows == 0 or alpha == 0.0:
            return
        if check_finite:
            # x^T x is finite when every |x| is below sqrt(max / rows): one reduction over X, checked before the
            # state is touched, so a refused batch leaves the accumulator as it was.
            largest = float(x.abs().amax())
            if not largest <= math.sqrt(torch.finfo(self.dtype).max / rows):
                raise ValueError(
                    f"activations{_layer(name)} contain NaN/inf or overflow x^2 (after casting to {self.dtype}); "
                    "check the model's dtype/overflow or the calibration prompts"
                )
        new_sum = self.weight_sum + alpha * rows
        keep, scale = self.weight_sum / new_sum, 2.0 * alpha / new_sum
        target = self._state if x.device == self._state.device else torch.zeros_like(self._state, device=x.device)
        with ieee_fp32_matmul(x.device, tf32=tf32):
            add_gram_upper_(target, x, beta=keep if target is self._state else 0.0, alpha=scale, block=self._block)
        if target is not self._state:
            self._state.mul_(keep).add_(target.to(self._state.device))
        if self._mean is not None:  # R x d: about 1/d of the X^T X work
            self._mean.mul_(keep).add_(x.sum(0).to(self._mean.device), alpha=alpha / new_sum)
        self._lower_stale = self._block < self.in_features
        self.weight_sum = new_sum
        self.num_rows += rows

    def merge(self, other: HessianAccumulator) -> HessianAccumulator:
        """Combine `other` into self in place (weighted by weight sums) and return self."""
        if other.in_features != self.in_features:
            raise ValueError(
                f"cannot merge Hessians of width {other.in_features} into width {self.in_features}"
            )
        if self.track_mean and not other.track_mean:
            raise ValueError("cannot merge an accumulator without input mean into one that tracks it")
        new_sum = self.weight_sum + other.weight_sum
        if other.weight_sum == 0.0:
            return self
        other_h = other.hessian.to(self.device, self.dtype)
        self.hessian.mul_(self.weight_sum / new_sum).add_(other_h, alpha=other.weight_sum / new_sum)
        if self._mean is not None:
            self._mean.mul_(self.weight_sum / new_sum).add_(other.input_mean.to(self.device, self.dtype),
                                                            alpha=other.weight_sum / new_sum)
        self.weight_sum = new_sum
        self.num_rows += other.num_rows
        return self

    def state_dict(self) -> dict:
        """Return a plain dict (tensors + numbers) that from_state() can rebuild."""
        state = {
            "in_features": self.in_features,
            "name": self.name,
            "hessian": self.hessian,
            "weight_sum": self.weight_sum,
            "num_rows": self.num_rows,
        }
        return state | ({"input_mean": self.input_mean} if self.track_mean else {})

    @classmethod
    def from_state(
        cls, state: dict, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> HessianAccumulator:
        """Rebuild an accumulator from state_dict() output, optionally on another device/dtype."""
        hessian = state["hessian"]
        acc = cls(
            int(state["in_features"]),
            device=hessian.device if device is None else device,
            dtype=hessian.dtype if dtype is None else dtype,
            name=state.get("name", ""),
            track_mean="input_mean" in state,
        )
        acc.hessian.copy_(hessian)
        if acc.track_mean:
            acc.input_mean.copy_(state["input_mean"])
        acc.weight_sum = float(state["weight_sum"])
        acc.num_rows = int(state["num_rows"])
        return acc


def all_finite(accumulators: Iterable[HessianAccumulator]) -> bool:
    """True when no accumulator has seen a non-finite activation; one check (and host sync) per device."""
    diagonals: dict[torch.device, list[Tensor]] = {}
    for acc in accumulators:
        diagonals.setdefault(acc._state.device, []).append(torch.diagonal(acc._state))
    # One concatenation and one reduction per device instead of three small ops per accumulator.
    return all(bool(torch.isfinite(torch.cat(d)).all()) for d in diagonals.values())


def raise_if_empty(accumulators: dict[str, HessianAccumulator]) -> None:
    """Raise naming the first layer whose Hessian received no calibration input: empty, it would make every input
    look dead, and OBS would zero the whole layer (structured OBS: call every head and neuron free to remove)."""
    for key, acc in accumulators.items():
        if not acc.weight_sum > 0:
            raise ValueError(f"no calibration input reached layer {key!r}: it never ran during calibration (every step "
                             "weighing 0 counts as never); check --blocks and the model")


def input_variance(acc: HessianAccumulator) -> Tensor:
    """Timestep-weighted variance of each input feature, E[x_j^2] - E[x_j]^2 (clamped at 0), shape [d]."""
    if acc.weight_sum == 0.0:
        raise ValueError(f"no calibration activations were recorded{_layer(acc.name)}")
    return (acc.act_sq_sum / acc.weight_sum - acc.input_mean**2).clamp_min(0.0)


def wanda_input_norm(acc: HessianAccumulator) -> Tensor:
    """Timestep-weighted ||X_j||: sqrt of the weighted mean of x_j^2 per input feature, shape [d]."""
    if acc.weight_sum == 0.0:
        raise ValueError(f"no calibration activations were recorded{_layer(acc.name)}")
    return torch.sqrt(acc.act_sq_sum / acc.weight_sum)


@dataclass
class DriftAccumulator:
    """Running timestep-weighted mean of 2 (x_dense - x) x^T: how far a layer's inputs x have drifted from the dense
    model's x_dense on the same rows, correlated with x (beyond the paper; see ``obs.dense_target_weights``).

    Normalised like ``HessianAccumulator`` (same alpha_t, same row weights), so H + drift = mean of 2 x_dense x^T.
    """

    in_features: int
    device: torch.device | str = "cpu"
    dtype: torch.dtype = torch.float32
    name: str = ""
    weight_sum: float = field(init=False, default=0.0)
    num_rows: int = field(init=False, default=0)
    drift: Tensor = field(init=False, repr=False)  # [d, d]: rows index x_dense - x, columns index x

    def __post_init__(self) -> None:
        """Validate the configuration and allocate zeroed state."""
        if self.in_features < 1:
            raise ValueError(f"in_features must be >= 1, got {self.in_features}")
        self.device = torch.device(self.device)
        self.drift = torch.zeros(self.in_features, self.in_features, dtype=self.dtype, device=self.device)

    def add_batch(self, dense_inputs: Tensor, inputs: Tensor, timestep_weight: float = 1.0) -> None:
        """Fold matching rows of the dense model's inputs and this model's inputs [..., d] into the running mean."""
        if dense_inputs.shape != inputs.shape or inputs.shape[-1] != self.in_features:
            raise ValueError(
                f"dense and pruned activations{_layer(self.name)} must have the same shape [..., {self.in_features}], "
                f"got {tuple(dense_inputs.shape)} and {tuple(inputs.shape)}: the dense copy saw another call"
            )
        alpha = _step_weight(timestep_weight)
        x = inputs.detach().reshape(-1, self.in_features).to(self.dtype)
        delta = dense_inputs.detach().reshape(-1, self.in_features).to(self.dtype) - x
        rows = x.shape[0]
        if rows == 0 or alpha == 0.0:
            return
        new_sum = self.weight_sum + alpha * rows
        update = (delta.T @ x).to(self.device)
        self.drift.mul_(self.weight_sum / new_sum).add_(update, alpha=2.0 * alpha / new_sum)
        self.weight_sum = new_sum
        self.num_rows += rows

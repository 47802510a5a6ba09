"""Block tuning (beyond the paper): after pruning, teach each pruned block to reproduce the dense block's output.

OBS-Diff solves every layer on its own: ``||W x - W' x||`` on the layer's inputs, the rest of the block held
fixed. What the sample sees is the block's output, and at 2:4 the layers' small errors add up inside the block
(attention, GELU, the gated residuals) and from block to block. ``tune_blocks`` takes the pruned transformer and
a dense copy made before pruning and, block by block in forward order, (1) runs the real pipeline over the
calibration prompts with the pruned model, recording the inputs of the block at every transformer call and the
output of the *dense* model's same block on the same call (so the target also undoes what earlier blocks changed),
then (2) runs ``iters`` steps of Adam on the block's target linears (weights and biases), one recorded call per
step, on the mean squared error to the dense output, each output tensor scaled by its mean square and each call
weighted by its denoising step's weight alpha_t. Pruned weights stay exactly zero (the mask is re-applied after
every step), so the sparsity and the N:M pattern are unchanged. Every other parameter is left as it is.

It is post-training on the calibration prompts, not a closed-form solve: the gain depends on the learning rate and
step count (defaults measured on the tiny models), and the recorded calls live in memory (``max_calls`` caps them;
on a full-size model keep the cap small or use ``cache_device="cpu"`` or ``"disk"``, as for cached calibration).
"""

from __future__ import annotations

import logging
import statistics
import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from .arch import Block
from .cached import CacheStore, to_device
from .calibrate import StepTracker
from .pipelines import run_pipeline

log = logging.getLogger(__name__)

TUNE_LR = 1e-4  # Adam step size for --tune-iters; larger ones overshot on tiny-sd3 at 2:4 (probe, 500 steps at 3e-4)
TUNE_MAX_CALLS = 256  # recorded transformer calls per block (a random subset when there are more)


class _Stop(Exception):
    """Raised inside the dense copy once the block of interest has run (the rest is not needed)."""


@dataclass
class RecordedCall:
    """One call of a block: its positional and keyword inputs, the dense block's outputs, and the step weight."""

    args: tuple
    kwargs: dict
    targets: tuple
    weight: float


def _outputs(value) -> tuple:
    """A block's outputs as a tuple of tensors-or-None."""
    return value if isinstance(value, tuple) else (value,)


@contextmanager
def _in_float32(module: nn.Module):
    """Within the block, ``module``'s half-precision parameters and buffers are float32 (Adam's small steps vanish
    when rounded to float16/bfloat16 every step); afterwards each is rounded back to its own dtype (zeros stay zero)."""
    tensors = [t for t in (*module.parameters(), *module.buffers()) if t.dtype in (torch.float16, torch.bfloat16)]
    dtypes = [t.dtype for t in tensors]
    for t in tensors:
        t.data = t.data.float()
    try:
        yield
    finally:
        for t, dtype in zip(tensors, dtypes):
            t.data = t.data.to(dtype)


def record_block_calls(pipe, dense: nn.Module, block: Block, dense_block: nn.Module, prompts: list[str], call: dict,
                       tracker: StepTracker, *, seed: int = 0, batch_size: int = 8, max_calls: int = TUNE_MAX_CALLS,
                       store: CacheStore | None = None, progress: bool = False) -> list[RecordedCall]:
    """Run the pipeline over ``prompts`` with the pruned model; for every transformer call record ``block``'s inputs
    and the dense copy's ``dense_block`` outputs on the same call (at most ``max_calls``, a seeded random subset), kept
    by ``store`` (the cached calibration's: where they were made, another device, or memory-mapped files)."""
    transformer = pipe.transformer
    store = store or CacheStore()
    calls: list[RecordedCall] = []
    current: dict = {}
    generator = torch.Generator().manual_seed(seed)
    seen = [0]

    def run_dense(module: nn.Module, args: tuple, kwargs: dict) -> None:
        current.clear()
        try:
            dense(*args, **kwargs)
        except _Stop:
            pass

    def dense_output(module: nn.Module, args: tuple, output) -> None:
        current["targets"] = _outputs(output)  # stored below only if this call is kept
        raise _Stop

    def block_input(module: nn.Module, args: tuple, kwargs: dict) -> None:
        if "targets" not in current:
            raise RuntimeError(f"the dense copy did not reach {block.name} in this call; block tuning needs the "
                               "transformer to run the same blocks on every call")
        seen[0] += 1
        targets = current.pop("targets")
        slot = len(calls)
        if slot >= max_calls:  # reservoir sampling: every call equally likely to be kept
            slot = int(torch.randint(seen[0], (1,), generator=generator))
            if slot >= max_calls:
                return  # not kept: nothing is stored (no copy, no file)
            old = calls[slot]
            store.discard((old.args, old.kwargs, old.targets))
        record = RecordedCall(store.put(args), {k: store.put(v) for k, v in kwargs.items()}, store.put(targets),
                              tracker.weight)
        if slot == len(calls):
            calls.append(record)
        else:
            calls[slot] = record

    handles = [transformer.register_forward_pre_hook(tracker.pre_hook, with_kwargs=True),
               transformer.register_forward_pre_hook(run_dense, with_kwargs=True),
               dense_block.register_forward_hook(dense_output),
               block.module.register_forward_pre_hook(block_input, with_kwargs=True)]
    try:
        run_pipeline(pipe, prompts, seed, call, batch_size, output_type="latent", progress=progress,
                     desc=f"recording {block.name}")
    finally:
        for h in handles:
            h.remove()
    return calls


def tune_block(module: nn.Module, linears: list[nn.Linear], calls: list[RecordedCall], *, iters: int,
               lr: float = TUNE_LR, seed: int = 0) -> dict:
    """Adam on the weights and biases of ``linears`` (inside ``module``) towards the recorded dense outputs, zeros
    kept; returns the weighted loss over all calls before and after and the seconds taken. Half-precision blocks are
    tuned in float32 and rounded back; a block whose loss did not go down keeps its weights (``tune_kept_start``)."""
    if iters < 1 or not calls:
        raise ValueError(f"block tuning needs iters >= 1 and recorded calls, got {iters} iterations and "
                         f"{len(calls)} calls")
    with _in_float32(module):
        return _tune_block(module, linears, calls, iters=iters, lr=lr, seed=seed)


def _tune_block(module: nn.Module, linears: list[nn.Linear], calls: list[RecordedCall], *, iters: int, lr: float,
                seed: int) -> dict:
    """``tune_block`` with the module's parameters in their working dtype."""
    t0 = time.perf_counter()
    device, dtype = linears[0].weight.device, linears[0].weight.dtype
    params = [p for lin in linears for p in (lin.weight, lin.bias) if p is not None]
    masks = [(lin.weight, lin.weight != 0) for lin in linears]
    # Each output tensor scaled by its mean square over the calls, so both streams count alike.
    scales = [sum(float(c.targets[i].float().pow(2).mean()) for c in calls) / len(calls) if calls[0].targets[i]
              is not None else None for i in range(len(calls[0].targets))]
    total_weight = sum(c.weight for c in calls)
    if not total_weight > 0:
        raise ValueError("every recorded call has step weight 0; choose a --weight-range with a positive maximum")

    def loss_of(c: RecordedCall) -> torch.Tensor:
        out = _outputs(module(*to_device(c.args, device, dtype), **to_device(c.kwargs, device, dtype)))
        terms = [(o.float() - t.to(device).float()).pow(2).mean() / max(s, 1e-30)
                 for o, t, s in zip(out, c.targets, scales) if o is not None and t is not None]
        return sum(terms)

    def full_loss() -> float:
        with torch.no_grad():
            return sum(c.weight * float(loss_of(c)) for c in calls) / total_weight

    before = full_loss()
    start = [p.detach().clone() for p in params]
    flags = [p.requires_grad for p in module.parameters()]
    module.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(params, lr=lr)
    generator = torch.Generator().manual_seed(seed)
    try:
        with torch.enable_grad():
            for _ in range(iters):
                c = calls[int(torch.randint(len(calls), (1,), generator=generator))]
                loss = c.weight * len(calls) / total_weight * loss_of(c)  # the weighted mean, in expectation
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                with torch.no_grad():
                    for weight, keep in masks:
                        weight.mul_(keep)
    finally:
        for p, flag in zip(module.parameters(), flags):
            p.requires_grad_(flag)
    after = full_loss()
    kept_start = not after < before  # also NaN: the steps diverged
    if kept_start:  # never leave a block further from the dense one than pruning left it
        log.warning("block tuning did not lower the loss of this block (%.4g -> %.4g); it keeps its pruned weights. "
                    "Try a smaller --tune-lr.", before, after)
        with torch.no_grad():
            for p, p0 in zip(params, start):
                p.copy_(p0)
        after = before
    return {"tune_loss_before": before, "tune_loss_after": after, "tune_kept_start": kept_start,
            "tune_calls": len(calls), "tune_s": time.perf_counter() - t0}


def mean_loss_ratio(records: dict[str, dict]) -> float:
    """The blocks' loss after tuning over their loss before, averaged over the blocks of ``tune_blocks``' records."""
    return statistics.fmean(r["tune_loss_after"] / r["tune_loss_before"] for r in records.values())


def tune_blocks(pipe, dense: nn.Module, selected: list[Block], targets: dict[str, list[nn.Linear]],
                prompts: list[str], call: dict, tracker: StepTracker, *, iters: int, lr: float = TUNE_LR,
                seed: int = 0, batch_size: int = 8, max_calls: int = TUNE_MAX_CALLS, cache_device=None,
                progress: bool = True) -> dict[str, dict]:
    """Tune every selected block in forward order (each recorded with the blocks before it already tuned); returns
    per block name its ``tune_block`` record. ``dense`` is a copy of the transformer made before pruning."""
    dense.requires_grad_(False).eval()
    dense_modules = dict(dense.named_modules())
    records = {}
    for block in tqdm(selected, desc="tuning blocks", disable=not progress):
        records[block.name] = _record_and_tune(pipe, dense, block, dense_modules[block.name], targets[block.name],
                                               prompts, call, tracker, iters=iters, lr=lr, seed=seed,
                                               batch_size=batch_size, max_calls=max_calls, cache_device=cache_device)
    return records


def _record_and_tune(pipe, dense: nn.Module, block: Block, dense_block: nn.Module, linears: list[nn.Linear],
                     prompts: list[str], call: dict, tracker: StepTracker, *, iters: int, lr: float, seed: int,
                     batch_size: int, max_calls: int, cache_device) -> dict:
    """Record one block's calls, tune it, and let the calls go before the next block records its own (a function of
    its own, so that no variable keeps them alive: two blocks' calls at once would double the recording's memory)."""
    store = CacheStore(cache_device)
    try:
        calls = record_block_calls(pipe, dense, block, dense_block, prompts, call, tracker, seed=seed,
                                   batch_size=batch_size, max_calls=max_calls, store=store)
        return tune_block(block.module, linears, calls, iters=iters, lr=lr, seed=seed + block.index)
    finally:
        store.close()

"""Cached calibration (beyond the paper): one trajectory pass, then block-wise propagation.

The paper re-runs the whole denoising trajectory over all prompts for every module package, so its
cost grows with the number of packages. Here (like SparseGPT does for LLMs) the trajectory runs once
with the dense model; the keyword inputs that enter the first pruned block at every transformer call
(hidden states of both streams, temb, rotary embeddings — per prompt batch, step and CFG half) are
cached with their step index. For each package only its blocks run on the cache, collecting the
timestep-weighted Hessians; the package is pruned; then its now-pruned blocks run once more to carry
the cache to the next package. All SD3/Flux blocks share one interface,
``block(hidden_states=, encoder_hidden_states=, temb=, ...) -> (encoder_hidden_states, hidden_states)``,
so Flux's double- and single-stream blocks need no special case.

The approximation: later packages see block inputs driven by the dense trajectory (x_t of the dense
model) rather than by the partially pruned one. ``refresh_every=K`` re-runs the trajectory with the
current model every K packages.

Where the cache lives (``cache_device``): by default where the block inputs were produced; "cpu" for
CPU RAM while the model runs on a GPU; "disk" (or "disk:/some/dir") for memory-mapped files in the
model dtype, so an SD3-size cache (≈ prompts × steps × 2 × tokens × hidden × bytes, e.g. 21 GB for
100 prompts × 25 steps at 512²) costs page cache, not RAM. ``obsdiff plan`` prints its size up front.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from .arch import ArchSpec, Block, blocks
from .calibrate import StepTracker, collect_hessians, guided_inputs
from .hessian import HessianAccumulator, raise_if_empty
from .pipelines import run_pipeline


@dataclass
class CachedCall:
    """The keyword inputs of one block call and the denoising step it belongs to."""

    step_index: int
    kwargs: dict

    def nbytes(self) -> int:
        """Bytes held by this record's tensors (shared rotary tensors counted once per record)."""
        total = 0
        for value in self.kwargs.values():
            for t in value if isinstance(value, tuple) else (value,):
                if isinstance(t, torch.Tensor):
                    total += t.numel() * t.element_size()
        return total


class CacheStore:
    """Keeps cached tensors on a device, or in memory-mapped files on disk ("disk" or "disk:/dir")."""

    def __init__(self, where: str | torch.device | None = None):
        where = None if where is None else str(where)
        self.disk = where is not None and where.startswith("disk")
        self.device = torch.device(where) if where is not None and not self.disk else None
        self._dir = tempfile.TemporaryDirectory(prefix="obsdiff-cache-", dir=where[5:] or None) if self.disk else None
        self._count = 0
        self._files: dict[int, str] = {}  # disk: id of a stored tensor -> its file (for discard)

    def put(self, value):
        """Store a tensor (or a tuple of them); other values pass through unchanged."""
        if isinstance(value, tuple):
            return tuple(self.put(v) for v in value)
        if not isinstance(value, torch.Tensor):
            return value
        value = value.detach()
        if not self.disk:
            return value.to(self.device or value.device)
        path = os.path.join(self._dir.name, f"{self._count}.pt")
        self._count += 1
        torch.save(value.cpu(), path)
        stored = torch.load(path, mmap=True, weights_only=True)  # pages come from the file on demand
        self._files[id(stored)] = path
        return stored

    def discard(self, value) -> None:
        """Give up stored tensors (a tensor, or a tuple or dict of them) early: disk mode deletes their files now
        (in memory they go when the last reference does)."""
        if isinstance(value, dict):
            value = tuple(value.values())
        if isinstance(value, tuple):
            for v in value:
                self.discard(v)
        elif isinstance(value, torch.Tensor) and id(value) in self._files:
            os.remove(self._files.pop(id(value)))  # an open memory map keeps its pages until the tensor is freed

    def close(self) -> None:
        """Delete the cache files (disk mode)."""
        if self._dir is not None:
            self._dir.cleanup()


def to_device(value, device, dtype: torch.dtype | None = None):
    """A stored value (a tensor, or a tuple, list or dict of them) on ``device``, floating point tensors also in
    ``dtype`` if given; other values pass through unchanged."""
    if isinstance(value, dict):
        return {k: to_device(v, device, dtype) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(to_device(v, device, dtype) for v in value)
    if not isinstance(value, torch.Tensor):
        return value
    return value.to(device, dtype) if dtype is not None and value.is_floating_point() else value.to(device)


def capture_block_inputs(pipe, arch: ArchSpec, block: Block, prompts: list[str], call: dict, seed: int,
                         batch_size: int, store: CacheStore | None = None, progress: bool = True) -> list[CachedCall]:
    """Run the full pipeline once and record every call's keyword inputs to ``block``."""
    tracker = StepTracker(pipe.scheduler, arch.timestep_scale)
    cache: list[CachedCall] = []
    store = store or CacheStore()

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        cache.append(CachedCall(tracker.step_index, {k: store.put(v) for k, v in kwargs.items()}))

    handles = [pipe.transformer.register_forward_pre_hook(tracker.pre_hook, with_kwargs=True),
               block.module.register_forward_pre_hook(hook, with_kwargs=True)]
    try:
        run_pipeline(pipe, prompts, seed, call, batch_size, output_type="latent", progress=progress, desc="trajectory")
    finally:
        for h in handles:
            h.remove()
    return cache


@torch.no_grad()
def propagate(cache: list[CachedCall], chain: list[Block], keep: bool = True,
              on_call: Callable[[CachedCall], None] | None = None, store: CacheStore | None = None) -> list[CachedCall]:
    """Run each cached call through ``chain`` (consecutive blocks); return the inputs of the next block.

    Every input goes to each block's device first (the cache may be on another one: ``--cache-device cpu``)."""
    out = []
    store = store or CacheStore()
    streams = ("hidden_states", "encoder_hidden_states")
    for record in cache:
        if on_call is not None:
            on_call(record)
        kwargs = record.kwargs
        hidden, encoder = kwargs["hidden_states"], kwargs["encoder_hidden_states"]
        others: dict = {}  # the call's other inputs (temb, rotary embeddings, ...), moved once per device
        for block in chain:
            device = next(block.module.parameters()).device
            if device not in others:
                others[device] = to_device({k: v for k, v in kwargs.items() if k not in streams}, device)
            encoder, hidden = block.module(**(others[device] | {"hidden_states": hidden.to(device),
                                                                "encoder_hidden_states": encoder.to(device)}))
        if keep:
            where = kwargs["hidden_states"].device
            out.append(CachedCall(record.step_index, kwargs | {"hidden_states": store.put(hidden.to(where)),
                                                              "encoder_hidden_states": store.put(encoder.to(where))}))
    return out


def cache_nbytes(cache: list[CachedCall]) -> int:
    """Total bytes of a block-input cache (what a real model's cache will cost; print it up front)."""
    return sum(r.nbytes() for r in cache)


def run_cached(pipe, arch: ArchSpec, packages: list[list[tuple[Block, dict[str, nn.Linear]]]], prompts: list[str],
               call: dict, prune_package: Callable[[int, dict[str, HessianAccumulator]], None], *,
               weighting: str, weight_range: tuple[float, float], seed: int, batch_size: int,
               hessian_device=None, cache_device=None, refresh_every: int = 0, progress: bool = True,
               hessian_inputs: str = "plain", track_mean: bool = False) -> dict:
    """Calibrate and prune package by package on cached block inputs; return cache/pass statistics.

    ``packages[p]`` lists (block, {key: first linear of an input group}) for the blocks that package p
    touches, in block order; ``prune_package(p, accumulators)`` prunes package p in place.
    """
    store = CacheStore(cache_device)
    try:
        return _run_cached(pipe, arch, packages, prompts, call, prune_package, store, weighting=weighting,
                           weight_range=weight_range, seed=seed, batch_size=batch_size,
                           hessian_device=hessian_device, refresh_every=refresh_every, progress=progress,
                           guided=guided_inputs(arch, call, hessian_inputs), track_mean=track_mean)
    finally:
        store.close()


def _run_cached(pipe, arch, packages, prompts, call, prune_package, store: CacheStore, *, weighting, weight_range,
                seed, batch_size, hessian_device, refresh_every, progress, guided, track_mean) -> dict:
    all_blocks = blocks(pipe.transformer, arch)
    tracker = StepTracker(pipe.scheduler, arch.timestep_scale, weighting, weight_range)
    first = packages[0][0][0]
    # Package 0 sees the dense trajectory's inputs anyway: collect its Hessians during the trajectory pass
    # itself, which saves one pass through its blocks.
    first_groups = {k: lin for _, g in packages[0] for k, lin in g.items()}
    first_tracker = StepTracker(pipe.scheduler, arch.timestep_scale, weighting, weight_range)
    with collect_hessians(pipe.transformer, arch, first_groups, first_tracker, hessian_device,
                          guided, track_mean) as first_accumulators:
        cache = capture_block_inputs(pipe, arch, first, prompts, call, seed, batch_size, store, progress)
    raise_if_empty(first_accumulators)
    cache_block = first.index  # the cache holds the inputs of this block
    stats = {"trajectory_passes": 1, "cache_bytes": cache_nbytes(cache), "cache_calls": len(cache)}
    for p, package in enumerate(tqdm(packages, desc="packages (cached)", disable=not progress)):
        if p == 0:
            prune_package(0, first_accumulators)
            continue
        if refresh_every and p % refresh_every == 0:
            cache = capture_block_inputs(pipe, arch, all_blocks[cache_block], prompts, call, seed, batch_size,
                                         store, progress)
            stats["trajectory_passes"] += 1
        start, end = package[0][0].index, package[-1][0].index
        if start != cache_block:  # carry the cache forward through blocks pruned by earlier packages
            cache = propagate(cache, all_blocks[cache_block:start], store=store)
            cache_block = start
        groups = {k: lin for _, g in package for k, lin in g.items()}
        tracker.weights = None
        with collect_hessians(pipe.transformer, arch, groups, tracker, hessian_device, guided,
                              track_mean) as accumulators:
            # The transformer itself is not called here: the step index comes from the cache instead.
            propagate(cache, all_blocks[start : end + 1], keep=False, on_call=lambda r: _set_step(tracker, r))
        raise_if_empty(accumulators)
        prune_package(p, accumulators)
    return stats


def _set_step(tracker: StepTracker, record: CachedCall) -> None:
    tracker.set_step(record.step_index, len(tracker.scheduler.timesteps))

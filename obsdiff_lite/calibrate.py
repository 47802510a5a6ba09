"""Calibration: hooks that feed layer inputs into timestep-weighted Hessians while the real pipeline runs.

The denoising step is read from the transformer's own ``timestep`` argument (a forward pre-hook with
kwargs) and mapped to the nearest entry of ``scheduler.timesteps`` — never from a call counter: SD3
batches the conditional and unconditional halves into one call, Flux with true CFG makes two calls
per step, and skip-layer guidance adds more. The step weight is then an explicit argument of
``HessianAccumulator.add_batch``.

``DenseReference`` (beyond the paper; ``--dense-targets``) runs a dense copy of the transformer on the
same arguments before every call and records how far each target layer's inputs have drifted from the
dense model's (``hessian.DriftAccumulator``).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from .arch import ArchSpec, cfg_scale, reads_image_tokens_only
from .distributed import allreduce_accumulators, rank_and_world, shard
from .hessian import DriftAccumulator, HessianAccumulator, all_finite, raise_if_empty
from .pipelines import check_prompts, run_pipeline
from .schedules import timestep_weights


@dataclass
class StepTracker:
    """Knows the current denoising step (from the transformer's `timestep`) and its weight alpha_t."""

    scheduler: object
    timestep_scale: float
    weighting: str = "uniform"
    weight_range: tuple[float, float] = (0.8, 1.2)
    step_index: int | None = None
    weights: torch.Tensor | None = field(default=None, repr=False)
    steps_seen: set[int] = field(default_factory=set)
    weight: float = 1.0  # alpha_t of the current step (1.0 before any step was observed); read by every layer hook

    def observe(self, timestep: torch.Tensor | float) -> int:
        """Map a transformer timestep argument to the index of the nearest scheduler timestep."""
        timesteps = torch.as_tensor(self.scheduler.timesteps, dtype=torch.float64).cpu()
        t = float(torch.as_tensor(timestep).flatten()[0]) * self.timestep_scale
        self.set_step(int(torch.argmin((timesteps - t).abs())), len(timesteps))
        self.steps_seen.add(self.step_index)
        return self.step_index

    def set_step(self, index: int, num_steps: int) -> None:
        """Make ``index`` (of ``num_steps``) the current step and look up its weight alpha_t."""
        if self.weights is None or len(self.weights) != num_steps:
            self.weights = timestep_weights(self.weighting, num_steps, *self.weight_range)
        self.step_index = index
        self.weight = float(self.weights[index])  # once per transformer call, not once per layer hook

    def pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """forward_pre_hook(with_kwargs=True) for the transformer."""
        timestep = kwargs.get("timestep")
        if timestep is None:
            raise RuntimeError("the transformer was called without a `timestep` keyword; cannot tell the denoising step")
        self.observe(timestep)


HESSIAN_INPUTS = ("plain", "guided", "guided-image")
log = logging.getLogger(__name__)


@dataclass
class GuidedInputs:
    """Combines a layer's two CFG halves the way the pipeline combines the predictions: s*x_cond + (1-s)*x_uncond.

    Beyond the paper. To first order a weight change dW moves the guided prediction by J dW x_guided (J the
    rest of the network, about the same for both halves), so the layer loss that matters for the sample is
    ||dW x_guided||^2: its Hessian is built from these combined inputs instead of from both halves.
    """

    layout: str  # "batch" (one call, [uncond; cond]) | "calls" (a cond call, then an uncond call)
    scale: float
    combine: Callable[[str], bool] = lambda key: True  # which input groups are combined; the others stay plain
    pending: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    def __call__(self, key: str, x: torch.Tensor) -> torch.Tensor | None:
        """The combined inputs, or None while the cond half of a "calls" pair waits for its uncond half."""
        if not self.combine(key):
            return x
        if self.layout == "batch":
            if x.shape[0] % 2:
                raise RuntimeError(f"{key}: a CFG batch must hold uncond and cond halves, got batch {x.shape[0]}")
            uncond, cond = x.chunk(2, dim=0)
        elif key not in self.pending:
            self.pending[key] = x.detach().clone()
            return None
        else:
            cond, uncond = self.pending.pop(key), x
        return self.scale * cond + (1.0 - self.scale) * uncond


def guided_inputs(arch: ArchSpec, call: dict, hessian_inputs: str) -> GuidedInputs | None:
    """A GuidedInputs for ``hessian_inputs="guided"`` when the call really uses CFG; None (plain Hessians) otherwise."""
    if hessian_inputs not in HESSIAN_INPUTS:
        raise ValueError(f"unknown hessian inputs {hessian_inputs!r}; choose one of {', '.join(HESSIAN_INPUTS)}")
    if hessian_inputs == "plain":
        return None
    scale = cfg_scale(arch, call)
    if scale is None:
        why = f"{arch.cfg_scale_key}={call.get(arch.cfg_scale_key, arch.cfg_default_scale)}"
        if arch.cfg_needs_negative_prompt and call.get("negative_prompt") is None:
            why += ", no negative_prompt"
        log.warning("hessian_inputs=%r but the pipeline call runs without classifier-free guidance (%s), so the "
                    "Hessians use the plain inputs", hessian_inputs, why)
        return None
    if hessian_inputs == "guided-image":  # text tokens of prompt and negative prompt are not paired positions
        return GuidedInputs(arch.cfg_layout, scale, combine=lambda key: reads_image_tokens_only(arch, key))
    return GuidedInputs(arch.cfg_layout, scale)


class _DenseDone(Exception):
    """Raised inside the dense copy's forward once its last needed block has run (the rest is not needed)."""


@dataclass
class DenseReference:
    """A dense copy of the transformer, run on every call of the pruned one with the same arguments, whose target
    layers' inputs become each layer's dense-target drift (beyond the paper; ``obs.dense_target_weights``).

    Make it before anything is pruned: ``DenseReference(copy.deepcopy(pipe.transformer))``. It costs one more copy
    of the transformer's weights, a forward of the copy up to the package's last block per call, and the copy's
    inputs to the package's target layers while a call runs.
    """

    transformer: nn.Module
    drifts: dict[str, DriftAccumulator] = field(default_factory=dict, repr=False)  # the last pass's, by target key
    inputs: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)  # the copy's, in the current call

    def __post_init__(self) -> None:
        self.transformer.requires_grad_(False).eval()

    @contextmanager
    def watch(self, pruned: nn.Module, groups: dict[str, nn.Linear], last_block: nn.Module | None = None):
        """Within the block, every call of ``pruned`` first runs the dense copy on the same arguments (stopping after
        the copy of ``last_block``) and fills ``inputs``: target key -> the dense copy's input to that layer in the
        current call (taken by the caller's layer hooks)."""
        names = {id(module): name for name, module in pruned.named_modules()}
        handles = []

        def capture(key: str):
            def hook(module: nn.Module, args: tuple) -> None:
                self.inputs[key] = args[0].detach()
            return hook

        def stop(*_) -> None:
            raise _DenseDone

        def run_dense(module: nn.Module, args: tuple, kwargs: dict) -> None:
            self.inputs.clear()
            with torch.no_grad():
                try:
                    self.transformer(*args, **kwargs)
                except _DenseDone:
                    pass

        try:
            for key, linear in groups.items():
                if id(linear) not in names:
                    raise ValueError(f"layer {key!r} is not part of the transformer being calibrated")
                handles.append(self.transformer.get_submodule(names[id(linear)]).register_forward_pre_hook(capture(key)))
            if last_block is not None:
                handles.append(self.transformer.get_submodule(names[id(last_block)]).register_forward_hook(stop))
            handles.append(pruned.register_forward_pre_hook(run_dense, with_kwargs=True))
            yield
        finally:
            for h in handles:
                h.remove()
            self.inputs.clear()


@contextmanager
def collect_hessians(transformer: nn.Module, arch: ArchSpec, groups: dict[str, nn.Linear], tracker: StepTracker,
                     hessian_device: torch.device | str | None = None, guided: GuidedInputs | None = None,
                     track_mean: bool = False, dense: DenseReference | None = None,
                     last_block: nn.Module | None = None):
    """Within the block, every forward of ``groups[key]`` adds its input (or, with ``guided``, the CFG-combined
    input of both halves) to ``accumulators[key]`` (with ``track_mean`` also to its input mean, for DSnoT). With
    ``dense`` the drift from the dense copy's inputs goes into ``dense.drifts[key]`` (the copy runs up to its
    ``last_block``, the block of the last target). Non-finite inputs raise (naming the layer) at the end of the
    transformer call that produced them, or on leaving the block."""
    accumulators: dict[str, HessianAccumulator] = {}
    dense_guided = None
    if dense is not None:
        dense.drifts = {}
        # The dense copy's CFG halves are combined like the pruned model's, with their own pending cond halves.
        dense_guided = None if guided is None else GuidedInputs(guided.layout, guided.scale, guided.combine)

    def check_finite(*_) -> None:
        # Once per transformer call rather than per layer: on a GPU every check waits for the device.
        if not all_finite(accumulators.values()):
            for key, acc in accumulators.items():
                acc.raise_if_not_finite(key)

    handles = [transformer.register_forward_pre_hook(tracker.pre_hook, with_kwargs=True),
               transformer.register_forward_hook(check_finite)]

    def make_hook(key: str, acc: HessianAccumulator):
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0] if guided is None else guided(key, args[0])
            if dense is not None:
                if key not in dense.inputs:
                    raise RuntimeError(f"the dense copy did not reach layer {key!r} in this call; dense targets need "
                                       "the transformer to run the same layers on every call")
                x_dense = dense.inputs.pop(key)
                x_dense = x_dense if dense_guided is None else dense_guided(key, x_dense)
                if x is not None:
                    dense.drifts[key].add_batch(x_dense, x, tracker.weight)
            if x is not None:
                acc.add_batch(x.reshape(-1, x.shape[-1]), tracker.weight, name=key, check_finite=False)

        return hook

    try:
        for key, linear in groups.items():
            device = hessian_device or linear.weight.device
            acc = HessianAccumulator(linear.in_features, device=device, name=key, track_mean=track_mean)
            accumulators[key] = acc
            if dense is not None:
                dense.drifts[key] = DriftAccumulator(linear.in_features, device=device, name=key)
            handles.append(linear.register_forward_pre_hook(make_hook(key, acc)))
        with dense.watch(transformer, groups, last_block) if dense is not None else contextlib.nullcontext():
            yield accumulators
    finally:
        for h in handles:
            h.remove()
    check_finite()  # also for callers that run blocks without calling the transformer (cached calibration)


def calibrate(pipe, arch: ArchSpec, groups: dict[str, nn.Linear], prompts: list[str], call: dict, *,
              weighting: str = "log-decrease", weight_range: tuple[float, float] = (0.8, 1.2), seed: int = 0,
              batch_size: int = 8, hessian_device=None, progress: bool = True, desc: str = "calibrating",
              hessian_inputs: str = "plain", track_mean: bool = False, dense: DenseReference | None = None,
              last_block: nn.Module | None = None) -> dict[str, HessianAccumulator]:
    """One calibration pass of the full pipeline over ``prompts``: timestep-weighted Hessians per input group
    (with ``dense``, also each group's drift from the dense copy, in ``dense.drifts``; see ``collect_hessians``).

    Under torch.distributed (world > 1) each rank runs only its shard of the prompts (global seeds
    kept) and the accumulators are all-reduced, so every rank returns the Hessians of all prompts.
    """
    check_prompts(prompts)  # all ranks' prompts: one rank's shard may be empty
    for key, linear in groups.items():
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"groups maps names to the nn.Linear whose input is collected; {key!r} is a "
                             f"{type(linear).__name__}")
    rank, world = rank_and_world()
    indexed = shard(prompts, rank, world) if world > 1 else list(enumerate(prompts))
    tracker = StepTracker(pipe.scheduler, arch.timestep_scale, weighting, weight_range)
    guided = guided_inputs(arch, call, hessian_inputs)
    if dense is not None and world > 1:
        raise ValueError("dense targets are not sharded across ranks; run them in one process")
    with collect_hessians(pipe.transformer, arch, groups, tracker, hessian_device, guided, track_mean, dense,
                          last_block) as accumulators:
        # The latents are all we need: skipping the VAE decode saves time and changes nothing upstream.
        run_pipeline(pipe, [p for _, p in indexed], seed, call, batch_size, output_type="latent", progress=progress,
                     desc=desc, seeds=[seed + i for i, _ in indexed])
    if world > 1:
        allreduce_accumulators(accumulators)
    raise_if_empty(accumulators)  # after the all-reduce: a rank without prompts has empty ones of its own
    expected = int(call.get("num_inference_steps", len(pipe.scheduler.timesteps)))
    if indexed and len(tracker.steps_seen) != expected:
        raise RuntimeError(
            f"calibration saw {len(tracker.steps_seen)} distinct denoising steps, expected {expected}: "
            "the timestep-to-step mapping is off for this scheduler"
        )
    return accumulators

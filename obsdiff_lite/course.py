"""Helpers for the course notebooks 00, 02 and 03: pictures, model summaries, step-local weight swaps, Hessians.

Everything a notebook computes that matters lives here (and is tested in tests/test_course.py), so the
notebooks stay narrative: they call these functions and draw the results.

* notebook 00: ``show_images``, ``detection_captions``, ``architecture_summary``, ``format_summary``;
* notebook 02: ``block_linears``, ``pipeline_call``, ``perturb_at_steps``, ``run_with_trajectory``,
  ``decode_latents``, ``sweep_single_steps``, ``image_mse``, ``latent_divergence``, ``plot_weighting``;
* notebook 03: ``group_representatives``, ``record_inputs``, ``step_hessians``, ``combine_step_hessians``,
  ``closed_form_hessian``, ``relative_frobenius``.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from .arch import ArchSpec, arch_for_transformer, block_units, blocks, get_linear
from .calibrate import StepTracker
from .hessian import HessianAccumulator
from .pipelines import pipeline_call, run_pipeline  # noqa: F401  (pipeline_call: used by the notebooks)
from .schedules import timestep_weights
from .structured import count_parameters

if TYPE_CHECKING:
    from matplotlib.axes import Axes

# --------------------------------------------------------------------------------------------------
# Pictures and summaries (notebook 00)
# --------------------------------------------------------------------------------------------------


def show_images(images: np.ndarray | Tensor, captions: list[str] | None = None, nrow: int = 8,
                title: str | None = None, scale: int = 3, ax: Axes | None = None) -> Axes:
    """Draw a grid of uint8 images (with optional captions) on a matplotlib Axes and return it."""
    import matplotlib.pyplot as plt

    from .shapes.bench import image_grid

    grid = np.asarray(image_grid(images, nrow=nrow, captions=captions, scale=scale))
    if ax is None:  # a figure at the grid's own pixel size (72 dpi), so captions are drawn 1:1
        height, width = grid.shape[:2]
        head = 18 if title else 0
        fig = plt.figure(figsize=(width / 72, (height + head) / 72), dpi=72)
        ax = fig.add_axes((0, 0, 1, height / (height + head)))
    ax.imshow(grid, interpolation="nearest")
    ax.set_axis_off()
    if title:
        ax.set_title(title, loc="left")
    return ax


def detection_captions(images: np.ndarray) -> list[str]:
    """What the classical detector reads off each image, as a caption ('(nothing found)' if empty)."""
    from .shapes.detector import detect_batch

    return [d.spec.caption() if d.found else "(nothing found)" for d in detect_batch(images)]


def block_linears(transformer: nn.Module, arch: ArchSpec | None = None) -> dict[str, nn.Linear]:
    """Every prunable block linear (the paper's targets), by global name, in forward order."""
    out: dict[str, nn.Linear] = {}
    for block in blocks(transformer, arch):
        for unit in block_units(block):
            for group in unit:
                for name in group:
                    out[f"{block.name}.{name}"] = get_linear(block.module, name)
    return out


def pick_layer(transformer: nn.Module, layer: str | None = None, arch: ArchSpec | None = None) -> str:
    """``layer`` if it is a block linear of ``transformer``, else a ValueError naming some that are; None picks the
    FFN down-projection of the middle block (tiny-sd3: transformer_blocks.2.ff.net.2), the widest input there."""
    names = block_linears(transformer, arch)
    if layer is None:
        all_blocks = blocks(transformer, arch)
        middle = all_blocks[(len(all_blocks) - 1) // 2]
        return f"{middle.name}.{middle.spec.ffns[0].down}"
    if layer not in names:
        examples = [n for n in names if n.split(".")[-1] in ("to_q", "2", "proj_out")][:4]
        raise ValueError(f"layer {layer!r} is not a block linear of this {type(transformer).__name__}; e.g. "
                         f"{', '.join(examples)} (course.block_linears lists all {len(names)}), or None for the "
                         "middle block's FFN down-projection")
    return layer


def group_representatives(transformer: nn.Module, arch: ArchSpec | None = None) -> dict[str, nn.Linear]:
    """One linear per input group (the first; its Hessian serves the whole group), by global name."""
    out: dict[str, nn.Linear] = {}
    for block in blocks(transformer, arch):
        for unit in block_units(block):
            for group in unit:
                out[f"{block.name}.{group[0]}"] = get_linear(block.module, group[0])
    return out


def architecture_summary(pipe: object) -> dict[str, object]:
    """Architecture facts of an SD3/Flux pipeline: blocks per kind, heads, widths, parameter counts."""
    transformer = pipe.transformer
    arch = arch_for_transformer(transformer)
    config = transformer.config
    kinds: dict[str, int] = {}
    for block in blocks(transformer, arch):
        kinds[block.spec.kind] = kinds.get(block.spec.kind, 0) + 1
    components = {
        name: count_parameters(getattr(pipe, name))
        for name in ("transformer", "text_encoder", "text_encoder_2", "text_encoder_3", "vae")
        if getattr(pipe, name, None) is not None
    }
    linears = block_linears(transformer, arch)
    return {
        "pipeline": type(pipe).__name__,
        "transformer": type(transformer).__name__,
        "blocks": kinds,
        "heads": int(config.num_attention_heads),
        "head_dim": int(config.attention_head_dim),
        "hidden": int(config.num_attention_heads * config.attention_head_dim),
        "prunable_linears": len(linears),
        "prunable_params": sum(int(lin.weight.numel()) for lin in linears.values()),
        "params": components,
    }


def format_summary(summary: dict[str, object]) -> str:
    """A few aligned text lines for ``architecture_summary``'s dict."""
    blocks_text = ", ".join(f"{n} {kind}" for kind, n in summary["blocks"].items())
    lines = [
        f"{summary['pipeline']} / {summary['transformer']}",
        f"  blocks: {blocks_text};  hidden {summary['hidden']} = {summary['heads']} heads x {summary['head_dim']}",
        f"  prunable block linears: {summary['prunable_linears']} ({summary['prunable_params']:,} weights)",
    ]
    lines += [f"  {name:<15}{n:>12,} parameters" for name, n in summary["params"].items()]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Calls, step-local weight swaps and trajectories (notebook 02)
# --------------------------------------------------------------------------------------------------


@contextmanager
def perturb_at_steps(pipe, replacements: dict[nn.Linear, Tensor], steps: Iterable[int]) -> Iterator[StepTracker]:
    """Within the block, each linear in ``replacements`` uses its new weight only at the denoising ``steps``."""
    # A forward pre-hook (with kwargs) on the transformer reads its `timestep` argument, maps it to the step
    # index with StepTracker and copies either the replacement or the original weight in before the call.
    # The original weights are restored on exit, also after an exception.
    arch = arch_for_transformer(pipe.transformer)
    tracker = StepTracker(pipe.scheduler, arch.timestep_scale)
    steps = set(int(s) for s in steps)
    originals = {linear: linear.weight.detach().clone() for linear in replacements}

    def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        use_new = tracker.observe(kwargs["timestep"]) in steps
        with torch.no_grad():
            for linear, new in replacements.items():
                linear.weight.copy_(new if use_new else originals[linear])

    handle = pipe.transformer.register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        yield tracker
    finally:
        handle.remove()
        with torch.no_grad():
            for linear, weight in originals.items():
                linear.weight.copy_(weight)


def run_with_trajectory(pipe, prompts: list[str], seed: int, call: dict) -> tuple[np.ndarray, Tensor]:
    """uint8 images and the latents after every denoising step, float32 [steps, batch, ...] (prompt i: seed + i)."""
    latents: list[Tensor] = []

    def on_step_end(pipeline, i, t, callback_kwargs):
        latents.append(callback_kwargs["latents"].detach().float().cpu().clone())
        return callback_kwargs

    generators = [torch.Generator("cpu").manual_seed(seed + i) for i in range(len(prompts))]
    with torch.no_grad():
        result = pipe(prompt=prompts, generator=generators, output_type="np", callback_on_step_end=on_step_end,
                      callback_on_step_end_tensor_inputs=["latents"], **call)
    images = np.clip(np.round(result.images * 255), 0, 255).astype(np.uint8)
    return images, torch.stack(latents)


@dataclass
class StepRun:
    """One generation: its images and its latent trajectory [steps, batch, ...]."""

    images: np.ndarray
    latents: Tensor


def sweep_single_steps(pipe, prompts: list[str], seed: int, call: dict, replacements: dict[nn.Linear, Tensor],
                       steps: Sequence[int]) -> dict[int | str, StepRun]:
    """Generate once dense ('dense'), once perturbed at every step ('all'), and once per step t perturbed at t only."""
    runs: dict[int | str, StepRun] = {"dense": StepRun(*run_with_trajectory(pipe, prompts, seed, call))}
    num_steps = int(call["num_inference_steps"])
    with perturb_at_steps(pipe, replacements, range(num_steps)):
        runs["all"] = StepRun(*run_with_trajectory(pipe, prompts, seed, call))
    for t in steps:
        with perturb_at_steps(pipe, replacements, [t]):
            runs[int(t)] = StepRun(*run_with_trajectory(pipe, prompts, seed, call))
    return runs


def decode_latents(pipe, latents: Tensor, height: int = 32, width: int = 32) -> np.ndarray:
    """uint8 images from (intermediate) latents of an SD3 or Flux pipeline, as the pipeline would decode them."""
    vae = pipe.vae
    z = latents.to(vae.device, vae.dtype)
    if z.ndim == 3:  # Flux packs 2x2 latent patches into tokens
        z = pipe._unpack_latents(z, height, width, pipe.vae_scale_factor)
    z = z / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)
    with torch.no_grad():
        pixels = vae.decode(z, return_dict=False)[0]
    images = pipe.image_processor.postprocess(pixels, output_type="np")
    return np.clip(np.round(images * 255), 0, 255).astype(np.uint8)


def image_mse(images: np.ndarray, reference: np.ndarray) -> float:
    """Mean squared error between two uint8 image batches, in [0, 1] pixel units."""
    a = images.astype(np.float64) / 255.0
    b = reference.astype(np.float64) / 255.0
    return float(((a - b) ** 2).mean())


def latent_divergence(latents: Tensor, reference: Tensor) -> Tensor:
    """Per step, ||z_s - z_s^ref|| over the batch, in units of the final reference latent's norm: float64 [steps]."""
    diff = (latents.double() - reference.double()).flatten(1).norm(dim=1)
    return diff / reference[-1].double().norm()


def plot_weighting(strategy: str = "log-decrease", alpha_min: float = 0.8, alpha_max: float = 1.2,
                   num_steps: int = 25, ax: Axes | None = None) -> Axes:
    """Bar chart of one schedule's share of the Hessian per step (alpha_t / sum alpha) against uniform's 1/T."""
    import matplotlib.pyplot as plt

    weights = timestep_weights(strategy, num_steps, alpha_min, alpha_max)
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 2.8))
    share = weights / weights.sum() if float(weights.sum()) > 0 else torch.full_like(weights, float("nan"))
    ax.bar(range(1, num_steps + 1), (100 * share).tolist(), color="tab:blue")
    ax.axhline(100 / num_steps, color="k", ls="--", lw=1, label="uniform: 1/T")
    ax.set(xlabel="denoising step (1 = noisiest)", ylabel="share of H, %",
           title=f"{strategy}, alpha in [{alpha_min:g}, {alpha_max:g}], T={num_steps}: "
                 f"first/last = {float(share[0] / share[-1]) if float(share[-1]) > 0 else float('inf'):.2f}")
    ax.legend(loc="upper right", fontsize="small")
    return ax


# --------------------------------------------------------------------------------------------------
# Inputs and Hessians per denoising step (notebook 03)
# --------------------------------------------------------------------------------------------------


@dataclass
class InputRecord:
    """One forward call's input to a linear: the denoising step and the tensor as it arrived ([batch, tokens, d])."""

    step: int
    x: Tensor


@contextmanager
def _step_hooks(pipe, linears: dict[str, nn.Linear], on_input) -> Iterator[StepTracker]:
    """Hooks: the transformer's timestep sets the step; every linear input goes to on_input(key, step, x)."""
    arch = arch_for_transformer(pipe.transformer)
    tracker = StepTracker(pipe.scheduler, arch.timestep_scale)
    handles = [pipe.transformer.register_forward_pre_hook(tracker.pre_hook, with_kwargs=True)]

    def make_hook(key: str):
        def hook(module: nn.Module, args: tuple) -> None:
            on_input(key, tracker.step_index, args[0])

        return hook

    try:
        handles += [linear.register_forward_pre_hook(make_hook(key)) for key, linear in linears.items()]
        yield tracker
    finally:
        for handle in handles:
            handle.remove()


def record_inputs(pipe, linears: dict[str, nn.Linear], prompts: list[str], call: dict, seed: int = 0,
                  batch_size: int = 8) -> dict[str, list[InputRecord]]:
    """Run the pipeline once and keep every input each linear receives, tagged with its denoising step."""
    records: dict[str, list[InputRecord]] = {key: [] for key in linears}

    def keep(key: str, step: int, x: Tensor) -> None:
        records[key].append(InputRecord(step, x.detach().float().cpu().clone()))

    with _step_hooks(pipe, linears, keep):
        run_pipeline(pipe, prompts, seed, call, batch_size, output_type="latent", progress=False)
    return records


def cfg_halves(records: Sequence[InputRecord], batched: bool) -> dict[str, list[InputRecord]]:
    """A layer's recorded inputs split into the two CFG halves, one record per call and half. ``batched``: SD3's
    layout, one call per step and batch with the unconditional half first; else Flux's true CFG, two calls per step
    and batch, the conditional one first."""
    halves: dict[str, list[InputRecord]] = {"unconditional": [], "conditional": []}
    if batched:
        for r in records:
            if r.x.shape[0] % 2:
                raise ValueError(f"a batched CFG call has an even batch (both halves), got {r.x.shape[0]} at step "
                                 f"{r.step}")
            b = r.x.shape[0] // 2
            halves["unconditional"].append(InputRecord(r.step, r.x[:b]))
            halves["conditional"].append(InputRecord(r.step, r.x[b:]))
        return halves
    if len(records) % 2 or any(c.step != u.step for c, u in zip(records[::2], records[1::2])):
        raise ValueError("with two CFG calls per step the records must pair up step by step (conditional first); "
                         "was the pipeline run with true CFG?")
    halves["conditional"] = list(records[::2])
    halves["unconditional"] = list(records[1::2])
    return halves


def step_hessians(pipe, linears: dict[str, nn.Linear], prompts: list[str], call: dict, seed: int = 0,
                  batch_size: int = 8, dtype: torch.dtype = torch.float64) -> dict[str, list[HessianAccumulator]]:
    """One calibration pass that keeps a separate, unweighted Hessian (mean of 2 x x^T) per layer and step."""
    num_steps = int(call["num_inference_steps"])
    accs = {key: [HessianAccumulator(linear.in_features, dtype=dtype, name=f"{key}@{t}") for t in range(num_steps)]
            for key, linear in linears.items()}

    def add(key: str, step: int, x: Tensor) -> None:
        accs[key][step].add_batch(x.reshape(-1, x.shape[-1]))

    with _step_hooks(pipe, linears, add):
        run_pipeline(pipe, prompts, seed, call, batch_size, output_type="latent", progress=False)
    return accs


def combine_step_hessians(step_accs: Sequence[HessianAccumulator], weights: Tensor) -> Tensor:
    """sum_t alpha_t rows_t H_t / sum_t alpha_t rows_t: the timestep-weighted H from per-step Hessians."""
    if len(step_accs) != len(weights):
        raise ValueError(f"{len(step_accs)} per-step Hessians but {len(weights)} weights")
    mass = torch.tensor([float(a) * acc.num_rows for a, acc in zip(weights.tolist(), step_accs)], dtype=torch.float64)
    if float(mass.sum()) <= 0:
        raise ValueError("no rows with positive weight: the weighted Hessian is undefined")
    stacked = torch.stack([acc.hessian.double() for acc in step_accs])
    return torch.einsum("t,tij->ij", mass / mass.sum(), stacked)


def closed_form_hessian(records: Sequence[InputRecord], weights: Tensor) -> Tensor:
    """2 sum_t alpha_t X_t^T X_t / sum_t alpha_t rows_t, straight from recorded inputs (float64)."""
    num = None
    den = 0.0
    for record in records:
        x = record.x.reshape(-1, record.x.shape[-1]).double()
        alpha = float(weights[record.step])
        term = 2.0 * alpha * (x.T @ x)
        num = term if num is None else num + term
        den += alpha * x.shape[0]
    if num is None or den <= 0:
        raise ValueError("no recorded inputs with positive weight")
    return num / den


def relative_frobenius(a: Tensor, b: Tensor) -> float:
    """||a - b||_F / ||b||_F."""
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())

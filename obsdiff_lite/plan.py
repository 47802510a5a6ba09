"""Memory planner: how much memory a pruning run needs, per module package, before it starts.

    plan = plan_memory(pipe, PruneConfig(packages=4), device="cuda", batch_size=4)
    print(plan.table())

``obsdiff plan MODEL [prune options]`` prints the same table without running anything; MODEL may be a
local pipeline directory (read from its configs and safetensors headers, no weights loaded) or a
full-size architecture name from ``arch.FULL_SIZE_CONFIGS`` (``sd3-medium``, ``sd3.5-medium``, ``sd3.5-large``,
``flux-dev``; built on the meta device), so a GPU run can be planned on a laptop. ``prune()`` calls
``check_memory`` before calibrating and refuses a run whose estimate exceeds the free memory.

The estimate of one package's peak is a sum of four parts (an upper bound: the calibration-phase and
solve-phase transients do not really coexist):

* **model** — every pipeline component's parameters and buffers in the model dtype (text encoders and
  VAE included: the whole pipeline sits on the device while calibrating);
* **Hessians** — float32 d x d, one per *unique input* (the first linear of each input group: q/k/v
  share one; structured: one per out-/down-projection input of an active unit), on
  ``hessian_device`` (default: the compute device), all of a package alive at once;
* **activations** — ``batch x CFG x (image + text tokens) x hidden x bytes x ACTIVATION_FACTOR``
  plus the calibration hook's transient (the widest input cast to float32, and its x^T x);
  ACTIVATION_FACTOR = 12 hidden-widths per token covers the residual streams of both MMDiT streams,
  the norm/modulated input, and the FFN's 4x-wide up-projection and GELU outputs that coexist at a
  block's peak. SDPA with the flash/memory-efficient kernels (CUDA, and torch's CPU flash kernel)
  never materialises the tokens x tokens score matrix, so attention adds nothing quadratic; text
  encoder activations (a few hundred tokens, once per batch) are negligible;
* **OBS solve** of the package's largest input group (its linears are solved together):
  SOLVE_HESSIAN_COPIES d x d float32 buffers (the damped copy, its Cholesky factor, H^-1 and its upper
  Cholesky factor in ``obs.prepare_inverse_hessian``, plus the device copy of H) and
  SOLVE_WEIGHT_COPIES float32 copies of the group's stacked weights (working copy, OBS update, mask, dW). Unstructured solves run on the weight's device,
  structured ones next to the Hessians. ``--refit`` adds one d x d buffer (the damped Hessian) and
  REFIT_WEIGHT_COPIES more weight-sized buffers (the conjugate-gradient state in ``obs.refit_kept_weights``).
  ``--solver admm`` adds ADMM_HESSIAN_COPIES d x d and ADMM_WEIGHT_COPIES weight-sized buffers instead
  (``obs.admm_sparsify_weights``; its closing re-fit needs fewer).

``--tune-iters`` keeps a copy of the transformer from the start (in every total) and adds a **tuning** phase after
the packages (their Hessians are gone by then), one block at a time: on ``cache_device`` the calls it records
(``min(--tune-max-calls, calls per pass) + 1``, each the block's inputs and the dense block's outputs: two residual
streams of the call's tokens, ``2 x samples x (tokens + 1) x hidden x bytes``); on the compute device the larger of
the recording pass's activations (as in calibration, without the Hessians) and the training of the largest tuned
block (a float32 working copy of a half-precision block, gradient, two Adam moments and a start copy of its
target weights in float32 plus a byte of mask per weight, one call's inputs and targets in float32, and
TUNE_ACTIVATION_FACTOR hidden-widths per token in float32 kept for the backward pass).

``--dense-targets`` adds a float32 drift matrix next to every Hessian (counted in the Hessian part), a
copy of the transformer (model part), the copy's inputs to the package's target layers for one call
(activations), and the moved weights of the group being solved (solve).

Cached calibration adds the block-input cache (prompts x CFG calls x steps x tokens x hidden x bytes,
twice while it is carried forward to the next package) on ``cache_device``.

Validation (tests/test_plan.py): the Hessian part equals, byte for byte, what the accumulators of
each package hold on the tiny models; the total, divided by the model's bytes plus the peak that torch's
CPU allocator accounting (profiler memory events) measures during ``prune()``, lies in ``TINY_BAND``
(seen 0.98 .. 1.30 on tiny SD3/Flux, exact, cached, wanda and structured runs: an upper bound but for
structured runs, whose measure also counts the shrunk copies of sliced weights; 1.03 .. 1.09 where block tuning
is the peak).

**SD3-medium, the paper's setting** (Table 7: 4 packages, batch 4, 512 px -> 1024 image + 333 text
tokens, CFG, float16 pipeline incl. T5-XXL; ``obsdiff plan sd3-medium --packages 4 --batch-size 4
--dtype float16 --device cuda``): the paper reports 24.05 GB with 4 packages and 30.67 GB with 1.
This planner estimates 19.26 GB and 25.55 GB (model 15.39 GB of which T5-XXL 9.5 GB; Hessians
2.15 GB vs 8.44 GB; activations 0.82 GB; solve 0.91 GB). The *difference* 1 -> 4 packages is pure
Hessian memory and agrees: 6.29 GB estimated vs 6.62 GB reported (code that keeps one Hessian per
linear instead of one per unique input would hold ~10% more). The absolute ~5 GB gap in both settings
is what a count of tensor bytes cannot see: the CUDA context, the caching allocator's reserve and
fragmentation, library workspaces, and whatever else the paper's measurement includes (its unit, GB
or GiB, is not stated either). Leave that margin on a real GPU; tests/test_plan.py checks the 1 -> 4
package difference against the paper, not the absolute numbers.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

GB = 1e9
ACTIVATION_FACTOR = 12  # hidden-widths per token alive at a block's peak (see the module docstring)
SOLVE_HESSIAN_COPIES = 5  # d x d float32 buffers alive inside one OBS solve
SOLVE_WEIGHT_COPIES = 4  # float32 copies of the weight alive inside one OBS solve
REFIT_WEIGHT_COPIES = 6  # --refit: mask, residual, preconditioned residual, direction, H @ direction, a temporary
# --solver admm (on top of the OBS solve, whose result stays alive): the damped and the normalised H and its eigenvectors
# (d x d); the target, Z, the dual, the step, its projection, the scores and two temporaries of the step (weight-sized);
# the re-fit that follows runs after the ADMM state is freed and needs fewer.
ADMM_HESSIAN_COPIES, ADMM_WEIGHT_COPIES = 3, 8
STRUCTURED_HESSIAN_COPIES = 7  # structured.ColumnPruner: + the live-column H and H^-1 = U^T U
HESSIAN_BYTES = 4  # HessianAccumulator keeps float32
TUNE_ACTIVATION_FACTOR = 3 * ACTIVATION_FACTOR  # --tune-iters: float32 hidden-widths per token alive in a backward
TINY_BAND = (0.9, 2.0)  # tests: estimate / measured peak on the tiny models (see the docstring)
_DEFAULT_STEPS = {"sd3": 28, "flux": 28}
_DEFAULT_TEXT = {"sd3": 256, "flux": 512}  # max_sequence_length defaults of the pipelines
_CLIP_TOKENS = 77


@dataclass
class PackageMemory:
    """The estimate for one module package (bytes)."""

    index: int
    blocks: list[int]
    num_hessians: int
    hessian_bytes: int
    largest_input: int
    activation_bytes: int
    solve_bytes: int
    cache_bytes: int = 0
    by_device: dict[str, int] = field(default_factory=dict)  # total per device type, model included


@dataclass
class TuningMemory:
    """The estimate for block tuning (--tune-iters), one block at a time after all packages (bytes)."""

    recorded_calls: int  # calls kept per block
    recorded_bytes: int  # on cache_device
    recording_bytes: int  # the recording pass's activations (compute device)
    training_bytes: int  # the largest tuned block's training state (compute device)
    by_device: dict[str, int] = field(default_factory=dict)  # totals per device type, model and dense copy included


@dataclass
class Plan:
    """A memory estimate for one pruning run: settings, the model, and every package."""

    arch: str
    method: str
    pattern: str
    calibration: str
    device: str
    dtype: str
    hessian_device: str
    cache_device: str
    batch_size: int
    cfg: int
    image_tokens: int
    text_tokens: int
    hidden: int
    model_bytes: int
    packages: list[PackageMemory]
    dense_copy_bytes: int = 0  # --dense-targets / --tune-iters: the dense copy of the transformer (in every total)
    tuning: TuningMemory | None = None  # --tune-iters: the phase after the packages

    def peak_bytes(self, device: str | None = None) -> int:
        """The largest package or tuning total on ``device`` (a device type; default: the compute device)."""
        key = _device_key(device or self.device)
        phases = [*self.packages, *([self.tuning] if self.tuning else [])]
        return max((p.by_device.get(key, 0) for p in phases), default=0)

    def peak_phase(self, device: str | None = None) -> str:
        """Where the peak on ``device`` is: 'package K of N' or 'block tuning'."""
        key = _device_key(device or self.device)
        package = max(self.packages, key=lambda p: p.by_device.get(key, 0))
        if self.tuning and self.tuning.by_device.get(key, 0) > package.by_device.get(key, 0):
            return "block tuning"
        return f"package {package.index + 1} of {len(self.packages)}"

    @property
    def devices(self) -> list[str]:
        return sorted({k for p in self.packages for k in p.by_device})

    def table(self) -> str:
        """A plain-text table: package, blocks, #Hessians, Hessian GB, activations, solve, total GB (MB if small)."""
        dev = _device_key(self.device)
        scale, unit = (1e9, "GB") if max(self.peak_bytes(d) for d in self.devices) >= 1e9 else (1e6, "MB")
        cfg = f" x CFG {self.cfg}" if self.cfg > 1 else ""
        lines = [
            f"memory plan: {self.arch}, {self.method} {self.pattern} ({self.calibration} calibration), "
            f"{len(self.packages)} packages, batch {self.batch_size}{cfg}, {self.image_tokens} image + "
            f"{self.text_tokens} text tokens, {self.dtype} on {self.device}, Hessians on {self.hessian_device}",
            f"model (all pipeline components, {self.dtype}): {self.model_bytes / scale:.2f} {unit}",
        ]
        if self.dense_copy_bytes:
            lines.append(f"dense copy of the transformer (--dense-targets / --tune-iters, in every total): "
                         f"{self.dense_copy_bytes / scale:.2f} {unit}; drifts (--dense-targets) in the Hessian column")
        other = [d for d in self.devices if d != dev]
        header = f"{'package':>7}  {'blocks':>7}  {'#Hessians':>9}  {'Hessian ' + unit:>10}  {'activ. ' + unit:>9}  " \
                 f"{'solve ' + unit:>8}  " + (f"cache {unit}  " if self.calibration == "cached" else "") + \
                 f"{'total ' + unit:>8}"
        header += "".join(f"  {d + ' ' + unit:>9}" for d in other)
        lines.append(header)
        for p in self.packages:
            blocks = f"{p.blocks[0]}-{p.blocks[-1]}" if len(p.blocks) > 1 else (str(p.blocks[0]) if p.blocks else "-")
            row = (f"{p.index + 1:>7}  {blocks:>7}  {p.num_hessians:>9}  {p.hessian_bytes / scale:>10.2f}  "
                   f"{p.activation_bytes / scale:>9.2f}  {p.solve_bytes / scale:>8.2f}  "
                   + (f"{p.cache_bytes / scale:>8.2f}  " if self.calibration == "cached" else "")
                   + f"{p.by_device.get(dev, 0) / scale:>8.2f}")
            row += "".join(f"  {p.by_device.get(d, 0) / scale:>9.2f}" for d in other)
            lines.append(row)
        if self.tuning:
            t = self.tuning
            lines.append(f"block tuning (after the packages, one block at a time): {t.recorded_calls} recorded calls "
                         f"{t.recorded_bytes / scale:.2f} {unit} on {_device_key(self.cache_device)}, recording "
                         f"{t.recording_bytes / scale:.2f} {unit}, training {t.training_bytes / scale:.2f} {unit}; total "
                         + ", ".join(f"{t.by_device.get(d, 0) / scale:.2f} {unit} on {d}" for d in [dev, *other]))
        lines.append(f"estimated peak on {dev}: {self.peak_bytes() / scale:.2f} {unit} ({self.peak_phase()})"
                     + "".join(f"; on {d}: {self.peak_bytes(d) / scale:.2f} {unit}" for d in other))
        return "\n".join(lines)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["peak_bytes"] = {d: self.peak_bytes(d) for d in self.devices}
        return out


# --- Devices and free memory -------------------------------------------------------------------------------


def _device_key(device) -> str:
    """'cuda:1' -> 'cuda', 'cpu' -> 'cpu', 'disk:/dir' -> 'disk' (the planner accounts per device type)."""
    if str(device).startswith("disk"):
        return "disk"
    return torch.device(device or "cpu").type


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def available_memory(device) -> int | None:
    """Free bytes on ``device``: CUDA free + this process's reusable cache; CPU: MemAvailable; disk: free space."""
    if str(device).startswith("disk"):  # the cached mode's memory-mapped cache files
        import shutil
        import tempfile

        return int(shutil.disk_usage(str(device)[5:] or tempfile.gettempdir()).free)
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    if device.type == "cpu":
        available = _meminfo_available()
        if available is not None:
            return available
        try:  # no /proc (macOS, BSD): free physical pages
            return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (ValueError, OSError, AttributeError):
            return None
    return None


# --- Sizes of modules ----------------------------------------------------------------------------------


def module_bytes(module: nn.Module, dtype: torch.dtype | None = None) -> int:
    """Parameter + buffer bytes of ``module`` (floating tensors counted in ``dtype`` when given)."""
    total = 0
    for t in [*module.parameters(), *module.buffers()]:
        size = torch.empty((), dtype=dtype).element_size() if dtype is not None and t.is_floating_point() \
            else t.element_size()
        total += t.numel() * size
    return total


def pipeline_bytes(pipe, dtype: torch.dtype | None = None) -> int:
    """Bytes of every nn.Module component of a pipeline (transformer, text encoders, VAE)."""
    return sum(module_bytes(c, dtype) for c in pipe.components.values() if isinstance(c, nn.Module))


# --- Geometry ------------------------------------------------------------------------------------------


def default_geometry(transformer: nn.Module, arch: str, call: dict, height: int | None = None,
                     width: int | None = None, text_tokens: int | None = None,
                     tokenizer_max_length: int = _CLIP_TOKENS, vae_scale_factor: int = 8) -> tuple[int, int]:
    """(image tokens, text tokens) of one sample: the call's size, else the transformer's default size."""
    from .structured import image_tokens as count_image_tokens

    side = int(getattr(transformer.config, "sample_size", 128)) * vae_scale_factor
    height = int(height or call.get("height") or side)
    width = int(width or call.get("width") or side)
    if text_tokens is None:
        text_tokens = int(call.get("max_sequence_length") or _DEFAULT_TEXT[arch])
        if arch == "sd3":  # CLIP tokens, then T5 tokens (zeros without a T5)
            text_tokens += int(tokenizer_max_length)
    return count_image_tokens(transformer, height, width, vae_scale_factor), int(text_tokens)


def _hidden(transformer: nn.Module) -> int:
    cfg = transformer.config
    return int(cfg.num_attention_heads * cfg.attention_head_dim)


# --- Which Hessians each package holds ---------------------------------------------------------------------


PackageLayers = tuple[list[int], dict[str, nn.Linear], list[list[nn.Linear]]]


def _pending_guided_bytes(arch, groups: dict[str, nn.Linear], hessian_inputs: str, call: dict, rows: int,
                          nbytes: int) -> int:
    """Guided Hessians with CFG in two calls (Flux): each combined group's cond-call input waits for the uncond call."""
    from .arch import cfg_scale
    from .calibrate import guided_inputs

    if hessian_inputs == "plain" or arch.cfg_layout != "calls" or cfg_scale(arch, call) is None:
        return 0  # nothing waits (and guided_inputs need not warn about a missing CFG a second time)
    guided = guided_inputs(arch, call, hessian_inputs)
    return rows * sum(lin.in_features for key, lin in groups.items() if guided.combine(key)) * nbytes


def _package_layers(transformer: nn.Module, config) -> list[PackageLayers]:
    """Per package: (block indices, {Hessian key: linear whose input it holds}, solve groups of linears).

    A solve group is the set of weights whose solver state coexists: the linears of one input group for
    unstructured and N:M OBS (solved together on their shared Hessian), all out-projections of a heads unit
    (their pruners live together, each with its own Hessian) or one down projection per FFN.
    """
    from .arch import blocks, parse_block_range
    from .prune import package_units

    all_blocks = blocks(transformer)
    if config.pattern == "structured":
        from .structured import (
            _unit_plan,
            default_structured_blocks,
            split_packages,
            structured_sparsities,
            structured_units,
        )

        block_range = config.blocks if config.blocks is not None else default_structured_blocks(len(all_blocks))
        selected = [all_blocks[i] for i in parse_block_range(block_range, len(all_blocks))]
        head_s, ffn_s = structured_sparsities(config)
        units = structured_units(selected)
        plans = {id(u): _unit_plan(u, head_s, ffn_s, config.ffn_multiple) for u in units}
        out = []
        for package in split_packages(units, config.packages):
            active = [u for u in package if any(plans[id(u)].values())]
            groups = {name: lin for u in active for name, lin in u.linears().items()}
            solve = []
            for u in active:  # a heads unit solves its out-projections together; FFNs one at a time
                linears = list(u.linears().values())
                solve += [linears] if u.kind == "heads" else [[lin] for lin in linears]
            out.append((sorted({u.block.index for u in package}), groups, solve))
        return out
    selected = [all_blocks[i] for i in parse_block_range(config.blocks, len(all_blocks))]
    out = []
    for package in package_units(selected, config.packages):
        targets = [t for unit in package for t in unit]
        groups = {t.key: t.linears()[0][1] for t in targets}
        solve = [[lin for _, lin in t.linears()] for t in targets]  # one OBS call per input group (shared H)
        out.append((sorted({t.block.index for t in targets}), groups, solve))
    return out


def _num_units(transformer: nn.Module, config) -> int:
    """The most packages ``config`` allows: one unit per package."""
    from .arch import block_units, blocks, parse_block_range

    all_blocks = blocks(transformer)
    if config.pattern == "structured":
        from .structured import default_structured_blocks, structured_units

        block_range = config.blocks if config.blocks is not None else default_structured_blocks(len(all_blocks))
        return len(structured_units([all_blocks[i] for i in parse_block_range(block_range, len(all_blocks))]))
    return sum(len(block_units(all_blocks[i])) for i in parse_block_range(config.blocks, len(all_blocks)))


def _solve_bytes(linears: list[nn.Linear], method: str, pattern: str, refit: bool = False,
                 dense_targets: bool = False, admm: bool = False) -> int:
    """Workspace of solving one group of linears (float32); unstructured/N:M groups share one Hessian."""
    structured = pattern == "structured"
    copies = STRUCTURED_HESSIAN_COPIES if structured else SOLVE_HESSIAN_COPIES
    total = 0
    for i, lin in enumerate(linears):
        rows, cols = lin.weight.shape
        if method in ("magnitude", "wanda", "dsnot", "l1-norm") and not refit:  # with --refit: an OBS solve
            total += 2 * rows * cols * 4  # score matrix and the new weight
        else:
            extra_h, extra_w = (ADMM_HESSIAN_COPIES, ADMM_WEIGHT_COPIES) if admm else (refit, refit * REFIT_WEIGHT_COPIES)
            hessians = (copies + extra_h) * cols * cols * 4 if structured or i == 0 else 0
            copies_w = SOLVE_WEIGHT_COPIES + extra_w + dense_targets  # + the moved weights
            total += hessians + copies_w * rows * cols * 4
    return total


def plan_memory(model, config, device="cpu", batch_size: int | None = None, num_tokens: tuple[int, int] | None = None,
                *, dtype: torch.dtype | str | None = None, call: dict | None = None, model_bytes: int | None = None,
                num_prompts: int | None = None, tokenizer_max_length: int = _CLIP_TOKENS) -> Plan:
    """Estimate per-package peak memory of pruning ``model`` (a pipeline or its transformer) with ``config``.

    ``num_tokens`` = (image tokens, text tokens) of one sample (default: the call's size / the model's
    default size and text length); ``batch_size`` defaults to ``config.batch_size`` (capped at the
    number of prompts); ``dtype`` to the model's; ``model_bytes`` to all pipeline components (or the
    transformer alone when a bare transformer is given).
    """
    from .arch import arch_for_transformer, cfg_factors
    from .pipelines import pipeline_call, resolve_dtype

    config.validate()
    is_pipe = hasattr(model, "transformer")
    transformer = model.transformer if is_pipe else model
    arch_spec = arch_for_transformer(transformer)
    arch = arch_spec.name
    param = next(transformer.parameters())
    dtype = resolve_dtype(dtype) if dtype is not None else param.dtype
    if call is None:
        call = pipeline_call(model, config.steps, config.guidance) if is_pipe else {}
    if model_bytes is None:
        model_bytes = pipeline_bytes(model, dtype) if is_pipe else module_bytes(transformer, dtype)
    if num_tokens is None and is_pipe:
        from .structured import image_tokens, mac_geometry

        geo = mac_geometry(model, call)
        num_tokens = (image_tokens(transformer, geo["height"], geo["width"], geo["vae_scale_factor"]),
                      geo["text_tokens"])
    elif num_tokens is None:
        num_tokens = default_geometry(transformer, arch, call, tokenizer_max_length=tokenizer_max_length)
    n_image, n_text = (int(n) for n in num_tokens)
    tokens = n_image + n_text
    if num_prompts is None:
        num_prompts = len(config.prompts) if config.prompts is not None else int(config.num_prompts)
    batch = max(1, min(int(batch_size or config.batch_size), num_prompts))
    cfg_batch, calls_per_step = cfg_factors(arch_spec, call)
    steps = int(call.get("num_inference_steps") or config.steps or _DEFAULT_STEPS[arch])
    hidden = _hidden(transformer)
    nbytes = torch.empty((), dtype=dtype).element_size()

    compute = _device_key(device)
    hess_dev = _device_key(config.hessian_device or device)
    cache_dev = _device_key(config.cache_device or device)
    structured = config.pattern == "structured"
    needs_data = config.method == "obs-diff" if structured else config.method != "magnitude"
    dense = bool(getattr(config, "dense_targets", False)) and needs_data
    admm = getattr(config, "solver", "obs") == "admm"
    # --dense-targets and block tuning (--tune-iters) keep a dense copy of the transformer from the start
    dense_copy = module_bytes(transformer, dtype) if dense or getattr(config, "tune_iters", 0) else 0
    cache = 0
    if needs_data and config.calibration == "cached":
        cache = 2 * num_prompts * cfg_batch * calls_per_step * steps * tokens * hidden * nbytes

    packages = []
    for index, (block_ids, groups, solve_groups) in enumerate(_package_layers(transformer, config)):
        widths = [lin.in_features for lin in groups.values()] if needs_data else []
        hessians = sum(d * d * HESSIAN_BYTES for d in widths) * (2 if dense else 1)  # + one drift per Hessian
        d_max = max(widths, default=0)
        rows = batch * cfg_batch * tokens
        activations = 0
        if needs_data:
            activations = rows * hidden * nbytes * ACTIVATION_FACTOR + rows * d_max * 4 + d_max * d_max * 4
            activations += _pending_guided_bytes(arch_spec, groups, config.hessian_inputs, call, batch * tokens, nbytes)
            activations += rows * sum(widths) * nbytes if dense else 0  # the dense copy's inputs, one call
        solve = max((_solve_bytes(g, config.method, config.pattern, config.refit, dense, admm) for g in solve_groups),
                    default=0)
        solve_dev = hess_dev if structured else compute
        by_device = {compute: model_bytes + dense_copy + activations}
        for dev, amount in ((hess_dev, hessians), (solve_dev, solve), (cache_dev, cache)):
            by_device[dev] = by_device.get(dev, 0) + amount
        packages.append(PackageMemory(index, block_ids, len(widths), hessians, d_max, activations, solve, cache,
                                      by_device))
    tuning = None
    if getattr(config, "tune_iters", 0):
        tuning = _tuning_memory(transformer, config, nbytes, batch * cfg_batch, tokens, hidden,
                                -(-num_prompts // batch) * steps * calls_per_step)
        tuning.by_device = {compute: model_bytes + dense_copy + max(tuning.recording_bytes, tuning.training_bytes)}
        tuning.by_device[cache_dev] = tuning.by_device.get(cache_dev, 0) + tuning.recorded_bytes
    return Plan(
        arch=arch, method=config.method, pattern=config.pattern, calibration=config.calibration, device=str(device),
        dtype=str(dtype).removeprefix("torch."), hessian_device=str(config.hessian_device or device),
        cache_device=str(config.cache_device or device), batch_size=batch, cfg=cfg_batch * calls_per_step,
        image_tokens=n_image, text_tokens=n_text, hidden=hidden, model_bytes=model_bytes, packages=packages,
        dense_copy_bytes=dense_copy, tuning=tuning,
    )


def _tuning_memory(transformer: nn.Module, config, nbytes: int, samples: int, tokens: int, hidden: int,
                   calls_per_pass: int) -> TuningMemory:
    """Block tuning's parts (see the module docstring): recorded calls, recording pass, training of one block."""
    from .arch import block_units, blocks, parse_block_range

    kept = min(int(config.tune_max_calls), calls_per_pass)
    per_call = 2 * samples * (tokens + 1) * hidden * nbytes  # block inputs (+ temb) and the dense outputs
    recording = samples * tokens * hidden * nbytes * ACTIVATION_FACTOR
    all_blocks = blocks(transformer)
    training = 0
    for index in parse_block_range(config.blocks, len(all_blocks)):
        block = all_blocks[index]
        names = [name for unit in block_units(block) for group in unit for name in group]
        targets = [block.module.get_submodule(name) for name in names]
        weights = sum(lin.weight.numel() for lin in targets)
        params = weights + sum(lin.bias.numel() for lin in targets if lin.bias is not None)
        half_copy = module_bytes(block.module, torch.float32) * max(4 - nbytes, 0) // 4  # float32 working copy
        training = max(training, half_copy + params * 4 * 4 + weights
                       + per_call * 4 // nbytes + samples * tokens * hidden * 4 * TUNE_ACTIVATION_FACTOR)
    return TuningMemory(kept, (kept + 1) * per_call, recording, training)


# --- The check before calibrating ---------------------------------------------------------------------------


def _suggestions(model, config, device, fits) -> list[str]:
    """Concrete ways out, each only if the planner says it fits."""
    from dataclasses import replace

    from .pipelines import DTYPES

    tips = []
    most = _num_units(model.transformer if hasattr(model, "transformer") else model, config)
    current = config.packages if isinstance(config.packages, int) else most  # "blocks": suggest no more
    for packages in sorted({min(current * f, most) for f in (2, 4, 8, 16)} | {most}):
        if packages > current and fits(plan_memory(model, replace(config, packages=packages), device)):
            tips.append(f"--packages {packages}")
            break
    if _device_key(device) != "cpu" and config.hessian_device in (None, str(device), _device_key(device)):
        if fits(plan_memory(model, replace(config, hessian_device="cpu"), device)):
            tips.append("--hessian-device cpu")
    param = next((model.transformer if hasattr(model, "transformer") else model).parameters())
    if param.dtype == torch.float32:
        for name in ("bfloat16", "float16"):
            if fits(plan_memory(model, config, device, dtype=DTYPES[name])):
                tips.append(f"--dtype {name}")
                break
    if config.batch_size > 1 and fits(plan_memory(model, replace(config, batch_size=1), device)):
        tips.append("--batch-size 1")
    return tips


def check_memory(pipe, config, device=None, available=None) -> Plan:
    """Refuse (ValueError, with suggestions) a run whose estimated peak exceeds the free memory.

    The pipeline is already loaded, so its bytes are subtracted from the estimate on its own device:
    the free memory reported now is what calibration and the solves still need.
    """
    device = device or next(pipe.transformer.parameters()).device
    available = available or available_memory
    plan = plan_memory(pipe, config, device)
    compute = _device_key(device)
    free = {d: available(config.cache_device if d == "disk" else d if d != compute else device) for d in plan.devices}

    def need(p: Plan, dev: str) -> int:
        return p.peak_bytes(dev) - (p.model_bytes if dev == compute else 0)

    def fits(p: Plan) -> bool:
        return all(free.get(d) is None or need(p, d) <= free[d] for d in p.devices)

    if fits(plan):
        return plan
    dev = next(d for d in plan.devices if free.get(d) is not None and need(plan, d) > free[d])
    tips = _suggestions(pipe, config, device, fits)
    advice = "try " + " or ".join(tips) if tips else "use a machine with more memory, or prune fewer --blocks"
    raise ValueError(
        f"not enough memory on {dev}: pruning needs an estimated {format_bytes(need(plan, dev))} on top of the loaded "
        f"model ({plan.peak_phase(dev)}; Hessians "
        f"{format_bytes(max(p.hessian_bytes for p in plan.packages))}), but only {format_bytes(free[dev])} is free; "
        f"{advice} (see `obsdiff plan`)"
    )


def format_bytes(nbytes: float) -> str:
    """Bytes as a short string: '2.15 GB', '188.7 MB' (decimal units from 1 MB), '16.0 KiB' below."""
    if nbytes >= GB:
        return f"{nbytes / GB:.2f} GB"
    if nbytes >= 1e6:
        return f"{nbytes / 1e6:.1f} MB"
    return f"{nbytes / 1024:.1f} KiB"


# --- Planning without weights: local directories and full-size names --------------------------------------------

# Public configs of the non-transformer components of the full-size pipelines (shapes only).
_CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
               projection_dim=768, vocab_size=49408, max_position_embeddings=77, hidden_act="quick_gelu")
_CLIP_G = dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32,
               projection_dim=1280, vocab_size=49408, max_position_embeddings=77, hidden_act="gelu")
_T5_XXL = dict(d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24, vocab_size=32128,
               feed_forward_proj="gated-gelu", relative_attention_num_buckets=32)
_VAE_16 = dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
               down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
               layers_per_block=2, norm_num_groups=32, use_quant_conv=False, use_post_quant_conv=False)
FULL_SIZE_COMPONENTS: dict[str, dict[str, tuple[str, dict]]] = {
    "sd3": {"text_encoder": ("CLIPTextModelWithProjection", _CLIP_L),
            "text_encoder_2": ("CLIPTextModelWithProjection", _CLIP_G),
            "text_encoder_3": ("T5EncoderModel", _T5_XXL), "vae": ("AutoencoderKL", _VAE_16)},
    "flux": {"text_encoder": ("CLIPTextModel", _CLIP_L), "text_encoder_2": ("T5EncoderModel", _T5_XXL),
             "vae": ("AutoencoderKL", _VAE_16)},
}


def _meta_module(class_name: str, config: dict) -> nn.Module:
    import diffusers
    import transformers

    with torch.device("meta"):
        if hasattr(diffusers, class_name) and not hasattr(transformers, class_name):
            return getattr(diffusers, class_name)(**config)
        cls = getattr(transformers, class_name)
        config_cls = {"T5EncoderModel": transformers.T5Config}.get(class_name, transformers.CLIPTextConfig)
        return cls(config_cls(**config))


@functools.lru_cache(maxsize=None)
def component_parameters(arch: str) -> dict[str, int]:
    """Parameter counts of a full-size pipeline's text encoders and VAE (built on the meta device)."""
    return {name: sum(p.numel() for p in _meta_module(*spec).parameters())
            for name, spec in FULL_SIZE_COMPONENTS[arch].items()}


def _safetensors_numel(directory: Path) -> tuple[int, int]:
    """(floating, other) element counts of every *.safetensors under ``directory`` (headers only)."""
    import struct

    floating = other = 0
    for file in directory.rglob("*.safetensors"):
        with open(file, "rb") as f:
            header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
        for key, info in header.items():
            if key == "__metadata__":
                continue
            numel = 1
            for s in info["shape"]:
                numel *= int(s)
            if info["dtype"] in ("F16", "BF16", "F32", "F64", "F8_E4M3", "F8_E5M2"):
                floating += numel
            else:
                other += numel * {"I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}.get(info["dtype"], 8)
    return floating, other


def load_plan_model(model: str | Path) -> tuple[nn.Module, dict]:
    """A transformer on the meta device plus what the planner needs (call, sizes), without loading weights.

    ``model`` is a full-size name (``arch.FULL_SIZE_CONFIGS``) or a local pipeline directory.
    Returns (transformer, info) with info keys: call, model_numel (floating), model_other_bytes,
    tokenizer_max_length, vae_scale_factor.
    """
    from .arch import FULL_SIZE_CONFIGS, arch_for_transformer, build_full_size_transformer

    if str(model) in FULL_SIZE_CONFIGS:
        transformer = build_full_size_transformer(str(model))
        arch = arch_for_transformer(transformer).name
        numel = sum(p.numel() for p in transformer.parameters()) + sum(component_parameters(arch).values())
        side = 512  # the paper's calibration resolution
        return transformer, {"call": {"height": side, "width": side}, "model_numel": numel, "model_other_bytes": 0,
                             "tokenizer_max_length": _CLIP_TOKENS, "vae_scale_factor": 8}
    from .pipelines import (_pipeline_class_name, _saved_structure, call_kwargs, generation_config, read_json_object,
                            resolve_model_path)

    path = Path(resolve_model_path(model))
    if not path.is_dir():
        raise ValueError(
            f"{str(model)!r} is neither a local pipeline directory nor a known architecture "
            f"({', '.join(FULL_SIZE_CONFIGS)}); `obsdiff plan` never downloads weights"
        )
    import diffusers

    from .arch import arch_for_pipeline_class

    arch_for_pipeline_class(_pipeline_class_name(path))
    index = read_json_object(path / "model_index.json")
    cls = getattr(diffusers, index["transformer"][1])
    with torch.device("meta"):
        transformer = cls.from_config(cls.load_config(path / "transformer"))
    structure = _saved_structure(path)
    if structure:
        from .surgery import apply_structure

        apply_structure(transformer, structure)
    floating, other = _safetensors_numel(path)
    tok_len = _CLIP_TOKENS
    tok_config = path / "tokenizer" / "tokenizer_config.json"
    if tok_config.is_file():
        tok_len = int(json.loads(tok_config.read_text()).get("model_max_length", _CLIP_TOKENS))
        tok_len = tok_len if tok_len < 1_000_000 else _CLIP_TOKENS
    vae_config = path / "vae" / "config.json"
    scale = 2 ** (len(json.loads(vae_config.read_text())["block_out_channels"]) - 1) if vae_config.is_file() else 8
    return transformer, {"call": call_kwargs(generation_config(path)), "model_numel": floating,
                         "model_other_bytes": other, "tokenizer_max_length": tok_len, "vae_scale_factor": scale}


def plan_for(model: str | Path, config, device="cpu", dtype="float32", batch_size: int | None = None,
             height: int | None = None, width: int | None = None, text_tokens: int | None = None) -> Plan:
    """``plan_memory`` for a full-size name or a local directory, without loading any weights."""
    from .arch import arch_for_transformer
    from .pipelines import resolve_call, resolve_dtype

    transformer, info = load_plan_model(model)
    dtype = resolve_dtype(dtype)
    call = resolve_call(info["call"], config.steps, config.guidance)
    arch = arch_for_transformer(transformer).name
    tokens = default_geometry(transformer, arch, call, height, width, text_tokens, info["tokenizer_max_length"],
                              info["vae_scale_factor"])
    nbytes = torch.empty((), dtype=dtype).element_size()
    model_bytes = info["model_numel"] * nbytes + info["model_other_bytes"]
    return plan_memory(transformer, config, device, batch_size, tokens, dtype=dtype, call=call, model_bytes=model_bytes)

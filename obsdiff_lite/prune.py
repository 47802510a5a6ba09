"""One entry point: prune an SD3/Flux pipeline with OBS-Diff (or a baseline) and get a report back.

    report = prune(pipe, PruneConfig(method="obs-diff", sparsity=0.5, packages=4))

Module packages (paper Sec. 4.2): the target units are split into G contiguous groups in block
order; for each group one calibration pass over the prompts collects all its Hessians through the
real pipeline, then the group is pruned before the next one is calibrated, so later groups see the
already-pruned earlier ones.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import numbers
import platform
import resource
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .arch import Block, arch_for_transformer, block_units, blocks, get_linear, parse_block_range
from .baselines import dsnot_prune, magnitude_prune, wanda_prune
from .calibrate import HESSIAN_INPUTS, DenseReference, StepTracker, calibrate
from .distributed import all_equal, broadcast_module_, rank_and_world
from .hessian import input_variance, wanda_input_norm
from .obs import (REFIT_ITERS, admm_sparsify_weights, cast_weight, check_sparsity_args, dense_target_weights,
                  parse_pattern, sparsify_weights)
from .pipelines import DATA_DIR, check_guidance, check_prompts, check_seed, parse_device, pipeline_call, resolve_device
from .schedules import WEIGHTINGS, timestep_weights
from .tune import TUNE_LR, TUNE_MAX_CALLS, tune_blocks

log = logging.getLogger(__name__)

METHODS = ("obs-diff", "sparsegpt", "wanda", "dsnot", "magnitude", "l1-norm")
STRUCTURED_METHODS = ("obs-diff", "l1-norm")
CALIBRATIONS = ("exact", "cached")  # pattern "structured": whole heads and FFN neurons
SOLVERS = ("obs", "admm")  # unstructured / N:M OBS methods: the paper's one-pass OBS, or OBS then ADMM (obs.py)
HEAD_SELECTIONS = ("saliency", "trajectory")  # structured: how heads are chosen (structured.prune_heads_obs)
PER_BLOCK = "blocks"  # packages="blocks": one module package per transformer block
HEAD_CANDIDATES = TRAJECTORY_PROMPTS = 4  # --head-selection trajectory: heads tried per removal, prompts per trial
PROMPTS_DIR = DATA_DIR / "prompts"


# PruneConfig's scalar annotations -> accepted Python types and how a message names them (PruneConfig._validate_types).
_SCALAR_TYPES = {"bool": ((bool, np.bool_), "True or False"), "int": ((numbers.Integral,), "an integer"),
                 "float": ((numbers.Real,), "a number"), "str": ((str,), "a string")}


@dataclass
class PruneConfig:
    """Everything that determines a pruning run (recorded verbatim in obsdiff.json)."""

    method: str = "obs-diff"
    pattern: str = "unstructured"  # unstructured | N:M (2:4, 4:8) | structured (heads and FFN neurons)
    sparsity: float | None = 0.5  # None with N:M: implied by the pattern
    head_sparsity: float | None = None  # structured only: fraction of heads removed per block (default: sparsity)
    ffn_sparsity: float | None = None  # structured only: fraction of FFN neurons removed (default: sparsity)
    ffn_multiple: int | None = None  # structured only: kept FFN widths rounded to this (None: 64 for full-size FFNs)
    head_selection: str = "saliency"  # structured obs-diff: saliency (paper: RRF of OBS saliencies) | trajectory
    head_candidates: int = HEAD_CANDIDATES  # trajectory selection: the cheapest heads by saliency tried per removal
    trajectory_prompts: int = TRAJECTORY_PROMPTS  # trajectory selection: calibration prompts sampled per trial
    weighting: str = "log-decrease"
    weight_range: tuple[float, float] = (0.8, 1.2)
    packages: int | str = 4  # module packages, or "blocks": one per transformer block
    num_prompts: int = 16
    prompts: list[str] | None = None  # explicit prompts (overrides num_prompts / the default source)
    steps: int | None = None  # default: the model's generation.json (or the pipeline default)
    guidance: float | None = None
    seed: int = 0
    blocks: str | None = None  # "START:END", END exclusive
    damp: float = 0.01
    block_size: int = 128
    batch_size: int = 8
    hessian_device: str | None = None  # e.g. "cpu" to keep Hessians off the GPU
    calibration: str = "exact"  # exact: the paper's re-run per package | cached: one trajectory (cached.py)
    refresh_every: int = 0  # cached mode: re-run the trajectory with the current model every K packages
    cache_device: str | None = None  # cached mode / --tune-iters: where block inputs are kept (default: model's device)
    hessian_inputs: str = "plain"  # plain (paper) | guided | guided-image: CFG-combined inputs (calibrate.py)
    refit: bool = False  # beyond the paper: least-squares re-fit of the kept weights after OBS (obs.refit_kept_weights)
    sparsity_ramp: float = 0.0  # beyond the paper: unstructured sparsity from s - ramp (first block) to s + ramp (last)
    block_sparsity: list[float] | None = None  # beyond the paper: one unstructured sparsity per selected block (sparsity=None)
    dense_targets: bool = False  # beyond the paper: OBS targets the dense model's layer outputs (obs.dense_target_weights)
    solver: str = "obs"  # beyond the paper: "admm" refines OBS's masks and weights (obs.admm_sparsify_weights)
    tune_iters: int = 0  # beyond the paper: Adam steps per block towards the dense block outputs after pruning (tune.py)
    tune_lr: float = TUNE_LR
    tune_max_calls: int = TUNE_MAX_CALLS  # recorded transformer calls per block for the tuning

    def validate(self) -> None:
        """Refuse impossible settings with one readable line each."""
        self._validate_types()
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.pattern == "structured":
            self._validate_structured()
        elif self.method == "l1-norm":
            raise ValueError("method l1-norm removes whole heads and neurons; use it with --pattern structured")
        elif self.head_sparsity is not None or self.ffn_sparsity is not None:
            raise ValueError("--head-sparsity / --ffn-sparsity apply only to --pattern structured")
        elif self.head_selection != "saliency" or self.ffn_multiple is not None:
            raise ValueError("--head-selection / --ffn-multiple apply only to --pattern structured")
        else:
            self._validate_sparsity()
        if self.sparsity_ramp and self.pattern != "unstructured":
            raise ValueError("--sparsity-ramp varies the unstructured sparsity over depth; N:M and structured pruning "
                             "remove the same share in every block")
        if self.block_sparsity is not None:
            self._validate_block_sparsity()
        if self.dense_targets:
            self._validate_dense_targets()
        if self.solver != "obs":
            self._validate_solver()
        if self.head_selection != "trajectory" and (self.head_candidates, self.trajectory_prompts) != (
                HEAD_CANDIDATES, TRAJECTORY_PROMPTS):
            raise ValueError("--head-candidates / --trajectory-prompts set up trajectory head selection, which is off; "
                             "add --pattern structured --head-selection trajectory or drop them")
        if self.tune_iters:
            self._validate_tuning()
        elif self.tune_lr != TUNE_LR or self.tune_max_calls != TUNE_MAX_CALLS:
            raise ValueError("--tune-lr / --tune-max-calls set up block tuning, which is off; add --tune-iters N "
                             "(e.g. 200) or drop them")
        if self.refit and self.pattern == "structured":
            raise ValueError("--refit applies to unstructured and N:M pruning; structured OBS already solves its kept "
                             "weights exactly")
        self._validate_common()

    def _validate_types(self) -> None:
        """Every scalar setting has its annotated type (Python callers; the CLI parses them): refit="no" would run the
        re-fit, steps=2.5 or damp="0.01" would fail deep inside a run. Numpy numbers count; bools are no numbers."""
        for f in fields(self):
            base, optional, _ = f.type.partition(" | None")
            value = getattr(self, f.name)
            if base not in _SCALAR_TYPES or (value is None and optional):
                continue
            kinds, description = _SCALAR_TYPES[base]
            description = "a 'START:END' string such as '2:25'" if f.name == "blocks" else description
            if f.name.endswith("_device"):
                kinds = (*kinds, torch.device)
            if not isinstance(value, kinds) or (base != "bool" and isinstance(value, (bool, np.bool_))):
                raise ValueError(f"{f.name} must be {description}{' or None' if optional else ''}, got {value!r}")
        pair = self.weight_range if isinstance(self.weight_range, (tuple, list)) else ()
        if len(pair) != 2 or not all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in pair):
            raise ValueError(f"weight_range must be two numbers (MIN, MAX), e.g. (0.8, 1.2), got {self.weight_range!r}")

    def _validate_structured(self) -> None:
        """Structured pruning: obs-diff or l1-norm, and a head and an FFN sparsity in [0, 1)."""
        if self.method not in STRUCTURED_METHODS:
            raise ValueError(
                f"method {self.method} does not remove whole heads or neurons; with --pattern structured use "
                f"{' or '.join(STRUCTURED_METHODS)}"
            )
        for label, value in (("head", self.head_sparsity), ("FFN", self.ffn_sparsity)):
            value = self.sparsity if value is None else value
            if value is None or not (0.0 <= float(value) < 1.0):
                raise ValueError(f"structured {label} sparsity must be in [0, 1) (e.g. 0.3 for 30%), got {value}")
        if self.head_selection not in HEAD_SELECTIONS:
            raise ValueError(f"unknown head selection {self.head_selection!r}; choose one of {', '.join(HEAD_SELECTIONS)}")
        if self.head_selection == "trajectory" and self.method != "obs-diff":
            raise ValueError("--head-selection trajectory refines OBS saliencies; use it with --method obs-diff")
        for label, value in (("head_candidates", self.head_candidates), ("trajectory_prompts", self.trajectory_prompts)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{label} must be a positive integer, got {value!r}")
        if self.ffn_multiple is not None and (isinstance(self.ffn_multiple, bool) or not isinstance(self.ffn_multiple, int)
                                              or self.ffn_multiple < 1):
            raise ValueError(f"ffn_multiple must be a positive integer (e.g. 64; 1 = no rounding), got {self.ffn_multiple!r}")

    def _validate_sparsity(self) -> None:
        """Unstructured / N:M: the pattern parses and the sparsity fits it."""
        kind, n, m = parse_pattern(self.pattern)
        if self.block_sparsity is not None and kind == "unstructured":
            return  # the per-block values replace the sparsity (_validate_block_sparsity)
        if kind == "nm":
            if self.sparsity not in (None, n / m):
                raise ValueError(f"pattern {self.pattern} implies sparsity {n / m:g}; drop --sparsity or set it to {n / m:g}")
        elif self.sparsity is None or not (0.0 <= float(self.sparsity) < 1.0):
            raise ValueError(f"sparsity must be in [0, 1) (e.g. 0.5 for 50%), got {self.sparsity}")

    def _validate_block_sparsity(self) -> None:
        """Per-block sparsities: unstructured only, instead of a sparsity or a ramp, each value in [0, 1)."""
        if self.pattern != "unstructured":
            raise ValueError("--block-sparsity sets unstructured sparsities per block; N:M and structured pruning "
                             "remove the same share in every block")
        if self.sparsity is not None or self.sparsity_ramp:
            raise ValueError("--block-sparsity replaces --sparsity and --sparsity-ramp; give one of them "
                             "(in Python: PruneConfig(sparsity=None, block_sparsity=[...]))")
        values = list(self.block_sparsity)
        if not values or not all(isinstance(v, (int, float)) and 0.0 <= float(v) < 1.0 for v in values):
            raise ValueError(f"--block-sparsity needs one value in [0, 1) per selected block, got {values}")

    def _validate_dense_targets(self) -> None:
        """Dense targets move the weights that OBS then prunes: OBS methods, unstructured or N:M, exact calibration."""
        if self.method not in ("obs-diff", "sparsegpt"):
            raise ValueError(f"--dense-targets changes the weights OBS compensates towards; method {self.method} has "
                             "no OBS update (use obs-diff or sparsegpt)")
        if self.pattern == "structured":
            raise ValueError("--dense-targets applies to unstructured and N:M pruning")
        if self.calibration != "exact":
            raise ValueError("--dense-targets runs a dense copy next to every calibration pass; use --calibration exact")

    def _validate_solver(self) -> None:
        """ADMM refines an OBS solution: OBS methods, unstructured or N:M."""
        if self.solver not in SOLVERS:
            raise ValueError(f"unknown solver {self.solver!r}; choose one of {', '.join(SOLVERS)}")
        if self.method not in ("obs-diff", "sparsegpt"):
            raise ValueError(f"--solver admm refines an OBS solution; method {self.method} has none (use obs-diff or "
                             "sparsegpt)")
        if self.pattern == "structured":
            raise ValueError("--solver admm applies to unstructured and N:M pruning; structured OBS already solves its "
                             "kept weights exactly")

    def _validate_tuning(self) -> None:
        """Block tuning keeps the zeros of unstructured and N:M masks; it needs a positive step count and step size."""
        if isinstance(self.tune_iters, bool) or not isinstance(self.tune_iters, int) or self.tune_iters < 0:
            raise ValueError(f"tune_iters must be an integer >= 0 (0: no block tuning), got {self.tune_iters!r}")
        if self.pattern == "structured":
            raise ValueError("--tune-iters applies to unstructured and N:M pruning")
        if not (self.tune_lr > 0 and math.isfinite(self.tune_lr)):
            raise ValueError(f"tune_lr must be a finite number > 0 (e.g. {TUNE_LR}), got {self.tune_lr}")
        if isinstance(self.tune_max_calls, bool) or not isinstance(self.tune_max_calls, int) or self.tune_max_calls < 1:
            raise ValueError(f"tune_max_calls must be an integer >= 1, got {self.tune_max_calls!r}")

    def _validate_common(self) -> None:
        """Settings shared by every pattern."""
        check_seed(self.seed)
        if self.hessian_inputs not in HESSIAN_INPUTS:
            raise ValueError(f"unknown hessian inputs {self.hessian_inputs!r}; choose one of {', '.join(HESSIAN_INPUTS)}")
        if self.calibration not in CALIBRATIONS:
            raise ValueError(f"unknown calibration {self.calibration!r}; choose one of {', '.join(CALIBRATIONS)}")
        if self.calibration == "cached" and self.pattern == "structured":
            raise ValueError("--calibration cached supports unstructured and N:M patterns; use exact for structured")
        if self.refresh_every < 0:
            raise ValueError(f"refresh_every must be >= 0, got {self.refresh_every}")
        if self.refresh_every and self.calibration != "cached":
            raise ValueError("--refresh-every re-samples cached calibration's trajectory; add --calibration cached or "
                             "drop it")
        if self.hessian_device is not None:
            parse_device(self.hessian_device, "--hessian-device")
        if self.cache_device is not None and not str(self.cache_device).startswith("disk"):
            parse_device(self.cache_device, "--cache-device")  # or disk / disk:DIR
        if self.cache_device is not None and self.calibration != "cached" and not self.tune_iters:
            raise ValueError("--cache-device keeps the block inputs of --calibration cached and of --tune-iters; with "
                             "neither it has nothing to keep (drop it)")
        check_guidance(self.guidance)
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"unknown weighting {self.weighting!r}; choose one of {', '.join(WEIGHTINGS)}")
        lo, hi = self.weight_range
        if not (0 <= lo <= hi and math.isfinite(hi)):
            raise ValueError(f"--weight-range needs finite 0 <= MIN <= MAX, got {lo} {hi}")
        if hi == 0 and self.effective_weighting != "uniform":
            raise ValueError(f"--weight-range {lo:g} {hi:g} gives every denoising step weight 0, so no calibration input "
                             "would count; give a positive MAX (the paper: 0.8 1.2)")
        if self.packages != PER_BLOCK and (isinstance(self.packages, bool) or not isinstance(self.packages, int)
                                           or self.packages < 1):
            raise ValueError(f"packages must be an integer >= 1 or {PER_BLOCK!r} (one per block), got {self.packages!r}")
        if self.prompts is not None:
            check_prompts(self.prompts)
        if self.prompts is None and self.num_prompts < 1:
            raise ValueError(f"num_prompts must be >= 1, got {self.num_prompts}")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not math.isfinite(self.sparsity_ramp):
            raise ValueError(f"sparsity_ramp must be a finite number (e.g. 0.1), got {self.sparsity_ramp}")
        if not (self.damp >= 0 and math.isfinite(self.damp)):  # also refuses NaN, which compares false
            raise ValueError(f"damp must be a finite number >= 0 (e.g. 0.01 = 1% of the mean Hessian diagonal), "
                             f"got {self.damp}")
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size < 1:
            raise ValueError(f"block_size must be a positive integer (e.g. 128), got {self.block_size!r}")

    def check_step_weights(self, num_steps: int) -> None:
        """Refuse a weighting that gives all ``num_steps`` denoising steps weight 0 (e.g. log-increase over one step
        from MIN 0): no calibration input would count. Methods that read no calibration data pass."""
        if self.method in ("magnitude", "l1-norm") and not self.refit:
            return
        weights = timestep_weights(self.effective_weighting, num_steps, *self.weight_range)
        if not float(weights.sum()) > 0:
            lo, hi = self.weight_range
            raise ValueError(f"--weighting {self.effective_weighting} --weight-range {lo:g} {hi:g} gives all "
                             f"{num_steps} denoising step(s) weight 0, so no calibration input would count; give a "
                             "positive MIN or more --steps")

    @property
    def effective_weighting(self) -> str:
        """SparseGPT is OBS with uniform timestep weights; the others use the configured weighting."""
        return "uniform" if self.method == "sparsegpt" else self.weighting


@dataclass
class Target:
    """One input group of one unit: linears that read the same tensor (one shared Hessian)."""

    block: Block
    names: list[str]

    @property
    def key(self) -> str:
        return f"{self.block.name}.{self.names[0]}"

    def linears(self) -> list[tuple[str, nn.Linear]]:
        return [(f"{self.block.name}.{n}", get_linear(self.block.module, n)) for n in self.names]


def ramped_sparsities(sparsity: float, ramp: float, weights: list[int]) -> list[float]:
    """Per-block sparsities rising linearly by 2 * ramp from the first block to the last, shifted so that the
    weight-count-weighted mean is exactly ``sparsity`` (blocks may hold different numbers of targeted weights).

    Beyond the paper, which prunes every layer alike: early blocks are the most sensitive (README, "Which blocks 2:4
    hurts most"), so a positive ramp prunes them less and the late blocks more; a negative one does the reverse.
    """
    k = len(weights)
    raw = [sparsity + ramp * (2 * i / (k - 1) - 1) if k > 1 else sparsity for i in range(k)]
    shift = sparsity - sum(w * r for w, r in zip(weights, raw)) / sum(weights)
    out = [r + shift for r in raw]
    if not all(0.0 <= x < 1.0 for x in out):
        raise ValueError(f"--sparsity-ramp {ramp:g} around sparsity {sparsity:g} asks for block sparsities from "
                         f"{min(out):.3f} to {max(out):.3f}; every block needs one in [0, 1): use a smaller ramp")
    return out


def per_block_sparsity(config: PruneConfig, selected: list[Block], block_weights: dict[str, int],
                       n: int) -> dict[str, float]:
    """Each selected block's sparsity: the config's (0 for N:M, whose pattern implies it), ramped over depth (by the
    blocks' targeted weights, ``block_weights``), or the explicit ``block_sparsity`` list (one value per selected
    block, checked here where the blocks are known)."""
    if config.block_sparsity is not None:
        values = [float(v) for v in config.block_sparsity]
        if len(values) != len(selected):
            raise ValueError(f"--block-sparsity has {len(values)} values but {len(selected)} blocks are selected "
                             f"(blocks {selected[0].index}-{selected[-1].index}); give one value per block")
        return {b.name: v for b, v in zip(selected, values)}
    if n:
        return {b.name: 0.0 for b in selected}
    if not config.sparsity_ramp:
        return {b.name: float(config.sparsity) for b in selected}
    ramped = ramped_sparsities(float(config.sparsity), config.sparsity_ramp, list(block_weights.values()))
    return dict(zip(block_weights, ramped))


def read_prompts(path: str | Path) -> list[str]:
    """Non-empty, stripped lines of a prompt file (or the strings of a .json list); clear errors for a missing or
    empty file and for data formats whose markup would be read as prompts."""
    path = Path(path)
    if not path.is_file():
        why = "is a directory" if path.is_dir() else "does not exist"
        raise ValueError(f"prompt file {str(path)!r} {why}; give a text file with one prompt per line")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"prompt file {str(path)!r} is not UTF-8 text ({exc.reason} at byte {exc.start}); save it as "
                         "UTF-8, one prompt per line") from None
    suffix = path.suffix.lower()
    if suffix == ".json":  # a JSON list of strings; read line by line it would calibrate on '[' and '"a cat",'
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"prompt file {str(path)!r} is not valid JSON ({exc.msg}, line {exc.lineno})") from None
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ValueError(f"prompt file {str(path)!r} must hold a JSON list of strings, or be a text file with one "
                             "prompt per line")
        lines = value
    elif suffix in (".jsonl", ".csv", ".tsv", ".parquet", ".yaml", ".yml"):
        raise ValueError(f"prompt file {str(path)!r} is a {suffix} file, read as plain text its markup would become "
                         "prompts; give a text file with one prompt per line (or a .json list of strings)")
    else:
        lines = text.splitlines()
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise ValueError(f"prompt file {str(path)!r} has no prompts; put one prompt per line")
    return prompts


def default_prompts(pipe, num: int, seed: int) -> list[str]:
    """Calibration prompts: shapes captions for the tiny world, else the project's shipped prompt list."""
    if getattr(pipe, "obsdiff_generation", {}).get("_prompts") == "shapes":
        from .shapes.dataset import balanced_specs

        # Seeds 10_000+ keep calibration prompts apart from evaluation prompts (ShapeBench uses small seeds).
        return [s.caption() for s in balanced_specs(num, seed=10_000 + seed)]
    prompts = read_prompts(PROMPTS_DIR / "calibration.txt")
    if num > len(prompts):  # not silently fewer than asked for
        raise ValueError(f"--num-prompts {num} asks for more than the {len(prompts)} prompts of the shipped list "
                         f"{PROMPTS_DIR / 'calibration.txt'}; use --num-prompts {len(prompts)} or less, or --prompts "
                         "FILE")
    return prompts[:num]


def package_units(selected: list[Block], num_packages: int | str) -> list[list[list[Target]]]:
    """Units of the selected blocks in block order, cut into ``num_packages`` contiguous near-equal chunks
    (``"blocks"``: one package per block, whatever its number of units)."""
    per_block = [[[Target(b, group) for group in unit] for unit in block_units(b)] for b in selected]
    if num_packages == PER_BLOCK:
        return [units for units in per_block if units]
    units = [unit for block_units_ in per_block for unit in block_units_]
    if num_packages > len(units):
        raise ValueError(
            f"packages={num_packages} but the selected blocks have only {len(units)} units; use 1..{len(units)}"
        )
    bounds = np.linspace(0, len(units), num_packages + 1).round().astype(int)
    return [units[bounds[i] : bounds[i + 1]] for i in range(num_packages)]


def _groups_by_block(targets: list[Target]) -> list[tuple[Block, dict[str, nn.Linear]]]:
    """(block, {key: first linear of each input group}) for the blocks ``targets`` touch, in block order."""
    out: list[tuple[Block, dict[str, nn.Linear]]] = []
    for t in targets:
        if not out or out[-1][0].index != t.block.index:
            out.append((t.block, {}))
        out[-1][1][t.key] = t.linears()[0][1]
    return out


def _peak_memory_bytes(device: torch.device) -> int:
    """The report's "peak_memory_bytes"; what it measures is said by ``peak_memory_scope``."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    # ru_maxrss is KiB on Linux, bytes on macOS.
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def peak_memory_scope(device: torch.device) -> str:
    """The report's "peak_memory_scope": the two peaks are not alike, and a CPU one says little about this run."""
    if device.type == "cuda":
        return "CUDA allocator peak on the model's GPU during this prune (tensors only, not the allocator's cache)"
    return ("the process's resident-memory high-water mark (CPU): it includes everything the process held before "
            "this prune; `obsdiff plan` estimates what the run itself needs")


def _prune_group(linears: list[tuple[str, nn.Linear]], config: PruneConfig, sparsity: float, n: int, m: int,
                 acc, drift=None) -> dict[str, dict]:
    """Prune the linears of one input group in place to ``sparsity`` (0 for N:M, which implies its own) by the
    configured method; return their per-layer records.

    OBS methods solve the group in one call (one shared Hessian: one Cholesky factor, one column loop). With a
    ``drift`` (a DriftAccumulator, --dense-targets) the weights are first moved to absorb the drift of their inputs.
    """
    weights = [linear.weight.data for _, linear in linears]
    shifts = [{} for _ in weights]
    if drift is not None:  # one solve for the whole group (its rows share H and the drift)
        stacked = torch.cat(weights) if len(weights) > 1 else weights[0]
        moved, _ = dense_target_weights(stacked, acc.hessian, drift.drift, config.damp,
                                        name=", ".join(name for name, _ in linears))
        parts = moved.split([w.shape[0] for w in weights])
        shifts = [{"dense_target_shift": float((new - old).float().norm() / old.float().norm().clamp_min(1e-30))}
                  for new, old in zip(parts, weights)]
        weights = list(parts)
    refit_iters = REFIT_ITERS if config.refit else 0
    if config.method == "magnitude":
        results = [(*magnitude_prune(w, sparsity, n, m), {}) for w in weights]
    elif config.method == "wanda":
        norm = wanda_input_norm(acc)
        results = [(*wanda_prune(w, norm.to(w.device), sparsity, n, m), {}) for w in weights]
    elif config.method == "dsnot":
        stats = [s.to(weights[0].device) for s in (acc.input_mean, input_variance(acc), wanda_input_norm(acc))]
        results = [(*dsnot_prune(w, *stats, sparsity, n, m), {}) for w in weights]
    elif config.solver == "admm":  # ends with the re-fit on its own mask, so --refit adds nothing
        results = admm_sparsify_weights(weights, acc.hessian, sparsity, n, m, config.block_size, config.damp,
                                        names=[name for name, _ in linears])
    else:
        results = sparsify_weights(weights, acc.hessian, sparsity, n, m, config.block_size, config.damp,
                                   names=[name for name, _ in linears], refit_iters=refit_iters)
    if refit_iters and config.method in ("magnitude", "wanda", "dsnot"):
        # The baseline's mask, with its kept weights solved by least squares (OBS pass with the mask fixed, then the
        # re-fit): separates what the mask costs from what the missing weight update costs. Inputs that never fire
        # are zeroed as in OBS; only magnitude's mask can have kept weights there.
        results = sparsify_weights(weights, acc.hessian, block_size=config.block_size, damp=config.damp,
                                   keep_masks=[keep for _, keep, _ in results], names=[name for name, _ in linears],
                                   refit_iters=refit_iters)
    records = {}
    for (name, linear), (new, _, stats), shift in zip(linears, results, shifts):
        linear.weight.data.copy_(cast_weight(new, linear.weight.dtype, name))
        record = {"shape": list(linear.weight.shape), "sparsity": float((linear.weight.data == 0).float().mean())}
        record.update(shift)
        record.update({k: (float(v) if isinstance(v, (int, float)) else v) for k, v in stats.items() if k != "sparsity"})
        records[name] = record
    return records


def prune(pipe, config: PruneConfig | None = None, progress: bool = True, check_memory: bool = True) -> dict:
    """Prune ``pipe.transformer`` in place; return a JSON-ready report (settings, per-layer stats, timings).

    ``check_memory``: refuse (ValueError) before calibrating when the memory plan (``plan.py``) exceeds
    the free memory. Under torch.distributed every rank calls this; calibration is sharded across the
    ranks and rank 0's pruned weights are broadcast after each package (``distributed.py``).
    """
    config = config or PruneConfig()
    if not isinstance(config, PruneConfig):
        raise TypeError(f"prune() takes a PruneConfig, got {type(config).__name__} (e.g. PruneConfig(sparsity=0.5))")
    if not hasattr(pipe, "transformer"):
        raise TypeError(f"prune() takes a diffusers SD3/Flux pipeline (with a .transformer), got {type(pipe).__name__}; "
                        "load one with obsdiff_lite.pipelines.load_pipeline")
    if getattr(pipe, "obsdiff_partial", None):
        log.warning("this pipeline was left partially pruned by a prune() that stopped half way (%s): some blocks are "
                    "pruned, others not, and this run prunes the pruned ones again; reload it with load_pipeline() to "
                    "start from its saved weights", pipe.obsdiff_partial)
    config.validate()
    config.check_step_weights(pipeline_call(pipe, config.steps, config.guidance)["num_inference_steps"])
    for option, where in (("--hessian-device", config.hessian_device), ("--cache-device", config.cache_device)):
        if where is not None and not str(where).startswith("disk"):
            resolve_device(where, option)  # a device this machine has
    if config.cache_device is not None and str(config.cache_device).startswith("disk:"):
        folder = Path(str(config.cache_device)[5:])
        if not folder.is_dir():
            raise ValueError(f"--cache-device {config.cache_device}: {folder} is not an existing directory; create it "
                             "or use plain 'disk' (the system's temporary directory)")
    world = rank_and_world()[1]
    if world > 1 and config.calibration == "cached":
        raise ValueError("--calibration cached is not sharded across ranks; run it in one process or use exact")
    if world > 1 and config.dense_targets:
        raise ValueError("--dense-targets is not sharded across ranks; run it in one process")
    if world > 1 and config.tune_iters:
        raise ValueError("--tune-iters is not sharded across ranks; run it in one process")
    if check_memory:
        from .plan import check_memory as check

        check(pipe, config)
    if config.pattern == "structured":
        from .structured import prune_structured

        report = prune_structured(pipe, config, progress=progress)
        if world > 1:  # every rank solved on the same all-reduced Hessians: same structure, rank 0's weights
            if not all_equal(report["structure"]):
                raise RuntimeError("ranks disagree on the pruned structure; the solves were not deterministic")
            broadcast_module_(pipe.transformer)
        return report
    transformer = pipe.transformer
    arch = arch_for_transformer(transformer)
    all_blocks = blocks(transformer, arch)
    selected = [all_blocks[i] for i in parse_block_range(config.blocks, len(all_blocks))]
    kind, n, m = parse_pattern(config.pattern)
    packages = package_units(selected, config.packages)
    targets = [t for pkg in packages for unit in pkg for t in unit]
    block_weights = {b.name: 0 for b in selected}  # targeted weights per block, in block order
    for t in targets:
        block_weights[t.block.name] += sum(int(lin.weight.numel()) for _, lin in t.linears())
    block_sparsity = per_block_sparsity(config, selected, block_weights, n)
    # Validate every target layer before any work: a 2:4 on a width not divisible by 4 fails now, by name.
    for t in targets:
        for name, linear in t.linears():
            check_sparsity_args(linear.in_features, n / m if n else block_sparsity[t.block.name], n, m, name=name)

    call = pipeline_call(pipe, config.steps, config.guidance)
    prompts = config.prompts if config.prompts is not None else default_prompts(pipe, config.num_prompts, config.seed)
    device = next(transformer.parameters()).device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    layers: dict[str, dict] = {}
    timings = {"calibration_s": 0.0, "solve_s": 0.0}
    needs_data = config.method != "magnitude" or config.refit  # the re-fit needs the Hessians
    track_mean = config.method == "dsnot"  # only DSnoT reads the input means
    package_targets = [[t for unit in package for t in unit] for package in packages]

    # --dense-targets: a copy of the transformer as it is now, before any pruning, runs next to every calibration pass.
    dense = DenseReference(copy.deepcopy(transformer)) if config.dense_targets and needs_data else None
    # --tune-iters: the dense model's block outputs are the targets (the same copy when both need one).
    dense_copy = None
    if config.tune_iters:
        dense_copy = dense.transformer if dense is not None else copy.deepcopy(transformer).requires_grad_(False)

    def prune_package(p: int, accumulators: dict) -> None:
        t0 = time.perf_counter()
        for t in package_targets[p]:
            group = t.linears()
            sparsity = block_sparsity[t.block.name]
            drift = dense.drifts.get(t.key) if dense is not None else None
            for name, record in _prune_group(group, config, sparsity, n, m, accumulators.get(t.key), drift).items():
                layers[name] = record | {"package": p}
            for _, linear in group:
                broadcast_module_(linear)  # no-op in one process; ranks stay identical under torchrun
        accumulators.clear()  # free this package's Hessians before the next calibration pass
        timings["solve_s"] += time.perf_counter() - t0

    start = time.perf_counter()
    mark_partial(pipe, config)  # weights change from here on; cleared when the run completes
    cache_stats = None
    if needs_data and config.calibration == "cached":
        from .cached import run_cached

        cache_stats = run_cached(
            pipe, arch, [_groups_by_block(ts) for ts in package_targets], prompts, call, prune_package,
            weighting=config.effective_weighting, weight_range=tuple(config.weight_range), seed=config.seed,
            batch_size=config.batch_size, hessian_device=config.hessian_device, cache_device=config.cache_device,
            refresh_every=config.refresh_every, progress=progress, hessian_inputs=config.hessian_inputs,
            track_mean=track_mean,
        )
    else:
        for p in tqdm(range(len(packages)), desc="packages", disable=not progress):
            accumulators = {}
            if needs_data:
                t0 = time.perf_counter()
                groups = {t.key: t.linears()[0][1] for t in package_targets[p]}
                accumulators = calibrate(
                    pipe, arch, groups, prompts, call, weighting=config.effective_weighting,
                    weight_range=tuple(config.weight_range), seed=config.seed, batch_size=config.batch_size,
                    hessian_device=config.hessian_device, progress=progress, desc=f"package {p + 1}/{len(packages)}",
                    hessian_inputs=config.hessian_inputs, track_mean=track_mean, dense=dense,
                    last_block=package_targets[p][-1].block.module,
                )
                timings["calibration_s"] += time.perf_counter() - t0
            prune_package(p, accumulators)
    if dense is not None:
        dense.drifts.clear()
    tuning = None
    if dense_copy is not None:
        t0 = time.perf_counter()
        tuning = _tune(pipe, config, arch, dense_copy, selected, targets, prompts, call, progress)
        timings["tune_s"] = time.perf_counter() - t0
        del dense_copy
    timings["total_s"] = time.perf_counter() - start
    if cache_stats is not None:
        timings["calibration_s"] = timings["total_s"] - timings["solve_s"] - timings.get("tune_s", 0.0)

    pipe.obsdiff_partial = None
    pruned = sum(block_weights.values())
    zeros = sum(int((linear.weight == 0).sum()) for t in targets for _, linear in t.linears())
    if n:
        target = n / m
    elif config.sparsity is not None:
        target = float(config.sparsity)
    else:  # explicit per-block sparsities: their mean weighted by each block's targeted weights
        target = sum(block_weights[b] * s for b, s in block_sparsity.items()) / pruned
    return run_record(config, prompts, arch, call, selected, len(packages)) | {
        "target_sparsity": target,
        "achieved_sparsity": zeros / max(pruned, 1),
        "targeted_parameters": pruned,
        "block_sparsity": block_sparsity if config.sparsity_ramp or config.block_sparsity is not None else None,
        "transformer_parameters": sum(int(p.numel()) for p in transformer.parameters()),
        "layers": layers,
        "timings": timings,
        "peak_memory_bytes": _peak_memory_bytes(device),
        "peak_memory_scope": peak_memory_scope(device),
        "cache": cache_stats,
        "tuning": tuning,
        "device": str(device),
    }


def _tune(pipe, config: PruneConfig, arch, dense_copy: nn.Module, selected: list[Block], targets: list, prompts,
          call: dict, progress: bool) -> dict[str, dict]:
    """--tune-iters: block tuning of the selected blocks' target linears towards the dense copy (tune.py)."""
    linears = {b.name: [] for b in selected}
    for t in targets:
        linears[t.block.name] += [lin for _, lin in t.linears()]
    tracker = StepTracker(pipe.scheduler, arch.timestep_scale, config.effective_weighting, tuple(config.weight_range))
    tuned = [b for b in selected if linears[b.name]]
    return tune_blocks(pipe, dense_copy, tuned, linears, prompts, call, tracker, iters=config.tune_iters,
                       lr=config.tune_lr, seed=config.seed, batch_size=config.batch_size,
                       max_calls=config.tune_max_calls, cache_device=config.cache_device, progress=progress)


def mark_partial(pipe, config: PruneConfig) -> None:
    """Mark ``pipe`` as being pruned (set before its weights change, cleared by the engine when the run completes):
    a run stopped half way (Ctrl-C in a notebook, out of memory) leaves the mark, and the next prune() warns."""
    pipe.obsdiff_partial = (f"method {config.method}, pattern {config.pattern}, sparsity "
                            f"{config.sparsity if config.sparsity is not None else 'per pattern'}")


def run_record(config: PruneConfig, prompts: list[str], arch, call: dict, selected: list[Block],
               num_packages: int) -> dict:
    """The report keys every pruning run shares: its settings, prompts and call, and what it ran on."""
    return {
        "config": asdict(config) | {"prompts": None, "num_prompts": len(prompts)},
        "calibration_prompts": prompts,
        "arch": arch.name,
        "call": call,
        "blocks": [b.index for b in selected],
        "num_packages": num_packages,
        "world_size": rank_and_world()[1],
        "versions": versions(),
    }


def versions() -> dict:
    """Library versions that determine the result (recorded for reproducibility)."""
    import diffusers
    import transformers

    from . import __version__

    return {"obsdiff_lite": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "python": platform.python_version()}

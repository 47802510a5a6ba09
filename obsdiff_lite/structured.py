"""Structured OBS-Diff: remove whole attention heads and FFN neurons, and physically shrink the model.

    report = prune_structured(pipe, PruneConfig(pattern="structured", sparsity=0.3))

Every selected block (default: all but the first and the last, as in the paper) has two units, in
forward order: its *heads* unit (inputs of the attention out-projections) and its *FFN* unit (inputs
of the down projections). Units are cut into module packages as in the unstructured engine: one
timestep-weighted calibration pass per package, then its units are pruned and shrunk, so the next
package is calibrated on the already smaller model.

Removing a set Q of input columns of W, given the Hessian H of its inputs, costs (group OBS)

    L_Q = trace(W_Q ([H^-1]_QQ)^-1 W_Q^T)   with the optimal update   dW = -W_Q ([H^-1]_QQ)^-1 H^-1[Q, :].

FFN neurons are single down-projection columns (L_j = sum_rows W_j^2 / [H^-1]_jj); they go in
shrinking chunks, H^-1 recomputed on the remaining columns after each (SlimGPT). Heads are head_dim
columns of every out-projection; they go one at a time, with fresh H^-1, the per-projection rankings
(image and text stream) fused by Reciprocal Rank Fusion (k = 60), and each out-projection compensated
with its own Hessian. The q/k/v (and add_q/k/v) rows, up-projection rows and out/down-projection
columns are then sliced away and ``attn.heads`` is updated (``surgery.remove_heads``/``remove_neurons``).

SD3's last block (``context_pre_only``) discards its text queries, but heads are shared by both
streams, so its add_q_proj rows are sliced with each head and the projection itself stays.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .arch import Block, FFNSpec, arch_for_transformer, blocks, get_linear, parse_block_range
from .calibrate import calibrate
from .hessian import ieee_fp32_matmul
from .obs import cast_weight, prepare_inverse_hessian
from .pipelines import pipeline_call, run_pipeline
from .prune import (PER_BLOCK, PruneConfig, _peak_memory_bytes, default_prompts, mark_partial, peak_memory_scope,
                    run_record)
from .surgery import attention_module, head_channels, head_dim, remove_heads, remove_neurons, transformer_structure

log = logging.getLogger(__name__)

RRF_K = 60  # Reciprocal Rank Fusion constant (paper)
MIN_CHUNK, MAX_CHUNK = 64, 1024  # SlimGPT-style FFN chunk bounds (paper code)
# Latent pixels per token side beyond the transformer's own patch size: Flux packs 2x2 latent patches.
_TOKEN_PACKING = MappingProxyType({"flux": 2})
_DEFAULT_TEXT_TOKENS = MappingProxyType({"sd3": 256, "flux": 512})  # pipelines' default max_sequence_length


# --- The group OBS solver -----------------------------------------------------------------------------


def _inverse_hessian(hessian: Tensor, damp: float, name: str = "") -> Tensor:
    """(H + damp * mean diag * I)^-1, via the engine's retrying Cholesky."""
    upper, _ = prepare_inverse_hessian(hessian, damp=damp, name=name)
    with ieee_fp32_matmul(upper.device):
        return upper.T @ upper


def group_saliency(weight: Tensor, hinv: Tensor, groups: Tensor) -> Tensor:
    """OBS cost trace(W_Q ([H^-1]_QQ)^-1 W_Q^T) of removing each group Q (rows of ``groups``: column indices)."""
    wq = weight[:, groups].permute(1, 2, 0)  # [G, g, rows]
    hqq = hinv[groups.unsqueeze(-1), groups.unsqueeze(-2)]  # [G, g, g]
    return (wq * torch.linalg.solve(hqq, wq)).sum(dim=(1, 2))


def obs_remove_columns(weight: Tensor, hinv: Tensor, cols: Tensor) -> Tensor:
    """``weight`` after removing columns ``cols`` optimally: W - W_Q ([H^-1]_QQ)^-1 H^-1[Q, :] (columns Q become 0)."""
    coef = torch.linalg.solve(hinv[cols][:, cols], weight[:, cols].T).T  # W_Q [H^-1]_QQ^-1 (symmetric)
    out = weight - coef @ hinv[cols]
    out[:, cols] = 0.0
    return out


def chunk_size(remaining: int) -> int:
    """Neurons removed in the next FFN chunk: (remaining - 512) // 2 clamped to [64, 1024], at most ``remaining``."""
    return min(remaining, max(MIN_CHUNK, min(MAX_CHUNK, (remaining - 512) // 2)))


class ColumnPruner:
    """Removes input columns of one linear, keeping its weight and Hessian restricted to the live columns."""

    def __init__(self, weight: Tensor, hessian: Tensor, damp: float = 0.01, name: str = ""):
        work = torch.float64 if hessian.dtype == torch.float64 else torch.float32
        self.name, self.damp = name, damp
        self.hessian0 = hessian.detach().to(work)
        self.weight0 = weight.detach().to(self.hessian0.device, work, copy=True)  # the layer is written back later
        if tuple(self.hessian0.shape) != (self.weight0.shape[1],) * 2:
            raise ValueError(f"Hessian of {name!r} has shape {tuple(hessian.shape)}, expected {(weight.shape[1],) * 2}")
        self.live = torch.arange(self.weight0.shape[1], device=self.hessian0.device)  # original indices, ascending
        self.weight = self.weight0.clone()  # [rows, live]

    def positions(self, columns: Tensor) -> Tensor:
        """Positions among the live columns of original column indices ``columns`` (all must be live)."""
        return torch.searchsorted(self.live, columns.to(self.live.device))

    def live_hessian(self) -> Tensor:
        """H restricted to the live columns (exactly the Hessian a recalibration of the shrunk layer would give)."""
        return self.hessian0[self.live][:, self.live]

    def inverse(self) -> Tensor:
        """Damped H^-1 over the live columns."""
        return _inverse_hessian(self.live_hessian(), self.damp, self.name)

    def remove(self, positions: Tensor, hinv: Tensor | None) -> None:
        """Drop the live columns at ``positions``; with ``hinv`` compensate the others by the OBS update."""
        with ieee_fp32_matmul(self.weight.device):
            if hinv is not None:
                self.weight = obs_remove_columns(self.weight, hinv, positions)
        keep = torch.ones(len(self.live), dtype=torch.bool, device=self.live.device)
        keep[positions] = False
        self.weight, self.live = self.weight[:, keep], self.live[keep]

    def trial_weight(self, positions: Tensor, hinv: Tensor) -> Tensor:
        """The full-width weight if the live columns at ``positions`` were removed now (state unchanged)."""
        with ieee_fp32_matmul(self.weight.device):
            return self._widen(obs_remove_columns(self.weight, hinv, positions))

    def full_weight(self) -> Tensor:
        """The weight at its original width, removed columns zero."""
        return self._widen(self.weight)

    def _widen(self, live_weight: Tensor) -> Tensor:
        """A [rows, live] weight scattered back to the original width (removed columns zero)."""
        out = torch.zeros_like(self.weight0)
        out[:, self.live] = live_weight
        return out

    def stats(self) -> dict:
        """Layer reconstruction error trace(dW H dW^T) / 2 (undamped H), absolute and relative to W H W^T / 2."""
        with ieee_fp32_matmul(self.weight0.device):
            dw = self.weight0 - self.full_weight()
            recon = float(((dw @ self.hessian0) * dw).sum() / 2)
            base = float(((self.weight0 @ self.hessian0) * self.weight0).sum() / 2)
        return {"recon_error": recon, "recon_error_rel": recon / base if base > 0 else 0.0}


def prune_columns(weight: Tensor, hessian: Tensor, candidates: Tensor, count: int, damp: float = 0.01,
                  compensate: bool = True, name: str = "") -> tuple[Tensor, Tensor, dict]:
    """Remove ``count`` of the ``candidates`` columns by OBS saliency in shrinking chunks; (weight, removed, stats).

    The returned weight keeps the original width with the removed columns zeroed (the rest compensated
    unless ``compensate`` is False); ``removed`` holds the removed column indices, ascending.
    """
    pruner = ColumnPruner(weight, hessian, damp, name)
    alive = torch.as_tensor(candidates, dtype=torch.long, device=pruner.live.device).sort().values
    if not 0 <= count < len(alive):
        raise ValueError(f"cannot remove {count} of {len(alive)} candidate columns of {name!r}")
    removed, remaining = [], count
    while remaining > 0:
        chunk = chunk_size(remaining)
        hinv = pruner.inverse()
        pos = pruner.positions(alive)
        scores = (pruner.weight[:, pos] ** 2).sum(0) / torch.diagonal(hinv)[pos]
        order = torch.sort(scores, stable=True).indices[:chunk]
        pruner.remove(pos[order], hinv if compensate else None)
        removed.append(alive[order])
        alive = alive[~torch.isin(alive, alive[order])]
        remaining -= chunk
    gone = torch.cat(removed).sort().values if removed else alive[:0]
    return pruner.full_weight(), gone, pruner.stats()


def prune_heads_obs(pruners: dict[str, ColumnPruner], head_columns: list[Tensor], count: int,
                    rrf_k: int = RRF_K, judge: Callable[[dict[str, Tensor]], float] | None = None,
                    candidates: int = 4) -> tuple[list[int], list[dict]]:
    """Remove ``count`` heads one per iteration (fresh H^-1, RRF-fused rankings, OBS update on every projection).

    With ``judge`` (beyond the paper), the ``candidates`` cheapest heads by fused rank are each tried: judge
    gets {projection name: full-width weight with that head removed and compensated} and returns an error;
    the head with the least error goes (``TrajectoryJudge``: final-latent error over a few prompts).
    """
    alive = list(range(len(head_columns)))
    removed, history = [], []
    for _ in range(count):
        fused = torch.zeros(len(alive), dtype=torch.float64)
        hinvs, saliencies = {}, {}
        for name, pruner in pruners.items():
            hinvs[name] = pruner.inverse()
            groups = torch.stack([pruner.positions(head_columns[h]) for h in alive])
            with ieee_fp32_matmul(pruner.weight.device):
                sal = group_saliency(pruner.weight, hinvs[name], groups).double().cpu()
            ranks = torch.argsort(torch.argsort(sal, stable=True), stable=True) + 1  # 1 = cheapest to remove
            fused += 1.0 / (rrf_k + ranks.double())
            saliencies[name] = sal
        order = torch.argsort(-fused, stable=True).tolist()  # best first; ties: the lowest head index
        pick, errors = order[0], {}
        if judge is not None and len(alive) > 1:
            for i in order[:candidates]:
                trial = {name: pruner.trial_weight(pruner.positions(head_columns[alive[i]]), hinvs[name])
                         for name, pruner in pruners.items()}
                errors[i] = judge(trial)
            pick = min(errors, key=lambda i: (errors[i], order.index(i)))
        entry = {"head": alive[pick], "saliency": {n: float(s[pick]) for n, s in saliencies.items()}}
        if errors:
            entry["trajectory_error"] = {str(alive[i]): err for i, err in errors.items()}
        head = alive.pop(pick)
        for name, pruner in pruners.items():
            pruner.remove(pruner.positions(head_columns[head]), hinvs[name])
        removed.append(head)
        history.append(entry)
    return removed, history


class TrajectoryJudge:
    """How far a temporary weight change moves the final latents of a few calibration prompts (beyond the paper).

    Errors accumulate over the denoising trajectory (the paper's premise); on tiny-flux's joint block the
    head whose removal changes each call's output least is the one that ruins prompt adherence, and the
    final-latent error of a short sampling run sees it (``benchmarks/run.py structured_selection``).
    """

    def __init__(self, pipe, prompts: list[str], call: dict, seed: int, batch_size: int):
        self.pipe, self.prompts, self.call, self.seed, self.batch_size = pipe, prompts, call, seed, batch_size
        self.reference = self.latents()  # the model as it is now: call before pruning anything

    def latents(self) -> Tensor:
        """Final latents of the judge's prompts (fixed generator seeds)."""
        out = run_pipeline(self.pipe, self.prompts, self.seed, self.call, self.batch_size, output_type="latent",
                           progress=False)
        return torch.cat([torch.as_tensor(x) for x in out]).float()

    def error(self, weights: dict[nn.Linear, Tensor]) -> float:
        """Mean squared final-latent change with ``weights`` written into their linears, then restored."""
        saved = {lin: lin.weight.data.clone() for lin in weights}
        try:
            for lin, weight in weights.items():
                _write_weight(lin, weight)
            return float(((self.latents() - self.reference) ** 2).mean())
        finally:
            for lin, weight in saved.items():
                lin.weight.data.copy_(weight)


# --- Units, packages and the per-unit work -------------------------------------------------------------


@dataclass(frozen=True)
class StructuredUnit:
    """One unit of structured pruning: the heads, or the FFNs, of one block."""

    block: Block
    kind: str  # "heads" | "ffn"

    def ffns(self) -> list[FFNSpec]:
        """The block's FFNs that are really present (SD3's last block has no ff_context)."""
        m = self.block.module
        return [f for f in self.block.spec.ffns
                if get_linear(m, f.up) is not None and get_linear(m, f.down) is not None]

    def linears(self) -> dict[str, nn.Linear]:
        """The projections whose inputs this unit prunes (out- or down-projections), by full name."""
        names = self.block.spec.heads.out if self.kind == "heads" else tuple(f.down for f in self.ffns())
        found = {n: get_linear(self.block.module, n) for n in names}
        return {f"{self.block.name}.{n}": lin for n, lin in found.items() if lin is not None}


def structured_units(selected: list[Block]) -> list[StructuredUnit]:
    """Per selected block, its heads unit then its FFN unit (those it has), in forward order."""
    units = []
    for block in selected:
        for kind in ("heads", "ffn"):
            unit = StructuredUnit(block, kind)
            if (kind == "heads" and block.spec.heads is None) or not unit.linears():
                continue
            units.append(unit)
    return units


def split_packages(units: list[StructuredUnit], num_packages: int | str) -> list[list[StructuredUnit]]:
    """Cut the units into ``num_packages`` contiguous near-equal module packages ("blocks": one per block)."""
    if num_packages == PER_BLOCK:
        packages: list[list[StructuredUnit]] = []
        for unit in units:
            if not packages or packages[-1][0].block.index != unit.block.index:
                packages.append([])
            packages[-1].append(unit)
        return packages
    if num_packages > len(units):
        raise ValueError(
            f"packages={num_packages} but the selected blocks have only {len(units)} structured units "
            f"(heads and FFN per block); use 1..{len(units)}"
        )
    bounds = np.linspace(0, len(units), num_packages + 1).round().astype(int)
    return [units[bounds[i] : bounds[i + 1]] for i in range(num_packages)]


def structured_sparsities(config: PruneConfig) -> tuple[float, float]:
    """(head sparsity, FFN sparsity): the specific settings, else ``config.sparsity``."""
    head = config.head_sparsity if config.head_sparsity is not None else config.sparsity
    ffn = config.ffn_sparsity if config.ffn_sparsity is not None else config.sparsity
    return float(head), float(ffn)


def default_structured_blocks(num_blocks: int) -> str | None:
    """The paper's structured default: every block but the first and the last ("1:N-1")."""
    return f"1:{num_blocks - 1}" if num_blocks > 2 else None


AUTO_FFN_MULTIPLE = 64  # GPU GEMMs slow down sharply at odd widths (measured: benchmarks/gpu_fullsize.py)


def kept_ffn_width(hidden: int, ffn_s: float, multiple: int | None = None) -> int:
    """Neurons an FFN of ``hidden`` keeps at sparsity ``ffn_s``, rounded to a multiple of ``multiple``.

    ``multiple=None`` (auto): 64 for full-size FFNs (>= 1024 neurons and a multiple of 64), else 1, so
    tiny models keep their exact fractions and real ones keep tensor-core-friendly widths. The kept width
    is the multiple nearest the exact one, at least one multiple and at most the largest one that fits.
    """
    keep = hidden - round(hidden * ffn_s)
    if multiple is None:
        multiple = AUTO_FFN_MULTIPLE if hidden >= 1024 and hidden % AUTO_FFN_MULTIPLE == 0 else 1
    if multiple > 1 and keep < hidden and hidden >= multiple:
        keep = min(hidden // multiple * multiple, max(multiple, round(keep / multiple) * multiple))
    return keep


def _unit_plan(unit: StructuredUnit, head_s: float, ffn_s: float, ffn_multiple: int | None = None) -> dict[str, int]:
    """How many heads (key "heads") or neurons (key: up projection) this unit removes; refuses emptying a module."""
    if unit.kind == "heads":
        n = int(attention_module(unit.block).heads)
        count = round(n * head_s)
        if count >= n:
            raise ValueError(
                f"head sparsity {head_s:g} would remove all {n} heads of {unit.block.name}; use a smaller value"
            )
        return {"heads": count}
    plan = {}
    for ffn in unit.ffns():
        hidden = get_linear(unit.block.module, ffn.up).out_features
        if round(hidden * ffn_s) >= hidden:
            raise ValueError(f"FFN sparsity {ffn_s:g} would remove all {hidden} neurons of {unit.block.name}.{ffn.up}")
        plan[ffn.up] = hidden - kept_ffn_width(hidden, ffn_s, ffn_multiple)
    return plan


def _warn_if_nothing_removed(units: list[StructuredUnit], plans: list[dict[str, int]], head_s: float,
                             ffn_s: float) -> None:
    """Warn when a positive head or FFN sparsity rounds to nothing removed in every pruned block (small modules)."""
    for label, sparsity, heads in (("head", head_s, True), ("FFN", ffn_s, False)):
        sized = [(u, p) for u, p in zip(units, plans) if (u.kind == "heads") == heads]
        if sparsity > 0 and sized and not any(v for _, p in sized for v in p.values()):
            widths: set[int] = set()  # head counts, or FFN widths, of the pruned blocks
            for u, _ in sized:
                if heads:
                    widths.add(int(attention_module(u.block).heads))
                else:
                    widths.update(get_linear(u.block.module, f.up).out_features for f in u.ffns())
            log.warning("%s sparsity %g removes nothing: it rounds to 0 of the %s %s in every pruned block; raise it "
                        "or set it to 0", label, sparsity, "/".join(map(str, sorted(widths))),
                        "heads" if heads else "neurons")


def _write_weight(linear: nn.Linear, weight: Tensor, name: str = "") -> None:
    """Copy a solver result back into ``linear`` in its own dtype (refused if it does not fit) and device."""
    linear.weight.data.copy_(cast_weight(weight.to(linear.weight.device), linear.weight.dtype, name))


def _prune_heads(unit: StructuredUnit, count: int, method: str, hessians: dict[str, Tensor], damp: float,
                 judge: TrajectoryJudge | None = None, candidates: int = 4) -> tuple[dict, dict[str, dict]]:
    """Remove ``count`` heads of the unit's block (OBS or L1) and shrink it; (block record, layer records)."""
    block, attn = unit.block, attention_module(unit.block)
    heads, dim = int(attn.heads), head_dim(attn)
    linears = unit.linears()
    head_columns = [head_channels([h], dim) for h in range(heads)]
    layers = {name: {"in_features_before": lin.in_features} for name, lin in linears.items()}
    history: list[dict] = []
    if method == "l1-norm":
        scores = torch.zeros(heads, dtype=torch.float64)
        for lin in linears.values():
            w = lin.weight.detach().abs().double().cpu()
            scores += torch.stack([w[:, cols].sum() for cols in head_columns])
        removed = torch.sort(scores, stable=True).indices[:count].tolist()
    else:
        pruners = {name: ColumnPruner(lin.weight, hessians[name], damp, name) for name, lin in linears.items()}
        trial = None if judge is None else (lambda weights: judge.error({linears[n]: w for n, w in weights.items()}))
        removed, history = prune_heads_obs(pruners, head_columns, count, judge=trial, candidates=candidates)
        for name, lin in linears.items():
            _write_weight(lin, pruners[name].full_weight(), name)
            hessians[name] = pruners[name].live_hessian()  # a later unit of this package may read this input too
            layers[name].update(pruners[name].stats())
    remove_heads(block, [h for h in range(heads) if h not in removed])
    for name, lin in linears.items():
        layers[name]["in_features_after"] = lin.in_features
    record = {"heads_before": heads, "heads_after": int(attn.heads), "removed_heads": sorted(removed)}
    if history:
        record["removal_order"] = history
    return record, layers


def _prune_ffns(unit: StructuredUnit, plan: dict[str, int], method: str, hessians: dict[str, Tensor], damp: float
                ) -> tuple[dict, dict[str, dict]]:
    """Remove the planned neurons of each FFN of the unit's block (OBS or L1) and shrink it; (record, layers)."""
    block = unit.block
    record, layers = {}, {}
    for ffn in unit.ffns():
        up, down = get_linear(block.module, ffn.up), get_linear(block.module, ffn.down)
        name = f"{block.name}.{ffn.down}"
        hidden, count = up.out_features, plan[ffn.up]
        offset = down.in_features - hidden  # Flux single proj_out: the attention columns come first
        candidates = torch.arange(offset, offset + hidden)
        layers[name] = {"in_features_before": down.in_features}
        if method == "l1-norm":
            scores = down.weight.detach().abs().double().sum(0).cpu()[candidates]
            removed = candidates[torch.sort(scores, stable=True).indices[:count]]
        else:
            new, removed, stats = prune_columns(down.weight, hessians[name], candidates, count, damp, name=name)
            _write_weight(down, new, name)
            layers[name].update(stats)
        keep = candidates[~torch.isin(candidates, removed.cpu())] - offset
        remove_neurons(block, ffn, keep)
        layers[name]["in_features_after"] = down.in_features
        record[ffn.up] = {"before": hidden, "after": up.out_features}
    return record, layers


# --- Size accounting -------------------------------------------------------------------------------------


def count_parameters(transformer: nn.Module) -> int:
    """All parameters of the transformer."""
    return sum(int(p.numel()) for p in transformer.parameters())


def image_tokens(transformer: nn.Module, height: int, width: int, vae_scale_factor: int = 8) -> int:
    """Image tokens of one transformer call at ``height`` x ``width`` pixels (VAE downscale, then patching)."""
    arch = arch_for_transformer(transformer)
    pixels = vae_scale_factor * int(getattr(transformer.config, "patch_size", 1)) * _TOKEN_PACKING.get(arch.name, 1)
    if height < pixels or width < pixels or height % pixels or width % pixels:
        raise ValueError(f"an image of {height}x{width} pixels does not divide into {arch.name} tokens: height and "
                         f"width must be positive multiples of {pixels} (e.g. 512 or 1024)")
    return (height // pixels) * (width // pixels)


def _linear_tokens(block: Block, name: str, n_image: int, n_text: int) -> int:
    """Tokens a block linear sees per sample: AdaLN modulation 1, single blocks all, joint blocks one stream."""
    if any(part.startswith("norm") for part in name.split(".")):
        return 1  # modulation linears read the pooled timestep/text embedding
    if block.spec.kind == "single":
        return n_image + n_text
    return n_text if ("add_" in name or "context" in name) else n_image


def linear_macs(transformer: nn.Module, height: int, width: int, text_tokens: int, vae_scale_factor: int = 8) -> int:
    """nn.Linear multiply-adds inside the transformer blocks for one forward at batch 1 (the paper's TFLOPs)."""
    n_image = image_tokens(transformer, height, width, vae_scale_factor)
    total = 0
    for block in blocks(transformer):
        for name, module in block.module.named_modules():
            if isinstance(module, nn.Linear):
                tokens = _linear_tokens(block, name, n_image, text_tokens)
                total += tokens * module.in_features * module.out_features
    return total


def mac_geometry(pipe, call: dict) -> dict[str, int]:
    """Resolution and text length at which the report counts MACs: the call's, else the pipeline defaults."""
    arch = arch_for_transformer(pipe.transformer)
    scale = int(getattr(pipe, "vae_scale_factor", 8))
    height = int(call.get("height") or pipe.default_sample_size * scale)
    width = int(call.get("width") or pipe.default_sample_size * scale)
    text = int(call.get("max_sequence_length") or _DEFAULT_TEXT_TOKENS[arch.name])
    if arch.name == "sd3":  # CLIP tokens, then T5 tokens (zeros when there is no T5)
        text += int(pipe.tokenizer_max_length)
    return {"height": height, "width": width, "text_tokens": text, "vae_scale_factor": scale}


# --- Entry point -----------------------------------------------------------------------------------------


def prune_structured(pipe, config: PruneConfig, progress: bool = True) -> dict:
    """Remove heads and FFN neurons of ``pipe.transformer`` in place (shrinking it); return a JSON-ready report."""
    config.validate()
    if config.pattern != "structured":
        raise ValueError(f"prune_structured needs pattern='structured', got {config.pattern!r}")
    transformer = pipe.transformer
    arch = arch_for_transformer(transformer)
    all_blocks = blocks(transformer, arch)
    block_range = config.blocks if config.blocks is not None else default_structured_blocks(len(all_blocks))
    selected = [all_blocks[i] for i in parse_block_range(block_range, len(all_blocks))]
    head_s, ffn_s = structured_sparsities(config)
    units = structured_units(selected)
    plans = [_unit_plan(u, head_s, ffn_s, config.ffn_multiple) for u in units]  # refuses impossible counts before any work
    _warn_if_nothing_removed(units, plans, head_s, ffn_s)
    packages = split_packages(units, config.packages)

    call = pipeline_call(pipe, config.steps, config.guidance)
    needs_data = config.method == "obs-diff"
    prompts = []
    if needs_data:
        prompts = config.prompts
        if prompts is None:
            prompts = default_prompts(pipe, config.num_prompts, config.seed)
    geometry = mac_geometry(pipe, call)

    def macs() -> int:
        return linear_macs(transformer, geometry["height"], geometry["width"], geometry["text_tokens"],
                           geometry["vae_scale_factor"])

    targeted = _targeted_linears(selected)
    targeted_before = sum(int(lin.weight.numel()) for lin in targeted())
    params_before, macs_before = count_parameters(transformer), macs()
    device = next(transformer.parameters()).device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    judge = None
    if config.head_selection == "trajectory" and any(p.get("heads") for p in plans):
        judge = TrajectoryJudge(pipe, prompts[: config.trajectory_prompts], call, config.seed, config.batch_size)
    plan_of = {id(u): p for u, p in zip(units, plans)}
    layers: dict[str, dict] = {}
    block_records: dict[str, dict] = {b.name: {} for b in selected}
    timings = {"calibration_s": 0.0, "solve_s": 0.0}
    start = time.perf_counter()
    mark_partial(pipe, config)  # heads and neurons go from here on; cleared when the run completes
    for p, package in enumerate(tqdm(packages, desc="packages", disable=not progress)):
        active = [u for u in package if any(plan_of[id(u)].values())]
        hessians: dict[str, Tensor] = {}
        if needs_data and active:
            t0 = time.perf_counter()
            groups = {name: lin for u in active for name, lin in u.linears().items()}
            accumulators = calibrate(
                pipe, arch, groups, prompts, call, weighting=config.effective_weighting,
                weight_range=tuple(config.weight_range), seed=config.seed, batch_size=config.batch_size,
                hessian_device=config.hessian_device, progress=progress, desc=f"package {p + 1}/{len(packages)}",
                hessian_inputs=config.hessian_inputs,
            )
            hessians = {name: acc.hessian for name, acc in accumulators.items()}
            timings["calibration_s"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        for unit in active:
            plan = plan_of[id(unit)]
            if unit.kind == "heads":
                record, unit_layers = _prune_heads(unit, plan["heads"], config.method, hessians, config.damp,
                                                   judge, config.head_candidates)
            else:
                record, unit_layers = _prune_ffns(unit, plan, config.method, hessians, config.damp)
                record = {"ffn": record}
            block_records[unit.block.name].update(record)
            for name, rec in unit_layers.items():
                layers.setdefault(name, {})[unit.kind] = rec | {"package": p}
        hessians.clear()  # free this package's Hessians before the next calibration pass
        timings["solve_s"] += time.perf_counter() - t0
    timings["total_s"] = time.perf_counter() - start
    pipe.obsdiff_partial = None

    targeted_after = sum(int(lin.weight.numel()) for lin in targeted())
    return run_record(config, prompts, arch, call, selected, len(packages)) | {
        "target_sparsity": {"heads": head_s, "ffn": ffn_s},
        "achieved_sparsity": 1.0 - targeted_after / max(targeted_before, 1),  # of the targeted linears' weights
        "targeted_parameters": targeted_before,
        "transformer_parameters": count_parameters(transformer),
        "parameters_before": params_before,
        "parameters_after": count_parameters(transformer),
        "macs_before": macs_before,
        "macs_after": macs(),
        "macs_at": geometry,
        "structure": transformer_structure(transformer),
        "block_records": block_records,
        "layers": layers,
        "timings": timings,
        "peak_memory_bytes": _peak_memory_bytes(device),
        "peak_memory_scope": peak_memory_scope(device),
        "device": str(device),
    }


def _targeted_linears(selected: list[Block]):
    """A callable listing the q/k/v, out, up and down projections of the selected blocks (re-read after surgery)."""

    def linears() -> list[nn.Linear]:
        out = []
        for block in selected:
            names = list(block.spec.heads.qkv + block.spec.heads.out) if block.spec.heads else []
            names += [n for f in block.spec.ffns for n in (f.up, f.down)]
            out += [lin for n in dict.fromkeys(names) if (lin := get_linear(block.module, n)) is not None]
        return out

    return linears

"""Helpers for notebooks 05 (structured pruning) and 07 (real models on a GPU): pictures, rankings, checks, timings.

Everything these notebooks compute that matters lives here (tests: tests/test_viz_structured.py), so the
notebooks stay narrative.

* notebook 05: ``unit_highlights`` / ``plot_unit_weights`` (what a head and an FFN neuron are),
  ``head_ranking`` / ``plot_head_ranking`` (group OBS saliency per stream and RRF fusion for one block),
  ``random_units`` / ``zero_units`` / ``slice_units`` / ``transformer_calls`` / ``max_output_diff``
  (slicing == zeroing),
  ``structure_rows`` / ``format_structure_table`` (the smaller model), ``time_sampling`` (interleaved timings),
  ``comparison_figure`` (image rows side by side);
* also ``matmul_times`` (zeros do not speed up a dense matmul, fewer columns do) and ``structured_size``
  (full-size parameter and MAC counts after structured pruning, on the meta device);
* notebook 07: ``hessian_budget`` (Hessian bytes per module package from layer widths), ``pick_prompts``,
  ``clip_score`` (torchmetrics, optional), ``report_summary`` (the short form of obsdiff.json).
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from .arch import Block, arch_for_transformer, blocks, get_linear
from .calibrate import calibrate
from .pipelines import call_kwargs, pipeline_call, run_pipeline
from .prune import PruneConfig, default_prompts, package_units, read_prompts
from .structured import RRF_K, ColumnPruner, StructuredUnit, group_saliency
from .surgery import attention_module, head_channels, head_dim, remove_heads, remove_neurons

HEAD_COLOR = (0.84, 0.15, 0.16)  # tab:red
NEURON_COLOR = (0.12, 0.47, 0.71)  # tab:blue
CLIP_MODEL = "openai/clip-vit-base-patch16"
GREY_LEVELS = 6  # |W| is drawn with this many grey levels (above 0)


# --- What a head and a neuron are ------------------------------------------------------------------------


@dataclass
class Highlight:
    """One weight matrix of a block and which of its entries belong to the highlighted head and neuron."""

    name: str
    weight: Tensor  # [out, in], float32 on the CPU
    head: Tensor  # bool, same shape: the entries of the highlighted head (all False if none)
    neuron: Tensor  # bool, same shape: the entries of the highlighted FFN neuron (all False if none)


def _mask(shape: torch.Size, index: Tensor | None = None, axis: str = "rows") -> Tensor:
    """A bool mask of ``shape`` that is True on rows (or columns) ``index`` (all False for None)."""
    mask = torch.zeros(shape, dtype=torch.bool)
    if index is not None:
        if axis == "rows":
            mask[index] = True
        else:
            mask[:, index] = True
    return mask


def unit_highlights(block: Block, head: int = 0, neuron: int = 0) -> list[Highlight]:
    """Every q/k/v, out, up and down matrix of ``block``, head ``head`` and neuron ``neuron`` of each FFN marked."""
    found: dict[str, Highlight] = {}

    def entry(name: str) -> Highlight | None:
        if name not in found and (lin := get_linear(block.module, name)) is not None:
            w = lin.weight.detach().float().cpu()
            found[name] = Highlight(name, w, _mask(w.shape), _mask(w.shape))
        return found.get(name)

    spec = block.spec
    if spec.heads is not None:
        channels = head_channels([head], head_dim(attention_module(block)))
        for name in spec.heads.qkv:  # a head = head_dim output rows of every q/k/v projection
            if (h := entry(name)) is not None:
                h.head |= _mask(h.weight.shape, channels, "rows")
        for name in spec.heads.out:  # ... and the same input columns of every out-projection (Flux single: first)
            if (h := entry(name)) is not None:
                h.head |= _mask(h.weight.shape, channels, "columns")
    for ffn in spec.ffns:
        up, down = entry(ffn.up), entry(ffn.down)
        if up is None or down is None:
            continue
        offset = down.weight.shape[1] - up.weight.shape[0]  # Flux single proj_out: MLP columns follow attention's
        up.neuron |= _mask(up.weight.shape, torch.tensor([neuron]), "rows")  # a neuron = one up row ...
        down.neuron |= _mask(down.weight.shape, torch.tensor([neuron + offset]), "columns")  # ... one down column
    order = list(found)
    for ffn in spec.ffns:  # Flux single: show proj_mlp (up) before the shared proj_out (down)
        if spec.heads is not None and ffn.down in spec.heads.out and ffn.up in order and ffn.down in order:
            order.remove(ffn.up)
            order.insert(order.index(ffn.down), ffn.up)
    return [found[n] for n in order]


def highlight_image(h: Highlight) -> np.ndarray:
    """RGB picture of |W| (grey, per-matrix scale) with the head's entries red and the neuron's blue."""
    mag = h.weight.abs()
    mag = (mag / mag.max().clamp_min(1e-12)).sqrt().numpy()  # sqrt: small weights stay visible
    mag = np.round(mag * GREY_LEVELS) / GREY_LEVELS  # a few grey levels: the notebook's PNGs stay small
    rgb = np.repeat((0.95 - 0.75 * mag)[..., None], 3, axis=-1)
    strength = 0.35 + 0.65 * mag
    for mask, color in ((h.head.numpy(), HEAD_COLOR), (h.neuron.numpy(), NEURON_COLOR)):
        s = strength[mask][:, None]
        rgb[mask] = (1.0 - s) + s * np.array(color)
    return np.clip(rgb, 0.0, 1.0)


def _runs(index: np.ndarray) -> list[tuple[int, int]]:
    """Contiguous runs [start, stop) of sorted integer indices."""
    runs: list[tuple[int, int]] = []
    for i in index.tolist():
        if runs and runs[-1][1] == i:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return runs


def _outline(ax, mask: np.ndarray, color) -> None:
    """Frame the fully-marked rows and columns of ``mask`` on ``ax`` (so a one-pixel neuron stays visible)."""
    from matplotlib.patches import Rectangle

    rows, cols = mask.shape
    for start, stop in _runs(np.flatnonzero(mask.all(1))):
        ax.add_patch(Rectangle((-0.5, start - 0.5), cols, stop - start, fill=False, edgecolor=color, lw=1.2))
    for start, stop in _runs(np.flatnonzero(mask.all(0))):
        ax.add_patch(Rectangle((start - 0.5, -0.5), stop - start, rows, fill=False, edgecolor=color, lw=1.2))


def plot_unit_weights(block: Block, head: int = 0, neuron: int = 0, title: str | None = None, max_cols: int = 8):
    """Draw every matrix of ``unit_highlights`` (same pixel scale throughout) and return the figure."""
    import matplotlib.pyplot as plt

    items = unit_highlights(block, head, neuron)
    rows = [items[i : i + max_cols] for i in range(0, len(items), max_cols)]
    heights = [max(h.weight.shape[0] for h in r) for r in rows]
    widths = [sum(h.weight.shape[1] for h in r) for r in rows]
    px = 10.0 / (max(widths) + 14 * max_cols)  # inches per weight entry
    fig = plt.figure(figsize=(11, sum(heights) * px + 0.5 * len(rows)))
    subfigs = fig.subfigures(len(rows), 1, height_ratios=[h * px + 0.5 for h in heights]) if len(rows) > 1 else [fig]
    for sub, row in zip(subfigs, rows):
        axes = sub.subplots(1, len(row), width_ratios=[h.weight.shape[1] for h in row], squeeze=False)[0]
        for ax, h in zip(axes, row):
            ax.imshow(highlight_image(h), interpolation="nearest", aspect="equal")
            _outline(ax, h.head.numpy(), HEAD_COLOR)
            _outline(ax, h.neuron.numpy(), NEURON_COLOR)
            ax.set_title(f"{h.name.removeprefix('attn.')}\n{tuple(h.weight.shape)}", fontsize=7)
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(title or f"{block.name}: head {head} (red) and FFN neuron {neuron} (blue); grey = |W|",
                 fontsize=9, y=1.04)
    return fig


# --- Group OBS saliency and RRF fusion for one block -----------------------------------------------------


@dataclass
class HeadRanking:
    """Per-head scores of one block's first head removal: group OBS saliency per out-projection, ranks, RRF."""

    block: str
    saliency: dict[str, np.ndarray]  # out-projection name -> OBS cost of removing each head
    ranks: dict[str, np.ndarray]  # 1 = cheapest to remove, per projection
    fused: np.ndarray  # sum over projections of 1 / (k + rank)
    l1: np.ndarray  # the L1-norm baseline's score: sum |W| over each head's out-projection columns
    rrf_k: int = RRF_K

    @property
    def order(self) -> list[int]:
        """Heads by fused score, most removable first (ties: the lower head index, as prune_heads_obs)."""
        return [int(i) for i in np.argsort(-self.fused, kind="stable")]

    @property
    def l1_order(self) -> list[int]:
        """Heads by L1 score, most removable (smallest) first."""
        return [int(i) for i in np.argsort(self.l1, kind="stable")]

    def table(self) -> str:
        """Plain-text table: one row per head with every projection's saliency and rank, RRF and L1."""
        names = list(self.saliency)
        short = [n.removeprefix(f"{self.block}.").removeprefix("attn.") for n in names]
        head = f"{'head':>4}  " + "  ".join(f"{s[-16:]:>16} {'rank':>4}" for s in short)
        head += f"  {'RRF score':>9}  {'L1 score':>9}"
        lines = [head]
        for h in range(len(self.fused)):
            row = f"{h:>4}  " + "  ".join(f"{self.saliency[n][h]:>16.4g} {int(self.ranks[n][h]):>4}" for n in names)
            lines.append(row + f"  {self.fused[h]:>9.5f}  {self.l1[h]:>9.4g}")
        return "\n".join(lines)


def _ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, smallest value first, ties by index (as ``prune_heads_obs``)."""
    t = torch.as_tensor(values)
    return (torch.argsort(torch.argsort(t, stable=True), stable=True) + 1).numpy()


def head_ranking(pipe, block_index: int, config: PruneConfig | None = None, prompts: list[str] | None = None,
                 progress: bool = False) -> HeadRanking:
    """Calibrate one block's out-projections like ``prune_structured`` and score every head (no pruning)."""
    config = config or PruneConfig(pattern="structured", sparsity=0.3)
    block = blocks(pipe.transformer)[block_index]
    unit = StructuredUnit(block, "heads")
    linears = unit.linears()
    call = pipeline_call(pipe, config.steps, config.guidance)
    if prompts is None:
        prompts = config.prompts or default_prompts(pipe, config.num_prompts, config.seed)
    accs = calibrate(pipe, arch_for_transformer(pipe.transformer), linears, prompts, call,
                     weighting=config.effective_weighting, weight_range=tuple(config.weight_range), seed=config.seed,
                     batch_size=config.batch_size, hessian_device=config.hessian_device, progress=progress)
    attn = attention_module(block)
    n, dim = int(attn.heads), head_dim(attn)
    groups = torch.stack([head_channels([h], dim) for h in range(n)])
    saliency, ranks = {}, {}
    fused = np.zeros(n)
    l1 = np.zeros(n)
    for name, lin in linears.items():
        pruner = ColumnPruner(lin.weight, accs[name].hessian, config.damp, name)
        sal = group_saliency(pruner.weight, pruner.inverse(), groups.to(pruner.weight.device)).double().cpu().numpy()
        saliency[name], ranks[name] = sal, _ranks(sal)
        fused += 1.0 / (RRF_K + ranks[name])
        w = lin.weight.detach().abs().double().cpu()
        l1 += np.array([float(w[:, cols].sum()) for cols in groups])
    return HeadRanking(block.name, saliency, ranks, fused, l1)


def plot_head_ranking(ranking: HeadRanking):
    """Bars: each projection's saliency per head (log scale) and the fused RRF score; returns the figure."""
    import matplotlib.pyplot as plt

    names = list(ranking.saliency)
    heads = np.arange(len(ranking.fused))
    fig, ax = plt.subplots(1, 2, figsize=(11, 2.8))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        label = name.removeprefix(f"{ranking.block}.").removeprefix("attn.")
        ax[0].bar(heads + (i - (len(names) - 1) / 2) * width, ranking.saliency[name], width, label=label)
    ax[0].set(yscale="log", xticks=heads, xlabel="head", ylabel="OBS cost of removing it",
              title=f"{ranking.block}: group OBS saliency per stream")
    ax[0].legend(fontsize=7)
    pick = ranking.order[0]
    colors = [HEAD_COLOR if h == pick else (0.6, 0.6, 0.6) for h in heads]
    ax[1].bar(heads, ranking.fused, color=colors)
    ax[1].set(xticks=heads, xlabel="head", ylabel=f"sum 1/({ranking.rrf_k} + rank)",
              title=f"RRF fusion: head {pick} goes first (red)")
    lo, hi = float(ranking.fused.min()), float(ranking.fused.max())
    ax[1].set_ylim(lo - 0.2 * (hi - lo + 1e-6), hi + 0.2 * (hi - lo + 1e-6))
    fig.tight_layout()
    return fig


# --- Surgery: slicing == zeroing ------------------------------------------------------------------------


UnitChoice = dict[str, dict[str, list[int]]]  # block name -> {"heads": [...], <up name>: [...]} (units to drop)


def random_units(transformer: nn.Module, block_indices: list[int], head_fraction: float, ffn_fraction: float,
                 seed: int = 0) -> UnitChoice:
    """A seeded random choice of heads and FFN neurons to drop in the given blocks (at least one head kept)."""
    g = torch.Generator().manual_seed(seed)
    all_blocks = blocks(transformer)
    out: UnitChoice = {}
    for i in block_indices:
        block = all_blocks[i]
        entry: dict[str, list[int]] = {}
        if block.spec.heads is not None:
            n = int(attention_module(block).heads)
            k = min(n - 1, round(n * head_fraction))
            entry["heads"] = sorted(torch.randperm(n, generator=g)[:k].tolist())
        for ffn in block.spec.ffns:
            if (up := get_linear(block.module, ffn.up)) is not None and get_linear(block.module, ffn.down) is not None:
                k = min(up.out_features - 1, round(up.out_features * ffn_fraction))
                entry[ffn.up] = sorted(torch.randperm(up.out_features, generator=g)[:k].tolist())
        out[block.name] = entry
    return out


def zero_units(transformer: nn.Module, choice: UnitChoice) -> None:
    """Zero the chosen heads (out-projection columns) and neurons (up rows and bias, down columns), in place."""
    by_name = {b.name: b for b in blocks(transformer)}
    for name, entry in choice.items():
        block = by_name[name]
        if entry.get("heads"):
            cols = head_channels(entry["heads"], head_dim(attention_module(block)))
            for out in block.spec.heads.out:
                if (lin := get_linear(block.module, out)) is not None:
                    lin.weight.data[:, cols] = 0.0
        for ffn in block.spec.ffns:
            if not entry.get(ffn.up):
                continue
            up, down = get_linear(block.module, ffn.up), get_linear(block.module, ffn.down)
            gone = torch.tensor(entry[ffn.up])
            up.weight.data[gone] = 0.0
            if up.bias is not None:
                up.bias.data[gone] = 0.0
            down.weight.data[:, down.in_features - up.out_features + gone] = 0.0


def slice_units(transformer: nn.Module, choice: UnitChoice) -> None:
    """Physically remove the chosen heads and neurons (``surgery.remove_heads`` / ``remove_neurons``), in place."""
    by_name = {b.name: b for b in blocks(transformer)}
    for name, entry in choice.items():
        block = by_name[name]
        if entry.get("heads"):
            n = int(attention_module(block).heads)
            remove_heads(block, [h for h in range(n) if h not in set(entry["heads"])])
        for ffn in block.spec.ffns:
            if entry.get(ffn.up):
                hidden = get_linear(block.module, ffn.up).out_features
                drop = set(entry[ffn.up])
                remove_neurons(block, ffn, [j for j in range(hidden) if j not in drop])


def transformer_calls(pipe, prompts: list[str], seed: int = 0, call: dict | None = None) -> list[dict]:
    """The keyword inputs of every transformer call while ``pipe`` samples ``prompts`` (tensors cloned)."""
    calls: list[dict] = []

    def grab(module, args, kwargs):
        calls.append({k: v.detach().clone() if isinstance(v, Tensor) else v for k, v in kwargs.items()})

    handle = pipe.transformer.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        call = call if call is not None else call_kwargs(getattr(pipe, "obsdiff_generation", {}))
        run_pipeline(pipe, prompts, seed, call, batch_size=len(prompts), output_type="latent", progress=False)
    finally:
        handle.remove()
    return calls


def max_output_diff(transformer_a: nn.Module, transformer_b: nn.Module, calls: list[dict],
                    dtype: torch.dtype | None = None) -> float:
    """Largest absolute difference between two transformers' outputs over the same recorded calls.

    ``dtype`` casts the recorded floating inputs (the transformers must already be in that dtype).
    """
    worst = 0.0
    with torch.no_grad():
        for kwargs in calls:
            if dtype is not None:
                kwargs = {k: v.to(dtype) if isinstance(v, Tensor) and v.is_floating_point() else v
                          for k, v in kwargs.items()}
            kwargs = dict(kwargs, return_dict=False)
            a, b = transformer_a(**kwargs)[0], transformer_b(**kwargs)[0]
            worst = max(worst, float((a.float() - b.float()).abs().max()))
    return worst


# --- The smaller model ------------------------------------------------------------------------------------


def structure_rows(before: dict[str, dict[str, int]], after: dict[str, dict[str, int]]) -> list[dict]:
    """One row per block: heads and each FFN's width before -> after (``transformer_structure`` dicts)."""
    rows = []
    for name, entry in before.items():
        row = {"block": name}
        for key, value in entry.items():
            row[key] = (int(value), int(after.get(name, {}).get(key, value)))
        rows.append(row)
    return rows


def _ffn_label(key: str) -> str:
    """A short column name for an FFN up projection: ff, ff_context, mlp."""
    return {"ff.net.0.proj": "ffn (image)", "ff_context.net.0.proj": "ffn (text)", "proj_mlp": "mlp"}.get(key, key)


def format_structure_table(before: dict[str, dict[str, int]], after: dict[str, dict[str, int]]) -> str:
    """Plain-text table: per block, heads and FFN widths as ``before -> after`` ('-' if the block lacks one)."""
    rows = structure_rows(before, after)
    keys = list(dict.fromkeys(k for r in rows for k in r if k != "block"))
    header = ["block", *[k if k == "heads" else _ffn_label(k) for k in keys]]
    body = []
    for r in rows:
        cells = [r["block"]]
        for k in keys:
            if k not in r:
                cells.append("-")
            else:
                b, a = r[k]
                cells.append(f"{b}" if a == b else f"{b} -> {a}")
        body.append(cells)
    widths = [max(len(x[i]) for x in [header, *body]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(header), "  ".join("-" * w for w in widths), *(line(cells) for cells in body)])


# --- Timing -----------------------------------------------------------------------------------------------


@dataclass
class Timings:
    """Wall-clock seconds per repeat for each pipeline: the whole sampling call and the transformer alone."""

    total: dict[str, list[float]] = field(default_factory=dict)
    transformer: dict[str, list[float]] = field(default_factory=dict)

    def medians(self) -> dict[str, dict[str, float]]:
        """{name: {"total": median s, "transformer": median s}}."""
        return {n: {"total": statistics.median(self.total[n]), "transformer": statistics.median(self.transformer[n])}
                for n in self.total}


def _transformer_clock(transformer: nn.Module) -> tuple[list[float], list]:
    """Hooks that add each transformer forward's wall time to a one-element list; (acc, handles)."""
    acc, start = [0.0], [0.0]

    def pre(module, args, kwargs):
        start[0] = time.perf_counter()

    def post(module, args, kwargs, output):
        acc[0] += time.perf_counter() - start[0]

    handles = [transformer.register_forward_pre_hook(pre, with_kwargs=True),
               transformer.register_forward_hook(post, with_kwargs=True)]
    return acc, handles


def time_sampling(pipes: dict[str, object], prompts: list[str], repeats: int = 5, warmup: int = 1, seed: int = 0,
                  call: dict | None = None) -> Timings:
    """Time each pipeline on the same prompts, interleaved (A B A B ...) so drifts in machine load hit all alike."""
    out = Timings({n: [] for n in pipes}, {n: [] for n in pipes})
    for r in range(warmup + repeats):
        for name, pipe in pipes.items():
            kwargs = call if call is not None else call_kwargs(getattr(pipe, "obsdiff_generation", {}))
            acc, handles = _transformer_clock(pipe.transformer)
            try:
                t0 = time.perf_counter()
                run_pipeline(pipe, prompts, seed, kwargs, batch_size=len(prompts), output_type="latent", progress=False)
                elapsed = time.perf_counter() - t0
            finally:
                for h in handles:
                    h.remove()
            if r >= warmup:
                out.total[name].append(elapsed)
                out.transformer[name].append(acc[0])
    return out


# --- Pictures of images -----------------------------------------------------------------------------------


def _resize(image: np.ndarray, cell: int) -> np.ndarray:
    """One uint8 HWC image resized to cell x cell (nearest when enlarging, antialiased when shrinking)."""
    from PIL import Image

    pil = Image.fromarray(image)
    resample = Image.NEAREST if cell >= max(image.shape[:2]) else Image.LANCZOS
    return np.asarray(pil.resize((cell, cell), resample))


def comparison_figure(rows: dict[str, np.ndarray], cell: int = 64, title: str | None = None, max_cols: int = 16):
    """Rows of uint8 images (one row per model, same prompts per column) in one labelled picture; returns the figure."""
    import matplotlib.pyplot as plt

    pad = 2
    ncols = min(max_cols, min(len(v) for v in rows.values()))
    canvas = np.full((pad + len(rows) * (cell + pad), pad + ncols * (cell + pad), 3), 255, dtype=np.uint8)
    for r, images in enumerate(rows.values()):
        for c in range(ncols):
            y, x = pad + r * (cell + pad), pad + c * (cell + pad)
            canvas[y : y + cell, x : x + cell] = _resize(np.asarray(images[c]), cell)
    fig, ax = plt.subplots(figsize=(canvas.shape[1] / 72, canvas.shape[0] / 72 + 0.3), dpi=72)
    ax.imshow(canvas, interpolation="nearest")
    ax.set_yticks([pad + r * (cell + pad) + cell / 2 for r in range(len(rows))], list(rows))
    ax.set_xticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)
    if title:
        ax.set_title(title, loc="left", fontsize=9)
    fig.tight_layout()
    return fig


# --- Notebook 07: memory, prompts, CLIP score, the saved report -------------------------------------------


def hessian_budget(transformer: nn.Module, packages: int, blocks_range: str | None = None) -> list[dict]:
    """Per module package (unstructured/N:M engine): blocks, number of unique-input Hessians and their float32 bytes."""
    from .arch import parse_block_range

    all_blocks = blocks(transformer)
    selected = [all_blocks[i] for i in parse_block_range(blocks_range, len(all_blocks))]
    out = []
    for p, package in enumerate(package_units(selected, packages)):
        widths = [t.linears()[0][1].in_features for unit in package for t in unit]
        ids = sorted({t.block.index for unit in package for t in unit})
        out.append({"package": p, "blocks": (ids[0], ids[-1]), "hessians": len(widths),
                    "bytes": sum(4 * d * d for d in widths), "widest": max(widths)})
    return out


def weight_bytes(module: nn.Module, dtype: torch.dtype) -> int:
    """Bytes of ``module``'s parameters stored in ``dtype`` (works on the meta device)."""
    return sum(p.numel() for p in module.parameters()) * torch.empty((), dtype=dtype).element_size()


def is_tiny_world(pipe) -> bool:
    """True for the project's tiny shapes models (their generation.json says ``"_prompts": "shapes"``)."""
    return getattr(pipe, "obsdiff_generation", {}).get("_prompts") == "shapes"


def pick_prompts(pipe, prompts_file: str | Path, num_prompts: int, num_show: int, seed: int = 0
                 ) -> tuple[list[str], list[str]]:
    """(calibration prompts, held-out prompts to show): shapes captions for a tiny model, else the prompt file.

    For a real model the shown prompts are the file's last ``num_show`` lines, kept out of calibration
    when the file is long enough (the shipped file has 104 lines; the paper calibrates on 100).
    """
    if is_tiny_world(pipe):
        from .evaluate import shapebench_prompts

        return default_prompts(pipe, num_prompts, seed), shapebench_prompts(num_show, seed)[1]
    lines = read_prompts(prompts_file)
    show = lines[-num_show:] if num_show else []
    pool = lines[: len(lines) - num_show] if len(lines) - num_show >= num_prompts else lines
    return pool[:num_prompts], show


def clip_score(images: np.ndarray, prompts: list[str], model_name: str = CLIP_MODEL, device: str = "cpu") -> float:
    """torchmetrics' CLIP score of uint8 NHWC images vs prompts; RuntimeError saying what is missing otherwise."""
    import importlib.util

    if importlib.util.find_spec("torchmetrics") is None:
        raise RuntimeError(f"CLIP score needs torchmetrics (pip install torchmetrics) and the {model_name} weights")
    try:
        from torchmetrics.multimodal.clip_score import CLIPScore

        metric = CLIPScore(model_name_or_path=model_name).to(device)
    except Exception as exc:  # offline, no cache, or a missing optional dependency
        raise RuntimeError(
            f"CLIP score needs the {model_name} weights, which are not reachable here ({type(exc).__name__})"
        ) from None
    pixels = torch.as_tensor(np.asarray(images)).permute(0, 3, 1, 2).to(device)
    with torch.no_grad():
        return float(metric(pixels, list(prompts)))


def report_summary(report: dict | str | Path) -> dict:
    """The short form of an obsdiff.json (a dict, or a path to the file or its directory): settings and results."""
    if not isinstance(report, dict):
        path = Path(report)
        report = json.loads((path / "obsdiff.json" if path.is_dir() else path).read_text())
    config = report.get("config", {})
    keys = ("method", "pattern", "sparsity", "weighting", "weight_range", "packages", "num_prompts", "steps",
            "guidance", "seed", "hessian_device")
    out = {k: config.get(k) for k in keys if k in config}
    out.update({k: report[k] for k in ("model", "arch", "device", "num_packages", "target_sparsity",
                                       "achieved_sparsity", "targeted_parameters", "transformer_parameters")
                if k in report})
    out["pruned_layers"] = len(report.get("layers", {}))
    out["timings_s"] = {k: round(float(v), 2) for k, v in report.get("timings", {}).items()}
    if "peak_memory_bytes" in report:
        out["peak_memory_gb"] = round(report["peak_memory_bytes"] / 1e9, 3)
    out["versions"] = report.get("versions", {})
    return out


# --- Why structured: dense kernels only get faster when the matrices get smaller -------------------------


def matmul_times(out_features: int, in_features: int, tokens: int, sparsity: float, repeats: int = 5,
                 seed: int = 0) -> dict[str, float]:
    """Median seconds of X @ W^T: W dense, W with ``sparsity`` zeros (unstructured), W with that many fewer columns."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, in_features, generator=g)
    w = torch.randn(out_features, in_features, generator=g)
    zeroed = w * (torch.rand(w.shape, generator=g) >= sparsity)
    keep = in_features - round(in_features * sparsity)
    cases = {"dense": (x, w), f"{sparsity:.0%} zeros (unstructured)": (x, zeroed),
             f"{sparsity:.0%} fewer inputs (structured)": (x[:, :keep].contiguous(), w[:, :keep].contiguous())}
    times: dict[str, list[float]] = {k: [] for k in cases}
    for r in range(repeats + 1):  # interleaved; the first round warms up
        for name, (a, b) in cases.items():
            t0 = time.perf_counter()
            a @ b.T
            if r:
                times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def structured_size(name: str, sparsity: float, text_tokens: int | None = None) -> dict[str, int]:
    """Parameters and linear MACs of a full-size model (``arch.FULL_SIZE_CONFIGS``) before/after structured pruning.

    Shapes only (meta device): every block but the first and the last loses ``round(heads * sparsity)``
    heads and ``round(width * sparsity)`` neurons of each FFN, as ``prune_structured`` plans it. MACs
    per transformer call at 1024 x 1024 px with ``text_tokens`` text tokens (default: 77 for SD3, the
    paper's Table 9 convention; 512 for Flux).
    """
    from .arch import build_full_size_transformer, parse_block_range
    from .structured import count_parameters, default_structured_blocks, linear_macs
    from .surgery import apply_structure, transformer_structure

    transformer = build_full_size_transformer(name)
    arch = arch_for_transformer(transformer).name
    text = text_tokens if text_tokens is not None else {"sd3": 77, "flux": 512}[arch]

    def size() -> tuple[int, int]:
        return count_parameters(transformer), linear_macs(transformer, 1024, 1024, text)

    params_before, macs_before = size()
    all_blocks = blocks(transformer)
    structure = transformer_structure(transformer)
    for i in parse_block_range(default_structured_blocks(len(all_blocks)), len(all_blocks)):
        entry = structure[all_blocks[i].name]
        structure[all_blocks[i].name] = {k: v - round(v * sparsity) for k, v in entry.items()}
    apply_structure(transformer, structure)
    params_after, macs_after = size()
    return {"parameters_before": params_before, "parameters_after": params_after,
            "macs_before": macs_before, "macs_after": macs_after}

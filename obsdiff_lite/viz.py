"""Helpers for course notebooks 04 (unstructured and N:M), 06 (module packages) and 08 (where to prune): sweeps,
pictures, packages.

Everything the notebooks compute that matters lives here (tested in tests/test_viz.py); the notebooks call
these functions and draw the results.

* sweeps: ``config_sweep`` (any list of labelled ``PruneConfig``s), ``sparsity_sweep`` (methods x sparsities / N:M
  patterns) and ``package_sweep`` (packages x calibration mode) prune ONE loaded pipeline again and again, restoring
  the dense weights in between, and score every run on the same ShapeBench prompts and seeds (``Run`` holds settings,
  scores, images and the pruning report);
* checks: ``layer_sparsity_range``, ``nm_valid``, ``same_pruning``;
* pictures: ``image_rows`` / ``show_image_rows`` (labelled rows of images, adherence marked per image),
  ``show_setting`` and its thin widget wrapper ``setting_slider``, ``plot_package_map``;
* module packages and memory: ``package_infos`` (which layers and unique inputs go in which package, and the
  Hessian bytes they hold), ``resolve_packages`` ("all" = one unit per package), ``trajectory_cache_bytes`` and
  ``full_size_geometry`` (the cached mode's cache at full size), ``format_bytes``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor, nn

from .arch import arch_for_transformer, block_units, blocks, get_linear, parse_block_range
from .plan import format_bytes  # noqa: F401  (re-exported for the notebooks)

if TYPE_CHECKING:
    from matplotlib.axes import Axes

HESSIAN_BYTES = 4  # HessianAccumulator keeps float32
METHOD_COLORS = {"dense": "black", "magnitude": "tab:gray", "wanda": "tab:orange", "dsnot": "tab:brown", "sparsegpt": "tab:green",
                 "obs-diff": "tab:blue", "obs-diff+refit": "tab:purple", "sparsegpt+refit": "tab:olive",
                 "wanda+refit": "tab:pink", "magnitude+refit": "tab:cyan", "dsnot+refit": "tab:red",
                 "obs-diff+admm": "crimson", "sparsegpt+admm": "darkgreen"}
REFIT_SUFFIX = "+refit"  # sweep method labels like "obs-diff+refit": that method with PruneConfig(refit=True)
ADMM_SUFFIX = "+admm"  # "obs-diff+admm": that method with PruneConfig(solver="admm")
# Short names of a block's units, per block kind (arch.BlockSpec.kind).
UNIT_NAMES = {"joint": ("qkv", "out", "ff-up", "ff-down"), "single": ("qkv+mlp", "out")}


# --------------------------------------------------------------------------------------------------
# Runs and labels
# --------------------------------------------------------------------------------------------------


def setting_label(pattern: str, sparsity: float | None) -> str:
    """'50%' for unstructured 0.5, the pattern itself ('2:4') for N:M, 'dense' for the unpruned model."""
    if pattern == "dense":
        return "dense"
    if pattern == "unstructured":
        return f"{float(sparsity):.0%}"
    return pattern


@dataclass
class Run:
    """One model of a sweep (dense or pruned): settings, ShapeBench scores, images and the pruning report."""

    method: str  # "dense" for the unpruned model
    pattern: str  # "dense" | "unstructured" | "N:M"
    sparsity: float  # the target (0.0 for dense; n/m for N:M)
    scores: dict[str, float]
    images: np.ndarray  # uint8 [N, 32, 32, 3], ShapeBench prompt i with seed + i
    report: dict | None = None  # prune()'s report (None for dense)
    packages: int = 0
    calibration: str = ""
    wall_s: float = 0.0  # wall time of prune() (NOT deterministic)
    weights: dict[str, Tensor] | None = field(default=None, repr=False)  # pruned target weights, if kept

    @property
    def setting(self) -> str:
        """'50%', '2:4' or 'dense' (see ``setting_label``)."""
        return setting_label(self.pattern, self.sparsity)

    @property
    def name(self) -> str:
        """'dense' or 'METHOD SETTING', e.g. 'obs-diff 50%'."""
        return "dense" if self.method == "dense" else f"{self.method} {self.setting}"


def pick(runs: Sequence[Run], **filters) -> list[Run]:
    """The runs whose attributes (method, pattern, setting, packages, calibration, ...) equal every filter."""
    return [r for r in runs if all(getattr(r, k) == v for k, v in filters.items())]


def runs_table(runs: Sequence[Run], metrics: Sequence[str] = ("full", "shape", "color", "size", "psnr", "ssim"),
               name=None) -> str:
    """A plain-text ShapeBench table, one line per run (``name(run)`` labels it; default ``run.name``)."""
    from .shapes.bench import format_table

    label = name or (lambda r: r.name)
    return format_table({label(r): {m: r.scores.get(m) for m in metrics} for r in runs})


def metric_curve(runs: Sequence[Run], method: str, metric: str = "full") -> tuple[list[float], list[float]]:
    """(sparsities, values) of ``method``'s unstructured runs, sorted by sparsity."""
    points = sorted((r.sparsity, r.scores[metric]) for r in pick(runs, method=method, pattern="unstructured"))
    return [s for s, _ in points], [v for _, v in points]


# --------------------------------------------------------------------------------------------------
# Target layers, weights and checks
# --------------------------------------------------------------------------------------------------


def target_linears(transformer: nn.Module) -> dict[str, nn.Linear]:
    """Every prunable block linear by global name ('transformer_blocks.0.attn.to_q'), in forward order."""
    out: dict[str, nn.Linear] = {}
    for block in blocks(transformer):
        for unit in block_units(block):
            for group in unit:
                for name in group:
                    out[f"{block.name}.{name}"] = get_linear(block.module, name)
    return out


def snapshot(module: nn.Module) -> dict[str, Tensor]:
    """A detached copy of ``module``'s state dict (to restore the dense weights between runs)."""
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def restore(module: nn.Module, state: dict[str, Tensor]) -> None:
    """Copy a ``snapshot`` back into ``module`` in place."""
    module.load_state_dict(state)


def layer_sparsity_range(report: dict) -> tuple[float, float]:
    """(lowest, highest) fraction of zeros over the target layers of a prune() report."""
    values = [float(layer["sparsity"]) for layer in report["layers"].values()]
    return min(values), max(values)


def nm_valid(weights: nn.Module | dict[str, Tensor], n: int, m: int) -> bool:
    """True if every target weight has at most m - n nonzeros in each group of m consecutive inputs of a row.

    ``weights`` is a transformer (its target linears are checked) or a dict of weights (``Run.weights``).
    """
    if isinstance(weights, nn.Module):
        weights = {k: lin.weight for k, lin in target_linears(weights).items()}
    for w in weights.values():
        w = w.detach()
        if w.shape[1] % m:
            return False
        nonzeros = (w != 0).reshape(w.shape[0], -1, m).sum(-1)
        if bool((nonzeros > m - n).any()):
            return False
    return True


def same_pruning(a: dict[str, Tensor], b: dict[str, Tensor], min_mask_agreement: float = 0.99,
                 rtol: float = 1e-3, atol: float = 1e-5) -> bool:
    """Two pruned weight sets agree: the same zeros on >= min_mask_agreement of each layer, kept weights allclose."""
    if a.keys() != b.keys():
        return False
    for key, wa in a.items():
        wb = b[key]
        if float(((wa == 0) == (wb == 0)).float().mean()) < min_mask_agreement:
            return False
        both = (wa != 0) & (wb != 0)
        if not torch.allclose(wa[both], wb[both], rtol=rtol, atol=atol):
            return False
    return True


def recon_errors(report: dict, key: str = "recon_error_rel") -> dict[str, float]:
    """Per-layer reconstruction error of an OBS run (layer name -> value); empty for magnitude/Wanda."""
    return {name: float(layer[key]) for name, layer in report["layers"].items() if key in layer}


def adherent(images: np.ndarray, specs: Sequence) -> np.ndarray:
    """Per image: does the classical detector read back exactly the prompt's spec? (bool [N])."""
    from .shapes.detector import detect_batch

    return np.array([d.spec == s for d, s in zip(detect_batch(images), specs)], dtype=bool)


# --------------------------------------------------------------------------------------------------
# Sweeps
# --------------------------------------------------------------------------------------------------


def _dense_run(pipe, num_eval_prompts: int, seed: int, progress: bool) -> tuple[Run, list]:
    """Sample and score the dense model once; return (its Run, the ShapeBench specs)."""
    from .evaluate import sample_shapebench
    from .shapes.bench import evaluate

    specs, images = sample_shapebench(pipe, num_eval_prompts, seed=seed, progress=progress)
    return Run("dense", "dense", 0.0, evaluate(images, specs), images), specs


def _pruned_run(pipe, dense_state: dict[str, Tensor], config, specs, dense_images: np.ndarray, seed: int,
                keep_weights: bool, progress: bool, label: str | None = None) -> Run:
    """Restore the dense weights, prune with ``config``, sample the ShapeBench prompts, score against dense.

    ``label`` names the run's method (default ``config.method``), e.g. "obs-diff+refit"."""
    from .evaluate import sample_shapebench
    from .prune import prune
    from .shapes.bench import evaluate

    restore(pipe.transformer, dense_state)
    start = time.perf_counter()
    report = prune(pipe, config, progress=progress)
    wall = time.perf_counter() - start
    _, images = sample_shapebench(pipe, len(specs), seed=seed, progress=progress)
    weights = None
    if keep_weights:
        weights = {k: lin.weight.detach().clone() for k, lin in target_linears(pipe.transformer).items()}
    return Run(label or config.method, config.pattern, report["target_sparsity"],
               evaluate(images, specs, reference=dense_images), images, report, report["num_packages"],
               config.calibration, wall, weights)


def _load(model: str | None, device: str, pipe: Any) -> Any:
    """The given pipeline, or a freshly loaded one."""
    if pipe is not None:
        return pipe
    from .pipelines import load_pipeline

    return load_pipeline(model, device=device)


def config_sweep(model: str | None, configs: Sequence[tuple[str, Any]], *, num_eval_prompts: int = 32, seed: int = 0,
                 device: str = "cpu", pipe=None, keep_weights: bool = False, progress: bool = False) -> list[Run]:
    """Dense, then one run per ``(label, PruneConfig)`` in order, all scored on the same ShapeBench prompts and seeds.

    The label becomes the run's ``method`` (e.g. "obs-diff+refit", "block 0"). One pipeline is loaded (or ``pipe`` is
    used) and pruned in place run after run, the dense weights restored in between; it is left dense at the end.
    Calibration prompts come from ``prune.default_prompts`` (seeds disjoint from ShapeBench's); ``seed`` picks the
    evaluation prompts and the generator seeds.
    """
    pipe = _load(model, device, pipe)
    dense_state = snapshot(pipe.transformer)
    dense, specs = _dense_run(pipe, num_eval_prompts, seed, progress)
    runs = [dense]
    try:
        for label, config in configs:
            runs.append(_pruned_run(pipe, dense_state, config, specs, dense.images, seed, keep_weights, progress,
                                    label=label))
    finally:
        restore(pipe.transformer, dense_state)
    return runs


def sparsity_sweep(model: str | None, methods: Sequence[str], sparsities: Sequence[float],
                   patterns: Sequence[str] = (), *, num_calibration_prompts: int = 8, num_eval_prompts: int = 32,
                   seed: int = 0, packages: int | str = 1, weighting: str = "log-decrease", device: str = "cpu",
                   pipe=None, keep_weights: bool = False, progress: bool = False) -> list[Run]:
    """Dense, then every method at every unstructured sparsity and every N:M pattern (``config_sweep``).

    A method may carry the suffix "+refit" ("obs-diff+refit"): the same method with the least-squares re-fit of
    the kept weights (``PruneConfig.refit``, beyond the paper), or "+admm" ("obs-diff+admm"): with ADMM after OBS
    (``PruneConfig.solver="admm"``, beyond the paper); its runs keep that label.
    """
    from .prune import PruneConfig

    pipe = _load(model, device, pipe)
    g = resolve_packages(pipe.transformer, packages)
    settings = [("unstructured", float(s)) for s in sparsities] + [(p, None) for p in patterns]
    configs = [(method, PruneConfig(method=method.removesuffix(REFIT_SUFFIX).removesuffix(ADMM_SUFFIX), pattern=pattern,
                                    sparsity=sparsity, packages=g, num_prompts=num_calibration_prompts, seed=seed,
                                    weighting=weighting, refit=method.endswith(REFIT_SUFFIX),
                                    solver="admm" if method.endswith(ADMM_SUFFIX) else "obs"))
               for pattern, sparsity in settings for method in methods]
    return config_sweep(None, configs, num_eval_prompts=num_eval_prompts, seed=seed, pipe=pipe,
                        keep_weights=keep_weights, progress=progress)


def package_sweep(model: str | None, packages: Sequence[int | str], calibrations: Sequence[str] = ("exact", "cached"),
                  *, method: str = "obs-diff", sparsity: float = 0.5, pattern: str = "unstructured",
                  num_calibration_prompts: int = 8, num_eval_prompts: int = 32, seed: int = 0, device: str = "cpu",
                  pipe=None, keep_weights: bool = False, progress: bool = False) -> list[Run]:
    """Dense, then ``method`` with every number of packages (ints or 'all') in every calibration mode (``config_sweep``).

    ``Run.wall_s`` and ``Run.report['timings']`` hold the (machine-dependent) pruning times.
    """
    from .prune import PruneConfig

    pipe = _load(model, device, pipe)
    configs = [(method, PruneConfig(method=method, pattern=pattern, sparsity=None if ":" in pattern else sparsity,
                                    packages=resolve_packages(pipe.transformer, g), calibration=calibration,
                                    num_prompts=num_calibration_prompts, seed=seed))
               for calibration in calibrations for g in packages]
    return config_sweep(None, configs, num_eval_prompts=num_eval_prompts, seed=seed, pipe=pipe,
                        keep_weights=keep_weights, progress=progress)


# --------------------------------------------------------------------------------------------------
# Pictures: labelled rows of images
# --------------------------------------------------------------------------------------------------


def _font(size: int) -> Any:
    """PIL's default font at ``size`` px (FreeType), or the fixed bitmap font where FreeType is missing."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):
        return ImageFont.load_default()


def image_rows(rows: dict[str, np.ndarray], n: int = 8, scale: int = 3, captions: Sequence[str] | None = None,
               marks: dict[str, Sequence[bool]] | None = None, title: str | None = None, label_width: int = 150,
               font_size: int = 12) -> Image.Image:
    """One row per label (same columns = same prompt and seed), label on the left, captions over the columns.

    ``marks[label][i]`` draws a green (True) or red (False) frame around image i of that row (e.g. ShapeBench
    adherence). Images are uint8 [N, H, W, 3]; the first ``n`` of each row are shown, upscaled ``scale``x;
    ``title`` goes on top.
    """
    import textwrap

    if not rows:
        raise ValueError("no rows to draw")
    first = next(iter(rows.values()))
    n = min(n, *(len(v) for v in rows.values()))
    cell_h, cell_w = first.shape[1] * scale, first.shape[2] * scale
    pad, frame = 4, 2
    font = _font(font_size)
    wrapped = [textwrap.wrap(c, max(6, cell_w // (font_size // 2 + 1)))[:4] for c in captions[:n]] if captions else []
    top = font_size + 2 * pad if title else 0
    header = top + (font_size + 2) * max((len(w) for w in wrapped), default=0) + (pad if wrapped else 0)
    width = label_width + n * (cell_w + pad) + pad
    height = header + len(rows) * (cell_h + pad) + pad
    grid = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    if title:
        draw.text((pad, pad), title, fill=(0, 0, 0), font=font)
    for i, lines in enumerate(wrapped):
        x = label_width + i * (cell_w + pad)
        for k, line in enumerate(lines):
            draw.text((x, top + pad + k * (font_size + 2)), line, fill=(40, 40, 40), font=font)
    for r, (label, images) in enumerate(rows.items()):
        y = header + pad + r * (cell_h + pad)
        for k, line in enumerate(label.split("\n")):
            draw.text((pad, y + cell_h // 2 - font_size + k * (font_size + 2)), line, fill=(0, 0, 0), font=font)
        for i in range(n):
            x = label_width + i * (cell_w + pad)
            grid.paste(Image.fromarray(np.asarray(images[i])).resize((cell_w, cell_h), Image.NEAREST), (x, y))
            if marks is not None and label in marks:
                color = (30, 160, 60) if marks[label][i] else (220, 40, 40)
                draw.rectangle([x, y, x + cell_w - 1, y + cell_h - 1], outline=color, width=frame)
    return grid


def show_image_rows(rows: dict[str, np.ndarray], n: int = 8, scale: int = 3, captions: Sequence[str] | None = None,
                    marks: dict[str, Sequence[bool]] | None = None, title: str | None = None,
                    ax: Axes | None = None) -> Axes:
    """Draw ``image_rows(...)`` on a matplotlib Axes (a new figure, exactly 1 pixel per pixel, if none); return it."""
    import matplotlib.pyplot as plt

    picture = np.asarray(image_rows(rows, n, scale, captions, marks, title))
    if ax is None:
        height, width = picture.shape[:2]
        dpi = plt.rcParams["figure.dpi"]
        ax = plt.figure(figsize=(width / dpi, height / dpi), dpi=dpi).add_axes((0, 0, 1, 1))
    ax.imshow(picture, interpolation="nearest")
    ax.set_axis_off()
    return ax


def setting_rows(runs: Sequence[Run], setting: str, specs: Sequence) -> tuple[dict, dict]:
    """(images, adherence marks) keyed 'dense' and 'METHOD\\nfull k/N' for every run at ``setting``."""
    chosen = pick(runs, method="dense") + [r for r in runs if r.method != "dense" and r.setting == setting]
    if len(chosen) < 2:
        raise ValueError(f"no pruned run at setting {setting!r}; settings: {sorted({r.setting for r in runs})}")
    images, marks = {}, {}
    for r in chosen:
        ok = adherent(r.images, specs)
        label = f"{r.method}\nfull {int(ok.sum())}/{len(ok)}"
        images[label], marks[label] = r.images, ok
    return images, marks


def show_setting(runs: Sequence[Run], setting: str, specs: Sequence, n: int = 8, captions: Sequence[str] | None = None,
                 ax: Axes | None = None) -> Axes:
    """Dense on top, then every method at ``setting`` ('50%', '2:4', ...): the same prompts and seeds per column."""
    images, marks = setting_rows(runs, setting, specs)
    return show_image_rows(images, n=n, captions=captions, marks=marks, ax=ax,
                           title=f"{setting}: frame green = ShapeBench reads back the prompt, red = it does not")


def setting_slider(runs: Sequence[Run], specs: Sequence, n: int = 8, captions: Sequence[str] | None = None) -> Any:
    """An ipywidgets slider over the sweep's settings that redraws ``show_setting`` (precomputed images only)."""
    import ipywidgets as widgets
    import matplotlib.pyplot as plt
    from IPython.display import display

    settings = list(dict.fromkeys(r.setting for r in runs if r.method != "dense"))
    slider = widgets.SelectionSlider(options=settings, value=settings[0], description="sparsity",
                                     continuous_update=False)
    out = widgets.Output()

    def redraw(change: dict) -> None:
        """Redraw the grid for the slider's new setting."""
        with out:
            out.clear_output(wait=True)
            show_setting(runs, change["new"], specs, n=n, captions=captions)
            plt.show()

    slider.observe(redraw, names="value")
    display(widgets.VBox([slider, out]))
    return slider


# --------------------------------------------------------------------------------------------------
# Module packages and memory
# --------------------------------------------------------------------------------------------------


@dataclass
class PackageInfo:
    """One module package: its blocks, units (labels), layers, and unique inputs (one Hessian each)."""

    index: int
    blocks: list[int]
    units: list[str]  # e.g. 'b0 qkv' (block 0, first unit)
    layers: list[str]  # global linear names
    inputs: list[tuple[str, int]]  # (first linear of each input group, its in_features)

    @property
    def hessian_bytes(self) -> int:
        """float32 d x d per unique input: what this package's accumulators hold at once."""
        return sum(d * d * HESSIAN_BYTES for _, d in self.inputs)


def num_units(transformer: nn.Module, block_range: str | None = None) -> int:
    """How many units (the most packages allowed) the selected blocks have."""
    all_blocks = blocks(transformer)
    return sum(len(block_units(all_blocks[i])) for i in parse_block_range(block_range, len(all_blocks)))


def resolve_packages(transformer: nn.Module, packages: int | str, block_range: str | None = None) -> int:
    """An int stays; 'all' becomes one unit per package (24 for tiny SD3, 16 for tiny Flux, 96 for SD3-medium)."""
    if packages == "all":
        return num_units(transformer, block_range)
    if isinstance(packages, bool) or not isinstance(packages, int) or packages < 1:
        hint = (" ('blocks', one package per block, is a prune() setting; the package sweeps plot G as a number)"
                if packages == "blocks" else "")
        raise ValueError(f"packages must be a number >= 1 or 'all' (one unit per package), got {packages!r}{hint}")
    return packages


def _unit_name(block, unit_index: int) -> str:
    """Short name of a block's unit: 'qkv', 'out', 'ff-up', 'ff-down' (joint) or 'qkv+mlp', 'out' (Flux single)."""
    names = UNIT_NAMES.get(block.spec.kind, ())
    return names[unit_index] if unit_index < len(names) else f"u{unit_index}"


def package_infos(transformer: nn.Module, packages: int | str, block_range: str | None = None) -> list[PackageInfo]:
    """The module packages ``prune()`` would use (``prune.package_units``), with their layers and unique inputs."""
    from .prune import package_units

    all_blocks = blocks(transformer, arch_for_transformer(transformer))
    selected = [all_blocks[i] for i in parse_block_range(block_range, len(all_blocks))]
    out = []
    for p, package in enumerate(package_units(selected, resolve_packages(transformer, packages, block_range))):
        units, layers, inputs, block_ids = [], [], [], []
        for unit in package:
            block = unit[0].block
            position = [[list(g) for g in u] for u in block_units(block)].index([t.names for t in unit])
            units.append(f"b{block.index} {_unit_name(block, position)}")
            if block.index not in block_ids:
                block_ids.append(block.index)
            for target in unit:
                layers += [name for name, _ in target.linears()]
                inputs.append((target.key, target.linears()[0][1].in_features))
        out.append(PackageInfo(p, block_ids, units, layers, inputs))
    return out


def plot_package_map(transformer: nn.Module, counts: Sequence[int | str], ax: Axes | None = None) -> Axes:
    """One row per G in ``counts``: every unit in block order, coloured by the package it falls in."""
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    rows = [package_infos(transformer, g) for g in counts]
    units = [u for p in rows[0] for u in p.units]
    grid = np.array([[p.index for p in infos for _ in p.units] for infos in rows], dtype=float)
    if ax is None:
        _, ax = plt.subplots(figsize=(min(16, 0.32 * len(units) + 1.5), 0.55 * len(rows) + 1.4))
    cmap = ListedColormap(plt.get_cmap("tab20")(np.arange(20) % 20))
    ax.imshow(grid % 20, cmap=cmap, vmin=0, vmax=19, aspect="auto", interpolation="nearest")
    for r, infos in enumerate(rows):
        for p in infos:
            start = sum(len(q.units) for q in infos[: p.index])
            ax.text(start + (len(p.units) - 1) / 2, r, str(p.index + 1), ha="center", va="center", fontsize=7)
    edges = [i for i in range(1, len(units)) if units[i].split()[0] != units[i - 1].split()[0]]
    for x in edges:
        ax.axvline(x - 0.5, color="black", lw=1.5)
    ax.set_yticks(range(len(rows)), [f"G = {len(infos)}" for infos in rows])
    ax.set_xticks(range(len(units)), units, rotation=90, fontsize=7)
    ax.set_title("module packages: units in block order (black lines: block boundaries), numbered by package",
                 loc="left")
    return ax


def trajectory_cache_bytes(num_prompts: int, steps: int, image_tokens: int, text_tokens: int, hidden: int,
                           cfg: int = 2, bytes_per_value: int = 2) -> int:
    """Block-input cache of ``calibration='cached'``: hidden + text states + temb per prompt, CFG half and step."""
    return num_prompts * cfg * steps * (image_tokens + text_tokens + 1) * hidden * bytes_per_value


def full_size_geometry(transformer: nn.Module, resolution: int = 512) -> dict[str, int]:
    """Tokens per sample, CFG factor and hidden width of a (full-size) SD3/Flux transformer at ``resolution`` px.

    SD3: 8x VAE, 2x2 patches, 77 CLIP + 256 T5 text tokens, CFG batches 2 halves. Flux-dev: 8x VAE, 2x2
    packed latents, 512 T5 tokens, guidance-distilled (no CFG).
    """
    arch = arch_for_transformer(transformer).name
    side = resolution // 8 // 2
    config = transformer.config
    return {"image_tokens": side * side, "text_tokens": 333 if arch == "sd3" else 512, "cfg": 2 if arch == "sd3" else 1,
            "hidden": int(config.num_attention_heads * config.attention_head_dim)}

"""Render the README's result tables from benchmarks/results/*.json (never type a number by hand).

    python benchmarks/readme.py          # rewrite the generated blocks in README.md
    python benchmarks/readme.py --check  # exit 1 if README.md is out of date (used by the tests)

A generated block sits between ``<!-- results:NAME -->`` and ``<!-- /results:NAME -->``; NAME picks
the renderer below.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
README = ROOT / "README.md"


def _load(name: str) -> dict:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def render_tiny_world() -> str:
    """Dense quality and pruning sensitivity of the shipped tiny models."""
    data = _load("tiny_world")
    if not data:
        return "_not measured yet: run `python benchmarks/tiny_world.py`_"
    sparsities = None
    lines = []
    for model, r in data.items():
        curves = r["curves"]
        sparsities = sparsities or list(next(iter(curves.values())))
        if not lines:
            head = "| model | dense full adherence | " + " | ".join(
                f"{m} {float(s):.0%}" for m in curves for s in sparsities) + " |"
            lines += [head, "|---" * (2 + len(curves) * len(sparsities)) + "|"]
        cells = [f"{curves[m][s]['full']:.3f}" for m in curves for s in sparsities]
        lines.append(f"| {model} | {r['dense']['full']:.3f} (n={r['num_prompts']}) | " + " | ".join(cells) + " |")
    lines.append("")
    commands = dict.fromkeys(r["command"] for r in data.values())  # distinct, in table order
    lines.append("Full ShapeBench adherence (all four attributes right). Produced by " +
                 " and ".join(f"`{c}`" for c in commands) + ".")
    return "\n".join(lines)


def render_demo() -> str:
    """The `make demo` comparison (dense vs OBS-Diff, + refit, + ADMM vs magnitude at 50%)."""
    path = RESULTS / "demo" / "report.json"
    data = json.loads(path.read_text()) if path.is_file() else {}
    if not data:
        return "_not measured yet: run `obsdiff demo --output benchmarks/results/demo`_"
    rows = ["| model | full adherence | shape | color | position | size | Fréchet dist. | PSNR to dense (dB) |",
            "|---|---|---|---|---|---|---|---|"]
    for name, s in data["scores"].items():
        psnr = f"{s['psnr']:.1f}" if "psnr" in s else "–"
        rows.append(f"| {name} | {s['full']:.3f} | {s['shape']:.3f} | {s['color']:.3f} | {s['position']:.3f} | "
                    f"{s['size']:.3f} | {s['fd']:.1f} | {psnr} |")
    rows.append("")
    rows.append(f"{data['num_prompts']} ShapeBench prompts, {data['calibration_prompts']} calibration prompts, "
                f"4 packages, log-decrease weighting; produced by `obsdiff demo --output benchmarks/results/demo`.")
    return "\n".join(rows)


def _cell(metric: dict | None, digits: int = 3) -> str:
    if metric is None:
        return "–"
    if metric["n"] < 2:
        return f"{metric['mean']:.{digits}f}"
    return f"{metric['mean']:.{digits}f} ± {metric['ci95']:.{digits}f}"


def _rows(name: str) -> list[dict]:
    return _load(name).get("rows", [])


def _find(rows: list[dict], **setting) -> dict | None:
    for r in rows:
        if all(r["setting"].get(k) == v for k, v in setting.items()):
            return r
    return None


def _shares(dense: float | None, *rows: dict) -> str:
    """Each row's full adherence as a share of dense, "91.4% / 96.0%" ("–" when the dense score is missing)."""
    return " / ".join(f"{r['full']['mean'] / dense:.1%}" for r in rows) if dense else "–"


def _pattern_label(pattern: str, sparsity: float | None) -> str:
    """A table label for a pattern: its sparsity ("50%") for unstructured, the pattern itself ("2:4") for N:M."""
    return f"{sparsity:.0%}" if sparsity else pattern


QUALITY_PATTERNS = [("unstructured", 0.3), ("unstructured", 0.5), ("unstructured", 0.6), ("unstructured", 0.7),
                    ("2:4", None), ("4:8", None)]
QUALITY_METHODS = ["magnitude", "wanda", "dsnot", "sparsegpt", "obs-diff"]


def render_quality() -> str:
    """Table 1/2 analog: full adherence (mean ± 95% CI over calibration seeds) per model, method, pattern."""
    data = _load("quality")
    if not data:
        return "_not measured yet: run `python benchmarks/run.py quality` then `summarize`_"
    lines = []
    for model in ("tiny-sd3", "tiny-flux"):
        dense = data["dense"].get(model, {}).get("full")
        head = [_pattern_label(p, s) for p, s in QUALITY_PATTERNS]
        lines += [f"**{model}** (dense: {dense:.3f})" if dense is not None else f"**{model}**", "",
                  "| method | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
        for method in QUALITY_METHODS:
            cells = []
            for pattern, sparsity in QUALITY_PATTERNS:
                r = _find(data["rows"], model=model, method=method, pattern=pattern, sparsity=sparsity)
                cells.append(_cell(r.get("full")) if r else "–")
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        lines.append("")
    seeds = max(len(r["seeds"]) for r in data["rows"])
    lines.append(f"Full ShapeBench adherence on {data['eval_prompts']} fixed evaluation prompts; mean ± 95% "
                 f"t-interval over {seeds} calibration seeds (magnitude uses no data: one run); {data['calibration_prompts']} "
                 "calibration prompts, 4 packages. Produced by `python benchmarks/run.py quality` "
                 "(`benchmarks/results/quality.json`, `.csv`).")
    return "\n".join(lines)


def render_weighting() -> str:
    """Table 6 analog: timestep weighting strategies at 50% and 60% on tiny-sd3."""
    data = _load("weighting")
    if not data:
        return "_not measured yet: run `python benchmarks/run.py weighting`_"
    sparsities = sorted({r["setting"]["sparsity"] for r in data["rows"]})
    lines = ["| weighting | " + " | ".join(f"full @ {s:.0%}" for s in sparsities) +
             " | " + " | ".join(f"PSNR @ {s:.0%}" for s in sparsities) + " |", "|---" * (1 + 2 * len(sparsities)) + "|"]
    for w in dict.fromkeys(r["setting"]["weighting"] for r in data["rows"]):
        rs = [_find(data["rows"], weighting=w, sparsity=s) for s in sparsities]
        lines.append(f"| {w} | " + " | ".join(_cell(r.get("full")) for r in rs) + " | " +
                     " | ".join(_cell(r.get("psnr"), 2) for r in rs) + " |")
    lines.append("")
    lines.append(f"tiny-sd3, OBS-Diff, mean ± 95% interval over {data['rows'][0]['full']['n']} calibration seeds; "
                 "`python benchmarks/run.py weighting` (per-seed values in `benchmarks/results/weighting.json`).")
    return "\n".join(lines)


def _num_packages(row: dict) -> float:
    """How many packages a row ran with ("blocks" rows recorded the count)."""
    return row["num_packages"]["mean"] if "num_packages" in row else row["setting"]["packages"]


def _packages_label(row: dict) -> str:
    g = row["setting"]["packages"]
    return f"{_num_packages(row):.0f} (one per block)" if g == "blocks" else str(g)


def render_packages() -> str:
    """Table 7 analog, with the cached calibration of this project: time, memory, quality per package count."""
    data = _load("packages")
    if not data:
        return "_not measured yet: run `python benchmarks/run.py packages`_"
    lines = ["| model | packages | mode | prune wall time (s) | peak RSS (MB) | full adherence |", "|---|---|---|---|---|---|"]
    rows = sorted(data["rows"], key=lambda r: (r["setting"]["model"], _num_packages(r), r["setting"]["packages"] == "blocks",
                                               r["setting"]["calibration"]))
    for r in rows:
        st = r["setting"]
        lines.append(f"| {st['model']} | {_packages_label(r)} | {st['calibration']} | {_cell(r['prune_wall_s'], 1)} | "
                     f"{r['peak_memory_bytes']['mean'] / 2**20:.0f} | {_cell(r['full'])} |")
    lines.append("")
    lines.append("OBS-Diff at 60%, 16 calibration prompts; 3 seeds where a ± is shown, else one run. Peak RSS is the "
                 "process high-water mark (it includes everything loaded before, so it cannot show the Hessian savings "
                 "of more packages on models this small; `obsdiff plan` computes them). \"one per block\" is "
                 "`--packages blocks`; the largest G is one package per unit (a group of linears sharing an input). "
                 "Wall times come from one process, one thread, on an otherwise idle machine: compare within the table. "
                 "`python benchmarks/run.py packages`.")
    return "\n".join(lines)


def render_structured() -> str:
    """Tables 4/9 analog: structured heads + FFN pruning, OBS-Diff vs L1-norm."""
    data = _load("structured")
    if not data:
        return "_not measured yet: run `python benchmarks/run.py structured`_"
    lines = ["| model | sparsity | method | params | linear MACs | full adherence | PSNR to dense |", "|---|---|---|---|---|---|---|"]
    rows = sorted(data["rows"], key=lambda r: (r["setting"]["model"], r["setting"]["sparsity"], r["setting"]["method"]))
    for r in rows:
        st = r["setting"]
        params = f"{r['parameters_after']['mean'] / 1e3:.0f}k / {r['parameters_before']['mean'] / 1e3:.0f}k"
        macs = f"{r['macs_after']['mean'] / 1e6:.1f}M / {r['macs_before']['mean'] / 1e6:.1f}M"
        lines.append(f"| {st['model']} | {st['sparsity']:.0%} | {st['method']} | {params} | {macs} | "
                     f"{_cell(r['full'])} | {_cell(r.get('psnr'), 2)} |")
    lines.append("")
    lines.append("Heads and FFN neurons removed in blocks 1..N-2 (first and last kept, as in the paper); "
                 "`python benchmarks/run.py structured`.")
    return "\n".join(lines)


def render_structured_parts() -> str:
    """Where structured OBS-Diff wins and loses: heads vs FFN neurons, joint vs single-stream blocks."""
    data = _load("structured_parts")
    if not data:
        return "_not measured yet: run `python benchmarks/run.py structured_parts`_"
    lines = ["| model | blocks | removed | L1-norm | OBS-Diff | OBS-Diff − L1 |", "|---|---|---|---|---|---|"]
    seen = []
    for r in data["rows"]:
        st = r["setting"]
        key = (st["model"], st["blocks"], st["head_sparsity"], st["ffn_sparsity"])
        if key in seen:
            continue
        seen.append(key)
        find = dict(model=st["model"], blocks=st["blocks"], head_sparsity=st["head_sparsity"], ffn_sparsity=st["ffn_sparsity"])
        l1, obs = _find(data["rows"], method="l1-norm", **find), _find(data["rows"], method="obs-diff", **find)
        what = f"{st['head_sparsity']:.0%} of heads" if st["head_sparsity"] else f"{st['ffn_sparsity']:.0%} of FFN neurons"
        blocks = st["blocks"] or "1:N-1 (all but first and last)"
        lines.append(f"| {st['model']} | {blocks} | {what} | {_cell(l1.get('full') if l1 else None)} | "
                     f"{_cell(obs.get('full') if obs else None)} | {_fmt(compare(obs, l1))} |")
    lines.append("")
    lines.append("Full adherence; Flux blocks 1:2 is its second double-stream (joint) block, 2:5 three single-stream "
                 "blocks. `python benchmarks/run.py structured_parts`.")
    return "\n".join(lines)


def render_head_diagnosis() -> str:
    """Per-head removal cost by four measures vs the adherence left, on one Flux joint block."""
    data = _load("head_diagnosis")
    if not data:
        return "_not measured yet: run `python benchmarks/head_diagnosis.py`_"
    seeds = data["seeds"]
    heads = len(seeds[0]["heads"])
    measures = {"OBS saliency, image + text out-projections (paper)": lambda r: sum(r["saliency"].values()),
                "block-output error": lambda r: r["block_error"],
                "noise-prediction error": lambda r: r["prediction_error"],
                "final-latent error (trajectory)": lambda r: r["latent_error"]}
    mean = lambda f, h: sum(f(s["heads"][h]) for s in seeds) / len(seeds)  # noqa: E731
    lines = ["| head removed | " + " | ".join(measures) + " | full adherence |", "|---" * (len(measures) + 2) + "|"]
    for h in range(heads):
        cells = [f"{mean(f, h):.3g}" for f in measures.values()]
        lines.append(f"| {h} | " + " | ".join(cells) + f" | {mean(lambda r: r['adherence'], h):.3f} |")
    picks = []
    for label, f in measures.items():
        chosen = [min(range(heads), key=lambda h, s=s: f(s["heads"][h])) for s in seeds]
        kept = sum(s["heads"][h]["adherence"] for s, h in zip(seeds, chosen)) / len(seeds)
        picks.append(f"{label}: head {', '.join(map(str, chosen))} → {kept:.3f}")
    best = [max(range(heads), key=lambda h, s=s: s["heads"][h]["adherence"]) for s in seeds]
    lines += ["", f"Means over calibration seeds {', '.join(str(s['seed']) for s in seeds)} ({data['model']}, block "
              f"{data['block']}, dense adherence {data['dense_adherence']:.3f}). The cheapest head by each measure, per "
              f"seed, and the adherence it leaves: {'; '.join(picks)}; the best choice per seed: head "
              f"{', '.join(map(str, best))}. `{data['command']}`."]
    return "\n".join(lines)


def render_hessian_inputs() -> str:
    """Plain (paper) vs CFG-combined ("guided", "guided-image") Hessian inputs, paired over the same seeds."""
    guided, quality, paper = _rows("hessian_inputs"), _rows("quality"), _rows("paper_calibration")
    if not guided:
        return "_not measured yet: run `python benchmarks/run.py hessian_inputs`_"
    dense = _load("quality").get("dense", {})
    variants = ("guided", "guided-image")
    lines = ["| model | calibration prompts | pattern | plain (paper) | " + " | ".join(variants) + " | "
             + " | ".join(f"{v} − plain" for v in variants) + " | share of dense: plain / " + " / ".join(variants) + " |",
             "|---" * (5 + 2 * len(variants)) + "|"]

    def add(model, prompts, pattern, sparsity, plain, rows):
        if not plain or not all(rows):
            return
        d = dense.get(model, {}).get("full")
        shares = _shares(d, plain, *rows)
        label = _pattern_label(pattern, sparsity)
        lines.append(f"| {model} | {prompts} | {label} | {_cell(plain['full'])} | "
                     + " | ".join(_cell(r["full"]) for r in rows) + " | "
                     + " | ".join(_fmt(compare(r, plain)) for r in rows) + f" | {shares} |")

    for model in MODELS_ORDER:
        for pattern, sparsity in (("unstructured", 0.5), ("unstructured", 0.6), ("2:4", None)):
            find = dict(model=model, method="obs-diff", pattern=pattern, sparsity=sparsity)
            add(model, 16, pattern, sparsity, _find(quality, **find),
                [_find(guided, hessian_inputs=v, **find) for v in variants])
    for pattern, sparsity in (("unstructured", 0.5), ("2:4", None)):
        find = dict(model="tiny-sd3", pattern=pattern, sparsity=sparsity, num_prompts=100)
        add("tiny-sd3", 100, pattern, sparsity, _find(paper, hessian_inputs="plain", **find),
            [_find(paper, hessian_inputs=v, **find) for v in variants])
    seeds = max(len(r["seeds"]) for r in guided)
    lines.append("")
    lines.append(f"OBS-Diff, full adherence, {seeds} calibration seeds, differences paired over the same seeds and "
                 "evaluation prompts, 4 packages; the plain 16-prompt rows are the quality table's OBS-Diff rows. "
                 "`guided` combines the CFG halves of every layer's input, `guided-image` only of the layers that "
                 "read image tokens alone (joint blocks' image stream). `python benchmarks/run.py hessian_inputs` and "
                 "`python benchmarks/run.py paper_calibration`.")
    return "\n".join(lines)


def _without(setting: dict, *keys: str) -> dict:
    """``setting`` without ``keys`` (the same setting but for those choices)."""
    return {k: v for k, v in setting.items() if k not in keys}


def _find_exact(rows: list[dict], **setting) -> dict | None:
    """The row whose setting is exactly ``setting`` (no other keys), e.g. plain Hessians rather than guided ones."""
    return next((r for r in rows if r["setting"] == setting), None)


def _obs_diff_setting(model: str, prompts: int, inputs: str, pattern: str, sparsity: float | None) -> tuple[dict, str]:
    """The sweep setting of a plain OBS-Diff run with these calibration prompts and Hessian inputs, and the sweep that
    holds it: the quality table (16 prompts, plain), the guided-Hessian one, or the paper's 100 prompts."""
    setting = dict(model=model, method="obs-diff", pattern=pattern, sparsity=sparsity)
    if inputs != "plain" or prompts == 100:
        setting["hessian_inputs"] = inputs
    if prompts == 100:
        setting["num_prompts"] = 100
    return setting, "paper_calibration" if prompts == 100 else "quality" if inputs == "plain" else "hessian_inputs"


def render_refit() -> str:
    """OBS-Diff with and without the least-squares re-fit of the kept weights, paired over the same seeds."""
    refit = _rows("refit")
    if not refit:
        return "_not measured yet: run `python benchmarks/run.py refit`_"
    dense = _load("quality").get("dense", {})
    sources = {"quality": _rows("quality"), "hessian_inputs": _rows("hessian_inputs"),
               "paper_calibration": _rows("paper_calibration")}
    lines = ["| model | calibration prompts | Hessian inputs | pattern | OBS-Diff | + refit | refit − OBS-Diff | "
             "PSNR to dense (dB): OBS-Diff / + refit | share of dense: OBS-Diff / + refit |", "|---" * 9 + "|"]
    cases = [(model, 16, "plain", pattern, sparsity) for model in MODELS_ORDER
             for pattern, sparsity in (("unstructured", 0.5), ("unstructured", 0.6), ("unstructured", 0.7),
                                       ("2:4", None), ("4:8", None))]
    cases += [("tiny-flux", 16, "guided-image", pattern, sparsity)
              for pattern, sparsity in (("unstructured", 0.5), ("unstructured", 0.6), ("2:4", None))]
    cases += [("tiny-sd3", prompts, inputs, pattern, sparsity) for prompts, inputs in ((16, "guided"), (100, "plain"),
                                                                                      (100, "guided"))
              for pattern, sparsity in (("unstructured", 0.5), ("2:4", None))]
    for model, prompts, inputs, pattern, sparsity in cases:
        setting, source = _obs_diff_setting(model, prompts, inputs, pattern, sparsity)
        base, new = _find_exact(sources[source], **setting), _find_exact(refit, **setting, refit=True)
        if not base or not new:
            continue
        d = dense.get(model, {}).get("full")
        shares = _shares(d, base, new)
        label = _pattern_label(pattern, sparsity)
        lines.append(f"| {model} | {prompts} | {inputs} | {label} | {_cell(base['full'])} | {_cell(new['full'])} | "
                     f"{_fmt(compare(new, base))} | {base['psnr']['mean']:.1f} / {new['psnr']['mean']:.1f} | {shares} |")
    seeds = max(len(r["seeds"]) for r in refit)
    lines.append("")
    lines.append(f"Full adherence, {seeds} calibration seeds, differences paired over the same seeds and evaluation "
                 "prompts, 4 packages. The OBS-Diff columns are the rows of the quality, guided-Hessian and 100-prompt "
                 "tables; the re-fit runs change nothing else. `python benchmarks/run.py refit`.")
    return "\n".join(lines)


def render_dense_targets() -> str:
    """OBS-Diff with the dense model's layer outputs as targets (beyond the paper), with and without the re-fit."""
    rows = _rows("dense_targets")
    if not rows:
        return "_not measured yet: run `python benchmarks/run.py dense_targets`_"
    dense = _load("quality").get("dense", {})
    quality, refit = _rows("quality"), _rows("refit")
    lines = ["| model | pattern | re-fit | OBS-Diff | + dense targets | difference | PSNR to dense (dB): OBS-Diff / "
             "+ dense targets | share of dense: OBS-Diff / + dense targets |", "|---" * 8 + "|"]
    for model in MODELS_ORDER:
        for pattern, sparsity in (("unstructured", 0.5), ("2:4", None)):
            for with_refit in (False, True):
                setting = dict(model=model, method="obs-diff", pattern=pattern, sparsity=sparsity)
                extra = {"refit": True} if with_refit else {}
                base = _find_exact(refit if with_refit else quality, **setting, **extra)
                new = _find_exact(rows, **setting, dense_targets=True, **extra)
                if not base or not new:
                    continue
                lines.append(f"| {model} | {_pattern_label(pattern, sparsity)} | {'yes' if with_refit else 'no'} | "
                             f"{_cell(base['full'])} | {_cell(new['full'])} | {_fmt(compare(new, base))} | "
                             f"{base['psnr']['mean']:.1f} / {new['psnr']['mean']:.1f} | "
                             f"{_shares(dense.get(model, {}).get('full'), base, new)} |")
    seeds = max(len(r["seeds"]) for r in rows)
    lines.append("")
    lines.append(f"Full adherence, mean ± 95% interval over {seeds} calibration seeds, differences paired over the same "
                 "seeds and evaluation prompts; 16 calibration prompts, 4 packages. The OBS-Diff column is the quality "
                 "table's row (re-fit: the re-fit table's); the dense-target runs change nothing else. "
                 "`python benchmarks/run.py dense_targets`.")
    return "\n".join(lines)


def render_tuning() -> str:
    """Block tuning after OBS-Diff and after Wanda on both tiny models (beyond the paper), paired with quality."""
    rows = _rows("tuning")
    if not rows:
        return "_not measured yet: run `python benchmarks/run.py tuning`_"
    dense = _load("quality").get("dense", {})
    quality = _rows("quality")
    iters = rows[0]["setting"]["tune_iters"]
    lines = ["| model | pattern | OBS-Diff | + block tuning | tuning adds | Wanda | + block tuning | tuning adds | "
             "tuned: OBS-Diff − Wanda | share of dense, tuned: OBS-Diff / Wanda |", "|---" * 10 + "|"]
    for model in MODELS_ORDER:
        for pattern, sparsity in (("unstructured", 0.5), ("2:4", None)):
            cells, tuned = [], []
            for method in ("obs-diff", "wanda"):
                setting = dict(model=model, method=method, pattern=pattern, sparsity=sparsity)
                base, new = _find_exact(quality, **setting), _find_exact(rows, **setting, tune_iters=iters)
                if not base or not new:
                    break
                cells += [_cell(base["full"]), _cell(new["full"]), _fmt(compare(new, base))]
                tuned.append(new)
            if len(tuned) < 2:
                continue
            full = dense.get(model, {}).get("full")
            shares = " / ".join(f"{t['full']['mean'] / full:.1%}" for t in tuned) if full else "–"
            lines.append(f"| {model} | {_pattern_label(pattern, sparsity)} | {' | '.join(cells)} | "
                         f"{_fmt(compare(tuned[0], tuned[1]))} | {shares} |")
    steps = sorted({r["setting"]["tune_iters"] for r in rows if r["setting"]["model"] == "tiny-sd3"
                    and r["setting"]["pattern"] == "2:4" and r["setting"]["method"] == "obs-diff"})
    if len(steps) > 1:
        setting = dict(model="tiny-sd3", method="obs-diff", pattern="2:4", sparsity=None)
        by_steps = [(0, _find_exact(quality, **setting))] + [(n, _find_exact(rows, **setting, tune_iters=n))
                                                              for n in steps]
        reference = dict(by_steps)[iters]
        lines += ["", f"| tuning steps (tiny-sd3, OBS-Diff, 2:4) | full adherence | − {iters} steps | "
                  "pruning time (s) |", "|---|---|---|---|"]
        for n, row in by_steps:
            if row:
                # The untuned row comes from an older sweep: its time would not compare, so none is shown.
                wall = f"{row['prune_wall_s']['mean']:.0f}" if n else "–"
                lines.append(f"| {n} | {_cell(row['full'])} | {'–' if row is reference else _fmt(compare(row, reference))} "
                             f"| {wall} |")
    seeds = max(len(r["seeds"]) for r in rows)
    ratios = [v for r in rows for v in r["tune_loss_ratio"]["values"]]
    kept = sum(v for r in rows for v in r["tune_kept_start"]["values"])
    lines.append("")
    lines.append(f"Full adherence on the usual evaluation prompts, mean ± 95% interval over {seeds} calibration "
                 "seeds, differences paired over the same seeds and evaluation prompts; 16 calibration prompts, 4 "
                 f"packages, the paper's Hessians and solver; `--tune-iters {iters}`"
                 + (" in the first table, the step counts named in the second" if len(steps) > 1 else "")
                 + ". The untuned columns are the "
                 f"quality table's rows. The tuning brought each block's error to the dense block's outputs down to "
                 f"{min(ratios):.2f}–{max(ratios):.2f} of its value after pruning (per run, averaged over blocks); "
                 f"{'no block' if kept == 0 else f'{kept} blocks in all'} had to keep its pruned weights"
                 + (" (all runs of both tables). Pruning time: one CPU thread, calibration, solves and tuning; the "
                    "0-step row is the quality table's."
                    if len(steps) > 1 else ".") + " `python benchmarks/run.py tuning`.")
    return "\n".join(lines)


def _admm_cases() -> list[tuple[str, int, str, str, float | None]]:
    """(model, calibration prompts, Hessian inputs, pattern, sparsity) of the admm sweep, in table order."""
    cases = [(model, 16, "plain", pattern, sparsity) for model in MODELS_ORDER
             for pattern, sparsity in (("unstructured", 0.5), ("unstructured", 0.6), ("unstructured", 0.7), ("2:4", None),
                                       ("4:8", None))]
    cases += [("tiny-flux", 16, "guided-image", pattern, sparsity)
              for pattern, sparsity in (("unstructured", 0.5), ("unstructured", 0.6), ("2:4", None))]
    return cases + [("tiny-sd3", prompts, "guided", pattern, sparsity) for prompts in (16, 100)
                    for pattern, sparsity in (("unstructured", 0.5), ("2:4", None))]


def _admm_rows(model: str, prompts: int, inputs: str, pattern: str, sparsity: float | None) -> tuple:
    """The OBS-Diff, OBS-Diff + refit and OBS-Diff + ADMM rows of one admm case (None where not measured)."""
    setting, source = _obs_diff_setting(model, prompts, inputs, pattern, sparsity)
    return (_find_exact(_rows(source), **setting), _find_exact(_rows("refit"), **setting, refit=True),
            _find_exact(_rows("admm"), **setting, solver="admm"))


def render_admm() -> str:
    """OBS-Diff, + refit and + ADMM (beyond the paper), paired over the same seeds, with Wanda for reference."""
    if not _rows("admm"):
        return "_not measured yet: run `python benchmarks/run.py admm`_"
    dense = _load("quality").get("dense", {})
    quality = _rows("quality")
    lines = ["| model | calibration prompts | Hessian inputs | pattern | OBS-Diff | + refit | + ADMM | ADMM − refit | "
             "ADMM − Wanda | PSNR to dense (dB): OBS-Diff / + refit / + ADMM | share of dense: OBS-Diff / + refit / "
             "+ ADMM |", "|---" * 11 + "|"]
    for model, prompts, inputs, pattern, sparsity in _admm_cases():
        base, refit, admm = _admm_rows(model, prompts, inputs, pattern, sparsity)
        if not admm:
            continue
        wanda = _find_exact(quality, model=model, method="wanda", pattern=pattern, sparsity=sparsity)
        measured = [r for r in (base, refit, admm) if r]
        psnr = " / ".join(f"{r['psnr']['mean']:.1f}" for r in measured)
        lines.append(f"| {model} | {prompts} | {inputs} | {_pattern_label(pattern, sparsity)} | "
                     f"{_cell(base['full']) if base else '–'} | {_cell(refit['full']) if refit else '–'} | "
                     f"{_cell(admm['full'])} | {_fmt(compare(admm, refit))} | {_fmt(compare(admm, wanda))} | "
                     f"{psnr} | "
                     f"{_shares(dense.get(model, {}).get('full'), *measured)} |")
    seeds = max(len(r["seeds"]) for r in _rows("admm"))
    lines.append("")
    lines.append(f"Full adherence, mean ± 95% interval over {seeds} calibration seeds, differences paired over the same "
                 "seeds and evaluation prompts, 4 packages, log-decrease weighting. `+ ADMM` (`--solver admm`) ends with "
                 "the re-fit on its own mask, so `ADMM − refit` is what moving the mask adds. The OBS-Diff and re-fit "
                 "columns are the quality, guided-Hessian, 100-prompt and re-fit tables' rows; Wanda is the quality "
                 "table's (16 prompts, plain statistics). `python benchmarks/run.py admm`.")
    return "\n".join(lines)


def render_admm_settings() -> str:
    """Layer errors of OBS + refit and of ADMM with its default and other settings, relative to OBS's, per layer."""
    data = _load("admm_settings")
    if not data:
        return "_not measured yet: run `python benchmarks/admm_settings.py`_"
    cases = [(model, pattern, measured) for model, patterns in data["models"].items()
             for pattern, measured in patterns.items()]
    labels = list(cases[0][2]["solvers"])
    lines = ["| solver | " + " | ".join(f"{model} {p if ':' in p else f'{float(p):.0%}'}" for model, p, _ in cases)
             + " |", "|---" * (len(cases) + 1) + "|"]
    for label in labels:
        lines.append(f"| {label} | " + " | ".join(f"{m['solvers'][label]['error_vs_obs']:.3f}" for _, _, m in cases) + " |")
    lines.append("| ADMM (default): seconds for all layers / OBS + refit's | " + " | ".join(
        f"{m['solvers']['ADMM (default)']['seconds']:.1f} / {m['solvers']['OBS + refit']['seconds']:.1f}"
        for _, _, m in cases) + " |")
    lines.append("| ADMM (default): iterations used (layers at the cap) | " + " | ".join(
        f"{m['admm_iters_default']['min']}–{m['admm_iters_default']['max']} ({m['admm_iters_default']['at_cap']})"
        for _, _, m in cases) + " |")
    defaults = data["defaults"]
    lines.append("")
    lines.append(f"Each layer's error after the solver divided by its error after OBS (1 = OBS), averaged over all "
                 f"target layers; every input group solved once on the dense model's Hessians from one calibration pass "
                 f"({data['num_prompts']} prompts, log-decrease weighting), so no package sees another's pruning. "
                 f"Defaults: start penalty {defaults['rho']:g}, at most {defaults['iters']} iterations. "
                 f"{data['threads']} CPU thread. `{data['command']}`.")
    return "\n".join(lines)


def render_admm_calibration() -> str:
    """OBS-Diff and ADMM calibrated on other prompts than the model's captions, and on very few prompts."""
    admm = _rows("admm")
    if not any("prompt_source" in r["setting"] for r in admm):
        return "_not measured yet: run `python benchmarks/run.py admm`_"
    quality, source, size = _rows("quality"), _rows("calibration_source"), _rows("calibration_size")
    lines = ["| model | pattern | OBS-Diff: own captions | real-world prompts | real-world − own | + ADMM: own captions | "
             "real-world prompts | real-world − own | ADMM − OBS-Diff, real-world prompts |", "|---" * 9 + "|"]
    for model in MODELS_ORDER:
        for pattern, sparsity in (("unstructured", 0.5), ("2:4", None)):
            base = dict(model=model, method="obs-diff", pattern=pattern, sparsity=sparsity)
            own, other = _find_exact(quality, **base), _find_exact(source, **base, prompt_source="real-world")
            a_own = _find_exact(admm, **base, solver="admm")
            a_other = _find_exact(admm, **base, solver="admm", prompt_source="real-world")
            if not a_other:
                continue
            lines.append(f"| {model} | {_pattern_label(pattern, sparsity)} | {_cell(own['full'])} | "
                         f"{_cell(other['full'])} | {_fmt(compare(other, own))} | {_cell(a_own['full'])} | "
                         f"{_cell(a_other['full'])} | {_fmt(compare(a_other, a_own))} | {_fmt(compare(a_other, other))} |")
    lines += ["", "| calibration prompts | OBS-Diff | + ADMM | ADMM − OBS-Diff |", "|---|---|---|---|"]
    for n in (2, 4, 16):
        plain = _find_exact(size, model="tiny-sd3", num_prompts=n, sparsity=0.6)
        new = _find_exact(admm, model="tiny-sd3", num_prompts=n, sparsity=0.6, solver="admm")
        if plain and new:
            lines.append(f"| {n} | {_cell(plain['full'])} | {_cell(new['full'])} | {_fmt(compare(new, plain))} |")
    lines.append("")
    lines.append("Full adherence, mean ± 95% interval over the calibration seeds (5 in the first table, 3 in the second), "
                 "differences paired over the same seeds and evaluation prompts, 4 packages. First table: 16 calibration "
                 "prompts, the model's own captions or 16 drawn per seed from `data/prompts/calibration.txt` (the "
                 "OBS-Diff columns are the quality and calibration-source tables' rows). Second table: tiny-sd3 at 60% "
                 "(the OBS-Diff column is the calibration-size table's). `python benchmarks/run.py admm`.")
    return "\n".join(lines)


def _dense_full(results: dict, model: str, evaluation: dict | None = None) -> float | None:
    """The dense model's full adherence stored with a summarized sweep: at its own sampling settings (no or an empty
    ``evaluation``), else at the sweep's ``evaluation`` (its ``dense_eval`` entries)."""
    if not evaluation:
        return results.get("dense", {}).get(model, {}).get("full")
    return next((d["scores"]["full"] for d in results.get("dense_eval", [])
                 if d["model"] == model and d["eval"] == evaluation), None)


ACCEPTANCE_SHARE = 0.95  # the engine issue: OBS-Diff keeps >= 95% of dense ShapeBench adherence at 50% and 2:4


def _acceptance_label(setting: dict) -> str:
    """A method label for the acceptance table: the paper's methods by name, additions spelled out."""
    label = setting["method"]
    if setting.get("hessian_inputs", "plain") != "plain":
        label += f" + {setting['hessian_inputs']} Hessians"
    if setting.get("solver", "obs") != "obs":
        label += f" + {setting['solver'].upper()}"
    if setting.get("tune_iters"):
        label += " + block tuning"
    return label


def _tuning_cost(rows: list[dict]) -> str:
    """', pruning took A s without and B s with it' for the best combination at 2:4 (mean wall time), if measured."""
    best = {"method": "obs-diff", "hessian_inputs": "guided", "solver": "admm", "pattern": "2:4"}
    walls = {}
    for r in rows:
        setting = r["setting"]
        if all(setting.get(k) == v for k, v in best.items()) and "prune_wall_s" in r:
            walls.setdefault(bool(setting.get("tune_iters")), []).append(r["prune_wall_s"]["mean"])
    if set(walls) != {False, True}:
        return ""
    return (f"; for the best combination at 2:4, pruning took {statistics.fmean(walls[False]):.0f} s without and "
            f"{statistics.fmean(walls[True]):.0f} s with it (one CPU thread, calibration and solves included)")


def render_acceptance() -> str:
    """The engine's acceptance line on tiny-sd3 (>= 95% of dense at 50% and 2:4, baselines measurably below), scored
    on the usual 120 evaluation prompts and again on 480 (each against the dense model on the same prompts)."""
    rows = _rows("acceptance")
    if not rows:
        return "_not measured yet: run `python benchmarks/run.py acceptance`_"
    results = _load("acceptance")
    usual = results.get("eval_prompts", 120)
    by_eval: dict[str, list[dict]] = {}  # rows per evaluation setting (none: the usual prompts)
    for r in rows:
        by_eval.setdefault(json.dumps(r["setting"].get("eval") or {}, sort_keys=True), []).append(r)
    lines = ["| evaluation prompts | pattern | method | full adherence | share of dense (95% interval) | − Wanda | "
             f"− magnitude | − the same untuned | keeps {ACCEPTANCE_SHARE:.0%} of dense? |", "|---" * 9 + "|"]
    denses, sizes = [], []
    for evaluation, eval_rows in sorted(((json.loads(k), v) for k, v in by_eval.items()),
                                        key=lambda item: item[0].get("prompts", usual)):
        dense = _dense_full(results, "tiny-sd3", evaluation)
        num_eval = evaluation.get("prompts", usual)
        denses.append(f"{dense:.3f} on {num_eval}")
        sizes.append(num_eval)
        for pattern, sparsity in (("unstructured", 0.5), ("2:4", None)):
            here = [r for r in eval_rows if r["setting"]["pattern"] == pattern and r["setting"].get("sparsity") == sparsity]
            order = ["magnitude", "wanda", "obs-diff"]
            for row in sorted(here, key=lambda r: (bool(r["setting"].get("tune_iters")),
                                                   order.index(r["setting"]["method"]), len(r["setting"]))):
                setting = row["setting"]
                mean, half = row["full"]["mean"], row["full"]["ci95"]
                low, high = (mean - half) / dense, (mean + half) / dense
                verdict = ("yes, the whole interval" if low >= ACCEPTANCE_SHARE else "the mean only" if mean / dense >=
                           ACCEPTANCE_SHARE else "no")
                # Like for like: a tuned row against the tuned baselines, and against itself untuned.
                baselines = [_find_exact(here, **_without(setting, "method", "hessian_inputs", "solver"), method=m)
                             for m in ("wanda", "magnitude")]
                untuned = _find_exact(here, **_without(setting, "tune_iters")) if setting.get("tune_iters") else None
                vs = [("–" if other is None or other is row else _fmt(compare(row, other)))
                      for other in (*baselines, untuned)]
                lines.append(f"| {num_eval} | {_pattern_label(pattern, sparsity)} | {_acceptance_label(setting)} | "
                             f"{_cell(row['full'])} | {mean / dense:.1%} ({low:.1%} – {high:.1%}) | {vs[0]} | {vs[1]} | "
                             f"{vs[2]} | {verdict} |")
    seeds = max(len(r["seeds"]) for r in rows)
    tune_iters = sorted({r["setting"]["tune_iters"] for r in rows if r["setting"].get("tune_iters")})
    lines.append("")
    # ShapeBench draws its prompts as one seeded sequence, so a larger set starts with the smaller one.
    superset = f"; the first {min(sizes)} of the {max(sizes)} are the {min(sizes)}" if len(sizes) > 1 else ""
    lines.append(f"tiny-sd3 (dense full adherence {' and '.join(denses)} evaluation prompts{superset}), mean ± 95% "
                 f"interval over {seeds} calibration seeds (magnitude without tuning uses no data: one run), "
                 "differences paired over the same seeds; 16 calibration prompts, 4 packages, log-decrease weighting."
                 + (f" Block tuning: `--tune-iters {tune_iters[0]}` (the same prompts), compared with the baselines "
                    f"tuned alike{_tuning_cost(rows)}." if tune_iters else "")
                 + " `python benchmarks/run.py acceptance`.")
    return "\n".join(lines)


STRONG = [0.1, 1.9]  # the widest weight range of the weight_range sweep


def render_weight_range() -> str:
    """The paper's weighting at wider alpha ranges (and its mirror), paired with uniform weights (SparseGPT)."""
    wr, quality = _rows("weight_range"), _rows("quality")
    if not wr:
        return "_not measured yet: run `python benchmarks/run.py weight_range`_"
    columns = [("log-decrease", [0.5, 1.5]), ("log-decrease", STRONG), ("log-increase", STRONG)]
    lines = ["| model | pattern | uniform (SparseGPT) | log-decrease 0.8–1.2 (paper) | log-decrease 0.5–1.5 | "
             "log-decrease 0.1–1.9 | log-increase 0.1–1.9 | decrease 0.1–1.9 − uniform | "
             "decrease 0.1–1.9 − increase 0.1–1.9 |", "|---" * 9 + "|"]
    for model in MODELS_ORDER:
        for pattern, sparsity in (("unstructured", 0.5), ("unstructured", 0.6), ("2:4", None)):
            base = dict(model=model, pattern=pattern, sparsity=sparsity)
            uniform = _find_exact(quality, **base, method="sparsegpt")
            paper = _find_exact(quality, **base, method="obs-diff")
            strong = [_find_exact(wr, **base, method="obs-diff", weighting=w, weight_range=r) for w, r in columns]
            if not all(strong):
                continue
            cells = [_cell(r["full"]) if r else "–" for r in (uniform, paper, *strong)]
            lines.append(f"| {model} | {_pattern_label(pattern, sparsity)} | " + " | ".join(cells) +
                         f" | {_fmt(compare(strong[1], uniform))} | {_fmt(compare(strong[1], strong[2]))} |")
    seeds = max(len(r["seeds"]) for r in wr)
    lines.append("")
    lines.append(f"OBS-Diff, full adherence, mean ± 95% interval over {seeds} calibration seeds, differences paired over "
                 "the same seeds and evaluation prompts; 16 calibration prompts, 4 packages. alpha runs from the first "
                 "range value at one end of the trajectory to the second at the other (log-decrease: the largest "
                 "weight on the first, noisiest step). The uniform and 0.8–1.2 columns are the quality table's "
                 "SparseGPT and OBS-Diff rows. `python benchmarks/run.py weight_range`.")
    return "\n".join(lines)


DAMPS = (0.001, 0.01, 0.03, 0.1, 0.3)  # the solver_settings sweep; 0.01 is the paper's code and the default


def render_solver_settings() -> str:
    """Dampening and mask block size, which the paper leaves unstated (its code: 0.01 and 128)."""
    ss = _rows("solver_settings")
    if not ss:
        return "_not measured yet: run `python benchmarks/run.py solver_settings`_"
    lines = ["| model | pattern | setting | full adherence | − default (damp 0.01, block 128) | PSNR to dense (dB) | "
             "layer error (mean relative) |", "|---" * 7 + "|"]
    for model in MODELS_ORDER:
        for pattern, sparsity in (("unstructured", 0.5), ("2:4", None)):
            base = dict(model=model, method="obs-diff", pattern=pattern, sparsity=sparsity)
            default = _find_exact(ss, **base, damp=0.01)
            variants = [(f"damp {d:g}" + (" (default)" if d == 0.01 else ""), _find_exact(ss, **base, damp=d))
                        for d in DAMPS]
            variants.append(("mask block 32", _find_exact(ss, **base, block_size=32)))
            for label, row in variants:
                if row:
                    diff = "–" if row is default else _fmt(compare(row, default))
                    error = f"{row['layer_error']['mean']:.4f}" if "layer_error" in row else "–"
                    lines.append(f"| {model} | {_pattern_label(pattern, sparsity)} | {label} | {_cell(row['full'])} | "
                                 f"{diff} | {row['psnr']['mean']:.2f} | {error} |")
    seeds = max(len(r["seeds"]) for r in ss)
    lines.append("")
    lines.append(f"OBS-Diff, full adherence, mean ± 95% interval over {seeds} calibration seeds, differences paired "
                 "over the same seeds and evaluation prompts; 16 calibration prompts, 4 packages. The default rows repeat "
                 "the quality table's OBS-Diff runs (same scores, run again for their layer error). Layer error: each pruned layer's output error on its calibration "
                 "Hessian relative to its output, averaged over layers (what OBS minimizes; `recon_error_rel` in "
                 "`obsdiff.json`). For N:M the block size only reorders float sums, so it is not run. "
                 "`python benchmarks/run.py solver_settings`.")
    return "\n".join(lines)


def _generation(model: str) -> dict:
    """The tiny model's own sampling settings (its generation.json): what calibration used."""
    return json.loads((ROOT / "data" / model / "generation.json").read_text())


def _sampling_label(model: str, evaluation: dict | None) -> str:
    """How a robustness row was sampled, e.g. "CFG 2" or "10 steps"; None: the model's own (calibrated) settings."""
    if not evaluation:
        g = _generation(model)
        cfg = g.get("guidance_scale", g.get("true_cfg_scale"))
        return f"CFG {cfg:g}, {g['num_inference_steps']} steps, Euler (as calibrated)"
    parts = []
    if "guidance" in evaluation:
        parts.append(f"CFG {evaluation['guidance']:g}")
    if "steps" in evaluation:
        parts.append(f"{evaluation['steps']} steps")
    if "sampler" in evaluation:
        parts.append(f"{evaluation['sampler'].capitalize()} sampler")
        if "steps" not in evaluation:
            parts.append(f"{_generation(model)['num_inference_steps']} steps")
    return ", ".join(parts)


def _robustness_cases() -> list[tuple[str, dict | None, dict | None, dict | None, float | None]]:
    """(model, evaluation, Wanda row, OBS-Diff row, dense full adherence) for the calibrated setting and each other."""
    rb, quality = _load("robustness"), _rows("quality")
    if not rb:
        return []
    cases = []
    for model in MODELS_ORDER:
        base = dict(model=model, pattern="unstructured", sparsity=0.5)
        cases.append((model, None, _find_exact(quality, **base, method="wanda"),
                      _find_exact(quality, **base, method="obs-diff"), _dense_full(rb, model)))
        evaluations = [r["setting"]["eval"] for r in rb["rows"] if r["setting"]["model"] == model]
        for evaluation in [json.loads(e) for e in dict.fromkeys(json.dumps(e, sort_keys=True) for e in evaluations)]:
            rows = [_find_exact(rb["rows"], **base, method=m, eval=evaluation) for m in ("wanda", "obs-diff")]
            cases.append((model, evaluation, *rows, _dense_full(rb, model, evaluation)))
    return cases


def render_robustness() -> str:
    """App. D analog: pruned at the model's own sampling settings, sampled at other CFG scales, step counts, samplers."""
    cases = _robustness_cases()
    if not cases:
        return "_not measured yet: run `python benchmarks/run.py robustness`_"
    lines = ["| model | sampled with | dense | Wanda 50% | OBS-Diff 50% | OBS-Diff − Wanda | share of dense: Wanda / OBS-Diff |",
             "|---" * 7 + "|"]
    for model, evaluation, wanda, obs, dense in cases:
        if not (wanda and obs):
            continue
        shares = _shares(dense, wanda, obs)
        lines.append(f"| {model} | {_sampling_label(model, evaluation)} | {dense:.3f} | {_cell(wanda['full'])} | "
                     f"{_cell(obs['full'])} | {_fmt(compare(obs, wanda))} | {shares} |")
    lines.append("")
    lines.append("Full adherence, mean ± 95% interval over 5 calibration seeds, differences paired over the same seeds "
                 "and evaluation prompts. Every model was calibrated and pruned with its own settings (first row of each "
                 "model, the quality table's runs) and only sampled with the others; dense is sampled the same way. "
                 "Heun is run on tiny-SD3 only: diffusers' Flux pipeline passes custom sigmas, which its Heun "
                 "scheduler refuses. `python benchmarks/run.py robustness`.")
    return "\n".join(lines)


def _calibration_source_cases() -> list[tuple[str, str, float | None, str, dict | None, dict | None]]:
    """(model, pattern, sparsity, method, row calibrated on the model's captions, row on the real-world prompts)."""
    cs, quality = _rows("calibration_source"), _rows("quality")
    cases = []
    for model in MODELS_ORDER:
        for pattern, sparsity in (("unstructured", 0.5), ("2:4", None)):
            for method in ("wanda", "obs-diff"):
                base = dict(model=model, method=method, pattern=pattern, sparsity=sparsity)
                own = _find_exact(quality, **base)
                other = _find_exact(cs, **base, prompt_source="real-world")
                if own and other:
                    cases.append((model, pattern, sparsity, method, own, other))
    return cases


def render_calibration_source() -> str:
    """Table 14 analog: calibration prompts from the model's own distribution vs from an unrelated one."""
    cases = _calibration_source_cases()
    if not cases:
        return "_not measured yet: run `python benchmarks/run.py calibration_source`_"
    lines = ["| model | pattern | method | calibrated on shape captions (the model's own) | on real-world prompts | "
             "real-world − own |", "|---" * 6 + "|"]
    for model, pattern, sparsity, method, own, other in cases:
        lines.append(f"| {model} | {_pattern_label(pattern, sparsity)} | {method} | {_cell(own['full'])} | "
                     f"{_cell(other['full'])} | {_fmt(compare(other, own))} |")
    seeds = max(len(r["seeds"]) for _, _, _, _, _, r in cases)
    lines.append("")
    lines.append(f"Full adherence, mean ± 95% interval over {seeds} calibration seeds, differences paired over the same "
                 "seeds (the generator seeds match; the prompts differ) and evaluation prompts; 16 calibration prompts, "
                 "4 packages. Real-world prompts: 16 drawn per seed from `data/prompts/calibration.txt`, the list "
                 "shipped for full-size models, which the tiny models never saw in training. The own-caption column "
                 "is the quality table's. `python benchmarks/run.py calibration_source`.")
    return "\n".join(lines)


def render_block_sensitivity() -> str:
    """2:4 OBS-Diff on one transformer block at a time, against all blocks at once (the quality table's run)."""
    bs, quality = _rows("block_sensitivity"), _rows("quality")
    if not bs:
        return "_not measured yet: run `python benchmarks/run.py block_sensitivity`_"
    dense = _load("block_sensitivity")["dense"]
    lines = ["| model | row | " + " | ".join(f"block {b}" for b in range(6)) + " | all six |", "|---" * 9 + "|"]
    measured = {}  # model -> (the all-six row or None, each block's share of the 2:4 weights)
    for model in MODELS_ORDER:
        rows = [_find_exact(bs, model=model, method="obs-diff", pattern="2:4", sparsity=None, blocks=f"{b}:{b + 1}",
                            packages=1) for b in range(6)]
        if not all(rows):
            continue
        every = _find_exact(quality, model=model, method="obs-diff", pattern="2:4", sparsity=None)
        d = dense[model]["full"]
        lost = [d - r["full"]["mean"] for r in rows]
        weights = [r["targeted_parameters"]["mean"] for r in rows]
        shares = [w / sum(weights) for w in weights]
        measured[model] = (every, shares)
        lines.append(f"| {model} | full adherence | " + " | ".join(_cell(r["full"]) for r in rows) +
                     f" | {_cell(every['full']) if every else '–'} |")
        all_lost = f"{d - every['full']['mean']:+.3f}" if every else "–"
        lines.append(f"| {model} | adherence lost | " + " | ".join(f"{x:+.3f}" for x in lost) +
                     f" | {all_lost} (sum of the six: {sum(lost):+.3f}) |")
        lines.append(f"| {model} | share of the 2:4 weights | " + " | ".join(f"{share:.0%}" for share in shares) +
                     " | 100% |")
    flux = json.loads((ROOT / "data" / "tiny-flux" / "transformer" / "config.json").read_text())
    lines.append("")
    lines.append(f"OBS-Diff 2:4 on the one block named (`--blocks b:b+1 --packages 1`), mean ± 95% interval over "
                 f"{max(len(r['seeds']) for r in bs)} calibration seeds; \"all six\" is the quality table's 2:4 run "
                 "(4 packages). "
                 f"Adherence lost: dense minus pruned. tiny-Flux's blocks 0–{flux['num_layers'] - 1} are double-stream "
                 f"(joint) blocks, the other {flux['num_single_layers']} single-stream. "
                 "`python benchmarks/run.py block_sensitivity`.")
    return "\n".join(lines + _render_spared_blocks(bs, measured, dense))


def _render_spared_blocks(bs: list[dict], measured: dict[str, tuple], dense: dict) -> list[str]:
    """2:4 on all blocks but the first one or two (the paper's Table 2 habit), against all six (4 packages each);
    ``measured``: per model, the all-six row and the blocks' weight shares that ``render_block_sensitivity`` found."""
    lines = ["", "| model | 2:4 on blocks | share of the 2:4 weights | full adherence | difference to all six | "
             "share of dense |", "|---" * 6 + "|"]
    seeds = []
    for model, (every, shares) in measured.items():
        spared = {first: _find_exact(bs, model=model, method="obs-diff", pattern="2:4", sparsity=None,
                                     blocks=f"{first}:6") for first in (1, 2)}
        if not (every and all(spared.values())):
            continue
        d = dense[model]["full"]
        lines.append(f"| {model} | 0–5 (all six) | 100% | {_cell(every['full'])} | – | {_shares(d, every)} |")
        for first, row in spared.items():
            seeds.append(len(row["seeds"]))
            lines.append(f"| {model} | {first}–5 | {sum(shares[first:]):.0%} | {_cell(row['full'])} | "
                         f"{_fmt(compare(row, every))} | {_shares(d, row)} |")
    if not seeds:
        return []
    return lines + ["", "OBS-Diff 2:4 on the blocks named (`--blocks 1:6`, `--blocks 2:6`), the others left dense, 4 packages "
                        f"like the all-six run (the quality table's); mean ± 95% interval over {max(seeds)} calibration "
                        "seeds, differences paired over the same seeds. Share of the 2:4 weights: from the single-block "
                        "runs above. `python benchmarks/run.py block_sensitivity`."]


WIDTH_PATTERNS = [("unstructured", 0.5), ("unstructured", 0.6), ("unstructured", 0.7), ("2:4", None)]


def render_width() -> str:
    """tiny-sd3 against tiny-sd3-mid and tiny-sd3-wide (same recipe and steps, 1.5x and 2x the hidden width) under
    the same pruning."""
    width, quality = _rows("width"), _rows("quality")
    if not width:
        return "_not measured yet: run `python benchmarks/run.py width`_"
    dense = _load("width")["dense"]
    head = [_pattern_label(p, s) for p, s in WIDTH_PATTERNS]
    lines = ["| model | method | " + " | ".join(head) + " |", "|---" * (len(head) + 2) + "|"]
    for model, rows in (("tiny-sd3", quality), ("tiny-sd3-long", width), ("tiny-sd3-mid", width),
                        ("tiny-sd3-wide", width)):
        if model not in dense:
            continue
        config = json.loads((ROOT / "data" / model / "transformer" / "config.json").read_text())
        steps = json.loads((ROOT / "data" / model / "training.json").read_text())["steps"]
        hidden = f"{config['num_attention_heads'] * config['attention_head_dim']}, {steps:,} steps"
        d = dense[model]["full"]
        lines.append(f"| {model} (hidden {hidden}) | dense | " + " | ".join(f"{d:.3f}" for _ in head) + " |")
        found = {method: [_find_exact(rows, model=model, method=method, pattern=p, sparsity=s) for p, s in WIDTH_PATTERNS]
                 for method in ("magnitude", "wanda", "obs-diff")}
        for method, row in found.items():
            lines.append(f"| {model} (hidden {hidden}) | {method} | " +
                         " | ".join(f"{_cell(r['full'])} ({_shares(d, r)})" if r else "–" for r in row) + " |")
        pairs = list(zip(found["wanda"], found["obs-diff"]))
        lines.append(f"| {model} (hidden {hidden}) | obs-diff − wanda | " +
                     " | ".join(_fmt(compare(obs, wanda)) for wanda, obs in pairs) + " |")
        lines.append(f"| {model} (hidden {hidden}) | PSNR to dense (dB): wanda / obs-diff | " + " | ".join(
            " / ".join(f"{r['psnr']['mean']:.1f}" for r in pair) if all(pair) else "–" for pair in pairs) + " |")
    seeds = max(len(r["seeds"]) for r in width)
    lines += ["", f"Full ShapeBench adherence on the same {_load('width')['eval_prompts']} evaluation prompts, mean ± 95% "
              f"interval over {seeds} calibration seeds (magnitude: one run), in brackets the share of the model's own dense "
              "adherence; 16 calibration prompts, 4 packages, log-decrease weighting. The tiny-sd3 rows are the quality "
              "table's. `python benchmarks/run.py width` (`benchmarks/results/width.json`)."]
    return "\n".join(lines)


RAMPS = (-0.1, 0.1, 0.2)  # the sparsity_ramp sweep


def render_sparsity_ramp() -> str:
    """Depth-graded unstructured sparsity (beyond the paper) against the paper's uniform sparsity, same total."""
    sr, quality = _rows("sparsity_ramp"), _rows("quality")
    if not sr:
        return "_not measured yet: run `python benchmarks/run.py sparsity_ramp`_"
    lines = ["| model | sparsity | " + " | ".join(f"ramp {r:+g}" for r in RAMPS[:1]) + " | uniform (paper) | " +
             " | ".join(f"ramp {r:+g}" for r in RAMPS[1:]) + " | " + " | ".join(f"ramp {r:+g} − uniform" for r in RAMPS) +
             f" | share of dense: uniform / ramp {RAMPS[1]:+g} |", "|---" * (4 + 2 * len(RAMPS)) + "|"]
    dense = _load("quality").get("dense", {})
    for model in MODELS_ORDER:
        for sparsity in (0.5, 0.6):
            base = dict(model=model, method="obs-diff", pattern="unstructured", sparsity=sparsity)
            uniform = _find_exact(quality, **base)
            ramped = [_find_exact(sr, **base, sparsity_ramp=r) for r in RAMPS]
            if not (uniform and all(ramped)):
                continue
            cells = [_cell(ramped[0]["full"]), _cell(uniform["full"])] + [_cell(r["full"]) for r in ramped[1:]]
            d = dense.get(model, {}).get("full")
            shares = _shares(d, uniform, ramped[1])
            lines.append(f"| {model} | {sparsity:.0%} | " + " | ".join(cells) + " | " +
                         " | ".join(_fmt(compare(r, uniform)) for r in ramped) + f" | {shares} |")
    combined = ["", "| model | sparsity | `--refit` | `--refit --sparsity-ramp 0.1` | difference | share of dense |",
                "|---" * 6 + "|"]
    refit = _rows("refit")
    for model in MODELS_ORDER:
        for sparsity in (0.5, 0.6):
            base = dict(model=model, method="obs-diff", pattern="unstructured", sparsity=sparsity, refit=True)
            alone, both = _find_exact(refit, **base), _find_exact(sr, **base, sparsity_ramp=RAMPS[1])
            d = dense.get(model, {}).get("full")
            if alone and both and d:
                combined.append(f"| {model} | {sparsity:.0%} | {_cell(alone['full'])} | {_cell(both['full'])} | "
                                f"{_fmt(compare(both, alone))} | {_shares(d, alone, both)} |")
    if len(combined) > 3:
        lines += combined
    lines.append("")
    lines.append(f"OBS-Diff, full adherence, mean ± 95% interval over {max(len(r['seeds']) for r in sr)} calibration "
                 "seeds, differences paired over the same seeds and evaluation prompts; 16 calibration prompts, 4 "
                 "packages. Ramp r: block sparsity rising linearly from s − r in the first block to s + r in the last, "
                 "shifted so that the total number of zeros is that of uniform sparsity s (negative: early blocks "
                 "pruned more). The uniform column is the quality table's, the `--refit` column the re-fit table's. "
                 "`python benchmarks/run.py sparsity_ramp`.")
    return "\n".join(lines)


def render_refit_masks() -> str:
    """Each method's mask with and without least-squares weights: how much of OBS's lead is the mask."""
    refit, quality = _rows("refit"), _rows("quality")
    methods = ("magnitude", "wanda", "obs-diff")
    if not _find_exact(refit, model="tiny-sd3", method="wanda", pattern="2:4", sparsity=None, refit=True):
        return "_not measured yet: run `python benchmarks/run.py refit`_"
    lines = ["| model | pattern | " + " | ".join(f"{m} | {m} + refit" for m in methods) + " |",
             "|---" * (2 + 2 * len(methods)) + "|"]
    for model in MODELS_ORDER:
        for pattern, sparsity in (("unstructured", 0.5), ("2:4", None)):
            cells = []
            for method in methods:
                setting = dict(model=model, method=method, pattern=pattern, sparsity=sparsity)
                base, new = _find_exact(quality, **setting), _find_exact(refit, **setting, refit=True)
                cells += [_cell(base["full"]) if base else "–", _cell(new["full"]) if new else "–"]
            lines.append(f"| {model} | {_pattern_label(pattern, sparsity)} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("Full adherence, mean ± 95% interval over 5 calibration seeds (magnitude without re-fit uses no data: one "
                 "run). `+ refit`: the method's own mask, its kept weights solved by least squares on the OBS-Diff "
                 "Hessian. `python benchmarks/run.py refit` and `python benchmarks/run.py quality`.")
    return "\n".join(lines)


def render_structured_selection() -> str:
    """Heads chosen by fused OBS saliencies (the paper) vs by trajectory error (beyond the paper), against L1-norm."""
    rows = _rows("structured_selection")
    if not rows:
        return "_not measured yet: run `python benchmarks/run.py structured_selection`_"
    lines = ["| model | sparsity | L1-norm | OBS-Diff, saliency (paper) | OBS-Diff, trajectory | trajectory − L1 | "
             "trajectory − saliency | prune time saliency / trajectory (s) |", "|---|---|---|---|---|---|---|---|"]
    for model in MODELS_ORDER:
        for sparsity in (0.2, 0.3):
            l1 = _find(rows, model=model, sparsity=sparsity, method="l1-norm")
            sal = _find(rows, model=model, sparsity=sparsity, method="obs-diff", head_selection="saliency")
            traj = _find(rows, model=model, sparsity=sparsity, method="obs-diff", head_selection="trajectory")
            if not (l1 and sal and traj):
                continue
            lines.append(f"| {model} | {sparsity:.0%} | {_cell(l1['full'])} | {_cell(sal['full'])} | {_cell(traj['full'])} | "
                         f"{_fmt(compare(traj, l1))} | {_fmt(compare(traj, sal))} | "
                         f"{sal['prune_wall_s']['mean']:.1f} / {traj['prune_wall_s']['mean']:.1f} |")
    lines.append("")
    seeds = max(len(r["seeds"]) for r in rows)
    lines.append(f"Full adherence, {seeds} calibration seeds (L1-norm needs none), 2 packages, heads and FFN neurons of blocks "
                 "1..N-2. Trajectory selection tries the 4 cheapest heads by fused saliency and keeps the removal that "
                 "moves the final latents of 4 calibration prompts least (`--head-selection trajectory`). "
                 "`python benchmarks/run.py structured_selection`.")
    return "\n".join(lines)


MODELS_ORDER = ("tiny-sd3", "tiny-flux")


def render_calibration_size() -> str:
    """Fig. 3 analog: number of calibration prompts vs quality (OBS-Diff 60% on tiny-sd3)."""
    data = _load("calibration_size")
    if not data:
        return "_not measured yet: run `python benchmarks/run.py calibration_size`_"
    rows = sorted(data["rows"], key=lambda r: r["setting"]["num_prompts"])
    lines = ["| calibration prompts | full adherence | PSNR to dense |", "|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['setting']['num_prompts']} | {_cell(r['full'])} | {_cell(r.get('psnr'), 2)} |")
    lines.append("")
    lines.append("tiny-sd3, OBS-Diff 60%, 4 packages, mean ± 95% interval over calibration seeds; "
                 "`python benchmarks/run.py calibration_size`.")
    return "\n".join(lines)


# Paper Table 7: SD3-medium at 30%, 100 calibration prompts x 25 steps, RTX 4090 (48 GB): pruning seconds per G.
PAPER_TABLE7_SECONDS = {1: 572.20, 4: 896.52, 10: 1539.37, 20: 2594.95}


def _linear_fit(points: dict[int, float]) -> tuple[float, float]:
    """Least-squares time = fixed + per_pass * G."""
    import numpy as np

    g = np.array(sorted(points), dtype=float)
    t = np.array([points[int(x)] for x in g])
    per_pass, fixed = np.polyfit(g, t, 1)
    return float(fixed), float(per_pass)


def render_cached_projection() -> str:
    """Exact vs cached calibration cost: measured on the tiny models and on full-size SD3-medium (GPU), and
    projected for SD3-medium's 24 blocks from the paper's timings."""
    data = _load("packages")
    if not data:
        return "_not measured yet: run `python benchmarks/run.py packages`_"
    lines = ["| model | source | fixed (s) | per trajectory pass (s) | exact, 4 packages (s) | "
             "exact, one package per block (s) | cached, one package per block (s) |", "|---|---|---|---|---|---|---|"]
    for model in ("tiny-sd3", "tiny-flux"):
        rows = [r for r in data["rows"] if r["setting"]["model"] == model]
        exact = {r["setting"]["packages"]: r["prune_wall_s"]["mean"] for r in rows
                 if r["setting"]["calibration"] == "exact" and isinstance(r["setting"]["packages"], int)}
        per_block = {r["setting"]["calibration"]: r for r in rows if r["setting"]["packages"] == "blocks"}
        if not exact or set(per_block) != {"exact", "cached"}:
            continue
        fixed, per_pass = _linear_fit(exact)
        lines.append(f"| {model} | measured here (fit over G = {', '.join(map(str, sorted(exact)))}) | {fixed:.1f} | "
                     f"{per_pass:.2f} | {exact.get(4, fixed + 4 * per_pass):.1f} | "
                     f"{per_block['exact']['prune_wall_s']['mean']:.1f} (G={_num_packages(per_block['exact']):.0f}) | "
                     f"{_cell(per_block['cached']['prune_wall_s'], 1)} |")
    gpu = {(r["mode"], r["packages"]): r for r in _load("gpu_fullsize_ieee").get("prune", [])}
    if {("exact", 4), ("exact", 24), ("cached", 24)} <= set(gpu):
        e4, e24, c24 = gpu[("exact", 4)], gpu[("exact", 24)], gpu[("cached", 24)]
        fixed, per_pass = _linear_fit({4: e4["total_s"], 24: e24["total_s"]})
        lines.append(f"| SD3-medium (24 blocks) | measured on an H100, random weights, IEEE Hessians, {e4['prompts']} prompts × "
                     f"{e4['steps']} steps | {fixed:.0f} | {per_pass:.1f} | {e4['total_s']:.0f} | "
                     f"{e24['total_s']:.0f} (G=24) | {c24['total_s']:.0f} |")
    fixed, per_pass = _linear_fit(PAPER_TABLE7_SECONDS)
    # Cached mode: one dense trajectory (already inside "fixed", which holds one pass plus the solves) plus
    # about two passes through the blocks (collect, then carry forward), whatever the number of packages.
    lines.append(f"| SD3-medium (24 blocks) | projected from the paper's Table 7 (100 prompts × 25 steps) | {fixed:.0f} | "
                 f"{per_pass:.0f} | {fixed + 4 * per_pass:.0f} | {fixed + 24 * per_pass:.0f} (G=24) | "
                 f"≈ {fixed + 2 * per_pass:.0f} |")
    lines.append("")
    lines.append("Exact mode costs fixed + G × one trajectory pass (a straight-line fit; fixed holds the OBS solves). "
                 "Cached mode costs one trajectory plus about two passes through the blocks, whatever G. The tiny "
                 "models' rows are single-process CPU timings from `python benchmarks/run.py packages`; the H100 row "
                 "is `benchmarks/gpu_fullsize.py` (see \"On a GPU\"); the last row is a projection, not a measurement.")
    return "\n".join(lines)


def render_overhead() -> str:
    """Calibration overhead of hooks + Hessians vs plain inference."""
    data = _load("calibration_overhead")
    if not data:
        return "_not measured yet: run `python benchmarks/calibration_overhead.py`_"
    lines = ["| model | packages | Hessian inputs | plain passes (s) | calibration passes (s) | overhead | "
             "range over repeats | overhead without XᵀX |", "|---|---|---|---|---|---|---|---|"]
    ratios = []
    for model, measured in data["models"].items():
        ratios.append(f"{measured['multiply_adds']['hessian_per_linear']:.2f}x on {model}")
        for r in measured["runs"]:
            lo, hi = r["overhead_range"]
            lines.append(f"| {model} | {r['packages']} | {r['hessian_inputs']} | {r['plain_s']:.2f} | "
                         f"{r['calibration_s']:.2f} | {r['overhead']:+.0%} | {lo:+.0%} … {hi:+.0%} | "
                         f"{r['without_gram_overhead']:+.0%} |")
    lines.append("")
    lines.append("Multiply-adds of the plain Hessians (X^T X, upper block triangle) over those of the target linears they "
                 f"serve, one pass: {', '.join(ratios)}; `guided` folds the two CFG halves into one row first, half "
                 "as many.")
    lines.append("")
    lines.append("Overhead without XᵀX: the same calibration passes timed again with the accumulators' XᵀX switched "
                 "off (hooks, step tracking, input reshapes, running-mean bookkeeping and finiteness checks still run), "
                 "against the same plain passes; the rest of the overhead is the Hessians' arithmetic.")
    lines.append("")
    lines.append(f"Medians of interleaved repeats, each alternating whether plain or calibration passes go first (the "
                 "range: each repeat's calibration passes against its own plain "
                 f"passes), {data['num_prompts']} prompts, {data['threads']} thread; `{data['command']}`.")
    return "\n".join(lines)


def render_speed() -> str:
    """Measured end-to-end CPU sampling speedups of structurally pruned tiny models."""
    data = _load("speed")
    if not data:
        return "_not measured yet: run `python benchmarks/speed.py`_"
    lines = ["| model | variant | params | linear MACs | median time per batch (ms) | speedup |", "|---|---|---|---|---|---|"]
    for model, variants in data["models"].items():
        for name, r in variants.items():
            params = f"{r['parameters_after'] / 1e3:.0f}k" if "parameters_after" in r else "–"
            macs = f"{r['macs_after'] / 1e6:.1f}M" if "macs_after" in r else "–"
            lines.append(f"| {model} | {name} | {params} | {macs} | {r['median_s'] * 1e3:.0f} | {r['speedup']:.2f}x |")
    lines.append("")
    lines.append(f"Full sampling calls (denoising loop with CFG and VAE decode), batch {data['batch']}, "
                 f"{data['threads']} CPU thread, median of {data['repeats']} interleaved repeats; `{data['command']}`.")
    return "\n".join(lines)


def _gpu_weights(run: dict) -> str:
    """How a GPU prune run solved its weights: plain OBS (the paper), + the re-fit, or + ADMM; + block tuning."""
    label = "OBS + ADMM" if run.get("solver") == "admm" else "OBS + refit" if run.get("refit") else "OBS"
    return label + (f" + block tuning ({run['tune_s']:.0f} s)" if run.get("tune_iters") else "")


def _plain_gpu_runs(data: dict) -> dict[tuple[str, int], dict]:
    """The paper-method GPU prune runs (no re-fit, no ADMM) by (calibration mode, packages)."""
    return {(r["mode"], r["packages"]): r for r in data.get("prune", []) if _gpu_weights(r) == "OBS"}


def render_gpu() -> str:
    """Full-size SD3-medium / Flux.1-dev on a GPU (random weights): latency, prune cost, Hessian precision."""
    now, before = _load("gpu_fullsize"), _load("gpu_fullsize_ieee")
    if not now:
        return "_not measured yet: run `python benchmarks/gpu_fullsize.py` on a GPU_"
    names = {"dense": "dense", "structured-30%": "30% structured (FFN widths rounded to 64, the default)",
             "structured-30%-unrounded": "30% structured, exact FFN widths (`--ffn-multiple 1`)",
             "2:4": "2:4, `to_sparse_semi_structured` (cuSPARSELt)"}
    lines = [f"**Transformer forward latency** on one {now['device']} ({now['dtype']}, one 1024×1024 image, "
             "median of 10 interleaved repeats):", "",
             "| model | variant | parameters | median (ms) | speedup |", "|---|---|---|---|---|"]
    for model in ("sd3-medium", "flux-dev"):
        lat = now["latency"].get(model)
        if not lat:
            continue
        sparse = lat if "2:4" in lat["median_ms"] else before.get("latency", {}).get(model, {})
        for key, label in names.items():
            source = sparse if key == "2:4" else lat
            if key not in source.get("median_ms", {}):
                continue
            before_after = lat["notes"].get(f"{key}_params") or [lat["notes"]["structured-30%_params"][0]] * 2
            p = f"{before_after[1] / 1e9:.2f} B"
            lines.append(f"| {model} | {label} | {p} | {source['median_ms'][key]:.1f} | {source['speedup'][key]:.2f}x |")
    cutlass = now["latency"].get("sd3-medium", {}).get("notes", {}).get("2:4-cutlass", "")
    lines += ["", "2:4 rows count the dense parameters (half of the block weights are zeros); a 2:4 row missing from "
              "the latest run comes from the IEEE run below. "
              + (f"PyTorch's CUTLASS 2:4 kernels were tried too and refused: {cutlass.removeprefix('not measured: ')}."
                 if cutlass else ""), ""]
    lines += ["**Prune cost**, OBS-Diff 50% unstructured on SD3-medium, 16 prompts × 10 steps at 512×512, CFG batch 4; "
              "the last column scales calibration to the paper's 100 prompts × 25 steps (solves do not scale):", "",
              "| Hessian matmuls | calibration | packages | weights | calibration (s) | solves (s) | total (s) | "
              "peak GPU memory (GB) | calibration vs the plain passes it replaces | projected 100 × 25 (min) |",
              "|---" * 10 + "|"]
    for data, label in ((now, "TF32 (default for fp16/bf16)"), (before, "IEEE float32")):
        for r in data.get("prune", []):
            lines.append(f"| {label} | {r['mode']} | {r['packages']} | {_gpu_weights(r)} | {r['calibration_s']:.1f} | "
                         f"{r['solve_s']:.1f} | "
                         f"{r['total_s']:.1f} | {r['peak_memory_gb']:.1f} | {r['calibration_overhead_vs_plain_passes']:+.0%} | "
                         f"{r['projected_100x25_min']:.1f} |")
    h = now.get("hessian", {})
    if h:
        lines += ["", f"Hessian matmul X^T X ({h['rows']} rows × {h['width']}, one SD3 FFN-down calibration call): "
                  + "; ".join(f"{n} activations {v['median_ms']['ieee']:.1f} ms IEEE vs {v['median_ms']['tf32']:.1f} ms TF32 "
                              f"({v['speedup']:.1f}x), max relative difference {v['max_rel_diff']:.0e}"
                              + (f", or {v['half_inputs']['median_ms']:.1f} ms from the {n} values with float32 output "
                                 f"(difference {v['half_inputs']['max_rel_diff']:.0e}; not used by the hooks yet)"
                                 if isinstance(v.get("half_inputs"), dict) else "")
                              for n, v in h.items() if isinstance(v, dict) and "max_rel_diff" in v)
                  + ". fp16/bf16 values fit TF32's 10-bit mantissa, so only the float32 summation order differs."]
        acc = h.get("accumulate")
        if acc:
            lines[-1] += (f" One running-mean update as the hooks make it: {acc['median_ms']['add_batch']:.1f} ms "
                          f"(upper block triangle, fused rescale, no per-layer sync) vs "
                          f"{acc['median_ms']['full_gram_sync_update']:.1f} ms before ({acc['speedup']:.1f}x).")
    lines += ["", f"`{now['command']}` (commit {now.get('code_commit', '?')}); the IEEE rows: `{before.get('command', '–')}` "
              f"(commit {before.get('code_commit', '?')}); results copied from the device's `$OUT` to "
              "`benchmarks/results/gpu_fullsize.json` and `gpu_fullsize_ieee.json`. Random weights: times and memory are "
              "real, images are not. Peak memory excludes real text encoders (stand-ins here; the paper's 24.05 GB "
              "includes them). \"Plain passes\": G pipeline passes for exact mode, one for cached mode."]
    lines += ["", "What this says:", ""]
    sd3 = now["latency"].get("sd3-medium")
    if sd3:
        lines.append(f"- Structured pruning is faster on a GPU only when kept FFN widths stay multiples of 64: with exact "
                     f"30% widths SD3-medium runs at {sd3['speedup']['structured-30%-unrounded']:.2f}x, rounded at "
                     f"{sd3['speedup']['structured-30%']:.2f}x. Full-size FFN widths are therefore rounded by default "
                     "(`--ffn-multiple`; tiny models keep exact fractions).")
    if sd3 and "2:4" in sd3["speedup"]:
        lines.append(f"- 2:4 through PyTorch's semi-structured tensors is {1 / sd3['speedup']['2:4']:.1f}x *slower* "
                     "end to end on SD3-medium here; the paper's 2:4 speedup needs kernels we do not have.")
    runs, tf32 = _plain_gpu_runs(before), _plain_gpu_runs(now)
    if ("exact", 4) in runs and ("exact", 4) in tf32:
        a, b = runs[("exact", 4)], tf32[("exact", 4)]
        lines.append(f"- TF32 Hessians cut calibration from {a['calibration_s']:.1f} s to {b['calibration_s']:.1f} s; "
                     f"the OBS solves ({b['solve_s']:.0f} s) are now most of the prune time.")
    if {("exact", 4), ("cached", 24), ("exact", 24)} <= set(runs):
        e4, c24, e24 = runs[("exact", 4)], runs[("cached", 24)], runs[("exact", 24)]
        lines.append(f"- One package per block: cached calibration took {c24['total_s']:.0f} s, less than exact mode with "
                     f"4 packages ({e4['total_s']:.0f} s) and {e24['total_s'] / c24['total_s']:.2f}x less than exact "
                     f"mode with 24 packages ({e24['total_s']:.0f} s), same run, IEEE Hessians.")
    return "\n".join(lines)


def compare(a: dict | None, b: dict | None, metric: str = "full") -> tuple[float, float] | None:
    """Mean difference a - b and its 95% half-width: paired over seeds when both have the same seeds."""
    if not a or not b or metric not in a or metric not in b:
        return None
    va, vb = a[metric]["values"], b[metric]["values"]
    if len(va) == len(vb) >= 2 and a["seeds"] == b["seeds"]:
        from scipy import stats

        d = [x - y for x, y in zip(va, vb)]
        mean = sum(d) / len(d)
        sd = (sum((x - mean) ** 2 for x in d) / (len(d) - 1)) ** 0.5
        return mean, stats.t.ppf(0.975, len(d) - 1) * sd / len(d) ** 0.5
    return a[metric]["mean"] - b[metric]["mean"], a[metric]["ci95"] + b[metric]["ci95"]


def _verdict(diff: tuple[float, float] | None) -> str:
    if diff is None:
        return "not measured"
    mean, half = diff
    if mean - half > 0:
        return "better"
    if mean + half < 0:
        return "worse"
    return "within noise"


def _fmt(diff: tuple[float, float] | None) -> str:
    return "–" if diff is None else f"{diff[0]:+.3f} ± {diff[1]:.3f}"


def render_claims() -> str:
    """Each claim of the paper, what this project measured, and a verdict computed from the results."""
    quality, weighting, packages, structured, speed = (_load(n) for n in ("quality", "weighting", "packages", "structured", "speed"))
    rows = ["| paper claim | what we measured (tiny world) | verdict |", "|---|---|---|"]

    def versus(model, method, others, settings):
        parts, verdicts = [], []
        for pattern, sparsity in settings:
            a = _find(quality.get("rows", []), model=model, method=method, pattern=pattern, sparsity=sparsity)
            for o in others:
                b = _find(quality.get("rows", []), model=model, method=o, pattern=pattern, sparsity=sparsity)
                d = compare(a, b)
                verdicts.append(_verdict(d))
                label = _pattern_label(pattern, sparsity)
                parts.append(f"{model} {label} vs {o}: {_fmt(d)}")
        return parts, verdicts

    def summary(verdicts):
        if not verdicts or all(v == "not measured" for v in verdicts):
            return "not measured yet"
        if all(v == "better" for v in verdicts):
            return "**confirmed**"
        if any(v == "better" for v in verdicts):
            return f"**partly** ({verdicts.count('better')} of {len(verdicts)} comparisons beyond noise)"
        return "**not confirmed**"

    for claim, method, others, settings in (
        ("OBS-Diff beats magnitude, Wanda and DSnoT at 50–60% unstructured (Table 1)", "obs-diff",
         ["magnitude", "wanda", "dsnot"], [("unstructured", 0.5), ("unstructured", 0.6)]),
        ("OBS-Diff beats magnitude, Wanda and DSnoT under 2:4 (Table 2)", "obs-diff", ["magnitude", "wanda", "dsnot"],
         [("2:4", None)]),
        ("The timestep-aware Hessian improves on plain SparseGPT (asked by reviewers; not in the paper)", "obs-diff",
         ["sparsegpt"], [("unstructured", 0.5), ("unstructured", 0.6), ("unstructured", 0.7), ("2:4", None)]),
    ):
        parts, verdicts = [], []
        for model in ("tiny-sd3", "tiny-flux"):
            p, v = versus(model, method, others, settings)
            parts += p
            verdicts += v
        rows.append(f"| {claim} | full-adherence difference (mean ± 95% CI): {'; '.join(parts) or '–'} | {summary(verdicts)} |")

    w = weighting.get("rows", [])
    parts, verdicts = [], []
    for s in sorted({r["setting"]["sparsity"] for r in w}):
        best = _find(w, weighting="log-decrease", sparsity=s)
        for other in ("uniform", "linear-decrease", "cosine", "exponential"):
            d = compare(best, _find(w, weighting=other, sparsity=s))
            verdicts.append(_verdict(d))
            parts.append(f"{s:.0%} vs {other}: {_fmt(d)}")
    rows.append(f"| Log-decrease timestep weighting is best (Table 6: +0.008 ImageReward over uniform) | "
                f"tiny-sd3, paired over 5 seeds: {'; '.join(parts) or '–'} | {summary(verdicts)} |")

    wr, q = _rows("weight_range"), quality.get("rows", [])
    parts, verdicts, favour = [], [], 0
    for model in ("tiny-sd3", "tiny-flux"):
        for pattern, sparsity in (("unstructured", 0.5), ("unstructured", 0.6), ("2:4", None)):
            base = dict(model=model, pattern=pattern, sparsity=sparsity)
            strong = _find_exact(wr, **base, method="obs-diff", weighting="log-decrease", weight_range=STRONG)
            for label, other in (("uniform", _find_exact(q, **base, method="sparsegpt")),
                                 ("log-increase", _find_exact(wr, **base, method="obs-diff", weighting="log-increase",
                                                              weight_range=STRONG))):
                d = compare(strong, other)
                verdicts.append(_verdict(d))
                favour += d is not None and d[0] > 0
                parts.append(f"{model} {_pattern_label(pattern, sparsity)} vs {label}: {_fmt(d)}")
    rows.append("| Early denoising steps deserve more weight in the Hessian (Sec. 3.2's premise; tested here with "
                "log-decrease at 0.1–1.9, a 19x range instead of the paper's 1.5x) | full-adherence difference "
                f"(mean ± 95% CI): {'; '.join(parts) or '–'}; the mean favours the early steps in {favour} of "
                f"{len(parts)} | {summary(verdicts)} |")

    parts, verdicts = [], []
    for model, evaluation, wanda, obs, dense in _robustness_cases():
        if evaluation is None or not (wanda and obs and dense):
            continue
        d = compare(obs, wanda)
        verdicts.append(_verdict(d))
        parts.append(f"{model} {_sampling_label(model, evaluation)}: {obs['full']['mean'] / dense:.1%} of dense, "
                     f"lead over Wanda {_fmt(d)}")
    rows.append("| A model pruned at one CFG scale, step count and sampler holds up at others (App. D, Tables 11–13) | "
                f"OBS-Diff 50%, calibrated at each model's own settings: {'; '.join(parts) or '–'} | "
                f"{summary(verdicts)} (verdict: OBS-Diff's lead over Wanda at each other setting) |")

    parts, verdicts = [], []
    for model, pattern, sparsity, method, own, other in _calibration_source_cases():
        if method == "obs-diff":
            d = compare(other, own)
            verdicts.append(_verdict(d))
            parts.append(f"{model} {_pattern_label(pattern, sparsity)}: {_fmt(d)}")
    worse = verdicts.count("worse")
    verdict = ("not measured yet" if not verdicts else "**confirmed** (no measurable loss)" if not worse
               else "**not confirmed**" if worse == len(verdicts) else f"**partly** ({worse} of {len(verdicts)} measurably worse)")
    rows.append("| Out-of-distribution calibration prompts work as well as in-distribution ones (Table 14: GCC3M vs "
                "COCO) | OBS-Diff, adherence with the shipped real-world prompts minus with the model's own captions: "
                f"{'; '.join(parts) or '–'} | {verdict} |")

    pk = packages.get("rows", [])
    parts, verdicts = [], []
    for model in ("tiny-sd3", "tiny-flux"):
        exact = sorted((r for r in pk if r["setting"]["model"] == model and r["setting"]["calibration"] == "exact"),
                       key=_num_packages)
        if len(exact) >= 2:
            d = compare(exact[-1], exact[0])
            verdicts.append("within noise" if _verdict(d) == "within noise" else "differs")
            t0, t1 = exact[0]["prune_wall_s"]["mean"], exact[-1]["prune_wall_s"]["mean"]
            parts.append(f"{model} G={_packages_label(exact[-1])} vs G=1: quality {_fmt(d)}, time {t1 / t0:.1f}x")
    verdict = ("not measured yet" if not verdicts else "**confirmed** (quality within noise)" if all(v == "within noise" for v in verdicts)
               else "**not confirmed**")
    rows.append(f"| Quality is insensitive to the number of module packages; time grows with them (Table 7) | "
                f"{'; '.join(parts) or '–'} | {verdict} |")

    st = structured.get("rows", [])
    parts, verdicts = [], []
    for model in ("tiny-sd3", "tiny-flux"):
        for s in (0.2, 0.3):
            d = compare(_find(st, model=model, method="obs-diff", sparsity=s), _find(st, model=model, method="l1-norm", sparsity=s))
            verdicts.append(_verdict(d))
            parts.append(f"{model} {s:.0%}: {_fmt(d)}")
    sel = _rows("structured_selection")
    traj_parts, traj_verdicts = [], []
    for model in ("tiny-sd3", "tiny-flux"):
        for s in (0.2, 0.3):
            d = compare(_find(sel, model=model, method="obs-diff", sparsity=s, head_selection="trajectory"),
                        _find(sel, model=model, method="l1-norm", sparsity=s))
            if d is not None:
                traj_verdicts.append(_verdict(d))
                traj_parts.append(f"{model} {s:.0%}: {_fmt(d)}")
    traj = f"; with `--head-selection trajectory` (beyond the paper): {'; '.join(traj_parts)}" if traj_parts else ""
    verdict = summary(verdicts) + (f" with the paper's head saliency; {summary(traj_verdicts)} with trajectory head "
                                   "selection" if traj_parts else "")
    rows.append(f"| Structured OBS-Diff is far above L1-norm at the same size (Tables 4, 9) | "
                f"full-adherence difference: {'; '.join(parts) or '–'}{traj} | {verdict} |")

    sp = speed.get("models", {})
    parts = [f"{m} 30%: {v['structured 30%']['speedup']:.2f}x" for m, v in sp.items() if "structured 30%" in v]
    gpu, gpu_ieee = _load("gpu_fullsize"), _load("gpu_fullsize_ieee")
    lat = gpu.get("latency", {})
    two_four = (gpu.get("latency", {}).get("sd3-medium", {}).get("speedup", {}).get("2:4")
                or gpu_ieee.get("latency", {}).get("sd3-medium", {}).get("speedup", {}).get("2:4"))
    if lat:
        gpu_text = ("; H100 whole transformer at 1024²: structured 30% " + ", ".join(
            f"{m} {v['speedup']['structured-30%']:.2f}x" for m, v in lat.items())
            + (f", 2:4 (torch semi-structured) SD3-medium {two_four:.2f}x" if two_four else ""))
        verdict = "structured: **partly confirmed** (close on Flux, below on SD3-medium); 2:4: **not confirmed** with stock PyTorch kernels"
    else:
        gpu_text, verdict = "; GPU: not measured", "not testable here (GPU)"
    rows.append("| Structured 30% gives 1.31x and 2:4 1.23x (one SD3.5-large block, RTX 4090; Table 5) | "
                f"end-to-end CPU sampling of the tiny models: {'; '.join(parts) or 'not measured yet'}{gpu_text} | {verdict} |")
    runs = _plain_gpu_runs(gpu)
    if ("exact", 4) in runs:
        r = runs[("exact", 4)]
        rows.append("| SD3-medium prunes in under 15 min on one RTX 4090 (Table 8) | H100, 4 packages, random weights: "
                    f"{r['total_s']:.0f} s for 16 prompts × 10 steps, projected {r['projected_100x25_min']:.1f} min for 100 × 25, "
                    f"peak {r['peak_memory_gb']:.1f} GB without text encoders | **consistent** (a faster GPU than the paper's) |")
    else:
        rows.append("| SD3-medium prunes in under 15 min on one RTX 4090 (Table 8) | `benchmarks/gpu_fullsize.py` exists and is "
                    "tested on CPU; no GPU run yet | not testable here (GPU) |")
    q = quality.get("rows", [])
    times = {m: [r["prune_wall_s"]["mean"] for r in q if r["setting"]["method"] == m] for m in QUALITY_METHODS}
    if all(times.values()):
        med = {m: sorted(v)[len(v) // 2] for m, v in times.items()}
        order = " < ".join(f"{m} {med[m]:.1f} s" for m in sorted(med, key=med.get))
        slowest_baseline = max(med["magnitude"], med["wanda"], med["dsnot"])
        verdict = "**confirmed**" if med["obs-diff"] > slowest_baseline else "**not confirmed**"
        rows.append(f"| OBS-Diff takes the longest to prune (Table 8) | median prune wall time on the tiny models: "
                    f"{order} (SparseGPT is the same solver with other step weights, so it costs the same) | {verdict} |")
    return "\n".join(rows)


def render_provenance() -> str:
    """Which code version produced each sweep's runs (recorded per run by benchmarks/run.py)."""
    names = sorted(p.stem for p in (RESULTS / "raw").glob("*.jsonl"))
    cells = [f"`{n}` {', '.join(_load(n).get('code', ['unrecorded']))}" for n in names]
    return "Sweeps and the commit their runs ran at: " + "; ".join(cells) + "." if cells else "_no sweeps yet_"


RENDERERS = {"provenance": render_provenance, "claims": render_claims, "gpu": render_gpu, "structured_selection": render_structured_selection, "head_diagnosis": render_head_diagnosis, "hessian_inputs": render_hessian_inputs, "refit": render_refit, "dense_targets": render_dense_targets, "admm": render_admm, "admm_settings": render_admm_settings, "acceptance": render_acceptance, "tuning": render_tuning, "admm_calibration": render_admm_calibration, "refit_masks": render_refit_masks, "weight_range": render_weight_range,
             "solver_settings": render_solver_settings, "robustness": render_robustness,
             "calibration_source": render_calibration_source, "block_sensitivity": render_block_sensitivity,
             "sparsity_ramp": render_sparsity_ramp, "width": render_width, "cached_projection": render_cached_projection, "structured_parts": render_structured_parts,
             "calibration_size": render_calibration_size, "speed": render_speed, "tiny_world": render_tiny_world, "demo": render_demo, "quality": render_quality,
             "weighting": render_weighting, "packages": render_packages, "structured": render_structured,
             "overhead": render_overhead}
BLOCK = re.compile(r"(<!-- results:(\w+) -->\n)(.*?)(<!-- /results:\2 -->)", re.S)


def rendered(text: str) -> str:
    """README text with every generated block re-rendered."""
    return BLOCK.sub(lambda m: m.group(1) + RENDERERS[m.group(2)]() + "\n" + m.group(4), text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    text = README.read_text()
    new = rendered(text)
    if args.check:
        if new != text:
            print("README.md is out of date with benchmarks/results: run python benchmarks/readme.py", file=sys.stderr)
            return 1
        return 0
    README.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())

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
    lines.append(f"Full ShapeBench adherence (all four attributes right). Produced by `{next(iter(data.values()))['command']}`.")
    return "\n".join(lines)


def render_demo() -> str:
    """The `make demo` comparison (dense vs OBS-Diff vs magnitude at 50%)."""
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


QUALITY_PATTERNS = [("unstructured", 0.3), ("unstructured", 0.5), ("unstructured", 0.6), ("unstructured", 0.7),
                    ("2:4", None), ("4:8", None)]
QUALITY_METHODS = ["magnitude", "wanda", "sparsegpt", "obs-diff"]


def render_quality() -> str:
    """Table 1/2 analog: full adherence (mean ± 95% CI over calibration seeds) per model, method, pattern."""
    data = _load("quality")
    if not data:
        return "_not measured yet: run `python benchmarks/run.py quality` then `summarize`_"
    lines = []
    for model in ("tiny-sd3", "tiny-flux"):
        dense = data["dense"].get(model, {}).get("full")
        head = [f"{s:.0%}" if s else p for p, s in QUALITY_PATTERNS]
        lines += [f"**{model}** (dense: {dense:.3f})" if dense is not None else f"**{model}**", "",
                  "| method | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
        for method in QUALITY_METHODS:
            cells = []
            for pattern, sparsity in QUALITY_PATTERNS:
                r = _find(data["rows"], model=model, method=method, pattern=pattern, sparsity=sparsity)
                cells.append(_cell(r.get("full")) if r else "–")
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        lines.append("")
    lines.append(f"Full ShapeBench adherence on {data['eval_prompts']} fixed evaluation prompts; mean ± 95% "
                 f"t-interval over calibration seeds (magnitude uses no data: one run); {data['calibration_prompts']} "
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


def render_packages() -> str:
    """Table 7 analog, with the cached calibration of this project: time, memory, quality per package count."""
    data = _load("packages")
    if not data:
        return "_not measured yet: run `python benchmarks/run.py packages`_"
    lines = ["| model | packages | mode | prune wall time (s) | peak RSS (MB) | full adherence |", "|---|---|---|---|---|---|"]
    rows = sorted(data["rows"], key=lambda r: (r["setting"]["model"], r["setting"]["packages"], r["setting"]["calibration"]))
    for r in rows:
        st = r["setting"]
        lines.append(f"| {st['model']} | {st['packages']} | {st['calibration']} | {_cell(r['prune_wall_s'], 1)} | "
                     f"{r['peak_memory_bytes']['mean'] / 2**20:.0f} | {_cell(r['full'])} |")
    lines.append("")
    lines.append("OBS-Diff at 60%, 16 calibration prompts, 3 seeds; peak RSS is the process high-water mark (it "
                 "includes everything loaded before). `python benchmarks/run.py packages`.")
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


def render_overhead() -> str:
    """Calibration overhead of hooks + Hessians vs plain inference."""
    data = _load("calibration_overhead")
    if not data:
        return "_not measured yet: run `python benchmarks/calibration_overhead.py`_"
    lines = ["| model | packages | plain passes (s) | calibration passes (s) | overhead |", "|---|---|---|---|---|"]
    for model, per_g in data["models"].items():
        for g, r in per_g.items():
            lines.append(f"| {model} | {g} | {r['plain_s']:.2f} | {r['calibration_s']:.2f} | {r['overhead']:+.0%} |")
    lines.append("")
    lines.append(f"Medians of interleaved repeats, {data['num_prompts']} prompts, {data['threads']} thread; `{data['command']}`.")
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


RENDERERS = {"speed": render_speed, "tiny_world": render_tiny_world, "demo": render_demo, "quality": render_quality,
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

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


RENDERERS = {"tiny_world": render_tiny_world, "demo": render_demo}
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

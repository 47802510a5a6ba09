"""Quality bar and pruning sensitivity of the shipped tiny models; writes their model cards.

    python benchmarks/tiny_world.py                     # both models, ~5 min on 2 cores
    python benchmarks/tiny_world.py --models tiny-sd3 --num-prompts 500

For each model in data/: dense ShapeBench on fresh balanced prompts (the quality bar: >= 0.90 full
adherence), then magnitude and Wanda at 30/50/60/70% unstructured (the sensitivity requirement:
50% magnitude must cost >= 10 points). Results go to benchmarks/results/tiny_world.json, and each
model directory's README.md (its model card) is regenerated from them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from obsdiff_lite.evaluate import sample_shapebench  # noqa: E402
from obsdiff_lite.pipelines import load_pipeline  # noqa: E402
from obsdiff_lite.prune import PruneConfig, prune  # noqa: E402
from obsdiff_lite.shapes.bench import evaluate, save_grid  # noqa: E402
from obsdiff_lite.shapes.tiny import TINY_FLUX, TINY_SD3  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "tiny_world.json"
SPARSITIES = (0.3, 0.5, 0.6, 0.7)
TINY_ARCHITECTURES = {"sd3": TINY_SD3, "flux": TINY_FLUX}


def measure(model: str, num_prompts: int, prune_prompts: int, seed: int) -> dict:
    """Dense quality on ``num_prompts`` prompts; magnitude/Wanda curves on ``prune_prompts``."""
    path = ROOT / "data" / model
    dense = load_pipeline(path)
    t0 = time.perf_counter()
    specs, images = sample_shapebench(dense, num_prompts, seed=seed)
    seconds = time.perf_counter() - t0
    result = {"dense": evaluate(images, specs), "dense_seconds_per_image": seconds / num_prompts,
              "num_prompts": num_prompts, "seed": seed, "curves": {}}
    save_grid(images[:32], path / "samples.png", nrow=16)
    ref_specs, ref_images = specs[:prune_prompts], images[:prune_prompts]
    for method in ("magnitude", "wanda"):
        for s in SPARSITIES:
            pipe = load_pipeline(path)
            prune(pipe, PruneConfig(method=method, sparsity=s, packages=1, num_prompts=16), progress=False)
            _, pruned = sample_shapebench(pipe, prune_prompts, seed=seed, progress=False)
            scores = evaluate(pruned, ref_specs, reference=ref_images)
            result["curves"].setdefault(method, {})[f"{s:.2f}"] = scores
            print(f"{model} {method} {s:.0%}: full adherence {scores['full']:.3f}", flush=True)
    return result


def _steps_of(pipeline_dir: str) -> int:
    """Training steps recorded by a shipped pipeline (a path relative to the repository, e.g. data/tiny-sd3)."""
    return json.loads((ROOT / pipeline_dir / "training.json").read_text())["steps"]


def model_card(model: str, result: dict) -> str:
    """Markdown model card from the training record and the measured results."""
    path = ROOT / "data" / model
    training = json.loads((path / "training.json").read_text())
    generation = json.loads((path / "generation.json").read_text())
    transformer = json.loads((path / "transformer" / "config.json").read_text())
    params = sum(t.numel() for t in load_pipeline(path).transformer.parameters())
    # The trainer records its head count for every model now, so the width experiment's model is told by its width.
    widened = transformer["num_attention_heads"] != TINY_ARCHITECTURES[training["arch"]]["num_attention_heads"]
    resumed = training.get("resumed_from")  # trained further from a shipped model: the fit side of the experiment
    d = result["dense"]
    lines = [
        f"# {model}",
        "",
        f"A tiny `{transformer['_class_name']}` pipeline trained by `obsdiff_lite.shapes.train` on the captioned-shapes",
        "dataset (32x32, one shape: 4 shapes x 6 colors x 5 positions x 2 sizes).",
        *(["It exists for one experiment: how much of the tiny world's sensitivity to pruning comes from its size or fit",
           "(README, \"Wider and longer-trained tiny models\"). The notebooks, tests and other benchmarks use tiny-sd3 and tiny-flux."]
          if widened or resumed else
          ["It exists so that every notebook, test and benchmark of obsdiff_lite runs offline on a CPU through the real",
           "diffusers classes."]),
        "",
        "## Training",
        f"- transformer: {params:,} parameters; config in `transformer/config.json`",
        *([f"- width: {transformer['num_attention_heads']} heads x {transformer['attention_head_dim']} (hidden "
           f"{transformer['num_attention_heads'] * transformer['attention_head_dim']}); otherwise tiny-sd3's data, VAE, "
           "settings and step count (its learning-rate decay follows steps, tiny-sd3's followed wall-clock time); "
           "`python benchmarks/run.py width` prunes it like tiny-sd3"] if widened else []),
        *([f"- trained further: the weights of `{resumed}`, then {training['steps'] - _steps_of(resumed):,} more steps "
           "with a fresh optimizer and learning-rate schedule, same data and settings; same width; "
           "`python benchmarks/run.py width` prunes it like tiny-sd3"] if resumed else []),
        f"- {training['steps']:,} steps in {training['minutes']:.1f} min "
        f"{'on CPU, both runs together' if resumed else 'on one CPU thread'}, batch {training.get('batch_size')},"
        f" AdamW lr {training.get('lr')}, EMA {training.get('ema_decay')}, caption dropout {training.get('caption_dropout')},"
        f" seed {training.get('seed')}",
        "- rectified flow (x_t = (1-t) x0 + t noise, target noise - x0, logit-normal t) on the latents of a tiny",
        "  AutoencoderKL (32x32x3 <-> 16x16x8) trained first by the same script",
        "- text encoders: kept at a fixed random init (a deterministic function of the caption is all the",
        "  conditioning needs); tokenizers built offline from the caption grammar",
        "",
        "## Recommended call (`generation.json`)",
        "```json",
        json.dumps({k: v for k, v in generation.items() if not k.startswith("_")}, indent=2),
        "```",
        "",
        f"## ShapeBench ({result['num_prompts']} balanced prompts, seed {result['seed']}; `benchmarks/tiny_world.py`)",
        f"- full adherence (all four attributes right): **{d['full']:.3f}**",
        f"- per attribute: shape {d['shape']:.3f}, color {d['color']:.3f}, position {d['position']:.3f}, size {d['size']:.3f}",
        f"- Fréchet ShapeBench distance to real images: {d['fd']:.2f}",
        "",
        "## Sensitivity to pruning (full adherence, unstructured, all block linears)",
        "",
        "| method | " + " | ".join(f"{s:.0%}" for s in SPARSITIES) + " |",
        "|---|" + "---|" * len(SPARSITIES),
    ]
    for method, curve in result["curves"].items():
        lines.append(f"| {method} | " + " | ".join(f"{curve[f'{s:.2f}']['full']:.3f}" for s in SPARSITIES) + " |")
    lines += ["", "![samples](samples.png)", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["tiny-sd3", "tiny-flux"])
    parser.add_argument("--num-prompts", type=int, default=500)
    parser.add_argument("--prune-prompts", type=int, default=240)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    for model in args.models:
        results[model] = measure(model, args.num_prompts, args.prune_prompts, args.seed)
        results[model]["command"] = " ".join(["python benchmarks/tiny_world.py", *sys.argv[1:]])
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(results, indent=2) + "\n")
        (ROOT / "data" / model / "README.md").write_text(model_card(model, results[model]))
        print(f"{model}: dense full adherence {results[model]['dense']['full']:.3f}", flush=True)


if __name__ == "__main__":
    main()

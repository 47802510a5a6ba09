"""End-to-end CPU sampling speed: dense vs structurally pruned tiny models (interleaved, medians).

    python benchmarks/speed.py                      # both tiny models, 10%..40%, ~3 min
    python benchmarks/speed.py --models tiny-sd3 --sparsities 0.3 --repeats 5

The pruned models are OBS-Diff structured (heads + FFN neurons, blocks 1..N-2). Each repeat samples
the same batch (fixed prompts, seeds, steps, resolution from generation.json) with every model in
turn, so load drift hits all of them alike. Writes benchmarks/results/speed.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from obsdiff_lite.evaluate import shapebench_prompts  # noqa: E402
from obsdiff_lite.pipelines import call_kwargs, load_pipeline, run_pipeline  # noqa: E402
from obsdiff_lite.prune import PruneConfig, prune  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "speed.json"


def measure(model: str, sparsities: list[float], batch: int, repeats: int) -> dict:
    """Median seconds per sampling call (batch prompts, full denoising loop + VAE decode) per model."""
    path = ROOT / "data" / model
    pipes = {"dense": load_pipeline(path)}
    info = {}
    for s in sparsities:
        pipe = load_pipeline(path)
        report = prune(pipe, PruneConfig(pattern="structured", sparsity=s, packages=2, num_prompts=8), progress=False)
        pipes[f"structured {s:.0%}"] = pipe
        info[f"structured {s:.0%}"] = {k: report[k] for k in ("parameters_before", "parameters_after", "macs_before", "macs_after")}
    _, prompts = shapebench_prompts(batch, seed=0)
    call = call_kwargs(pipes["dense"].obsdiff_generation)
    times = {k: [] for k in pipes}
    for name, pipe in pipes.items():  # warm-up
        run_pipeline(pipe, prompts, 0, call, batch, progress=False)
    for _ in range(repeats):
        for name, pipe in pipes.items():
            t0 = time.perf_counter()
            run_pipeline(pipe, prompts, 0, call, batch, progress=False)
            times[name].append(time.perf_counter() - t0)
    dense = statistics.median(times["dense"])
    out = {}
    for name, ts in times.items():
        med = statistics.median(ts)
        out[name] = {"median_s": med, "all_s": ts, "speedup": dense / med, **info.get(name, {})}
        print(f"{model} {name}: {med * 1e3:.0f} ms per batch of {batch}, speedup {dense / med:.2f}x", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["tiny-sd3", "tiny-flux"])
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.4])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = {"command": " ".join(["python benchmarks/speed.py", *sys.argv[1:]]), "threads": args.threads,
               "batch": args.batch, "repeats": args.repeats, "models": {}}
    for model in args.models:
        results["models"][model] = measure(model, args.sparsities, args.batch, args.repeats)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()

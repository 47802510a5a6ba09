"""Calibration overhead: hooks + timestep-weighted Hessians vs plain pipeline inference, same prompts.

    python benchmarks/calibration_overhead.py --model data/tiny-sd3 --prompts 16 --repeats 3

For each package count G, times (interleaved, each repeat alternating which goes first; medians over repeats) G
plain inference passes over the calibration prompts and the G calibration passes of `prune` (hooks on, Hessians of
that package's layers accumulated), excluding the OBS solves, once per ``--hessian-inputs`` (``guided`` folds the two
CFG halves into one input row before X^T X, so its Hessians cost half). Each calibration pass is also timed once more
with the accumulators' X^T X switched off (``without_gram``; hooks, step tracking, input reshapes, running-mean
bookkeeping and finiteness checks still run), which splits the overhead into the Hessians' arithmetic and everything
around it. Also counts the multiply-adds of one pass in the target linears and in their (plain) Hessians. Writes
benchmarks/results/calibration_overhead.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from obsdiff_lite import hessian  # noqa: E402
from obsdiff_lite.arch import arch_for_transformer, blocks  # noqa: E402
from obsdiff_lite.calibrate import HESSIAN_INPUTS, calibrate  # noqa: E402
from obsdiff_lite.pipelines import call_kwargs, load_pipeline, run_pipeline  # noqa: E402
from obsdiff_lite.prune import default_prompts, package_units  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "calibration_overhead.json"


@contextlib.contextmanager
def without_gram():
    """Within the block, Hessian accumulators skip their X^T X (all else runs), to time calibration without it."""
    original = hessian.add_gram_upper_
    hessian.add_gram_upper_ = lambda *args, **kwargs: None
    try:
        yield
    finally:
        hessian.add_gram_upper_ = original


def multiply_adds(pipe, arch, prompts: list[str], call: dict, batch_size: int) -> dict:
    """Multiply-adds of one plain pass in the target linears vs in their Hessians (X^T X on the block upper
    triangle, one per shared input), counted by hooks: the floor of the overhead when the linears dominate."""
    from obsdiff_lite.hessian import gram_upper_products

    counts = {"linears": 0, "hessians": 0}
    handles = []
    for package in package_units(blocks(pipe.transformer, arch), 1):
        for target in (t for unit in package for t in unit):
            linears = [lin for _, lin in target.linears()]
            d = linears[0].in_features
            out = sum(lin.out_features for lin in linears)

            def hook(module, args, d=d, out=out, gram=gram_upper_products(d)):
                rows = args[0].numel() // d
                counts["linears"] += rows * d * out
                counts["hessians"] += rows * gram

            handles.append(linears[0].register_forward_pre_hook(hook))
    try:
        run_pipeline(pipe, prompts, 0, call, batch_size, output_type="latent", progress=False)
    finally:
        for h in handles:
            h.remove()
    return counts | {"hessian_per_linear": counts["hessians"] / counts["linears"]}


def measure(model: str, num_prompts: int, packages: list[int], repeats: int, batch_size: int,
            hessian_inputs: list[str]) -> dict:
    """Median seconds of plain passes and calibration passes for each package count and Hessian input."""
    pipe = load_pipeline(model)
    arch = arch_for_transformer(pipe.transformer)
    call = call_kwargs(pipe.obsdiff_generation)
    prompts = default_prompts(pipe, num_prompts, 0)
    out = {"multiply_adds": multiply_adds(pipe, arch, prompts, call, batch_size), "runs": []}
    for g in packages:
        plan = package_units(blocks(pipe.transformer, arch), g)
        plain, calib, no_gram = [], {h: [] for h in hessian_inputs}, {h: [] for h in hessian_inputs}

        def time_plain() -> None:
            t0 = time.perf_counter()
            for _ in plan:
                run_pipeline(pipe, prompts, 0, call, batch_size, output_type="latent", progress=False)
            plain.append(time.perf_counter() - t0)

        def time_calibration() -> None:
            for inputs in hessian_inputs:
                for times, context in ((calib, contextlib.nullcontext), (no_gram, without_gram)):
                    t0 = time.perf_counter()
                    with context():
                        for package in plan:
                            groups = {t.key: t.linears()[0][1] for unit in package for t in unit}
                            calibrate(pipe, arch, groups, prompts, call, batch_size=batch_size, progress=False,
                                      hessian_inputs=inputs)
                    times[inputs].append(time.perf_counter() - t0)

        for repeat in range(repeats):
            # Alternate which goes first, so that a machine slowing down or speeding up within a repeat does not
            # always land on the same side.
            for part in ((time_plain, time_calibration) if repeat % 2 == 0 else (time_calibration, time_plain)):
                part()
        p = statistics.median(plain)
        for inputs, times in calib.items():
            c = statistics.median(times)
            n = statistics.median(no_gram[inputs])
            paired = [ct / pt - 1 for ct, pt in zip(times, plain)]  # each repeat's calibration vs its own plain passes
            out["runs"].append({"packages": g, "hessian_inputs": inputs, "plain_s": p, "calibration_s": c,
                                "overhead": c / p - 1, "overhead_range": [min(paired), max(paired)],
                                "without_gram_s": n, "without_gram_overhead": n / p - 1,
                                "plain_all_s": plain, "calibration_all_s": times,
                                "without_gram_all_s": no_gram[inputs]})
            print(f"{model} G={g} {inputs}: plain {p:.2f} s, calibration {c:.2f} s, overhead {c / p - 1:+.1%} "
                  f"({n / p - 1:+.1%} without X^T X)", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", nargs="+", default=["data/tiny-sd3", "data/tiny-flux"])
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--packages", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--hessian-inputs", nargs="+", default=["plain", "guided"], choices=HESSIAN_INPUTS)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = {"command": " ".join(["python benchmarks/calibration_overhead.py", *sys.argv[1:]]),
               "threads": args.threads, "num_prompts": args.prompts, "models": {}}
    for model in args.model:
        results["models"][Path(model).name] = measure(model, args.prompts, args.packages, args.repeats, args.batch_size,
                                                      args.hessian_inputs)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()

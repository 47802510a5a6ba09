"""Layer errors of OBS, OBS + re-fit and OBS + ADMM on the tiny models' real Hessians, and ADMM's own settings.

    python benchmarks/admm_settings.py                       # both tiny models, 16 prompts
    python benchmarks/admm_settings.py --models tiny-sd3 --prompts 2 --patterns 2:4 --out /tmp/a.json   # quick

One calibration pass of the dense model (one package, log-decrease weighting, the first ``--prompts`` default
captions) gives every input group's Hessian. Each group is then solved on its own by OBS, OBS + re-fit, and OBS +
ADMM with the defaults and with other start penalties and iteration caps. The number per solver is the mean over
layers of its layer error relative to OBS's on the same layer (1 = OBS; what the solvers minimise, without the
compounding of sequential packages), plus the solve time. Writes benchmarks/results/admm_settings.json.
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

from obsdiff_lite.arch import arch_for_transformer, blocks  # noqa: E402
from obsdiff_lite.calibrate import calibrate  # noqa: E402
from obsdiff_lite.obs import ADMM_ITERS, ADMM_RHO, REFIT_ITERS, admm_sparsify_weights, parse_pattern, sparsify_weights  # noqa: E402
from obsdiff_lite.pipelines import call_kwargs, load_pipeline  # noqa: E402
from obsdiff_lite.prune import default_prompts, package_units  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "admm_settings.json"
# (label, admm_sparsify_weights arguments); the first is the library's default.
ADMM_VARIANTS = [("ADMM (default)", {}), ("ADMM, start penalty 0.01", {"rho": 0.01}),
                 ("ADMM, start penalty 0.1", {"rho": 0.1}), ("ADMM, start penalty 0.3", {"rho": 0.3}),
                 ("ADMM, at most 30 iterations", {"iters": 30}), ("ADMM, at most 300 iterations", {"iters": 300})]


def input_groups(model: str, num_prompts: int) -> list[tuple[list[str], list[torch.Tensor], torch.Tensor]]:
    """(layer names, weights, Hessian) of every input group of the dense model, from one calibration pass."""
    pipe = load_pipeline(model)
    arch = arch_for_transformer(pipe.transformer)
    (package,) = package_units(blocks(pipe.transformer, arch), 1)
    targets = [t for unit in package for t in unit]
    accumulators = calibrate(pipe, arch, {t.key: t.linears()[0][1] for t in targets},
                             default_prompts(pipe, num_prompts, 0), call_kwargs(pipe.obsdiff_generation), progress=False)
    return [([name for name, _ in t.linears()], [lin.weight.data.clone() for _, lin in t.linears()],
             accumulators[t.key].hessian) for t in targets]


def measure(groups, pattern: str) -> dict:
    """Mean relative layer error (vs OBS) and solve seconds per solver, over every layer of ``groups``.

    ``pattern``: an unstructured sparsity ("0.5") or N:M ("2:4").
    """
    _, n, m = parse_pattern(pattern) if ":" in pattern else ("unstructured", 0, 0)
    sparsity = 0.0 if m else float(pattern)
    solvers = {"OBS + refit": lambda w, h: sparsify_weights(w, h, sparsity, n, m, refit_iters=REFIT_ITERS)}
    solvers |= {label: (lambda w, h, kw=kw: admm_sparsify_weights(w, h, sparsity, n, m, **kw)) for label, kw in ADMM_VARIANTS}
    ratios = {label: [] for label in solvers}
    seconds = dict.fromkeys(solvers, 0.0)
    iterations = []
    for _, weights, hessian in groups:
        for label, solve in solvers.items():
            t0 = time.perf_counter()
            results = solve(weights, hessian)
            seconds[label] += time.perf_counter() - t0
            for _, _, stats in results:
                ratios[label].append(stats["recon_error"] / stats["recon_error_obs"] if stats["recon_error_obs"] > 0 else 1.0)
                if label == "ADMM (default)":
                    iterations.append(stats["admm_iters"])
    return {"layers": len(ratios["OBS + refit"]),
            "solvers": {label: {"error_vs_obs": sum(r) / len(r), "worst_vs_obs": max(r), "seconds": seconds[label]}
                        for label, r in ratios.items()},
            "admm_iters_default": {"min": min(iterations), "max": max(iterations),
                                   "at_cap": sum(i >= ADMM_ITERS for i in iterations)}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["tiny-sd3", "tiny-flux"])
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--patterns", nargs="+", default=["0.5", "0.7", "2:4"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    result = {"command": " ".join(["python benchmarks/admm_settings.py", *sys.argv[1:]]), "threads": args.threads,
              "num_prompts": args.prompts, "defaults": {"iters": ADMM_ITERS, "rho": ADMM_RHO}, "models": {}}
    for model in args.models:
        groups = input_groups(str(ROOT / "data" / model), args.prompts)
        result["models"][model] = {}
        for pattern in args.patterns:
            result["models"][model][pattern] = measured = measure(groups, pattern)
            print(model, pattern, {k: round(v["error_vs_obs"], 3) for k, v in measured["solvers"].items()}, flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

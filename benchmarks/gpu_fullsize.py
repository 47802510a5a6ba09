"""Full-size SD3-medium on a GPU, random weights (no download): prune cost and real latency.

    python benchmarks/gpu_fullsize.py --device cuda --out benchmarks/results/gpu_fullsize.json
    python benchmarks/gpu_fullsize.py --tiny --out /tmp/gpu_fullsize_tiny.json   # CPU self-test (CI)

(a) OBS-Diff at 50% with 4 module packages over a reduced calibration set (--prompts x --steps at
    512x512, CFG 7, batch 4): calibration and solve time, peak GPU memory, and the projection to the
    paper's 100 prompts x 25 steps (calibration scales with prompts x steps; solves do not).
    Paper (Table 8 / Table 7): 14.95 min, 24.05 GB peak with 4 packages on a 48 GB RTX 4090.
(b) Transformer forward latency at 1024x1024 (4096 image + 333 text tokens), dense vs 2:4 through
    torch.sparse.to_sparse_semi_structured on every block linear vs 30% structured (heads + FFN,
    blocks 1..N-2), interleaved repeats, medians. Paper (Table 5, ONE block of SD3.5-large, RTX 4090):
    2:4 1.23x, structured 30% 1.31x.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from obsdiff_lite.arch import block_units, blocks  # noqa: E402
from obsdiff_lite.baselines import magnitude_prune  # noqa: E402
from obsdiff_lite.fullsize import build_random_pipeline  # noqa: E402
from obsdiff_lite.prune import PruneConfig, prune  # noqa: E402

TINY = {"num_layers": 3, "num_attention_heads": 2, "caption_projection_dim": 128, "pooled_projection_dim": 64,
        "joint_attention_dim": 128}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def prune_cost(args, device, dtype) -> dict:
    """Part (a): prune a random full-size transformer with OBS-Diff and project to the paper's setting."""
    pipe = build_random_pipeline(args.model, device=device, dtype=dtype, overrides=TINY if args.tiny else None)
    pipe.obsdiff_generation = {"num_inference_steps": args.steps, "guidance_scale": 7.0, "height": args.resolution,
                               "width": args.resolution, "max_sequence_length": args.text_tokens}
    prompts = [line for line in (ROOT / "data" / "prompts" / "calibration.txt").read_text().splitlines() if line][: args.prompts]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    report = prune(pipe, PruneConfig(sparsity=0.5, packages=args.packages, prompts=prompts, batch_size=4,
                                     calibration=args.calibration), progress=not args.quiet)
    t = report["timings"]
    scale = (100 * 25) / (args.prompts * args.steps)
    projected = t["calibration_s"] * scale + t["solve_s"]
    return {"prompts": args.prompts, "steps": args.steps, "resolution": args.resolution, "packages": args.packages,
            "calibration": args.calibration,
            "calibration_s": t["calibration_s"], "solve_s": t["solve_s"], "total_s": t["total_s"],
            "peak_memory_gb": report["peak_memory_bytes"] / 2**30, "achieved_sparsity": report["achieved_sparsity"],
            "projected_100x25_min": projected / 60, "paper_min": 14.95, "paper_peak_gb_4_packages": 24.05}


def _inputs(transformer, resolution: int, text_tokens: int, batch: int, device, dtype):
    cfg = transformer.config
    side = resolution // 8
    return dict(
        hidden_states=torch.randn(batch, cfg.in_channels, side, side, device=device, dtype=dtype),
        encoder_hidden_states=torch.randn(batch, text_tokens, cfg.joint_attention_dim, device=device, dtype=dtype),
        pooled_projections=torch.randn(batch, cfg.pooled_projection_dim, device=device, dtype=dtype),
        timestep=torch.full((batch,), 500.0, device=device, dtype=dtype),
    )


def _to_semi_structured_(transformer) -> int:
    """2:4-prune every block linear by magnitude and store it as a cuSPARSELt semi-structured tensor."""
    from torch.sparse import to_sparse_semi_structured

    count = 0
    for block in blocks(transformer):
        for unit in block_units(block):
            for group in unit:
                for name in group:
                    linear = block.module.get_submodule(name)
                    pruned, _ = magnitude_prune(linear.weight.data, 0.0, 2, 4)
                    linear.weight = torch.nn.Parameter(to_sparse_semi_structured(pruned), requires_grad=False)
                    count += 1
    return count


def latency(args, device, dtype) -> dict:
    """Part (b): interleaved median forward latency of dense, 2:4 and 30%-structured transformers."""
    from obsdiff_lite.structured import prune_structured

    pipe = build_random_pipeline(args.model, device=device, dtype=dtype, overrides=TINY if args.tiny else None)
    models = {"dense": pipe.transformer}
    notes = {}
    if device.type == "cuda" and dtype in (torch.float16, torch.bfloat16):
        sparse = copy.deepcopy(pipe.transformer)
        try:
            notes["2:4_layers"] = _to_semi_structured_(sparse)
            models["2:4"] = sparse
        except (RuntimeError, ValueError) as exc:  # e.g. a GPU without sparse tensor cores
            notes["2:4"] = f"not measured: {type(exc).__name__}: {exc}"
    else:
        notes["2:4"] = "not measured: semi-structured kernels need CUDA and float16/bfloat16"
    structured = copy.deepcopy(pipe)
    report = prune_structured(structured, PruneConfig(method="l1-norm", pattern="structured", sparsity=0.3, packages=1), progress=False)
    models["structured-30%"] = structured.transformer
    notes["structured_params"] = [report["parameters_before"], report["parameters_after"]]
    inputs = _inputs(pipe.transformer, args.latency_resolution, args.text_tokens + 77, args.latency_batch, device, dtype)
    times = {k: [] for k in models}
    with torch.no_grad():
        for _ in range(args.warmup):
            for m in models.values():
                m(**inputs)
        for _ in range(args.repeats):
            for name, m in models.items():  # interleaved, so drift affects all equally
                _sync(device)
                t0 = time.perf_counter()
                m(**inputs)
                _sync(device)
                times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"resolution": args.latency_resolution, "batch": args.latency_batch, "text_tokens": args.text_tokens + 77,
            "median_ms": {k: v * 1e3 for k, v in med.items()},
            "speedup": {k: med["dense"] / v for k, v in med.items()}, "notes": notes,
            "paper_single_block_speedup": {"2:4": 1.23, "structured-30%": 1.31}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="sd3-medium")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float16")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--packages", type=int, default=4)
    parser.add_argument("--calibration", default="exact", help="exact (the paper) | cached (one trajectory)")
    parser.add_argument("--text-tokens", type=int, default=256, help="T5 tokens (SD3 adds 77 CLIP tokens)")
    parser.add_argument("--latency-resolution", type=int, default=1024)
    parser.add_argument("--latency-batch", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--skip-prune", action="store_true")
    parser.add_argument("--tiny", action="store_true", help="CPU self-test: 3 small blocks, 64x64, 1 prompt, 2 steps")
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "gpu_fullsize.json")
    args = parser.parse_args()
    if args.tiny:
        args.dtype, args.prompts, args.steps, args.resolution = "float32", 1, 2, 64
        args.latency_resolution, args.text_tokens, args.warmup, args.repeats = 64, 8, 1, 2
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    result = {"command": " ".join(["python benchmarks/gpu_fullsize.py", *sys.argv[1:]]), "model": args.model,
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "dtype": args.dtype,
              "tiny": args.tiny, "torch": torch.__version__}
    if not args.skip_prune:
        result["prune"] = prune_cost(args, device, dtype)
        print(json.dumps(result["prune"], indent=2), flush=True)
    result["latency"] = latency(args, device, dtype)
    print(json.dumps(result["latency"], indent=2), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

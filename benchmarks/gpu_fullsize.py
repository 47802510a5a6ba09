"""Full-size SD3-medium / Flux.1-dev on a GPU, random weights (no download): prune cost and real latency.

    python benchmarks/gpu_fullsize.py --out benchmarks/results/gpu_fullsize.json          # on a GPU
    python benchmarks/gpu_fullsize.py --tiny --device cpu --out /tmp/gpu_fullsize.json    # CPU self-test (CI)

Parts (``--parts``, run in the order given; each one's failure is recorded and the next one runs;
the JSON is rewritten after every part, so a run cut short keeps what it measured):

``latency`` / ``latency-flux``
    Transformer forward latency at 1024x1024, dense vs 2:4 (magnitude masks stored with
    ``torch.sparse.to_sparse_semi_structured`` on every block linear) vs 30% structured (heads +
    FFN neurons of blocks 1..N-2), interleaved repeats, medians. Paper (Table 5, ONE block of
    SD3.5-large on an RTX 4090): 2:4 1.23x, structured 30% 1.31x.
``prune``
    OBS-Diff at 50% unstructured for each ``--prune-runs`` entry MODE:PACKAGES[:refit|:admm][:tune] (e.g.
    ``exact:4``, ``cached:24``, ``exact:4:refit`` with the least-squares re-fit after each OBS solve,
    ``exact:4:admm`` with ``--solver admm``, ``exact:4:admm:tune`` with block tuning after it: TUNE_ITERS steps,
    at most TUNE_MAX_CALLS recorded calls per block, kept on TUNE_CACHE_DEVICE) over a reduced calibration set
    (``--prompts`` x ``--steps`` at 512x512, CFG 7, batch 4): calibration and solve time, peak GPU memory, and one
    plain pipeline pass over the same prompts (for the calibration overhead). Projected to the paper's 100 prompts x 25 steps:
    calibration scales with prompts x steps, solves do not. Paper (Table 8): 14.95 min and 24.05 GB
    peak with 4 packages on a 48 GB RTX 4090 (its peak includes the text encoders; ours are stand-ins).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from obsdiff_lite.arch import block_units, blocks  # noqa: E402
from obsdiff_lite.baselines import magnitude_prune  # noqa: E402
from obsdiff_lite.fullsize import build_random_pipeline  # noqa: E402
from obsdiff_lite.pipelines import run_pipeline  # noqa: E402
from obsdiff_lite.prune import PruneConfig, prune  # noqa: E402
from obsdiff_lite.tune import mean_loss_ratio  # noqa: E402

FLUX_LATENCY_MIN_BYTES = 60 * 2**30  # dense + structured + 2:4 copies of Flux.1-dev in bfloat16 (about 24 GB each)
_TINY_SD3 = {"num_layers": 3, "num_attention_heads": 2, "caption_projection_dim": 128, "pooled_projection_dim": 64,
             "joint_attention_dim": 128}
TINY = {
    "sd3-medium": _TINY_SD3,
    "sd3.5-medium": {**_TINY_SD3, "dual_attention_layers": (0, 1)},
    "sd3.5-large": _TINY_SD3,
    "flux-dev": {"num_layers": 2, "num_single_layers": 2, "num_attention_heads": 2, "attention_head_dim": 16,
                 "axes_dims_rope": (4, 6, 6), "joint_attention_dim": 64, "pooled_projection_dim": 32},
}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _pipeline(args, model: str, device, dtype):
    """The same random weights for every run of one model (seeded init)."""
    torch.manual_seed(0)
    return build_random_pipeline(model, device=device, dtype=dtype, overrides=TINY[model] if args.tiny else None)


# ":tune" runs: the tiny models' steps; recorded calls capped and kept in CPU RAM, like the README's full-size command
TUNE_ITERS, TUNE_MAX_CALLS, TUNE_CACHE_DEVICE = 200, 64, "cpu"
PRUNE_RUN_EXTRAS = ([], ["refit"], ["admm"], ["tune"], ["refit", "tune"], ["admm", "tune"])


def prune_run(args, spec: str, device, dtype) -> dict:
    """Prune a random full-size SD3-medium with OBS-Diff (MODE:PACKAGES[:refit|:admm][:tune]) and project to the
    paper's setting."""
    mode, packages, *extra = spec.split(":")
    refit, solver, tune = "refit" in extra, "admm" if "admm" in extra else "obs", "tune" in extra
    pipe = _pipeline(args, args.model, device, dtype)
    call = {"num_inference_steps": args.steps, "guidance_scale": 7.0, "height": args.resolution,
            "width": args.resolution, "max_sequence_length": args.text_tokens}
    pipe.obsdiff_generation = dict(call)
    prompts = [line for line in (ROOT / "data" / "prompts" / "calibration.txt").read_text().splitlines() if line][: args.prompts]
    with torch.no_grad():  # one plain pass (warm-up first): the unit the calibration overhead is measured in
        run_pipeline(pipe, prompts[:4], 0, call, 4, output_type="latent", progress=False)
        _sync(device)
        t0 = time.perf_counter()
        run_pipeline(pipe, prompts, 0, call, 4, output_type="latent", progress=False)
        _sync(device)
        plain_pass_s = time.perf_counter() - t0
    _free(device)
    report = prune(pipe, PruneConfig(sparsity=0.5, packages=int(packages), prompts=prompts, batch_size=4,
                                     calibration=mode, refit=refit, solver=solver,
                                     **({"tune_iters": TUNE_ITERS, "tune_max_calls": TUNE_MAX_CALLS,
                                         "cache_device": TUNE_CACHE_DEVICE} if tune else {})),
                   progress=not args.quiet)
    t = report["timings"]
    scale = (100 * 25) / (args.prompts * args.steps)
    passes = int(packages) if mode == "exact" else 1
    out = {"mode": mode, "packages": int(packages), "refit": refit, "solver": solver, "prompts": args.prompts, "steps": args.steps,
           "resolution": args.resolution, "text_tokens": args.text_tokens + 77,
           "plain_pass_s": plain_pass_s, "calibration_s": t["calibration_s"], "solve_s": t["solve_s"],
           "total_s": t["total_s"], "calibration_overhead_vs_plain_passes": t["calibration_s"] / (passes * plain_pass_s) - 1,
           "peak_memory_gb": report["peak_memory_bytes"] / 2**30, "achieved_sparsity": report["achieved_sparsity"],
           "cache_gb": report["cache"]["cache_bytes"] / 2**30 if report.get("cache") else None,
           "projected_100x25_min": (t["calibration_s"] * scale + t["solve_s"]) / 60,
           "tune_iters": TUNE_ITERS if tune else 0, "tune_s": t.get("tune_s"),
           "tune_loss_ratio": mean_loss_ratio(report["tuning"]) if report.get("tuning") else None,
           "paper_min_4_packages": 14.95, "paper_peak_gb_4_packages": 24.05}
    del pipe
    _free(device)
    return out


def _inputs(transformer, resolution: int, text_tokens: int, batch: int, device, dtype) -> dict:
    """Random transformer inputs of the right shapes for one denoising call."""
    cfg = transformer.config
    side = resolution // 8
    if "guidance_embeds" in cfg:  # Flux: packed 2x2 latents, rotary ids, guidance
        tokens = (side // 2) ** 2
        img_ids = torch.zeros(side // 2, side // 2, 3, device=device)
        img_ids[..., 1] = torch.arange(side // 2, device=device)[:, None]
        img_ids[..., 2] = torch.arange(side // 2, device=device)[None, :]
        return dict(
            hidden_states=torch.randn(batch, tokens, cfg.in_channels, device=device, dtype=dtype),
            encoder_hidden_states=torch.randn(batch, text_tokens, cfg.joint_attention_dim, device=device, dtype=dtype),
            pooled_projections=torch.randn(batch, cfg.pooled_projection_dim, device=device, dtype=dtype),
            timestep=torch.full((batch,), 0.5, device=device, dtype=dtype),
            guidance=torch.full((batch,), 3.5, device=device, dtype=dtype) if cfg.guidance_embeds else None,
            img_ids=img_ids.reshape(-1, 3), txt_ids=torch.zeros(text_tokens, 3, device=device),
        )
    return dict(
        hidden_states=torch.randn(batch, cfg.in_channels, side, side, device=device, dtype=dtype),
        encoder_hidden_states=torch.randn(batch, text_tokens, cfg.joint_attention_dim, device=device, dtype=dtype),
        pooled_projections=torch.randn(batch, cfg.pooled_projection_dim, device=device, dtype=dtype),
        timestep=torch.full((batch,), 500.0, device=device, dtype=dtype),
    )


def _to_semi_structured_(transformer, backend: str = "cusparselt") -> int:
    """2:4-prune every block linear by magnitude and store it as a semi-structured tensor (cuSPARSELt or CUTLASS)."""
    from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

    SparseSemiStructuredTensor._FORCE_CUTLASS = backend == "cutlass"

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


def latency(args, model: str, device, dtype) -> dict:
    """Interleaved median forward latency of dense, 2:4 and 30%-structured transformers."""
    from obsdiff_lite.structured import prune_structured

    pipe = _pipeline(args, model, device, dtype)
    text_tokens = args.text_tokens + (77 if model.startswith("sd3") else 256)  # SD3: CLIP 77 + T5; Flux: T5 512
    inputs = _inputs(pipe.transformer, args.latency_resolution, text_tokens, args.latency_batch, device, dtype)
    models = {"dense": pipe.transformer}
    notes = {}
    # Structured 30%: FFN widths rounded to 64 (the default for full-size FFNs) and exact (odd) widths.
    for label, multiple in (("structured-30%", None), ("structured-30%-unrounded", 1)):
        structured = copy.deepcopy(pipe)
        report = prune_structured(structured, PruneConfig(method="l1-norm", pattern="structured", sparsity=0.3,
                                                          packages=1, ffn_multiple=multiple), progress=False)
        models[label] = structured.transformer
        notes[f"{label}_params"] = [report["parameters_before"], report["parameters_after"]]
        del structured
    backends = args.sparse_backends if model == args.model else args.flux_sparse_backends
    if device.type == "cuda" and dtype in (torch.float16, torch.bfloat16):
        for backend in backends:
            label = "2:4" if backend == "cusparselt" else f"2:4-{backend}"
            try:
                sparse = copy.deepcopy(pipe.transformer)
                notes[f"{label}_layers"] = _to_semi_structured_(sparse, backend)
                with torch.no_grad():
                    sparse(**inputs)  # kernels can refuse shapes only at the first call
                models[label] = sparse
            except (RuntimeError, ValueError, NotImplementedError) as exc:  # e.g. no sparse tensor cores
                notes[label] = f"not measured: {type(exc).__name__}: {str(exc)[:300]}"
                sparse = None
                _free(device)
    else:
        notes["2:4"] = "not measured: semi-structured kernels need CUDA and float16/bfloat16"
    if not backends:
        notes["2:4"] = "not measured in this run (no backend asked for)"
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
    out = {"model": model, "resolution": args.latency_resolution, "batch": args.latency_batch,
           "text_tokens": text_tokens, "median_ms": {k: v * 1e3 for k, v in med.items()},
           "speedup": {k: med["dense"] / v for k, v in med.items()}, "notes": notes,
           "paper_single_block_speedup": {"2:4": 1.23, "structured-30%": 1.31}}
    del models, pipe
    _free(device)
    return out


def hessian_precision(args, device) -> dict:
    """X^T X of half-precision activations: IEEE float32 vs TF32 (exact for fp16/bf16 inputs) — error and time."""
    from obsdiff_lite.hessian import ieee_fp32_matmul

    rows, width = (256, 64) if args.tiny else (4 * 2 * 1357, 6144)  # one calibration call of SD3's FFN-down input
    out = {"rows": rows, "width": width}
    for name in ("bfloat16", "float16"):
        torch.manual_seed(0)
        x = torch.randn(rows, width, device=device).to(getattr(torch, name)).float()
        result, times = {}, {}
        for tf32 in (False, True):
            with ieee_fp32_matmul(device, tf32=tf32):
                result[tf32] = x.T @ x
                samples = []
                for _ in range(5):
                    _sync(device)
                    t0 = time.perf_counter()
                    x.T @ x
                    _sync(device)
                    samples.append(time.perf_counter() - t0)
            times["tf32" if tf32 else "ieee"] = statistics.median(samples) * 1e3
        diff = (result[True] - result[False]).abs().max() / result[False].abs().max()
        out[name] = {"median_ms": times, "max_rel_diff": float(diff), "speedup": times["ieee"] / times["tf32"],
                     "half_inputs": _half_input_gram(x.to(getattr(torch, name)), result[False], device)}
    out["accumulate"] = hessian_accumulate(rows, width, device)
    return out


def _half_input_gram(half: torch.Tensor, exact: torch.Tensor, device) -> dict | str:
    """X^T X from the half-precision activations themselves with float32 output (``torch.mm(..., out_dtype=)``,
    tensor cores, float32 accumulation): a candidate for the Hessian hooks, not used by them yet. Time and error."""
    try:
        result = torch.mm(half.T, half, out_dtype=torch.float32)
    except (RuntimeError, NotImplementedError, TypeError) as exc:
        return f"not available on {device}: {str(exc).splitlines()[0][:120]}"
    samples = []
    for _ in range(5):
        _sync(device)
        t0 = time.perf_counter()
        torch.mm(half.T, half, out_dtype=torch.float32)
        _sync(device)
        samples.append(time.perf_counter() - t0)
    return {"median_ms": statistics.median(samples) * 1e3,
            "max_rel_diff": float((result - exact).abs().max() / exact.abs().max())}


def hessian_accumulate(rows: int, width: int, device) -> dict:
    """One calibration update of a running-mean Hessian from bf16 activations, TF32: the full X^T X, a NaN check
    that waits for the device and a separate rescale (before 2d1bebe) vs HessianAccumulator.add_batch as the
    hooks call it (upper block triangle, rescale fused into addmm_, no check)."""
    from obsdiff_lite.hessian import HessianAccumulator, ieee_fp32_matmul

    torch.manual_seed(0)
    x16 = torch.randn(rows, width, device=device).to(torch.bfloat16)
    state = torch.zeros(width, width, device=device)
    acc = HessianAccumulator(width, device=device)

    def full_update() -> None:
        x = x16.float()
        with ieee_fp32_matmul(device, tf32=True):
            batch = x.T @ x
        if not bool(torch.isfinite(torch.diagonal(batch)).all()):
            raise RuntimeError("non-finite")
        state.mul_(0.5).add_(batch, alpha=0.5)

    times = {}
    for name, step in (("full_gram_sync_update", full_update),
                       ("add_batch", lambda: acc.add_batch(x16, 1.0, check_finite=False))):
        step()
        samples = []
        for _ in range(5):
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(4):  # several calls in a row, as within one transformer call
                step()
            _sync(device)
            samples.append((time.perf_counter() - t0) / 4)
        times[name] = statistics.median(samples) * 1e3
    return {"activations": "bfloat16", "median_ms": times,
            "speedup": times["full_gram_sync_update"] / times["add_batch"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="sd3-medium", choices=sorted(TINY), help="the model pruned by the prune part")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--parts", nargs="+", default=["hessian", "latency", "prune", "latency-flux"],
                        choices=["hessian", "latency", "prune", "latency-flux"])
    parser.add_argument("--sparse-backends", nargs="+", default=["cusparselt", "cutlass"],
                        help="2:4 kernels timed for --model")
    parser.add_argument("--flux-sparse-backends", nargs="*", default=["cusparselt"],
                        help="2:4 kernels timed for Flux (each is another 12B-parameter copy in GPU memory)")
    parser.add_argument("--prune-runs", nargs="+", default=["exact:4", "cached:24"],
                        help="MODE:PACKAGES[:refit|:admm][:tune] each, MODE exact|cached")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--text-tokens", type=int, default=256, help="T5 tokens (SD3 adds 77 CLIP tokens)")
    parser.add_argument("--latency-resolution", type=int, default=1024)
    parser.add_argument("--latency-batch", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--tiny", action="store_true", help="CPU self-test: a few small blocks, 64x64, 1 prompt, 2 steps")
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "gpu_fullsize.json")
    args = parser.parse_args()
    for spec in args.prune_runs:
        mode, packages, *rest = spec.split(":") + ([] if ":" in spec else [""])
        if mode not in ("exact", "cached") or not packages.isdigit() or rest not in PRUNE_RUN_EXTRAS:
            parser.error(f"--prune-runs entries are MODE:PACKAGES[:refit|:admm][:tune] with MODE exact|cached, got "
                         f"{spec!r}")
    if args.tiny:
        args.dtype, args.prompts, args.steps, args.resolution = "float32", 1, 2, 64
        args.latency_resolution, args.text_tokens, args.warmup, args.repeats = 64, 8, 1, 2
        args.prune_runs = [":".join([mode, str(min(int(packages), 3)), *rest])  # the tiny configs have 3 or 4 blocks
                           for mode, packages, *rest in (spec.split(":") for spec in args.prune_runs)]
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    result = {"command": " ".join(["python benchmarks/gpu_fullsize.py", *sys.argv[1:]]), "model": args.model,
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "dtype": args.dtype,
              "tiny": args.tiny, "torch": torch.__version__, "prune": [], "latency": {}, "errors": {}}

    def save():
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")

    jobs = []
    for part in args.parts:
        if part == "hessian":
            jobs.append(("hessian precision", lambda: result.__setitem__("hessian", hessian_precision(args, device))))
        elif part == "prune":
            jobs += [(f"prune {spec}", lambda spec=spec: result["prune"].append(prune_run(args, spec, device, dtype)))
                     for spec in args.prune_runs]
        elif part == "latency-flux" and device.type == "cuda" and \
                torch.cuda.get_device_properties(device).total_memory < FLUX_LATENCY_MIN_BYTES:
            result["skipped"] = {"latency flux-dev": "needs three copies of the 12B-parameter transformer in GPU memory"}
        else:
            model = "flux-dev" if part == "latency-flux" else args.model
            jobs.append((f"latency {model}",
                         lambda model=model: result["latency"].__setitem__(model, latency(args, model, device, dtype))))
    for name, job in jobs:
        t0 = time.perf_counter()
        try:
            job()
        except Exception as exc:  # record and go on: a device run is too precious to lose to one part
            result["errors"][name] = "".join(traceback.format_exception(exc))[-3000:]
            print(f"{name} FAILED:\n{result['errors'][name]}", flush=True)
            _free(device)
        print(f"{name}: {time.perf_counter() - t0:.1f} s", flush=True)
        save()
        print(json.dumps({k: result.get(k) for k in ("hessian", "prune", "latency")}, indent=1)[-3000:], flush=True)
    save()
    sys.exit(1 if result["errors"] else 0)


if __name__ == "__main__":
    main()

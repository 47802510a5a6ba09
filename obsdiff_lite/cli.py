"""The ``obsdiff`` command line: prune, eval, demo.

    obsdiff prune data/tiny-sd3 --output runs/sd3-50 --sparsity 0.5
    obsdiff plan sd3-medium --packages 4 --batch-size 4 --dtype float16 --device cuda
    obsdiff eval runs/sd3-50 --reference data/tiny-sd3 --grid runs/sd3-50.png
    obsdiff demo
    torchrun --nproc_per_node 8 -m obsdiff_lite prune MODEL --output OUT --device cuda   (data-parallel)

Bad input ends with one readable line and exit status 2; the machine failing (a full disk: 1, out of memory: 3)
with one line too; never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

REPO_DATA = Path(__file__).resolve().parent.parent / "data"


class CLIError(ValueError):
    """An error the user can fix; printed as one line."""


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (default cpu)")
    p.add_argument("--dtype", default="float32", help="float32 | float16 | bfloat16 (default float32)")


def _packages(text: str) -> int | str:
    """--packages: a positive integer, or "blocks" (one module package per transformer block)."""
    if text == "blocks":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of packages or 'blocks', got {text!r}") from None


def _fractions(text: str) -> list[float]:
    """--block-sparsity: comma-separated numbers ("0.3,0.5,0.6"); ValueError (one readable line) otherwise."""
    try:
        return [float(x) for x in text.split(",")]
    except ValueError:
        raise ValueError(f"--block-sparsity expects comma-separated numbers such as 0.3,0.5,0.6, got {text!r}") from None


def _add_prune_args(p: argparse.ArgumentParser) -> None:
    from .prune import HEAD_CANDIDATES, METHODS, TRAJECTORY_PROMPTS
    from .schedules import WEIGHTINGS
    from .tune import TUNE_LR, TUNE_MAX_CALLS

    p.add_argument("model", help="pipeline directory or hub id (e.g. data/tiny-sd3, stabilityai/stable-diffusion-3-medium-diffusers)")
    p.add_argument("--method", default="obs-diff", help=f"{' | '.join(METHODS)} (default obs-diff)")
    p.add_argument("--pattern", default="unstructured",
                   help="unstructured | 2:4 | 4:8 | N:M | structured (whole heads and FFN neurons; default unstructured)")
    p.add_argument("--sparsity", type=float, default=None, help="fraction of weights removed per layer (default 0.5; implied by N:M)")
    p.add_argument("--head-sparsity", type=float, default=None,
                   help="structured: fraction of heads removed per block (default --sparsity)")
    p.add_argument("--ffn-sparsity", type=float, default=None,
                   help="structured: fraction of FFN neurons removed per FFN (default --sparsity)")
    p.add_argument("--ffn-multiple", type=int, default=None,
                   help="structured: round kept FFN widths to a multiple of this (default: 64 for FFNs of >= 1024 "
                        "neurons, where GPU matmuls slow down at odd widths; 1 = exact fractions)")
    p.add_argument("--head-selection", default="saliency",
                   help="structured obs-diff: saliency (the paper: fused OBS saliencies) | trajectory (try the "
                        "--head-candidates cheapest heads, keep the removal that moves a short sampling run least)")
    p.add_argument("--head-candidates", type=int, default=HEAD_CANDIDATES, help="trajectory head selection: heads tried per removal")
    p.add_argument("--trajectory-prompts", type=int, default=TRAJECTORY_PROMPTS,
                   help="trajectory head selection: calibration prompts sampled per trial")
    p.add_argument("--weighting", default="log-decrease", help=f"timestep weighting: {' | '.join(WEIGHTINGS)}")
    p.add_argument("--weight-range", type=float, nargs=2, default=(0.8, 1.2), metavar=("MIN", "MAX"))
    p.add_argument("--packages", type=_packages, default=4,
                   help="module packages: 1 .. number of units, or 'blocks' for one per block (default 4)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--num-prompts", type=int, default=16, help="calibration prompts (default 16; paper 100)")
    group.add_argument("--prompts", type=Path,
                       help="text file with one calibration prompt per line, or a .json list of strings")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's generation.json)")
    p.add_argument("--guidance", type=float, default=None, help="CFG scale (default: the model's generation.json)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--blocks", default=None, help="START:END block range, END exclusive (default all; structured: 1:N-1)")
    p.add_argument("--damp", type=float, default=0.01, help="dampening, fraction of mean Hessian diagonal")
    p.add_argument("--block-size", type=int, default=128,
                   help="OBS column block: unstructured masks are chosen per block of this many columns (default 128)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per pipeline call during calibration")
    p.add_argument("--hessian-device", default=None, help="keep Hessians here (e.g. cpu) while the model runs on --device")
    p.add_argument("--calibration", default="exact",
                   help="exact (the paper: one full trajectory per package) | cached (one trajectory, block-wise)")
    p.add_argument("--hessian-inputs", default="plain",
                   help="plain: Hessians from both CFG halves (the paper) | guided: from s*x_cond + (1-s)*x_uncond, "
                        "the inputs combined as CFG combines the predictions | guided-image: the same for layers that "
                        "read image tokens only, plain for the others (both beyond the paper)")
    p.add_argument("--refit", action="store_true",
                   help="after the mask is chosen, re-fit the kept weights by least squares on the same Hessian "
                        "(beyond the paper; unstructured and N:M; with magnitude/wanda/dsnot: their mask, solved weights)")
    p.add_argument("--dense-targets", action="store_true",
                   help="OBS reconstructs the dense model's layer outputs from the pruned model's inputs, so later "
                        "packages also repair what earlier ones changed (beyond the paper; obs-diff/sparsegpt, "
                        "unstructured and N:M; runs a dense copy of the transformer next to calibration)")
    p.add_argument("--solver", default="obs",
                   help="obs: the paper's one-pass OBS | admm: OBS, then ADMM moves masks and weights together on the "
                        "same layer loss and the kept weights are re-fitted (beyond the paper; obs-diff/sparsegpt, "
                        "unstructured and N:M; never ends a layer above OBS's error)")
    p.add_argument("--tune-iters", type=int, default=0, metavar="N",
                   help="after pruning, N Adam steps per block on the kept weights and biases of its target linears "
                        "towards the dense model's block outputs on the calibration prompts; zeros stay zero (beyond "
                        "the paper; unstructured and N:M; e.g. 200; keeps a dense copy of the transformer)")
    p.add_argument("--tune-lr", type=float, default=TUNE_LR, help=f"Adam step size for --tune-iters (default {TUNE_LR})")
    p.add_argument("--tune-max-calls", type=int, default=TUNE_MAX_CALLS, metavar="K",
                   help=f"--tune-iters records at most K transformer calls per block, a random subset (default "
                        f"{TUNE_MAX_CALLS}); on a full-size model keep K small or use --cache-device cpu")
    p.add_argument("--sparsity-ramp", type=float, default=0.0,
                   help="unstructured: sparsity rises linearly over depth from SPARSITY - RAMP in the first block to "
                        "SPARSITY + RAMP in the last, same total (beyond the paper; early blocks are the sensitive ones)")
    p.add_argument("--block-sparsity", default=None, metavar="S0,S1,...",
                   help="unstructured: one sparsity per selected block, comma-separated, instead of --sparsity "
                        "(beyond the paper; e.g. from a block-sensitivity profile, notebook 08)")
    p.add_argument("--refresh-every", type=int, default=0, help="cached mode: re-run the trajectory every K packages")
    p.add_argument("--cache-device", default=None, help="cached mode: keep block inputs here: cpu, or disk / disk:/DIR (memory-mapped files); "
                        "--tune-iters: keep its recorded block calls here too")
    _add_model_args(p)


def _prune_config(args):
    from .prune import PruneConfig, read_prompts

    prompts = read_prompts(args.prompts) if args.prompts is not None else None
    sparsity = args.sparsity
    both_specific = args.head_sparsity is not None and args.ffn_sparsity is not None
    block_sparsity = _fractions(args.block_sparsity) if args.block_sparsity is not None else None
    per_block = block_sparsity is not None
    if sparsity is None and ((args.pattern == "unstructured" and not per_block)
                             or (args.pattern == "structured" and not both_specific)):
        sparsity = 0.5
    return PruneConfig(
        method=args.method, pattern=args.pattern, sparsity=sparsity, head_sparsity=args.head_sparsity,
        ffn_sparsity=args.ffn_sparsity, ffn_multiple=args.ffn_multiple, head_selection=args.head_selection,
        head_candidates=args.head_candidates, trajectory_prompts=args.trajectory_prompts, weighting=args.weighting,
        weight_range=tuple(args.weight_range), packages=args.packages, num_prompts=args.num_prompts,
        prompts=prompts, steps=args.steps, guidance=args.guidance, seed=args.seed, blocks=args.blocks,
        damp=args.damp, block_size=args.block_size, batch_size=args.batch_size, hessian_device=args.hessian_device,
        calibration=args.calibration, refresh_every=args.refresh_every, cache_device=args.cache_device,
        hessian_inputs=args.hessian_inputs, refit=args.refit, sparsity_ramp=args.sparsity_ramp,
        block_sparsity=block_sparsity, dense_targets=args.dense_targets, solver=args.solver,
        tune_iters=args.tune_iters, tune_lr=args.tune_lr, tune_max_calls=args.tune_max_calls,
    )


def cmd_prune(args) -> int:
    """Prune MODEL and write a complete pipeline directory plus obsdiff.json (under torchrun: rank 0 writes)."""
    from .distributed import init_from_env, shutdown
    from .pipelines import load_pipeline, resolve_device, resolve_dtype
    from .prune import prune
    from .surgery import check_output_dir, save_pipeline, terminate_as_interrupt

    config = _prune_config(args)
    config.validate()
    resolve_device(args.device), resolve_dtype(args.dtype)
    check_output_dir(args.output, args.overwrite)
    with terminate_as_interrupt():
        dist = init_from_env(args.device)  # no-op outside torchrun
        try:
            pipe = load_pipeline(args.model, device=dist.device, dtype=args.dtype)
            report = prune(pipe, config, progress=dist.is_main, check_memory=not args.skip_memory_check)
            report["model"], report["dtype"] = str(args.model), args.dtype
            if dist.is_main:
                save_pipeline(pipe, args.output, report, overwrite=args.overwrite)
        finally:
            shutdown()
    if not dist.is_main:
        return 0
    t = report["timings"]
    if "structure" in report:
        print(
            f"pruned {report['arch']} {args.model} with {config.method} (structured: parameters "
            f"{report['parameters_before']:,} -> {report['parameters_after']:,}, linear MACs "
            f"{report['macs_before']:,} -> {report['macs_after']:,}) in {t['total_s']:.1f} s -> {args.output}"
        )
        return 0
    print(
        f"pruned {report['arch']} {args.model} with {config.method} ({config.pattern}, "
        f"{report['achieved_sparsity']:.1%} of {report['targeted_parameters']:,} targeted weights) in "
        f"{t['total_s']:.1f} s (calibration {t['calibration_s']:.1f} s, solve {t['solve_s']:.1f} s"
        + (f", block tuning {t['tune_s']:.1f} s" if "tune_s" in t else "") + f") -> {args.output}"
    )
    if report.get("tuning"):  # did it help? the per-block numbers are in obsdiff.json
        from .tune import mean_loss_ratio

        kept = sum(r["tune_kept_start"] for r in report["tuning"].values())
        count = len(report["tuning"])
        print(f"block tuning: loss to the dense blocks x{mean_loss_ratio(report['tuning']):.2f} on average over "
              f"{count} block{'s' * (count != 1)}" + (f"; {kept} kept their pruned weights (loss did not fall)" if kept
                                                      else ""))
    return 0


def _plan_device(text: str) -> str:
    """A device name for planning (need not exist on this machine)."""
    import torch

    try:
        device = torch.device(text)
    except RuntimeError:
        raise ValueError(f"unsupported device {text!r}; use cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"unsupported device {text!r}; use cpu, cuda or cuda:N")
    return str(device)


def cmd_plan(args) -> int:
    """Print the memory plan of a prune run (no weights loaded; MODEL may be a full-size name)."""
    import torch

    from .pipelines import resolve_dtype
    from .plan import available_memory, format_bytes, plan_for
    from .surgery import check_output_file, write_file_atomic

    if args.json is not None:
        check_output_file(args.json, "--json")
    config = _prune_config(args)
    config.validate()
    device, dtype = _plan_device(args.device), resolve_dtype(args.dtype)
    for name, value in (("--height", args.height), ("--width", args.width), ("--text-tokens", args.text_tokens)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    plan = plan_for(args.model, config, device=device, dtype=dtype, batch_size=args.batch_size, height=args.height,
                    width=args.width, text_tokens=args.text_tokens)
    print(plan.table())
    local = torch.device(device).type == "cpu" or (torch.device(device).type == "cuda" and torch.cuda.is_available())
    if local and (free := available_memory(device)) is not None:
        verdict = "fits" if plan.peak_bytes() <= free else "does NOT fit"
        print(f"free memory on this machine's {device}: {format_bytes(free)} -> {verdict}")
    if args.json is not None:
        write_file_atomic(args.json, lambda tmp: tmp.write_text(json.dumps(plan.to_dict(), indent=2) + "\n"))
    return 0


def cmd_eval(args) -> int:
    """Generate ShapeBench prompts with MODEL and print/save adherence, Fréchet distance and fidelity."""
    from .evaluate import evaluate_models

    rows = evaluate_models(
        {str(args.model): args.model}, reference=args.reference, num_prompts=args.num_prompts, seed=args.seed,
        device=args.device, dtype=args.dtype, grid=args.grid, json_path=args.json, batch_size=args.batch_size,
        steps=args.steps, guidance=args.guidance,
    )
    return 0 if rows else 1


def cmd_demo(args) -> int:
    """Prune the tiny SD3 model to 50% with OBS-Diff and compare it with dense and with magnitude."""
    from .evaluate import run_demo

    run_demo(output=args.output, device=args.device, num_prompts=args.num_prompts, model=args.model)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="obsdiff", description="One-shot OBS pruning of SD3/Flux diffusion transformers.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more detail")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prune", help="prune a pipeline and save it")
    _add_prune_args(p)
    p.add_argument("--output", type=Path, required=True, help="output pipeline directory")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    p.add_argument("--skip-memory-check", action="store_true",
                   help="do not refuse a run whose memory plan (obsdiff plan) exceeds the free memory")
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("plan", help="estimate the memory a prune run needs, per module package (runs nothing)")
    _add_prune_args(p)
    p.add_argument("--height", type=int, default=None,
                   help="image height in pixels (default: generation.json; full-size names: 512)")
    p.add_argument("--width", type=int, default=None, help="image width in pixels (default: as --height)")
    p.add_argument("--text-tokens", type=int, default=None, help="text tokens per sample (default: the pipeline's)")
    p.add_argument("--json", type=Path, help="also write the plan to this JSON file")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("eval", help="score a (tiny-world) pipeline with ShapeBench")
    p.add_argument("model")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reference", help="dense model to measure fidelity (PSNR/SSIM) against")
    p.add_argument("--json", type=Path, help="write the scores to this JSON file")
    p.add_argument("--grid", type=Path, help="write an image grid PNG")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=None,
                   help="denoising steps (default: the model's generation.json); e.g. to test a model off its calibration")
    p.add_argument("--guidance", type=float, default=None, help="CFG scale (default: the model's generation.json)")
    _add_model_args(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("demo", help="prune tiny-sd3 to 50%% with OBS-Diff (as in the paper, with --refit, with --solver admm) and compare "
                                       "with dense and magnitude")
    p.add_argument("--model", default=str(REPO_DATA / "tiny-sd3"))
    p.add_argument("--output", type=Path, default=Path("runs/demo"))
    p.add_argument("--num-prompts", type=int, default=64, help="evaluation prompts (default 64)")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``obsdiff`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="obsdiff: %(levelname)s: %(message)s")
    try:
        return _run(args)
    except KeyboardInterrupt as exc:  # SIGINT, or SIGTERM (surgery.terminate_as_interrupt), also while importing
        output = getattr(exc, "output", None)  # surgery.OutputCompleteInterrupt: it came after the commit
        print(f"obsdiff: interrupted after {output} was completely written" if output is not None
              else "obsdiff: interrupted; nothing was written", file=sys.stderr)
        return 130


def _run(args) -> int:
    import torch

    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError) as exc:
        print(f"obsdiff: error: {exc}", file=sys.stderr)
        return 2
    except torch.OutOfMemoryError:
        print("obsdiff: error: out of memory; run `obsdiff plan` with the same options, then use more --packages, "
              "--hessian-device cpu, a lower --dtype or fewer --num-prompts", file=sys.stderr)
        return 3
    except OSError as exc:  # the machine, not the input: a full disk, a file vanished or locked mid-run
        print(f"obsdiff: error: {exc} (no partial output is left behind)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

"""ShapeBench evaluation of tiny-world pipelines, and the demo (prune tiny-sd3, compare with dense).

Evaluation prompts are balanced over the caption vocabulary and drawn by seed; calibration prompts
use a disjoint seed range (see ``prune.default_prompts``), so a model is never scored on the prompts
it was calibrated on.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from .pipelines import DATA_DIR, check_guidance, check_seed, generate_images, load_pipeline, pipeline_call
from .shapes.bench import evaluate, format_table, image_grid
from .shapes.features import FEATURE_DIM
from .surgery import check_output_file, write_file_atomic
from .shapes.dataset import balanced_specs


GRID_SUFFIXES = (".png", ".jpg", ".jpeg")  # image grids: formats every Pillow build writes in RGB


def print_fd_note(num_prompts: int) -> None:
    """Under a score table: with N <= the feature width the fd's covariance is rank-deficient, its value mostly
    noise."""
    if num_prompts <= FEATURE_DIM:
        print(f"fd: {num_prompts} images cannot fit the {FEATURE_DIM}-dimensional feature covariance; it is biased "
              f"upwards at small N, so compare fd only at equal --num-prompts (more than {FEATURE_DIM}, e.g. 256)")


def shapebench_prompts(num_prompts: int, seed: int = 0):
    """The evaluation specs and captions (balanced over the vocabulary; seed < 10_000 by convention)."""
    specs = balanced_specs(num_prompts, seed=seed)
    return specs, [s.caption() for s in specs]


def check_sampling(num_prompts: int, batch_size: int, steps: int | None = None, guidance: float | None = None,
                   seed: int = 0) -> None:
    """Refuse sampling settings that would fail deep inside the pipeline or score nothing, one line each."""
    check_seed(seed)
    for label, value in (("num_prompts", num_prompts), ("batch_size", batch_size), ("steps", steps)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{label} must be an integer >= 1, got {value!r}")
    check_guidance(guidance)


def sample_shapebench(pipe, num_prompts: int = 64, seed: int = 0, batch_size: int = 32, progress: bool = True,
                      steps: int | None = None, guidance: float | None = None):
    """(specs, uint8 images) for the ShapeBench prompts, with the model's generation.json settings (step count and
    CFG scale overridden if given)."""
    check_sampling(num_prompts, batch_size, steps, guidance, seed)
    specs, prompts = shapebench_prompts(num_prompts, seed)
    call = pipeline_call(pipe, steps, guidance)
    images = generate_images(pipe, prompts, seed=seed, call=call, batch_size=batch_size, progress=progress)
    return specs, images


def evaluate_models(models: dict[str, str | Path], reference: str | Path | None = None, num_prompts: int = 64,
                    seed: int = 0, device: str = "cpu", dtype: str = "float32", grid: Path | None = None,
                    json_path: Path | None = None, batch_size: int = 32, progress: bool = True,
                    steps: int | None = None, guidance: float | None = None) -> dict[str, dict]:
    """Score each model (name -> path) on ShapeBench; fidelity (PSNR/SSIM) against ``reference`` if given. Every
    model, the reference too, samples with its generation.json settings, or with ``steps`` / ``guidance`` if given."""
    check_sampling(num_prompts, batch_size, steps, guidance, seed)  # before any model is loaded
    if grid is not None:
        check_output_file(grid, "--grid", GRID_SUFFIXES)
    if json_path is not None:
        check_output_file(json_path, "--json")
    sampling = dict(steps=steps, guidance=guidance)
    ref_images = None
    if reference is not None:
        _, ref_images = sample_shapebench(load_pipeline(reference, device, dtype), num_prompts, seed, batch_size, progress,
                                          **sampling)
    rows, grids = {}, []
    for name, path in models.items():
        specs, images = sample_shapebench(load_pipeline(path, device, dtype), num_prompts, seed, batch_size, progress,
                                          **sampling)
        rows[name] = evaluate(images, specs, reference=ref_images)
        grids.append(images[:16])
    print(format_table(rows))
    print_fd_note(num_prompts)
    if grid is not None:
        write_file_atomic(grid, image_grid(np.concatenate(grids), nrow=16).save)
    if json_path is not None:
        payload = {"num_prompts": num_prompts, "seed": seed, "reference": str(reference) if reference else None,
                   "steps": steps, "guidance": guidance,
                   "models": {k: str(v) for k, v in models.items()}, "scores": rows}
        write_file_atomic(json_path, lambda tmp: tmp.write_text(json.dumps(payload, indent=2) + "\n"))
    return rows


# The demo's pruned models: the paper's OBS-Diff, the same with the least-squares re-fit and with ADMM (both beyond
# the paper), magnitude.
DEMO_RUNS = {"obs-diff": {"method": "obs-diff"}, "obs-diff + refit": {"method": "obs-diff", "refit": True},
             "obs-diff + admm": {"method": "obs-diff", "solver": "admm"}, "magnitude": {"method": "magnitude"}}


def run_demo(output: Path = Path("runs/demo"), model: str | Path | None = None, device: str = "cpu",
             num_prompts: int = 64, sparsity: float = 0.5, calibration_prompts: int = 16, progress: bool = True) -> dict:
    """Prune tiny-sd3 to 50% with OBS-Diff (the paper's method, then with --refit and with --solver admm) and with
    magnitude; print and save dense vs pruned ShapeBench."""
    from .prune import PruneConfig, prune

    check_sampling(num_prompts, 32)  # before anything is loaded or pruned
    model = model or DATA_DIR / "tiny-sd3"
    output = Path(output)
    check_output_file(output / "report.json", "--output")  # not a file, not under one; the folder is made when writing
    dense = load_pipeline(model, device)
    specs, dense_images = sample_shapebench(dense, num_prompts, progress=progress)
    rows = {"dense": evaluate(dense_images, specs)}
    images = {"dense": dense_images}
    reports = {}
    for label, settings in DEMO_RUNS.items():
        pipe = load_pipeline(model, device)
        t0 = time.perf_counter()
        report = prune(pipe, PruneConfig(sparsity=sparsity, num_prompts=calibration_prompts, **settings), progress=progress)
        reports[label] = {"prune_seconds": time.perf_counter() - t0, "achieved_sparsity": report["achieved_sparsity"],
                          "timings": report["timings"]}
        _, images[label] = sample_shapebench(pipe, num_prompts, progress=progress)
        rows[f"{label} {sparsity:.0%}"] = evaluate(images[label], specs, reference=dense_images)
    print(format_table(rows))
    print_fd_note(num_prompts)
    # One row of 16 prompts per model: dense | OBS-Diff | OBS-Diff + refit | OBS-Diff + ADMM | magnitude.
    grid = image_grid(np.concatenate([im[:16] for im in images.values()]), nrow=16)
    write_file_atomic(output / "grid.png", grid.save)
    result = {"model": str(model), "sparsity": sparsity, "num_prompts": num_prompts,
              "calibration_prompts": calibration_prompts, "scores": rows, "pruning": reports,
              "grid": str(output / "grid.png"), "grid_rows": list(images)}
    write_file_atomic(output / "report.json", lambda tmp: tmp.write_text(json.dumps(result, indent=2) + "\n"))
    print(f"wrote {output / 'report.json'} and {output / 'grid.png'} (rows: {', '.join(images)})")
    return result

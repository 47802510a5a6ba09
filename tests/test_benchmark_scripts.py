"""Benchmark scripts that need hardware or hours run here in a self-test size, so they stay correct."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def _sweeps():
    """benchmarks/run.py as a module (the sweep definitions and the --shard parser)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import run
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return run


def test_gpu_fullsize_script_runs_on_cpu_in_tiny_mode(tmp_path):
    out = tmp_path / "gpu.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_fullsize.py"), "--tiny", "--quiet",
                           "--device", "cpu", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["errors"] == {}
    runs = {(r["mode"], r["packages"]) for r in result["prune"]}
    assert runs == {("exact", 3), ("cached", 3)}  # the GPU defaults exact:4 / cached:24, capped at 3 tiny blocks
    for run in result["prune"]:
        assert abs(run["achieved_sparsity"] - 0.5) < 0.005
        assert run["projected_100x25_min"] > 0 and run["plain_pass_s"] > 0
    assert set(result["latency"]) == {"sd3-medium", "flux-dev"}
    for lat in result["latency"].values():
        # 2:4 needs CUDA: recorded as not measured
        assert set(lat["median_ms"]) == {"dense", "structured-30%", "structured-30%-unrounded"}
        assert "not measured" in lat["notes"]["2:4"]
        before, after = lat["notes"]["structured-30%_params"]
        assert after < before
    accumulate = result["hessian"]["accumulate"]["median_ms"]
    assert set(accumulate) == {"full_gram_sync_update", "add_batch"} and min(accumulate.values()) > 0
    hessian = result["hessian"]["bfloat16"]
    assert hessian["max_rel_diff"] == 0.0  # on CPU both precisions are IEEE
    assert hessian["half_inputs"].startswith("not available on cpu")  # float32 output from half inputs: CUDA only


def test_gpu_fullsize_prunes_sd35_medium_with_dual_attention_in_tiny_mode(tmp_path):
    out = tmp_path / "gpu.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_fullsize.py"), "--tiny", "--quiet", "--device",
                           "cpu", "--model", "sd3.5-medium", "--parts", "prune", "--prune-runs", "exact:2:refit",
                           "exact:2:admm:tune", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["errors"] == {} and result["model"] == "sd3.5-medium"
    refit, tuned = result["prune"]
    assert (refit["mode"], refit["packages"], refit["refit"], refit["solver"]) == ("exact", 2, True, "obs")
    assert refit["tune_iters"] == 0 and refit["tune_s"] is None
    assert (tuned["solver"], tuned["tune_iters"]) == ("admm", 200) and tuned["tune_s"] > 0
    assert 0 < tuned["tune_loss_ratio"] <= 1  # a block that did not improve keeps its weights: ratio 1
    for run in (refit, tuned):
        assert abs(run["achieved_sparsity"] - 0.5) < 0.005


def test_gpu_fullsize_refuses_a_malformed_prune_run():
    for spec in ("exact", "exact:x", "exact:4:fast", "greedy:4", "exact:4:tune:admm"):
        proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_fullsize.py"), "--tiny", "--device", "cpu",
                               "--parts", "prune", "--prune-runs", spec], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and "MODE:PACKAGES[:refit|:admm][:tune]" in proc.stderr, (spec, proc.stderr[-500:])


def test_calibration_overhead_script_in_a_small_setting(tmp_path):
    """One prompt, 1 and 2 packages, plain and guided Hessians: every combination timed, the cost counted."""
    out = tmp_path / "overhead.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "calibration_overhead.py"), "--model",
                           str(ROOT / "data" / "tiny-sd3"), "--prompts", "1", "--packages", "1", "2", "--repeats", "1",
                           "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    measured = json.loads(out.read_text())["models"]["tiny-sd3"]
    assert {(r["packages"], r["hessian_inputs"]) for r in measured["runs"]} == {
        (g, h) for g in (1, 2) for h in ("plain", "guided")}
    assert all(r["plain_s"] > 0 and r["calibration_s"] > 0 and r["without_gram_s"] > 0 for r in measured["runs"])
    assert all(r["without_gram_overhead"] == r["without_gram_s"] / r["plain_s"] - 1 for r in measured["runs"])
    assert all(r["overhead_range"][0] == r["overhead_range"][1] == r["overhead"] for r in measured["runs"])  # 1 repeat
    counts = measured["multiply_adds"]
    assert counts["hessian_per_linear"] == counts["hessians"] / counts["linears"] and 0.5 < counts["hessian_per_linear"] < 2


def test_calibration_overhead_without_gram_skips_only_the_hessians_arithmetic():
    """Inside ``without_gram`` an accumulator counts its rows but its Hessian stays zero; outside it adds X^T X again."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import calibration_overhead
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    from obsdiff_lite.hessian import HessianAccumulator

    x = torch.randn(10, 6)
    acc = HessianAccumulator(6)
    with calibration_overhead.without_gram():
        acc.add_batch(x)
    assert acc.num_rows == 10 and acc.weight_sum == 10.0 and not acc.hessian.any()
    acc.add_batch(x)  # the running mean over 20 rows, of which the first 10 added nothing
    torch.testing.assert_close(acc.hessian, 2 * x.T @ x / 20)


def test_every_sweep_run_is_a_valid_prune_config():
    """A typo in a sweep's settings must fail here, not an hour into the sweep."""
    sweeps = _sweeps()
    from obsdiff_lite.arch import arch_for_transformer, blocks, parse_block_range
    from obsdiff_lite.pipelines import load_pipeline
    from obsdiff_lite.prune import PruneConfig, package_units

    model_blocks = {}

    assert {"quality", "refit", "weight_range", "solver_settings", "robustness", "calibration_source"} <= set(sweeps.EXPERIMENTS)
    for name in sweeps.EXPERIMENTS:
        runs = sweeps.experiment_runs(name)
        assert runs, name
        assert len({sweeps.run_key(r) for r in runs}) == len(runs), f"{name} repeats a run"
        for run in runs:
            assert (ROOT / "data" / run["model"]).is_dir(), run
            settings = sweeps.prune_settings(run)
            PruneConfig(**settings).validate()
            if "blocks" in run:  # the block range exists and holds enough units for the packages asked for
                if run["model"] not in model_blocks:
                    pipe = load_pipeline(ROOT / "data" / run["model"])
                    model_blocks[run["model"]] = blocks(pipe.transformer, arch_for_transformer(pipe.transformer))
                every = model_blocks[run["model"]]
                selected = [every[i] for i in parse_block_range(run["blocks"], len(every))]
                package_units(selected, settings.get("packages", 4))
            if "prompt_source" in run:  # drawn by the run's seed from the named list, so seeds differ in prompts
                assert len(settings["prompts"]) == sweeps.CALIB_PROMPTS
                assert settings["prompts"] == sweeps.prune_settings(run)["prompts"]
            assert set(run.get("eval", {})) <= {"steps", "guidance", "sampler", "prompts"}, run
            assert run.get("eval", {}).get("sampler", "heun") in sweeps.SAMPLERS, run
            num_eval = run.get("eval", {}).get("prompts", sweeps.EVAL_PROMPTS)
            assert isinstance(num_eval, int) and num_eval >= sweeps.EVAL_PROMPTS, run  # never fewer than the usual


def test_sweep_evaluation_prompts_come_from_the_run(monkeypatch):
    """``eval: {"prompts": N}`` scores on N ShapeBench prompts, by default EVAL_PROMPTS, always from EVAL_SEED; the
    acceptance sweep's larger evaluation holds every combination twice."""
    sweeps = _sweeps()
    from obsdiff_lite.shapes.dataset import all_specs, balanced_specs

    asked = []
    monkeypatch.setattr(sweeps, "sample_shapebench", lambda pipe, n, seed, **kw: asked.append((n, seed)))
    sweeps.sample(None)
    sweeps.sample(None, {"prompts": sweeps.ACCEPTANCE_EVAL_PROMPTS})
    assert asked == [(sweeps.EVAL_PROMPTS, sweeps.EVAL_SEED), (sweeps.ACCEPTANCE_EVAL_PROMPTS, sweeps.EVAL_SEED)]
    larger = balanced_specs(sweeps.ACCEPTANCE_EVAL_PROMPTS, sweeps.EVAL_SEED)
    assert larger[: sweeps.EVAL_PROMPTS] == balanced_specs(sweeps.EVAL_PROMPTS, sweeps.EVAL_SEED)  # the usual 120 first
    assert sorted(map(all_specs().index, larger)) == sorted(list(range(len(all_specs()))) * 2)
    runs = sweeps.experiment_runs("acceptance")
    scored = [r for r in runs if "eval" in r and "tune_iters" not in r]
    usual = [r for r in runs if "eval" not in r]
    assert [{k: v for k, v in r.items() if k != "eval"} for r in scored] == usual  # the same runs, scored again
    # Block-tuned runs: every method of the larger evaluation (magnitude too, with its calibration seeds) tuned.
    tuned = [r for r in runs if "tune_iters" in r]
    assert all(r["tune_iters"] == sweeps.ACCEPTANCE_TUNE_ITERS and r["eval"] == scored[0]["eval"] for r in tuned)
    untuned_settings = {json.dumps({k: v for k, v in r.items() if k != "seed"}, sort_keys=True) for r in scored}
    assert {json.dumps({k: v for k, v in r.items() if k not in ("seed", "tune_iters")}, sort_keys=True)
            for r in tuned} == untuned_settings
    assert len(tuned) == 10 * len(untuned_settings)


def test_run_plots_draws_the_readme_figures_from_the_results(tmp_path, monkeypatch):
    import shutil

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import run
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    for name in ("quality", "weighting", "block_sensitivity"):
        shutil.copy(ROOT / "benchmarks" / "results" / f"{name}.json", tmp_path)
    monkeypatch.setattr(run, "RESULTS", tmp_path)
    run.plots()
    for name in ("quality", "weighting", "block_sensitivity"):
        png = tmp_path / f"{name}.png"
        assert png.stat().st_size > 10_000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"benchmarks/results/{name}.png" in (ROOT / "README.md").read_text()  # the README shows each figure


def test_admm_settings_script_in_a_small_setting(tmp_path):
    """Two prompts, one pattern: every solver measured on every layer; ADMM never ends a layer above OBS."""
    out = tmp_path / "admm.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "admm_settings.py"), "--models", "tiny-flux",
                           "--prompts", "2", "--patterns", "2:4", "--out", str(out)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    measured = json.loads(out.read_text())["models"]["tiny-flux"]["2:4"]
    assert measured["layers"] > 0 and measured["admm_iters_default"]["min"] > 0
    for label, solver in measured["solvers"].items():
        assert 0 < solver["error_vs_obs"] <= solver["worst_vs_obs"] <= 1 + 1e-6, label
        assert solver["seconds"] > 0


def test_sweep_shards_are_counted_from_zero():
    """--shard 2/2 ran no run at all, silently: shards are 0-based, so it is refused with the valid range."""
    import argparse

    import pytest

    sweeps = _sweeps()
    assert sweeps.parse_shard("1/2") == (1, 2)
    for text, match in (("2/2", r"0/2 \.\. 1/2"), ("0/0", "n must be >= 1"), ("x", "i/n such as 0/2")):
        with pytest.raises(argparse.ArgumentTypeError, match=match):
            sweeps.parse_shard(text)

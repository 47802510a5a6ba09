"""Memory planner: exact Hessian bytes, an honest bound of the measured peak, the paper's SD3-medium
setting, the refusal before calibrating, and `obsdiff plan`."""

from __future__ import annotations

import json

import pytest
import torch

from obsdiff_lite import plan as planner
from obsdiff_lite.cli import main
from obsdiff_lite.pipelines import load_pipeline
from obsdiff_lite.plan import GB, TINY_BAND, check_memory, plan_for, plan_memory
from obsdiff_lite.prune import PruneConfig, prune

FAST = dict(num_prompts=2, steps=2, batch_size=2)


def _record_calibrations(monkeypatch) -> list[dict]:
    """Wrap calibrate() where prune and the structured engine call it; record what each pass holds."""
    import obsdiff_lite.prune
    import obsdiff_lite.structured

    seen = []
    real = obsdiff_lite.prune.calibrate

    def recording(*args, **kwargs):
        accs = real(*args, **kwargs)
        nbytes = sum(a.hessian.numel() * a.hessian.element_size() for a in accs.values())
        seen.append({"count": len(accs), "bytes": nbytes})
        return accs

    monkeypatch.setattr(obsdiff_lite.prune, "calibrate", recording)
    monkeypatch.setattr(obsdiff_lite.structured, "calibrate", recording)
    return seen


@pytest.mark.parametrize("settings", [dict(packages=3), dict(pattern="structured", sparsity=0.3, packages=2)],
                         ids=["unstructured", "structured"])
def test_hessian_part_equals_the_accumulators_bytes(random_dir, monkeypatch, settings):
    """Per package, the planned #Hessians and their bytes are exactly what the accumulators hold."""
    pipe = load_pipeline(random_dir)
    config = PruneConfig(**FAST, **settings)
    plan = plan_memory(pipe, config)
    seen = _record_calibrations(monkeypatch)
    prune(pipe, config, progress=False)
    planned = [{"count": p.num_hessians, "bytes": p.hessian_bytes} for p in plan.packages if p.num_hessians]
    assert seen == planned and len(seen) == config.packages


def _measured_peak(pipe, config) -> int:
    """Peak bytes newly allocated (and alive) during prune(), from torch's CPU allocator accounting.

    The profiler's memory events (profile_memory=True) report every CPU allocation and free made
    while it runs; their running sum is the bytes alive on top of what existed before (the model).
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        prune(pipe, config, progress=False, check_memory=False)
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    alive = peak = 0
    for e in events:
        alive += e.nbytes()
        peak = max(peak, alive)
    return peak


@pytest.mark.parametrize("model, settings", [
    ("sd3", dict(packages=2)),
    ("flux", dict(pattern="structured", sparsity=0.3, packages=2)),
    ("sd3", dict(pattern="2:4", sparsity=None, packages=1, refit=True)),
    ("flux", dict(packages=2, dense_targets=True)),
    ("sd3", dict(pattern="2:4", sparsity=None, packages=1, solver="admm")),
], ids=["sd3-unstructured", "flux-structured", "sd3-2:4-refit", "flux-dense-targets", "sd3-2:4-admm"])
def test_estimate_bounds_the_measured_peak(random_sd3_dir, random_flux_dir, model, settings):
    """Estimate / (model bytes + measured peak during prune) lies in TINY_BAND (seen: 0.98 .. 1.30).

    Structured runs can read slightly high: the shrunk copies of sliced weights are new allocations
    while the release of the old ones (allocated before measuring) is invisible to the accounting.
    """
    pipe = load_pipeline(random_sd3_dir if model == "sd3" else random_flux_dir)
    config = PruneConfig(num_prompts=3, steps=3, batch_size=3, **settings)
    plan = plan_memory(pipe, config)
    assert plan.model_bytes == sum(t.numel() * t.element_size() for c in pipe.components.values()
                                   if isinstance(c, torch.nn.Module) for t in [*c.parameters(), *c.buffers()])
    measured = plan.model_bytes + _measured_peak(pipe, config)
    ratio = plan.peak_bytes() / measured
    assert TINY_BAND[0] <= ratio <= TINY_BAND[1], f"estimate {plan.peak_bytes():,} vs measured {measured:,}"


def test_tuning_adds_one_dense_copy_to_every_total(random_flux_dir):
    """--tune-iters keeps a copy of the transformer from the start: exactly its bytes more in every package."""
    pipe = load_pipeline(random_flux_dir)
    plain = plan_memory(pipe, PruneConfig(num_prompts=3, steps=3, batch_size=3, packages=2))
    tuned = plan_memory(pipe, PruneConfig(num_prompts=3, steps=3, batch_size=3, packages=2, tune_iters=10))
    copy_bytes = sum(t.numel() * t.element_size() for t in pipe.transformer.parameters())
    assert tuned.dense_copy_bytes == copy_bytes > 0 and plain.dense_copy_bytes == 0
    assert [sum(t.by_device.values()) - sum(p.by_device.values()) for t, p in zip(tuned.packages, plain.packages)] == \
        [copy_bytes] * 2


@pytest.mark.parametrize("model", ["sd3", "flux"])
def test_tuning_phase_bounds_the_measured_peak_when_it_is_the_peak(random_sd3_dir, random_flux_dir, model):
    """With many recorded calls block tuning is the peak (recorded calls of one block at a time, then the training
    of that block): the estimate / (model bytes + measured peak) lies in TINY_BAND too (seen 1.03 .. 1.09). While
    tune_blocks kept the previous block's calls alive during the next recording it read 0.92 (sd3) and 0.77 (flux)."""
    pipe = load_pipeline(random_sd3_dir if model == "sd3" else random_flux_dir)
    config = PruneConfig(num_prompts=8, steps=10, batch_size=4, packages=2, tune_iters=5)
    plan = plan_memory(pipe, config)
    assert plan.peak_phase() == "block tuning"
    assert plan.tuning.recorded_calls == 2 * 10 * plan.cfg // (2 if model == "sd3" else 1)  # every call kept
    measured = plan.model_bytes + _measured_peak(pipe, config)
    ratio = plan.peak_bytes() / measured
    assert TINY_BAND[0] <= ratio <= TINY_BAND[1], f"estimate {plan.peak_bytes():,} vs measured {measured:,}"


def test_tuning_phase_parts(random_sd3_dir):
    """Recorded calls: min(cap, calls per pass) + 1 on the cache device; a half-precision block adds its float32
    working copy to the training; the table names the phase, and a refusal says when tuning is what does not fit."""
    pipe = load_pipeline(random_sd3_dir)
    base = dict(num_prompts=8, steps=10, batch_size=4, packages=2, tune_iters=5)
    capped = plan_memory(pipe, PruneConfig(tune_max_calls=3, cache_device="cpu", **base)).tuning
    full = plan_memory(pipe, PruneConfig(**base)).tuning
    assert (capped.recorded_calls, full.recorded_calls) == (3, 20)
    assert capped.recorded_bytes * 21 == full.recorded_bytes * 4  # (3 + 1) vs (20 + 1) calls
    half = plan_memory(pipe, PruneConfig(**base), dtype=torch.bfloat16).tuning
    assert half.recorded_bytes * 2 == full.recorded_bytes and half.training_bytes > full.training_bytes / 2
    plan = plan_memory(pipe, PruneConfig(**base))
    assert "block tuning (after the packages, one block at a time): 20 recorded calls" in plan.table()
    assert "(block tuning)" in plan.table().splitlines()[-1]
    need = plan.peak_bytes() - plan.model_bytes
    packages_need = max(p.by_device["cpu"] for p in plan.packages) - plan.model_bytes
    free = (need + packages_need) // 2  # the packages fit, tuning does not
    with pytest.raises(ValueError, match=r"not enough memory on cpu.*\(block tuning; Hessians"):
        check_memory(pipe, PruneConfig(**base), available=lambda device: free)


def test_sd3_medium_paper_setting():
    """SD3-medium, 4 vs 1 packages, batch 4, 512 px (1024 image + 333 text tokens), CFG, float16, on cuda.

    Paper (Table 7): 24.05 GB with 4 packages, 30.67 GB with 1. This planner: 19.26 GB and 25.55 GB
    (see plan.py's docstring for the ~5 GB both share). The difference is pure Hessian memory, so it is
    the part checked against the paper: 6.29 GB estimated vs 6.62 GB reported.
    """
    plans = {g: plan_for("sd3-medium", PruneConfig(packages=g, batch_size=4, num_prompts=100), device="cuda",
                         dtype="float16") for g in (1, 4)}
    one, four = plans[1], plans[4]
    assert (one.image_tokens, one.text_tokens, one.cfg, one.batch_size) == (1024, 333, 2, 4)
    # 23 joint blocks with 8 unique inputs (6 of width 1536, 2 of 6144); the last (context_pre_only) has 5.
    assert one.packages[0].hessian_bytes == 4 * (23 * (6 * 1536**2 + 2 * 6144**2) + 4 * 1536**2 + 6144**2)
    assert one.packages[0].num_hessians == 23 * 8 + 5
    assert 15.0 * GB < one.model_bytes < 15.8 * GB  # transformer 2.03 B + T5-XXL 4.76 B + CLIPs + VAE, fp16
    delta = (one.peak_bytes() - four.peak_bytes()) / GB
    assert abs(delta - (30.67 - 24.05)) < 0.1 * (30.67 - 24.05), delta
    assert 0.7 < four.peak_bytes() / (24.05 * GB) < 1.0 and 0.7 < one.peak_bytes() / (30.67 * GB) < 1.0
    cpu = plan_for("sd3-medium", PruneConfig(packages=4, batch_size=4, hessian_device="cpu"), device="cuda",
                   dtype="float16")
    assert cpu.peak_bytes("cpu") == max(p.hessian_bytes for p in four.packages)
    assert cpu.peak_bytes() == four.peak_bytes() - cpu.peak_bytes("cpu")


def test_refit_adds_its_conjugate_gradient_buffers_to_the_solve():
    """--refit: one more d x d buffer and REFIT_WEIGHT_COPIES weight-sized ones for the largest input group."""
    from obsdiff_lite.plan import REFIT_WEIGHT_COPIES

    plain, refit = (plan_for("sd3-medium", PruneConfig(pattern="2:4", sparsity=None, refit=r), device="cuda",
                             dtype="float16") for r in (False, True))
    # SD3-medium's largest solve group is ff.net.2 (1536 x 6144): its Hessian is 6144 wide.
    extra = 6144**2 * 4 + REFIT_WEIGHT_COPIES * 1536 * 6144 * 4
    assert {r.solve_bytes - p.solve_bytes for p, r in zip(plain.packages, refit.packages)} == {extra}


def test_admm_adds_its_buffers_to_the_solve():
    """--solver admm: ADMM_HESSIAN_COPIES d x d and ADMM_WEIGHT_COPIES weight-sized buffers for the largest group
    (instead of the re-fit's, which its closing re-fit needs fewer of)."""
    from obsdiff_lite.plan import ADMM_HESSIAN_COPIES, ADMM_WEIGHT_COPIES

    plain, admm = (plan_for("sd3-medium", PruneConfig(pattern="2:4", sparsity=None, solver=s), device="cuda",
                            dtype="float16") for s in ("obs", "admm"))
    extra = ADMM_HESSIAN_COPIES * 6144**2 * 4 + ADMM_WEIGHT_COPIES * 1536 * 6144 * 4
    assert {a.solve_bytes - p.solve_bytes for p, a in zip(plain.packages, admm.packages)} == {extra}


def test_refuses_before_calibrating_with_suggestions(random_sd3_dir, monkeypatch, tmp_path, capsys):
    pipe = load_pipeline(random_sd3_dir)
    config = PruneConfig(packages=1, **FAST)
    need_one = plan_memory(pipe, config).peak_bytes() - plan_memory(pipe, config).model_bytes
    need_most = plan_memory(pipe, PruneConfig(packages=24, **FAST)).peak_bytes() - plan_memory(pipe, config).model_bytes
    assert need_most < need_one
    free = (need_one + need_most) // 2  # enough only with more packages
    monkeypatch.setattr(planner, "available_memory", lambda device: free)
    seen = _record_calibrations(monkeypatch)
    with pytest.raises(ValueError, match=r"not enough memory on cpu.*--packages \d+.*obsdiff plan") as info:
        prune(pipe, config, progress=False)
    assert not seen, "refused before any calibration"
    assert "--batch-size" in str(info.value) or "--packages" in str(info.value)
    out = tmp_path / "out"
    assert main(["prune", str(random_sd3_dir), "--output", str(out), "--packages", "1", "--num-prompts", "2",
                 "--steps", "2", "--batch-size", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("obsdiff: error: not enough memory") and "\n" not in err and not out.exists()
    assert check_memory(pipe, PruneConfig(packages=24, **FAST)).peak_bytes() > 0  # fits: returns the plan


def test_plan_command(random_sd3_dir, tmp_path, capsys):
    assert main(["plan", "sd3-medium", "--packages", "4", "--batch-size", "4", "--dtype", "float16",
                 "--device", "cuda", "--json", str(tmp_path / "plan.json")]) == 0
    out = capsys.readouterr().out
    assert "1024 image + 333 text tokens" in out and "Hessian GB" in out and "estimated peak on cuda: 19." in out
    assert len([line for line in out.splitlines() if line.strip().startswith(("1 ", "2 ", "3 ", "4 "))]) == 4
    data = json.loads((tmp_path / "plan.json").read_text())
    assert data["peak_bytes"]["cuda"] > 19e9 and len(data["packages"]) == 4

    assert main(["plan", str(random_sd3_dir), "--packages", "2", "--num-prompts", "3", "--batch-size", "3"]) == 0
    table = capsys.readouterr().out
    pipe = load_pipeline(random_sd3_dir)  # the directory plan (no weights loaded) equals the loaded pipeline's
    loaded = plan_memory(pipe, PruneConfig(packages=2, num_prompts=3, batch_size=3))
    assert f"estimated peak on cpu: {loaded.peak_bytes() / 1e6:.2f} MB" in table
    assert "64 image + 20 text tokens" in table

    for argv, needle in [
        (["plan", str(tmp_path / "nope")], "known architecture"),
        (["plan", "sd3-medium", "--packages", "999"], "units"),
        (["plan", "sd3-medium", "--device", "tpu"], "device"),
        (["plan", "sd3-medium", "--height", "0"], "--height"),
        (["plan", "sd3-medium", "--width", "1000"], "multiples of 16"),  # was planned as 0 or rounded-down tokens
        (["plan", "flux-dev", "--height", "8"], "multiples of 16"),
    ]:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("obsdiff: error: ") and "\n" not in err and needle in err, err


def test_guided_hessians_with_two_cfg_calls_plan_the_waiting_inputs(random_flux_dir, random_sd3_dir):
    """Flux true CFG: the cond call's inputs of every combined group wait for the uncond call; SD3 batches both."""
    flux = load_pipeline(random_flux_dir)
    plans = {mode: plan_memory(flux, PruneConfig(hessian_inputs=mode, **FAST))
             for mode in ("plain", "guided", "guided-image")}
    extra = [g.activation_bytes - p.activation_bytes for g, p in zip(plans["guided"].packages, plans["plain"].packages)]
    image = [g.activation_bytes - p.activation_bytes
             for g, p in zip(plans["guided-image"].packages, plans["plain"].packages)]
    rows = plans["plain"].batch_size * (plans["plain"].image_tokens + plans["plain"].text_tokens)
    nbytes = next(flux.transformer.parameters()).element_size()
    widths = [sum(lin.in_features for lin in groups.values())
              for _, groups, _ in planner._package_layers(flux.transformer, PruneConfig(**FAST))]
    assert extra == [rows * w * nbytes for w in widths]
    assert all(0 <= i <= e for i, e in zip(image, extra)) and sum(image) < sum(extra)  # single blocks stay plain
    sd3 = load_pipeline(random_sd3_dir)
    assert plan_memory(sd3, PruneConfig(hessian_inputs="guided", **FAST)).peak_bytes() == \
        plan_memory(sd3, PruneConfig(**FAST)).peak_bytes()


def test_dense_targets_plan_a_transformer_copy_and_a_drift_per_hessian():
    from obsdiff_lite.plan import load_plan_model, module_bytes

    plain, dense = (plan_for("sd3-medium", PruneConfig(packages=4, dense_targets=d), device="cuda", dtype="float16")
                    for d in (False, True))
    transformer, _ = load_plan_model("sd3-medium")
    copy = module_bytes(transformer, torch.float16)
    for p, d in zip(plain.packages, dense.packages):
        assert d.hessian_bytes == 2 * p.hessian_bytes
        assert d.by_device["cuda"] - p.by_device["cuda"] >= copy + p.hessian_bytes
    assert (plain.dense_copy_bytes, dense.dense_copy_bytes) == (0, copy)
    assert "dense copy of the transformer" in dense.table() and "dense copy" not in plain.table()

"""The OBS-Diff engine on random-init tiny SD3/Flux pipelines: calibration, packages, targets, determinism."""

from __future__ import annotations

import pytest
import torch

from obsdiff_lite.arch import arch_for_transformer, block_units, blocks, parse_block_range
from obsdiff_lite.calibrate import StepTracker, calibrate
from obsdiff_lite.obs import parse_pattern
from obsdiff_lite.pipelines import call_kwargs, load_pipeline, run_pipeline
from obsdiff_lite.prune import PruneConfig, package_units, prune
from obsdiff_lite.schedules import timestep_weights

FAST = dict(num_prompts=3, steps=3, batch_size=3)


def _targets(pipe):
    return {
        f"{b.name}.{n}": getattr_linear(b.module, n)
        for b in blocks(pipe.transformer)
        for unit in block_units(b)
        for group in unit
        for n in group
    }


def getattr_linear(module, name):
    for part in name.split("."):
        module = getattr(module, part)
    return module


def test_arch_lists_every_block_linear(random_dir):
    pipe = load_pipeline(random_dir)
    arch = arch_for_transformer(pipe.transformer)
    names = set(_targets(pipe))
    if arch.name == "sd3":
        # 6 joint blocks x 12 linears, minus the last block's to_add_out and ff_context (context_pre_only).
        assert len(names) == 5 * 12 + 9
        assert "transformer_blocks.5.attn.to_add_out" not in names
    else:
        assert len(names) == 2 * 12 + 4 * 5
        assert "single_transformer_blocks.0.proj_mlp" in names
    # Every nn.Linear inside the blocks that the paper prunes is a target; modulation linears are not.
    for b in blocks(pipe.transformer):
        for name, mod in b.module.named_modules():
            if isinstance(mod, torch.nn.Linear) and f"{b.name}.{name}" not in names:
                assert "norm" in name, f"{b.name}.{name} is neither a target nor an AdaLN modulation linear"


def test_step_tracker_maps_timesteps_not_calls(random_dir):
    """SD3 batches cond+uncond into one call, Flux makes two calls per step: both map to `steps` indices."""
    pipe = load_pipeline(random_dir)
    arch = arch_for_transformer(pipe.transformer)
    tracker = StepTracker(pipe.scheduler, arch.timestep_scale, "log-decrease")
    seen = []
    handle = pipe.transformer.register_forward_pre_hook(
        lambda m, a, k: seen.append(tracker.observe(k["timestep"])), with_kwargs=True
    )
    try:
        run_pipeline(pipe, ["a large red circle at the top left"], 0, call_kwargs(pipe.obsdiff_generation) | {"num_inference_steps": 4}, progress=False, output_type="latent")
    finally:
        handle.remove()
    calls_per_step = 1 if arch.name == "sd3" else 2
    assert seen == [i for i in range(4) for _ in range(calls_per_step)]
    assert tracker.weight == pytest.approx(float(timestep_weights("log-decrease", 4)[3]))


def test_calibrated_hessian_equals_closed_form(random_sd3_dir):
    """H from the hooks equals 2 * sum_t a_t X_t^T X_t / sum_t a_t rows_t computed from recorded inputs."""
    pipe = load_pipeline(random_sd3_dir)
    arch = arch_for_transformer(pipe.transformer)
    linear = pipe.transformer.transformer_blocks[2].attn.to_q
    call = call_kwargs(pipe.obsdiff_generation)
    prompts = ["a small blue cross in the center", "a large green square at the top right"]
    recorded, tracker = [], StepTracker(pipe.scheduler, arch.timestep_scale)
    h1 = pipe.transformer.register_forward_pre_hook(tracker.pre_hook, with_kwargs=True)
    h2 = linear.register_forward_pre_hook(lambda m, a: recorded.append((tracker.step_index, a[0].detach().reshape(-1, a[0].shape[-1]).double())))
    try:
        run_pipeline(pipe, prompts, 0, call, batch_size=2, output_type="latent", progress=False)
    finally:
        h1.remove(), h2.remove()
    alpha = timestep_weights("log-decrease", call["num_inference_steps"])
    num = sum(alpha[i] * 2 * x.T @ x for i, x in recorded)
    den = sum(alpha[i] * x.shape[0] for i, x in recorded)
    expected = num / den
    acc = calibrate(pipe, arch, {"q": linear}, prompts, call, weighting="log-decrease", batch_size=2, progress=False)["q"]
    assert torch.allclose(acc.hessian.double(), expected, rtol=1e-4, atol=1e-6 * float(expected.abs().max()))
    # CFG doubles the batch: both halves enter H (rows = 2 prompts x 2 halves x 64 image tokens per step).
    assert recorded[0][1].shape[0] == 2 * 2 * 64


@pytest.mark.parametrize("method", ["obs-diff", "sparsegpt", "wanda", "dsnot", "magnitude"])
def test_every_target_at_requested_sparsity_and_others_untouched(random_dir, method):
    pipe = load_pipeline(random_dir)
    before = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    report = prune(pipe, PruneConfig(method=method, sparsity=0.6, packages=2, blocks="1:", **FAST), progress=False)
    targets = _targets(pipe)
    first_block = blocks(pipe.transformer)[0].name + "."
    for name, linear in targets.items():
        frac = float((linear.weight == 0).float().mean())
        if name.startswith(first_block):
            assert torch.equal(linear.weight, before[name + ".weight"]), f"{name} is outside --blocks 1: but changed"
        else:
            assert abs(frac - 0.6) <= 0.005, f"{name}: sparsity {frac:.4f}"
            assert torch.isfinite(linear.weight).all()
    changed = {k for k, v in pipe.transformer.state_dict().items() if not torch.equal(v, before[k])}
    assert all(k.removesuffix(".weight") in targets for k in changed), "only target weights may change"
    assert not any(k.endswith(".bias") for k in changed)
    assert abs(report["achieved_sparsity"] - 0.6) < 0.005


def test_ramped_sparsities_keep_the_weighted_mean_and_the_slope():
    from obsdiff_lite.prune import ramped_sparsities

    weights = [4, 4, 4, 1]  # e.g. SD3's smaller last block
    out = ramped_sparsities(0.5, 0.1, weights)
    assert sum(w * s for w, s in zip(weights, out)) / sum(weights) == pytest.approx(0.5, abs=1e-12)
    assert out == sorted(out) and out[-1] - out[0] == pytest.approx(0.2)
    assert all(b - a == pytest.approx(0.2 / 3) for a, b in zip(out, out[1:]))
    assert ramped_sparsities(0.5, -0.1, weights) == sorted(ramped_sparsities(0.5, -0.1, weights), reverse=True)
    assert ramped_sparsities(0.5, 0.0, weights) == [0.5] * 4 and ramped_sparsities(0.5, 0.2, [7]) == [0.5]


def test_sparsity_ramp_prunes_early_blocks_less_at_the_same_total(random_dir):
    pipe = load_pipeline(random_dir)
    report = prune(pipe, PruneConfig(sparsity=0.5, sparsity_ramp=0.15, packages=2, **FAST), progress=False)
    assert abs(report["achieved_sparsity"] - 0.5) < 0.005  # the same number of zeros as without the ramp
    per_block = report["block_sparsity"]
    assert list(per_block.values()) == sorted(per_block.values()) and max(per_block.values()) - min(per_block.values()) > 0.25
    for b in blocks(pipe.transformer):  # every layer of a block at that block's sparsity
        for name, linear in _targets(pipe).items():
            if name.startswith(b.name + "."):
                assert abs(float((linear.weight == 0).float().mean()) - per_block[b.name]) <= 0.005, name
    flat = load_pipeline(random_dir)  # ramp 0 is the paper's uniform sparsity, bit for bit
    prune(flat, PruneConfig(sparsity=0.5, sparsity_ramp=0.0, packages=2, **FAST), progress=False)
    uniform = load_pipeline(random_dir)
    assert prune(uniform, PruneConfig(sparsity=0.5, packages=2, **FAST), progress=False)["block_sparsity"] is None
    assert all(torch.equal(a, b) for a, b in zip(flat.transformer.state_dict().values(),
                                                 uniform.transformer.state_dict().values()))


@pytest.mark.parametrize("pattern", ["2:4", "4:8"])
@pytest.mark.parametrize("method", ["obs-diff", "dsnot"])
def test_nm_patterns_are_valid(random_dir, pattern, method):
    pipe = load_pipeline(random_dir)
    prune(pipe, PruneConfig(method=method, pattern=pattern, sparsity=None, packages=1, **FAST), progress=False)
    _, n, m = parse_pattern(pattern)
    for name, linear in _targets(pipe).items():
        zeros = (linear.weight == 0).reshape(linear.out_features, -1, m).sum(-1)
        assert bool((zeros >= n).all()), f"{name} violates {pattern}"


def test_same_seed_gives_bit_identical_weights(random_sd3_dir):
    states = []
    for _ in range(2):
        pipe = load_pipeline(random_sd3_dir)
        prune(pipe, PruneConfig(sparsity=0.5, packages=3, **FAST), progress=False)
        states.append(pipe.transformer.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_packages_are_sequential(random_sd3_dir):
    """With 2 packages the first package sees the dense model (same as 1 package); the second sees it pruned."""
    runs = {}
    for g in (1, 2):
        pipe = load_pipeline(random_sd3_dir)
        report = prune(pipe, PruneConfig(sparsity=0.5, packages=g, **FAST), progress=False)
        runs[g] = (pipe.transformer.state_dict(), report)
    layers = runs[2][1]["layers"]
    first = [k for k, v in layers.items() if v["package"] == 0]
    second = [k for k, v in layers.items() if v["package"] == 1]
    assert first and second
    assert all(torch.equal(runs[1][0][k + ".weight"], runs[2][0][k + ".weight"]) for k in first)
    assert not all(torch.equal(runs[1][0][k + ".weight"], runs[2][0][k + ".weight"]) for k in second)


def test_package_units_keep_parallel_sets_together(random_sd3_dir):
    pipe = load_pipeline(random_sd3_dir)
    selected = blocks(pipe.transformer)
    for g in (1, 4, 24):
        packages = package_units(selected, g)
        assert len(packages) == g
        flat = [t.names for pkg in packages for unit in pkg for t in unit]
        assert ["attn.to_q", "attn.to_k", "attn.to_v"] in flat  # q/k/v stay one input group
        sizes = [len(p) for p in packages]
        assert max(sizes) - min(sizes) <= 1
    with pytest.raises(ValueError, match="units"):
        package_units(selected, 1000)


def test_one_package_per_block_follows_block_boundaries(random_flux_dir):
    """Flux blocks have 4 (joint) or 2 (single) units: "blocks" packages follow blocks, not unit counts."""
    from obsdiff_lite.cli import _packages
    from obsdiff_lite.structured import split_packages, structured_units

    pipe = load_pipeline(random_flux_dir)
    selected = blocks(pipe.transformer)
    packages = package_units(selected, "blocks")
    assert [{t.block.index for unit in pkg for t in unit} for pkg in packages] == [{b.index} for b in selected]
    assert [len(pkg) for pkg in packages] == [len(block_units(b)) for b in selected]
    structured = split_packages(structured_units(selected), "blocks")
    assert [[u.block.index for u in pkg] for pkg in structured] == [[b.index] * len(pkg) for b, pkg in
                                                                     zip(selected, structured)]
    assert _packages("blocks") == "blocks" and _packages("3") == 3
    report = prune(pipe, PruneConfig(packages="blocks", num_prompts=2, steps=2, batch_size=2), progress=False)
    assert report["num_packages"] == len(selected)
    assert {v["package"] for v in report["layers"].values()} == set(range(len(selected)))


def test_block_sparsity_sets_each_block_and_equal_values_are_the_uniform_run(random_dir):
    pipe = load_pipeline(random_dir)
    values = [0.2 + 0.1 * i for i in range(len(blocks(pipe.transformer)))]
    report = prune(pipe, PruneConfig(sparsity=None, block_sparsity=values, packages=2, **FAST), progress=False)
    per_block = report["block_sparsity"]
    assert list(per_block.values()) == values
    for b in blocks(pipe.transformer):  # every layer of a block at that block's value
        for name, linear in _targets(pipe).items():
            if name.startswith(b.name + "."):
                assert abs(float((linear.weight == 0).float().mean()) - per_block[b.name]) <= 0.005, name
    # the recorded target is the mean weighted by each block's weights, and the zeros add up to it
    assert min(values) < report["target_sparsity"] < max(values)
    assert abs(report["achieved_sparsity"] - report["target_sparsity"]) < 0.005
    equal = load_pipeline(random_dir)  # the same value everywhere is the paper's uniform sparsity, bit for bit
    prune(equal, PruneConfig(sparsity=None, block_sparsity=[0.5] * len(values), packages=2, **FAST), progress=False)
    uniform = load_pipeline(random_dir)
    prune(uniform, PruneConfig(sparsity=0.5, packages=2, **FAST), progress=False)
    assert all(torch.equal(a, b) for a, b in zip(equal.transformer.state_dict().values(),
                                                 uniform.transformer.state_dict().values()))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(sparsity=1.5), r"\[0, 1\)"),
        (dict(pattern="4:2", sparsity=None), "4:2"),
        (dict(method="random"), "obs-diff"),
        (dict(weighting="quadratic"), "log-decrease"),
        (dict(packages=0), "packages"),
        (dict(packages="all"), "one per block"),
        (dict(blocks="9:3"), "blocks"),
        (dict(prompts=[]), "empty"),
        (dict(refit=True, pattern="structured", sparsity=0.25), "structured OBS already"),
        (dict(damp=float("nan")), "damp must be a finite"),
        (dict(block_size=0), "block_size must be a positive integer"),
        (dict(pattern="2:4", sparsity=None, sparsity_ramp=0.1), "N:M and structured"),
        (dict(pattern="structured", sparsity=0.25, sparsity_ramp=0.1), "N:M and structured"),
        (dict(sparsity=0.5, sparsity_ramp=0.6), "smaller ramp"),
        (dict(sparsity_ramp=float("nan")), "sparsity_ramp must be a finite"),
        (dict(sparsity=None, block_sparsity=[0.5, 0.5]), "2 values but 6 blocks are selected"),
        (dict(sparsity=None, block_sparsity=[0.5] * 5 + [1.2]), r"one value in \[0, 1\)"),
        (dict(sparsity=None, block_sparsity=[0.5] * 5 + [float("nan")]), r"one value in \[0, 1\)"),
        (dict(block_sparsity=[0.5] * 6), "replaces --sparsity"),
        (dict(sparsity=None, sparsity_ramp=0.1, block_sparsity=[0.5] * 6), "replaces --sparsity"),
        (dict(pattern="2:4", sparsity=None, block_sparsity=[0.5] * 6), "N:M and structured"),
        (dict(weight_range=(0.8, float("inf"))), "finite 0 <= MIN <= MAX"),
        (dict(method="wanda", dense_targets=True), "no OBS update"),
        (dict(pattern="structured", sparsity=0.25, dense_targets=True), "unstructured and N:M"),
        (dict(calibration="cached", dense_targets=True), "--calibration exact"),
        (dict(solver="newton"), "unknown solver 'newton'"),
        (dict(method="wanda", solver="admm"), "refines an OBS solution"),
        (dict(pattern="structured", sparsity=0.25, solver="admm"), "unstructured and N:M"),
        (dict(tune_iters=-1), "tune_iters must be an integer >= 0"),
        (dict(tune_iters=2.5), "tune_iters must be an integer"),
        (dict(pattern="structured", sparsity=0.25, tune_iters=5), "--tune-iters applies to unstructured and N:M"),
        (dict(tune_iters=5, tune_lr=0.0), "tune_lr must be a finite number > 0"),
        (dict(tune_iters=5, tune_lr=float("nan")), "tune_lr must be a finite number > 0"),
        (dict(tune_iters=5, tune_max_calls=0), "tune_max_calls must be an integer >= 1"),
        # settings that would be silently ignored are refused too
        (dict(tune_lr=3e-4), "block tuning, which is off; add --tune-iters"),
        (dict(tune_max_calls=8), "block tuning, which is off; add --tune-iters"),
        (dict(refresh_every=2), "add --calibration cached"),
        (dict(cache_device="cpu"), "nothing to keep"),
        (dict(guidance=-3.0), "guidance must be a finite number >= 0"),
        (dict(guidance=float("nan")), "guidance must be a finite number >= 0"),
        (dict(weight_range=(0.0, 0.0)), "every denoising step weight 0"),
        (dict(hessian_device="tpu"), "unsupported device 'tpu' for --hessian-device"),
        (dict(calibration="cached", cache_device="gpu"), "unsupported device 'gpu' for --cache-device"),
        (dict(prompts="a red circle"), "list of strings, got str"),  # not twelve one-letter prompts
        (dict(blocks=3), "'START:END' string"),
        # Python callers: wrong types are named, not run (refit="no" would re-fit; the others failed mid-run)
        (dict(refit="no"), "refit must be True or False, got 'no'"),
        (dict(steps=2.5), "steps must be an integer or None, got 2.5"),
        (dict(num_prompts="4"), "num_prompts must be an integer, got '4'"),
        (dict(damp="0.01"), "damp must be a number, got '0.01'"),
        (dict(guidance="7"), "guidance must be a number or None"),
        (dict(batch_size=2.0), "batch_size must be an integer"),
        (dict(seed=True), "seed must be an integer"),
        (dict(weight_range=0.8), r"weight_range must be two numbers \(MIN, MAX\)"),
        (dict(weight_range=(0.8, 1.0, 1.2)), r"weight_range must be two numbers \(MIN, MAX\)"),
        (dict(head_candidates=2), "trajectory head selection, which is off"),
        (dict(pattern="structured", sparsity=0.3, trajectory_prompts=2), "trajectory head selection, which is off"),
    ],
)
def test_bad_config_is_refused_before_work(random_sd3_dir, kwargs, match):
    pipe = load_pipeline(random_sd3_dir)
    with pytest.raises(ValueError, match=match):
        prune(pipe, PruneConfig(**(FAST | kwargs)), progress=False)


def test_numpy_numbers_lists_and_torch_devices_are_accepted_settings():
    import numpy as np

    PruneConfig(steps=np.int64(2), damp=np.float32(0.01), sparsity=np.float64(0.5), weight_range=[0.8, 1.2],
                refit=np.bool_(True), calibration="cached", cache_device=torch.device("cpu")).validate()


@pytest.mark.parametrize("settings", [dict(), dict(pattern="structured", sparsity=0.3),
                                      dict(calibration="cached", packages=3)], ids=["obs", "structured", "cached"])
def test_a_layer_no_calibration_input_reached_is_refused_not_zeroed(random_sd3_dir, monkeypatch, settings):
    """An empty Hessian makes every input look dead, and OBS would zero the whole layer: refuse, naming the layer."""
    from obsdiff_lite.hessian import HessianAccumulator

    add_batch = HessianAccumulator.add_batch

    def add_batch_but_to_out(self, inputs, timestep_weight=1.0, name=None, check_finite=True):
        if "attn.to_out" not in (self.name if name is None else name):  # as if those layers never ran
            add_batch(self, inputs, timestep_weight, name, check_finite)

    monkeypatch.setattr(HessianAccumulator, "add_batch", add_batch_but_to_out)
    pipe = load_pipeline(random_sd3_dir)
    with pytest.raises(ValueError, match="no calibration input reached layer 'transformer_blocks"):
        prune(pipe, PruneConfig(**(FAST | settings)), progress=False)


@pytest.mark.parametrize("kwargs, match", [
    (dict(hessian_device="cuda"), "--hessian-device cuda was requested but this machine has no CUDA GPU"),
    (dict(tune_iters=2, cache_device="cuda:1"), "--cache-device cuda:1 was requested but this machine has no CUDA"),
    (dict(hessian_device="mps"), "--hessian-device mps was requested but this machine has no MPS device"),
    (dict(calibration="cached", cache_device="disk:/no/such/dir"), "/no/such/dir is not an existing directory"),
])
def test_devices_this_machine_lacks_are_refused_before_work(random_sd3_dir, monkeypatch, kwargs, match):
    """Where the Hessians or the cached inputs should live is checked up front (they are only touched mid-run)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    pipe = load_pipeline(random_sd3_dir)
    with pytest.raises(ValueError, match=match):
        prune(pipe, PruneConfig(**(FAST | kwargs)), progress=False)


def test_a_gpu_index_this_machine_lacks_is_refused(monkeypatch):
    """cuda:3 on a one-GPU machine failed when the model moved there ('invalid device ordinal', a traceback)."""
    from obsdiff_lite.pipelines import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("cuda:0") == torch.device("cuda:0") and resolve_device("cuda") == torch.device("cuda")
    with pytest.raises(ValueError, match=r"--device cuda:3 was requested but this machine has 1 CUDA GPU \(cuda:0\)"):
        resolve_device("cuda:3")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ValueError, match=r"--hessian-device cuda:2 .* has 2 CUDA GPUs \(cuda:0 \.\. cuda:1\)"):
        resolve_device("cuda:2", "--hessian-device")


def test_prune_names_what_it_takes(random_sd3_dir):
    with pytest.raises(TypeError, match="takes a diffusers SD3/Flux pipeline"):
        prune(None, PruneConfig(**FAST))
    with pytest.raises(TypeError, match="takes a PruneConfig, got str"):
        prune(load_pipeline(random_sd3_dir), "obs-diff")


def test_save_pipeline_names_what_it_takes(random_sd3_dir, tmp_path):
    from obsdiff_lite.surgery import save_pipeline

    with pytest.raises(TypeError, match="takes a diffusers SD3/Flux pipeline, got NoneType"):
        save_pipeline(None, tmp_path / "out", {})
    with pytest.raises(TypeError, match="takes the report dict that prune\\(\\) returned, got str"):
        save_pipeline(load_pipeline(random_sd3_dir), tmp_path / "out", "report")
    assert not (tmp_path / "out").exists()


def test_block_range_parsing():
    assert parse_block_range("1:23", 24) == list(range(1, 23))
    assert parse_block_range(":", 4) == [0, 1, 2, 3]
    assert parse_block_range(None, 2) == [0, 1]
    for bad in ("5", "3:3", "0:25", "a:b"):
        with pytest.raises(ValueError, match="blocks"):
            parse_block_range(bad, 24)


def test_guided_inputs_combine_the_cfg_halves_like_the_pipeline():
    from obsdiff_lite.calibrate import GuidedInputs

    g = torch.Generator().manual_seed(0)
    uncond, cond = torch.randn(2, 5, 8, generator=g), torch.randn(2, 5, 8, generator=g)
    batch = GuidedInputs("batch", 4.0)  # SD3: one call, [uncond; cond]
    assert torch.allclose(batch("k", torch.cat([uncond, cond])), 4.0 * cond - 3.0 * uncond)
    calls = GuidedInputs("calls", 3.5)  # Flux true CFG: a cond call, then an uncond call
    assert calls("k", cond) is None and "k" in calls.pending
    assert torch.allclose(calls("k", uncond), 3.5 * cond - 2.5 * uncond) and not calls.pending
    with pytest.raises(RuntimeError, match="halves"):
        batch("k", torch.randn(3, 5, 8))


def test_guided_hessians_end_to_end(random_dir, caplog, monkeypatch):
    """--hessian-inputs guided: one combined row per CFG pair (half the rows), different weights, same sparsity;
    without CFG it falls back to plain Hessians with a warning."""
    import obsdiff_lite.prune as prune_module
    from obsdiff_lite.calibrate import guided_inputs

    rows: dict[str, dict[str, int]] = {"plain": {}, "guided": {}}
    original = prune_module._prune_group

    def recording(linears, config, sparsity, n, m, acc, *rest):
        for name, _ in linears:
            rows[config.hessian_inputs][name] = acc.num_rows
        return original(linears, config, sparsity, n, m, acc, *rest)

    monkeypatch.setattr(prune_module, "_prune_group", recording)
    weights = {}
    for mode in ("plain", "guided"):
        pipe = load_pipeline(random_dir)
        report = prune(pipe, PruneConfig(hessian_inputs=mode, num_prompts=2, steps=2, batch_size=2), progress=False)
        assert abs(report["achieved_sparsity"] - 0.5) < 0.005
        weights[mode] = pipe.transformer.transformer_blocks[1].attn.to_out[0].weight.detach().clone()
    assert all(rows["guided"][k] * 2 == rows["plain"][k] for k in rows["plain"])
    assert not torch.equal(weights["plain"], weights["guided"])
    arch = arch_for_transformer(pipe.transformer)
    with caplog.at_level("WARNING"):
        assert guided_inputs(arch, {arch.cfg_scale_key: 1.0}, "guided") is None
    assert "without classifier-free guidance" in caplog.text
    with pytest.raises(ValueError, match="unknown hessian inputs"):
        PruneConfig(hessian_inputs="both").validate()


def test_guided_image_combines_only_image_token_inputs():
    from obsdiff_lite.arch import FLUX, SD3, reads_image_tokens_only
    from obsdiff_lite.calibrate import guided_inputs

    assert reads_image_tokens_only(SD3, "transformer_blocks.3.attn.to_q")
    assert reads_image_tokens_only(FLUX, "transformer_blocks.0.ff.net.2")
    assert not reads_image_tokens_only(SD3, "transformer_blocks.3.attn.add_q_proj")  # text stream
    assert not reads_image_tokens_only(FLUX, "single_transformer_blocks.2.attn.to_q")  # text and image tokens
    with pytest.raises(ValueError, match="not in any block list"):
        reads_image_tokens_only(SD3, "proj_out")
    guided = guided_inputs(FLUX, {"true_cfg_scale": 4.0, "negative_prompt": ""}, "guided-image")
    cond, uncond = torch.ones(1, 3, 4), torch.zeros(1, 3, 4)
    text_key = "transformer_blocks.0.ff_context.net.2"
    assert guided(text_key, cond) is cond and guided(text_key, uncond) is uncond  # both halves, unchanged
    image_key = "transformer_blocks.0.ff.net.2"
    assert guided(image_key, cond) is None and torch.equal(guided(image_key, uncond), 4.0 * cond)


def test_guided_inputs_follow_whether_the_pipeline_really_runs_cfg():
    """One description of CFG (arch.cfg_scale) serves the planner and the guided Hessians: Flux runs true CFG only
    with a negative prompt (else its single calls must not be paired), SD3 defaults to CFG 7."""
    from obsdiff_lite.arch import FLUX, SD3, cfg_factors, cfg_scale
    from obsdiff_lite.calibrate import guided_inputs

    assert cfg_scale(FLUX, {"true_cfg_scale": 4.0}) is None and cfg_factors(FLUX, {"true_cfg_scale": 4.0}) == (1, 1)
    assert guided_inputs(FLUX, {"true_cfg_scale": 4.0}, "guided") is None
    flux_cfg = {"true_cfg_scale": 4.0, "negative_prompt": ""}
    assert cfg_factors(FLUX, flux_cfg) == (1, 2) and guided_inputs(FLUX, flux_cfg, "guided").scale == 4.0
    assert cfg_factors(SD3, {}) == (2, 1) and guided_inputs(SD3, {}, "guided").scale == 7.0
    assert cfg_factors(SD3, {"guidance_scale": 1.0}) == (1, 1)


def test_calibration_stops_at_the_first_call_with_non_finite_activations(random_dir):
    """Hooks skip the per-layer check (a host sync each on a GPU); the per-call check still names the layer."""
    pipe = load_pipeline(random_dir)
    arch = arch_for_transformer(pipe.transformer)
    block = blocks(pipe.transformer, arch)[-1]
    unit = block_units(block)[0]
    key = f"{block.name}.{unit[0][0]}"
    linear = getattr_linear(block.module, unit[0][0])
    calls = []
    pipe.transformer.register_forward_pre_hook(lambda m, a: calls.append(1))
    linear.register_forward_pre_hook(lambda m, a: (torch.full_like(a[0], float("nan")),))
    call = call_kwargs(pipe.obsdiff_generation) | {"num_inference_steps": 3}
    with pytest.raises(ValueError, match=rf"{key}.*NaN/inf"):
        calibrate(pipe, arch, {key: linear}, ["a red circle"], call, progress=False)
    assert len(calls) == 1


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_sd35_dual_attention_is_pruned_like_the_other_linears(random_sd35_dual_dir, pattern):
    """SD3.5-medium's image-only attn2 is a data change in arch: its q/k/v share one Hessian, to_out another."""
    pipe = load_pipeline(random_sd35_dual_dir)
    arch = arch_for_transformer(pipe.transformer)
    first = blocks(pipe.transformer, arch)[0]
    groups = [g for unit in block_units(first) for g in unit]
    assert ["attn2.to_q", "attn2.to_k", "attn2.to_v"] in groups and ["attn2.to_out.0"] in groups
    assert not any(n.startswith("attn2") for unit in block_units(blocks(pipe.transformer, arch)[3]) for g in unit for n in g)
    before = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    sparsity = 0.5 if pattern == "unstructured" else None
    prune(pipe, PruneConfig(pattern=pattern, sparsity=sparsity, packages=2, **FAST), progress=False)
    targets = _targets(pipe)
    assert sum(".attn2." in name for name in targets) == 3 * 4
    for name, linear in targets.items():
        if pattern == "unstructured":
            assert abs(float((linear.weight == 0).float().mean()) - 0.5) <= 0.005, name
        else:
            assert bool(((linear.weight == 0).reshape(linear.out_features, -1, 4).sum(-1) >= 2).all()), name
    changed = {k for k, v in pipe.transformer.state_dict().items() if not torch.equal(v, before[k])}
    assert {k.removesuffix(".weight") for k in changed} == set(targets)
    (latents,) = run_pipeline(pipe, ["a red circle"], 0, call_kwargs(pipe.obsdiff_generation), progress=False,
                              output_type="latent")
    assert torch.isfinite(latents).all()


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_refit_keeps_the_obs_masks_and_lowers_every_layers_error(random_dir, pattern):
    """--refit changes only the kept weights: the same zeros as plain OBS-Diff, each layer's error at most OBS's."""
    sparsity = 0.6 if pattern == "unstructured" else None
    config = dict(pattern=pattern, sparsity=sparsity, packages=1, **FAST)
    plain, refit = load_pipeline(random_dir), load_pipeline(random_dir)
    plain_report = prune(plain, PruneConfig(**config), progress=False)
    report = prune(refit, PruneConfig(refit=True, **config), progress=False)
    targets, plain_targets = _targets(refit), _targets(plain)
    assert set(report["layers"]) == set(targets)
    for name, linear in targets.items():
        assert torch.equal(linear.weight == 0, plain_targets[name].weight == 0), name
        layer = report["layers"][name]
        assert layer["recon_error_obs"] == pytest.approx(plain_report["layers"][name]["recon_error"], rel=1e-5)
        assert layer["recon_error"] <= layer["recon_error_obs"] * (1 + 1e-6), name
        assert 0 < layer["refit_iters"] <= 100 and not layer["refit_kept_start"]
    total = sum(v["recon_error"] for v in report["layers"].values())
    assert total < 0.95 * sum(v["recon_error_obs"] for v in report["layers"].values())
    assert report["config"]["refit"] is True


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_admm_solver_lowers_every_layers_error_below_obs_at_the_same_sparsity(random_dir, pattern):
    """--solver admm, one package (every Hessian from the dense model): each layer starts from the plain OBS-Diff run's
    solution (same error recorded), ends at or below it with the requested zeros (one budget per layer, where OBS
    has one per 128-column block: a weight apart), and in total well below."""
    sparsity = 0.6 if pattern == "unstructured" else None
    config = dict(pattern=pattern, sparsity=sparsity, packages=1, **FAST)
    plain, admm = load_pipeline(random_dir), load_pipeline(random_dir)
    plain_report = prune(plain, PruneConfig(**config), progress=False)
    report = prune(admm, PruneConfig(solver="admm", **config), progress=False)
    targets = _targets(admm)
    assert set(report["layers"]) == set(targets) and report["config"]["solver"] == "admm"
    for name, linear in targets.items():
        layer = report["layers"][name]
        if pattern == "unstructured":
            assert int((linear.weight == 0).sum()) == int(linear.weight.numel() * 0.6), name
            assert abs(layer["sparsity"] - plain_report["layers"][name]["sparsity"]) < 0.001, name
        assert layer["recon_error_obs"] == pytest.approx(plain_report["layers"][name]["recon_error"], rel=1e-5)
        assert layer["recon_error"] <= layer["recon_error_obs"] * (1 + 1e-6), name
        assert layer["admm_iters"] > 0
    if pattern == "2:4":
        for linear in targets.values():
            assert bool(((linear.weight == 0).reshape(linear.weight.shape[0], -1, 4).sum(-1) >= 2).all())
    total = sum(v["recon_error"] for v in report["layers"].values())
    assert total < 0.9 * sum(v["recon_error_obs"] for v in report["layers"].values())


@pytest.mark.parametrize("method", ["magnitude", "wanda"])
def test_refit_of_a_baseline_keeps_its_mask_and_solves_its_weights(random_sd3_dir, method):
    """--method wanda --refit: Wanda's zeros, least-squares weights (what the mask costs, without the update's cost)."""
    config = dict(method=method, pattern="2:4", sparsity=None, packages=1, **FAST)
    plain, refit = load_pipeline(random_sd3_dir), load_pipeline(random_sd3_dir)
    prune(plain, PruneConfig(**config), progress=False)
    report = prune(refit, PruneConfig(refit=True, **config), progress=False)
    for name, linear in _targets(refit).items():
        before = _targets(plain)[name].weight
        assert torch.equal(linear.weight == 0, before == 0), name
        assert not torch.equal(linear.weight, before), name
        layer = report["layers"][name]
        assert layer["recon_error"] <= layer["recon_error_obs"] * (1 + 1e-6) and layer["refit_iters"] > 0


def test_dense_reference_drift_equals_closed_form_and_stops_after_the_last_block(random_sd3_dir):
    """With block 0 changed after the dense copy was made, the drift a later layer records equals
    2 sum_t a_t (X_dense - X)^T X / sum_t a_t rows_t from the inputs both models' layers saw; the copy stops early."""
    import copy

    from obsdiff_lite.calibrate import DenseReference

    pipe = load_pipeline(random_sd3_dir)
    arch = arch_for_transformer(pipe.transformer)
    dense = DenseReference(copy.deepcopy(pipe.transformer))
    with torch.no_grad():
        pipe.transformer.transformer_blocks[0].ff.net[2].weight[:, ::2] = 0.0  # "prune" block 0
    linear = pipe.transformer.transformer_blocks[2].attn.to_q
    call = call_kwargs(pipe.obsdiff_generation) | {"num_inference_steps": 3}
    prompts = ["a small blue cross in the center", "a large green square at the top right"]
    tracker = StepTracker(pipe.scheduler, arch.timestep_scale)
    recorded, dense_recorded, later_calls = [], [], []
    hooks = [pipe.transformer.register_forward_pre_hook(tracker.pre_hook, with_kwargs=True),
             linear.register_forward_pre_hook(lambda m, a: recorded.append((tracker.step_index, a[0].double()))),
             dense.transformer.transformer_blocks[2].attn.to_q.register_forward_pre_hook(
                 lambda m, a: dense_recorded.append(a[0].double())),
             dense.transformer.transformer_blocks[3].register_forward_pre_hook(lambda m, a: later_calls.append(1))]
    try:
        run_pipeline(pipe, prompts, 0, call, batch_size=2, output_type="latent", progress=False)  # the dense copy idle
        assert not dense_recorded
        recorded.clear()
        calibrate(pipe, arch, {"q": linear}, prompts, call, weighting="log-decrease", batch_size=2, progress=False,
                  dense=dense, last_block=pipe.transformer.transformer_blocks[2])
    finally:
        for h in hooks:
            h.remove()
    drift = dense.drifts["q"].drift.double()
    alpha = timestep_weights("log-decrease", 3)
    rows = [(i, x.reshape(-1, x.shape[-1]), xd.reshape(-1, x.shape[-1])) for (i, x), xd in zip(recorded, dense_recorded)]
    expected = sum(alpha[i] * 2 * (xd - x).T @ x for i, x, xd in rows) / sum(alpha[i] * x.shape[0] for i, x, _ in rows)
    assert len(recorded) == len(dense_recorded) == 3 and not later_calls  # one copy call per call, stopped at block 2
    assert expected.abs().max() > 1e-3  # block 0's change reached block 2
    assert torch.allclose(drift, expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))
    assert not pipe.transformer._forward_pre_hooks and not dense.transformer.transformer_blocks[2]._forward_hooks


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_dense_targets_change_only_the_packages_after_the_first(random_dir, pattern):
    """Package 1 sees the dense model's own inputs (no drift): bit-identical to OBS-Diff. Later packages move their
    weights towards the dense outputs before OBS, with the same sparsity or N:M pattern; no hook is left behind."""
    sparsity = 0.5 if pattern == "unstructured" else None
    config = dict(pattern=pattern, sparsity=sparsity, packages=2, **FAST)
    plain, dense = load_pipeline(random_dir), load_pipeline(random_dir)
    plain_report = prune(plain, PruneConfig(**config), progress=False)
    report = prune(dense, PruneConfig(dense_targets=True, **config), progress=False)
    targets, plain_targets = _targets(dense), _targets(plain)
    for name, linear in targets.items():
        layer = report["layers"][name]
        same = torch.equal(linear.weight, plain_targets[name].weight)
        assert same == (layer["package"] == 0) == (layer["dense_target_shift"] == 0.0), name
        assert layer["sparsity"] == pytest.approx(plain_report["layers"][name]["sparsity"], abs=1e-9), name
    assert report["config"]["dense_targets"] is True
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in dense.transformer.modules())


def test_dense_targets_with_one_package_are_obs_diff_bit_for_bit(random_sd3_dir):
    config = dict(pattern="2:4", sparsity=None, packages=1, **FAST)
    plain, dense = load_pipeline(random_sd3_dir), load_pipeline(random_sd3_dir)
    prune(plain, PruneConfig(**config), progress=False)
    prune(dense, PruneConfig(dense_targets=True, **config), progress=False)
    assert all(torch.equal(a, b) for a, b in zip(plain.transformer.state_dict().values(),
                                                 dense.transformer.state_dict().values()))


def test_weights_that_do_not_fit_the_model_dtype_are_refused_not_written_as_inf(random_sd3_dir, monkeypatch):
    """An OBS update beyond float16's range (65504) became inf silently when written back into a float16 model."""
    import obsdiff_lite.prune as prune_module
    from obsdiff_lite.obs import cast_weight

    big = torch.full((2, 2), 1e5)
    assert torch.equal(cast_weight(big, torch.bfloat16), big.to(torch.bfloat16))  # bfloat16 holds it
    with pytest.raises(ValueError, match="'blk.to_q'.*do not fit float16.*1e\\+05"):
        cast_weight(big, torch.float16, "blk.to_q")

    solve = prune_module.sparsify_weights

    def overflowing(weights, *args, **kwargs):
        return [(w * 0 + 1e5, keep, stats) for w, keep, stats in solve(weights, *args, **kwargs)]

    monkeypatch.setattr(prune_module, "sparsify_weights", overflowing)
    pipe = load_pipeline(random_sd3_dir, dtype="float16")
    with pytest.raises(ValueError, match="transformer_blocks.0.attn.to_q.*do not fit float16"):
        prune(pipe, PruneConfig(**FAST), progress=False)


def test_calibrate_refuses_prompts_groups_and_batches_it_cannot_use(random_sd3_dir):
    """The notebooks' lower-level entry point: a bare string calibrated on one-letter prompts, no prompts blamed the
    layers ('no calibration input reached ... check --blocks'), batch_size 0 failed inside range()."""
    from obsdiff_lite.pipelines import pipeline_call, run_pipeline

    pipe = load_pipeline(random_sd3_dir)
    arch, call = arch_for_transformer(pipe.transformer), pipeline_call(pipe, steps=2)
    name = "transformer_blocks.0.attn.to_q"
    groups = {name: pipe.transformer.get_submodule(name)}
    for prompts, match in (("a red circle", "list of strings, got str .*prompts=\\[...\\]"),
                           ([], "prompt list is empty"), (["a", 3], "list of strings")):
        with pytest.raises(ValueError, match=match):
            calibrate(pipe, arch, groups, prompts, call, progress=False)
    with pytest.raises(ValueError, match="'transformer_blocks.0.attn.to_q' is a SD3Transformer2DModel"):
        calibrate(pipe, arch, {name: pipe.transformer}, ["a"], call, progress=False)
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1, got 0"):
        calibrate(pipe, arch, groups, ["a"], call, batch_size=0, progress=False)
    assert run_pipeline(pipe, [], 0, call, progress=False, output_type="latent") == []  # a rank with no prompts

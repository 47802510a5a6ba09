"""Cached calibration: same Hessians as exact mode for one package; block propagation equals a forward."""

from __future__ import annotations

import pytest
import torch

from obsdiff_lite.arch import arch_for_transformer, blocks
from obsdiff_lite.cached import capture_block_inputs, propagate
from obsdiff_lite.pipelines import call_kwargs, load_pipeline
from obsdiff_lite.prune import PruneConfig, prune

FAST = dict(num_prompts=3, steps=3, batch_size=3)


@pytest.mark.parametrize("solver", ["obs", "admm"])
def test_one_package_cached_equals_exact(random_dir, solver):
    """With one package both modes see the dense trajectory: pruned weights agree to float tolerance (with either
    solver: ADMM's mask moves do not amplify the float differences of the two modes' Hessians)."""
    states = {}
    for mode in ("exact", "cached"):
        pipe = load_pipeline(random_dir)
        report = prune(pipe, PruneConfig(sparsity=0.5, packages=1, calibration=mode, solver=solver, **FAST),
                       progress=False)
        states[mode] = pipe.transformer.state_dict()
    assert report["cache"]["trajectory_passes"] == 1 and report["cache"]["cache_bytes"] > 0
    for key, exact in states["exact"].items():
        cached = states["cached"][key]
        # Same masks almost everywhere; the kept weights agree to float tolerance.
        same_mask = ((exact == 0) == (cached == 0)).float().mean()
        assert same_mask > 0.995, key
        both = (exact != 0) & (cached != 0)
        assert torch.allclose(exact[both], cached[both], rtol=1e-3, atol=1e-5), key


def test_block_propagation_equals_full_forward(random_dir):
    """Running cached block inputs through the (pruned) blocks gives the inputs the real forward sees."""
    pipe = load_pipeline(random_dir)
    prune(pipe, PruneConfig(method="magnitude", sparsity=0.5, packages=1, **FAST), progress=False)
    arch = arch_for_transformer(pipe.transformer)
    chain = blocks(pipe.transformer, arch)
    call = call_kwargs(pipe.obsdiff_generation) | {"num_inference_steps": 2}
    prompts = ["a large red circle at the top left", "a small cyan cross in the center"]
    at_first = capture_block_inputs(pipe, arch, chain[0], prompts, call, 0, 2, progress=False)
    at_last = capture_block_inputs(pipe, arch, chain[-1], prompts, call, 0, 2, progress=False)
    carried = propagate(at_first, chain[:-1])
    assert len(carried) == len(at_last) > 0
    for mine, real in zip(carried, at_last):
        assert mine.step_index == real.step_index
        for key in ("hidden_states", "encoder_hidden_states"):
            assert torch.allclose(mine.kwargs[key], real.kwargs[key], rtol=1e-4, atol=1e-5)


def test_cached_mode_runs_one_trajectory_for_many_packages(random_sd3_dir):
    pipe = load_pipeline(random_sd3_dir)
    report = prune(pipe, PruneConfig(sparsity=0.5, packages=12, calibration="cached", **FAST), progress=False)
    assert report["cache"]["trajectory_passes"] == 1
    assert abs(report["achieved_sparsity"] - 0.5) < 0.005
    pipe = load_pipeline(random_sd3_dir)
    report = prune(pipe, PruneConfig(sparsity=0.5, packages=4, calibration="cached", refresh_every=2, **FAST), progress=False)
    assert report["cache"]["trajectory_passes"] == 2


def test_disk_cache_gives_identical_weights_and_cleans_up(random_sd3_dir, tmp_path):
    """Memory-mapped cache files on disk change where the cache lives, not a single weight."""
    states = {}
    for where in (None, f"disk:{tmp_path}"):
        pipe = load_pipeline(random_sd3_dir)
        prune(pipe, PruneConfig(sparsity=0.5, packages=3, calibration="cached", cache_device=where, **FAST), progress=False)
        states[where] = pipe.transformer.state_dict()
    assert all(torch.equal(states[None][k], states[f"disk:{tmp_path}"][k]) for k in states[None])
    assert list(tmp_path.iterdir()) == [], "cache files must be deleted after the run"


def test_plan_counts_a_disk_cache_on_disk(random_sd3_dir):
    from obsdiff_lite.plan import plan_memory

    pipe = load_pipeline(random_sd3_dir)
    plan = plan_memory(pipe, PruneConfig(sparsity=0.5, calibration="cached", cache_device="disk", **FAST))
    assert "disk" in plan.devices and plan.peak_bytes("disk") > 0


@pytest.mark.parametrize("hessian_inputs", ["plain", "guided"])
def test_propagated_hessians_equal_exact_ones_when_nothing_changes(random_dir, monkeypatch, hessian_inputs):
    """Sparsity 0 leaves every weight as it is, so exact mode re-samples the dense trajectory for every package and
    cached mode's block-by-block inputs must give the same Hessians for every package (later ones propagated)."""
    import obsdiff_lite.prune as prune_module

    seen: dict[str, dict[str, torch.Tensor]] = {"exact": {}, "cached": {}}
    original = prune_module._prune_group

    def recording(linears, config, sparsity, n, m, acc, *rest):
        for name, _ in linears:
            seen[config.calibration][name] = acc.hessian.clone()
        return original(linears, config, sparsity, n, m, acc, *rest)

    monkeypatch.setattr(prune_module, "_prune_group", recording)
    for mode in ("exact", "cached"):
        prune(load_pipeline(random_dir), PruneConfig(sparsity=0.0, packages="blocks", calibration=mode,
                                                     hessian_inputs=hessian_inputs, **FAST), progress=False)
    assert seen["exact"].keys() == seen["cached"].keys() and len(seen["exact"]) > 8
    for name, exact in seen["exact"].items():
        assert torch.allclose(seen["cached"][name], exact, rtol=1e-4, atol=1e-6), name


def test_cached_calibration_names_the_layer_with_non_finite_inputs(random_sd3_dir):
    """Cached mode runs later packages' blocks without calling the transformer: leaving the collection still checks."""
    pipe = load_pipeline(random_sd3_dir)
    last = blocks(pipe.transformer)[-1]
    linear = last.module.get_submodule("ff.net.2")
    in_transformer = []  # NaN only in block-by-block propagation, so the dense trajectory stays finite
    pipe.transformer.register_forward_pre_hook(lambda m, a: in_transformer.append(1))
    pipe.transformer.register_forward_hook(lambda m, a, o: in_transformer.clear())
    linear.register_forward_pre_hook(lambda m, a: None if in_transformer else (torch.full_like(a[0], float("nan")),))
    with pytest.raises(ValueError, match=rf"activations of layer '{last.name}\.ff\.net\.2' contain NaN/inf"):
        prune(pipe, PruneConfig(sparsity=0.5, packages="blocks", calibration="cached", **FAST), progress=False)


def test_propagation_moves_every_cached_input_to_the_blocks_device(random_dir):
    """The cache can live on another device than the blocks (--cache-device cpu with a GPU model): every input,
    temb and rotary embeddings included, must be moved. Blocks on the meta device stand in for a GPU here: an input
    left on the CPU fails as it would on CUDA."""
    import copy

    from obsdiff_lite.arch import Block

    pipe = load_pipeline(random_dir)
    arch = arch_for_transformer(pipe.transformer)
    chain = blocks(pipe.transformer, arch)
    call = call_kwargs(pipe.obsdiff_generation) | {"num_inference_steps": 2}
    cache = capture_block_inputs(pipe, arch, chain[0], ["a small cyan cross in the center"], call, 0, 1, progress=False)
    on_meta = [Block(b.index, b.name, b.spec, copy.deepcopy(b.module).to("meta")) for b in chain[:2]]
    assert propagate(cache, on_meta, keep=False) == []  # ran every call through both blocks without a device error


def test_to_device_moves_nested_inputs_and_casts_only_floating_ones():
    from obsdiff_lite.cached import to_device

    value = {"temb": torch.randn(2, 4), "rotary": (torch.randn(3, 2), torch.randn(3, 2)), "ids": torch.arange(3),
             "attention_kwargs": None, "lists": [torch.ones(1)]}
    moved = to_device(value, "meta", torch.float16)
    assert moved["temb"].device.type == "meta" and moved["temb"].dtype == torch.float16
    assert all(t.device.type == "meta" and t.dtype == torch.float16 for t in moved["rotary"])
    assert isinstance(moved["rotary"], tuple) and isinstance(moved["lists"], list)
    assert moved["ids"].device.type == "meta" and moved["ids"].dtype == torch.int64
    assert moved["attention_kwargs"] is None and moved["lists"][0].device.type == "meta"

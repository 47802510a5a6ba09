"""Notebook helpers of 04/06/08 (obsdiff_lite.viz) on random-init tiny pipelines and the meta-device SD3-medium."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pytest
import torch

from obsdiff_lite.arch import arch_for_transformer, block_units, blocks, build_full_size_transformer
from obsdiff_lite.cached import capture_block_inputs
from obsdiff_lite.pipelines import call_kwargs, load_pipeline
from obsdiff_lite.prune import PruneConfig, default_prompts, prune
from obsdiff_lite.viz import (
    format_bytes,
    config_sweep,
    image_rows,
    layer_sparsity_range,
    nm_valid,
    num_units,
    package_infos,
    package_sweep,
    pick,
    plot_package_map,
    recon_errors,
    resolve_packages,
    runs_table,
    same_pruning,
    setting_label,
    show_setting,
    snapshot,
    sparsity_sweep,
    target_linears,
    trajectory_cache_bytes,
)


def test_setting_labels():
    assert setting_label("unstructured", 0.5) == "50%"
    assert setting_label("2:4", None) == "2:4"
    assert setting_label("dense", 0.0) == "dense"


def test_packages_cover_every_layer_once_in_block_order(random_dir):
    transformer = load_pipeline(random_dir).transformer
    layers = list(target_linears(transformer))
    units = num_units(transformer)
    assert resolve_packages(transformer, "all") == units and resolve_packages(transformer, 3) == 3
    for bad, match in (("blocks", "is a prune\\(\\) setting"), ("4", "got '4'"), (0, "got 0")):  # int("blocks") crashed
        with pytest.raises(ValueError, match=match):
            resolve_packages(transformer, bad)
    for g in (1, 2, 4, "all"):
        infos = package_infos(transformer, g)
        assert len(infos) == resolve_packages(transformer, g)
        assert [name for p in infos for name in p.layers] == layers  # every layer once, in forward order
        assert sum(len(p.units) for p in infos) == units
        assert sum(p.hessian_bytes for p in infos) == package_infos(transformer, 1)[0].hessian_bytes
    # Parallel sets stay together: each block unit's linears all land in one package.
    where = {name: p.index for p in package_infos(transformer, 4) for name in p.layers}
    for block in blocks(transformer):
        for unit in block_units(block):
            assert len({where[f"{block.name}.{n}"] for group in unit for n in group}) == 1


def test_hessian_bytes_sd3_medium_on_meta():
    transformer = build_full_size_transformer("sd3-medium")
    d, f = 1536, 4 * 1536
    per_block = 6 * d * d + 2 * f * f  # qkv, add-qkv, out, add-out, ff up x2; ff down x2
    last = 4 * d * d + f * f  # context_pre_only: no to_add_out, no ff_context
    total = (23 * per_block + last) * 4
    assert package_infos(transformer, 1)[0].hessian_bytes == total
    assert resolve_packages(transformer, "all") == 24 * 4
    assert max(p.hessian_bytes for p in package_infos(transformer, 4)) < total / 3
    assert format_bytes(total).endswith("GB")


def test_trajectory_cache_bytes_matches_the_cached_run(random_sd3_dir):
    pipe = load_pipeline(random_sd3_dir)
    config = PruneConfig(sparsity=0.5, packages=2, calibration="cached", num_prompts=2, batch_size=2)
    call = call_kwargs(pipe.obsdiff_generation)
    prompts = default_prompts(pipe, 2, 0)
    record = capture_block_inputs(pipe, arch_for_transformer(pipe.transformer), blocks(pipe.transformer)[0],
                                  prompts, call, 0, 2, progress=False)[0].kwargs
    report = prune(pipe, config, progress=False)
    cfg = record["hidden_states"].shape[0] // 2
    expected = trajectory_cache_bytes(2, call["num_inference_steps"], record["hidden_states"].shape[1],
                                      record["encoder_hidden_states"].shape[1], record["hidden_states"].shape[2],
                                      cfg=cfg, bytes_per_value=4)
    assert report["cache"]["cache_bytes"] == expected


def test_sparsity_sweep_restores_dense_and_hits_targets(random_sd3_dir):
    pipe = load_pipeline(random_sd3_dir)
    dense = snapshot(pipe.transformer)
    runs = sparsity_sweep(None, ["magnitude", "obs-diff"], [0.5], ["2:4"], num_calibration_prompts=2,
                          num_eval_prompts=4, pipe=pipe, keep_weights=True)
    assert [r.name for r in runs] == ["dense", "magnitude 50%", "obs-diff 50%", "magnitude 2:4", "obs-diff 2:4"]
    assert all(torch.equal(v, dense[k]) for k, v in pipe.transformer.state_dict().items())  # left dense
    for r in runs[1:]:
        lo, hi = layer_sparsity_range(r.report)
        assert abs(lo - 0.5) <= 0.005 and abs(hi - 0.5) <= 0.005
        assert r.images.shape == runs[0].images.shape and {"full", "psnr", "ssim"} <= set(r.scores)
    for r in pick(runs, pattern="2:4"):
        assert nm_valid(r.weights, 2, 4)
    assert not nm_valid(pipe.transformer, 2, 4)  # the dense model is not 2:4
    assert recon_errors(pick(runs, method="obs-diff", setting="50%")[0].report)
    assert recon_errors(pick(runs, method="magnitude", setting="50%")[0].report) == {}
    assert "obs-diff 2:4" in runs_table(runs)
    picture = image_rows({"a": runs[0].images, "b": runs[1].images}, n=3, scale=2, captions=["x"] * 3,
                         marks={"a": [True, False, True]})
    assert picture.size[0] > 3 * 64 and picture.size[1] > 2 * 64
    from obsdiff_lite.evaluate import shapebench_prompts

    specs, _ = shapebench_prompts(4, 0)
    assert show_setting(runs, "2:4", specs, n=4) is not None
    with pytest.raises(ValueError):
        show_setting(runs, "70%", specs)


def test_sparsity_sweep_refit_label_runs_the_refit_on_the_same_masks(random_sd3_dir):
    pipe = load_pipeline(random_sd3_dir)
    runs = sparsity_sweep(None, ["obs-diff", "obs-diff+refit"], [], ["2:4"], num_calibration_prompts=2,
                          num_eval_prompts=2, pipe=pipe, keep_weights=True)
    plain, refit = runs[1:]
    assert refit.name == "obs-diff+refit 2:4" and refit.report["config"]["refit"] is True
    assert plain.report["config"]["refit"] is False
    assert all(torch.equal(refit.weights[k] == 0, plain.weights[k] == 0) for k in plain.weights)
    assert sum(recon_errors(refit.report).values()) < sum(recon_errors(plain.report).values())
    with pytest.raises(ValueError, match="l1-norm"):
        sparsity_sweep(None, ["l1-norm+refit"], [0.5], num_calibration_prompts=2, num_eval_prompts=2, pipe=pipe)


def test_sparsity_sweep_admm_label_runs_the_admm_solver(random_sd3_dir):
    pipe = load_pipeline(random_sd3_dir)
    runs = sparsity_sweep(None, ["obs-diff", "obs-diff+admm"], [], ["2:4"], num_calibration_prompts=2,
                          num_eval_prompts=2, pipe=pipe)
    plain, admm = runs[1:]
    assert admm.name == "obs-diff+admm 2:4" and admm.report["config"]["solver"] == "admm"
    assert plain.report["config"]["solver"] == "obs"
    assert sum(recon_errors(admm.report).values()) < sum(recon_errors(plain.report).values())
    with pytest.raises(ValueError, match="refines an OBS solution"):
        sparsity_sweep(None, ["wanda+admm"], [0.5], num_calibration_prompts=2, num_eval_prompts=2, pipe=pipe)


def test_package_sweep_cached_one_package_equals_exact(random_sd3_dir):
    pipe = load_pipeline(random_sd3_dir)
    runs = package_sweep(None, [1, "all"], ["exact", "cached"], num_calibration_prompts=2, num_eval_prompts=2,
                         pipe=pipe, keep_weights=True)
    expected = [("exact", 1), ("exact", 24), ("cached", 1), ("cached", 24)]
    assert [(r.calibration, r.packages) for r in runs[1:]] == expected
    exact, cached = pick(runs, calibration="exact", packages=1)[0], pick(runs, calibration="cached", packages=1)[0]
    assert same_pruning(exact.weights, cached.weights)
    assert all(r.report["cache"]["trajectory_passes"] == 1 for r in pick(runs, calibration="cached"))
    assert all(r.wall_s > 0 for r in runs[1:])
    ax = plot_package_map(pipe.transformer, [1, 4, "all"])
    assert len(ax.get_yticklabels()) == 3
    assert np.isfinite([r.scores["full"] for r in runs]).all()


def test_config_sweep_labels_runs_and_prunes_only_what_each_config_asks(random_sd3_dir):
    pipe = load_pipeline(random_sd3_dir)
    dense = snapshot(pipe.transformer)
    configs = [("block 1", PruneConfig(pattern="2:4", sparsity=None, blocks="1:2", packages=1, num_prompts=2)),
               ("ramp", PruneConfig(sparsity=0.5, sparsity_ramp=0.1, packages=1, num_prompts=2))]
    runs = config_sweep(None, configs, num_eval_prompts=2, pipe=pipe, keep_weights=True)
    assert [r.name for r in runs] == ["dense", "block 1 2:4", "ramp 50%"]
    assert all(torch.equal(v, dense[k]) for k, v in pipe.transformer.state_dict().items())  # left dense
    block = runs[1]
    assert block.report["blocks"] == [1] and set(block.report["layers"]) == {
        k for k in target_linears(pipe.transformer) if k.startswith("transformer_blocks.1.")}
    for name, weight in block.weights.items():  # the other blocks kept their dense weights
        if not name.startswith("transformer_blocks.1."):
            assert torch.equal(weight, dense[name + ".weight"]), name
    ramp = runs[2].report
    assert abs(ramp["achieved_sparsity"] - 0.5) < 0.005
    per_block = list(ramp["block_sparsity"].values())
    assert per_block == sorted(per_block) and per_block[-1] - per_block[0] > 0.19  # s - 0.1 ... s + 0.1


def test_every_unstructured_method_has_a_colour():
    from obsdiff_lite.prune import METHODS
    from obsdiff_lite.viz import ADMM_SUFFIX, METHOD_COLORS, REFIT_SUFFIX

    unstructured = set(METHODS) - {"l1-norm"}  # l1-norm removes whole heads and neurons (viz_structured)
    suffixed = {m + suffix for m in ("obs-diff", "sparsegpt") for suffix in (REFIT_SUFFIX, ADMM_SUFFIX)}
    assert unstructured | suffixed <= set(METHOD_COLORS)

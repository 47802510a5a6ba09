"""Course helpers (obsdiff_lite.course) on random-init tiny SD3/Flux pipelines: step-local swaps, per-step Hessians."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from obsdiff_lite.arch import arch_for_transformer
from obsdiff_lite.calibrate import calibrate
from obsdiff_lite.course import (
    InputRecord,
    architecture_summary,
    block_linears,
    cfg_halves,
    closed_form_hessian,
    combine_step_hessians,
    decode_latents,
    detection_captions,
    format_summary,
    group_representatives,
    image_mse,
    latent_divergence,
    perturb_at_steps,
    pick_layer,
    pipeline_call,
    record_inputs,
    relative_frobenius,
    run_with_trajectory,
    step_hessians,
    sweep_single_steps,
)
from obsdiff_lite.hessian import HessianAccumulator
from obsdiff_lite.pipelines import load_pipeline
from obsdiff_lite.schedules import timestep_weights
from obsdiff_lite.shapes.dataset import make_dataset

PROMPTS = ["a small red circle in the center", "a large blue cross at the top left"]


def test_summary_counts_blocks_and_linears(random_dir):
    pipe = load_pipeline(random_dir)
    summary = architecture_summary(pipe)
    assert summary["hidden"] == summary["heads"] * summary["head_dim"] == 64
    assert summary["prunable_linears"] == len(block_linears(pipe.transformer))
    assert summary["params"]["transformer"] == sum(p.numel() for p in pipe.transformer.parameters())
    assert summary["pipeline"] in format_summary(summary)
    reps = group_representatives(pipe.transformer)
    assert set(reps) <= set(block_linears(pipe.transformer)) and len(reps) < summary["prunable_linears"]


def test_pipeline_call_overrides_steps_and_cfg(random_dir):
    pipe = load_pipeline(random_dir)
    call = pipeline_call(pipe, steps=2, guidance=1.5)
    assert call["num_inference_steps"] == 2
    assert 1.5 in (call.get("guidance_scale"), call.get("true_cfg_scale"))
    assert not any(k.startswith("_") for k in call)


def test_perturb_at_one_step_leaves_earlier_steps_and_weights_alone(random_dir):
    pipe = load_pipeline(random_dir)
    call = pipeline_call(pipe, steps=3)
    linears = block_linears(pipe.transformer)
    before = {k: lin.weight.detach().clone() for k, lin in linears.items()}
    replacements = {lin: torch.zeros_like(lin.weight) for lin in linears.values()}
    runs = sweep_single_steps(pipe, PROMPTS, 0, call, replacements, [1])
    dense, hit = runs["dense"], runs[1]
    assert dense.latents.shape[0] == 3 and dense.images.dtype == np.uint8
    assert torch.equal(hit.latents[0], dense.latents[0])  # step 0 ran with the original weights
    assert not torch.equal(hit.latents[1], dense.latents[1])  # step 1 did not
    assert all(torch.equal(before[k], lin.weight) for k, lin in linears.items())  # restored
    with perturb_at_steps(pipe, replacements, []):
        images, _ = run_with_trajectory(pipe, PROMPTS, 0, call)
    assert np.array_equal(images, dense.images)
    assert image_mse(dense.images, dense.images) == 0.0
    assert float(latent_divergence(hit.latents, dense.latents)[0]) == 0.0


def test_decode_latents_matches_the_pipeline(random_dir):
    pipe = load_pipeline(random_dir)
    call = pipeline_call(pipe, steps=2)
    images, latents = run_with_trajectory(pipe, PROMPTS, 0, call)
    assert np.array_equal(decode_latents(pipe, latents[-1]), images)


def test_per_step_hessians_match_calibrate_and_closed_form(random_dir):
    pipe = load_pipeline(random_dir)
    arch = arch_for_transformer(pipe.transformer)
    call = pipeline_call(pipe, steps=3)
    name = next(iter(block_linears(pipe.transformer)))
    groups = {name: block_linears(pipe.transformer)[name]}
    weights = timestep_weights("log-decrease", 3)
    per_step = step_hessians(pipe, groups, PROMPTS, call)[name]
    records = record_inputs(pipe, groups, PROMPTS, call)[name]
    hook = calibrate(pipe, arch, groups, PROMPTS, call, weighting="log-decrease", progress=False)[name].hessian
    assert len(per_step) == 3 and {r.step for r in records} == {0, 1, 2}
    combined = combine_step_hessians(per_step, weights)
    closed = closed_form_hessian(records, weights)
    assert relative_frobenius(combined, closed) < 1e-12
    assert relative_frobenius(hook, closed) < 1e-5
    with pytest.raises(ValueError):
        combine_step_hessians(per_step, weights[:2])


def test_closed_form_equals_accumulator_on_random_inputs():
    from obsdiff_lite.course import InputRecord

    g = torch.Generator().manual_seed(0)
    records = [InputRecord(step, torch.randn(2, 5, 4, generator=g, dtype=torch.float64)) for step in (0, 1, 1, 2)]
    weights = torch.tensor([1.2, 1.0, 0.8], dtype=torch.float64)
    acc = HessianAccumulator(4, dtype=torch.float64)
    for r in records:
        acc.add_batch(r.x, float(weights[r.step]))
    assert torch.allclose(closed_form_hessian(records, weights), acc.hessian, rtol=1e-12, atol=1e-12)


def test_detection_captions_read_rendered_images():
    images, specs = make_dataset(4, seed=3)
    assert detection_captions(images) == [s.caption() for s in specs]
    assert detection_captions(np.zeros((1, 32, 32, 3), np.uint8)) == ["(nothing found)"]



def test_pick_layer_defaults_to_the_middle_ffn_and_names_valid_layers(random_dir):
    pipe = load_pipeline(random_dir)
    picked = pick_layer(pipe.transformer)
    assert picked in block_linears(pipe.transformer) and picked.endswith(("ff.net.2", "proj_out"))
    assert pick_layer(pipe.transformer, picked) == picked
    with pytest.raises(ValueError, match="not a block linear of this .*lists all"):
        pick_layer(pipe.transformer, "transformer_blocks.99.ff.net.2")


def test_cfg_halves_reads_both_layouts():
    """SD3: one call per step with [uncond; cond]; Flux true CFG: two calls per step, the conditional one first."""
    x = [torch.randn(4, 3, 2) for _ in range(2)]
    batched = cfg_halves([InputRecord(0, x[0]), InputRecord(1, x[1])], batched=True)
    assert [r.step for r in batched["conditional"]] == [0, 1]
    assert torch.equal(batched["unconditional"][1].x, x[1][:2]) and torch.equal(batched["conditional"][1].x, x[1][2:])
    calls = [InputRecord(0, x[0]), InputRecord(0, x[1]), InputRecord(1, x[1]), InputRecord(1, x[0])]
    paired = cfg_halves(calls, batched=False)
    assert [r.x for r in paired["conditional"]] == [x[0], x[1]]
    assert [r.x for r in paired["unconditional"]] == [x[1], x[0]]
    with pytest.raises(ValueError, match="pair up step by step"):
        cfg_halves(calls[1:], batched=False)
    with pytest.raises(ValueError, match="even batch"):
        cfg_halves([InputRecord(0, torch.randn(3, 2))], batched=True)

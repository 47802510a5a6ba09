"""Structured pruning on random-init tiny SD3/Flux: exact surgery, counts, reload, OBS compensation, CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from obsdiff_lite.arch import arch_for_transformer, blocks, get_linear
from obsdiff_lite.calibrate import calibrate
from obsdiff_lite.cli import main
from obsdiff_lite.pipelines import call_kwargs, generate_images, load_pipeline, run_pipeline
from obsdiff_lite.prune import PruneConfig, prune
from obsdiff_lite.structured import (
    ColumnPruner,
    count_parameters,
    linear_macs,
    mac_geometry,
    obs_remove_columns,
    prune_columns,
    prune_heads_obs,
)
from obsdiff_lite.surgery import (
    attention_module,
    head_channels,
    head_dim,
    remove_heads,
    remove_neurons,
    save_pipeline,
    transformer_structure,
)

PROMPTS = ["a large red circle at the top left", "a small blue cross in the center"]
FAST = dict(num_prompts=2, steps=2, batch_size=2)


def _latents(pipe, steps: int = 2) -> torch.Tensor:
    call = call_kwargs(pipe.obsdiff_generation) | {"num_inference_steps": steps}
    return torch.cat(run_pipeline(pipe, PROMPTS, 0, call, batch_size=2, output_type="latent", progress=False))


def test_slicing_equals_zeroing_without_compensation(random_dir):
    """Physically removing heads/neurons gives the same outputs as zeroing them in a dense copy."""
    dense, sliced = load_pipeline(random_dir), load_pipeline(random_dir)
    kinds = set()
    for zb, sb in zip(blocks(dense.transformer), blocks(sliced.transformer)):
        kinds.add(zb.spec.kind)
        attn = attention_module(zb)
        n, dim = int(attn.heads), head_dim(attn)
        drop = [zb.index % n, (zb.index + 2) % n]
        cols = head_channels(drop, dim)  # "first" (Flux single) columns are the leading attention ones too
        for name in zb.spec.heads.out:
            if (lin := get_linear(zb.module, name)) is not None:
                lin.weight.data[:, cols] = 0.0
        remove_heads(sb, [h for h in range(n) if h not in drop])
        for ffn in zb.spec.ffns:
            up, down = get_linear(zb.module, ffn.up), get_linear(zb.module, ffn.down)
            if up is None:
                continue
            gone = torch.arange(zb.index % 3, up.out_features, 3)
            up.weight.data[gone] = 0.0
            up.bias.data[gone] = 0.0
            down.weight.data[:, down.in_features - up.out_features + gone] = 0.0
            remove_neurons(sb, ffn, torch.tensor([j for j in range(up.out_features) if j not in set(gone.tolist())]))
        assert int(attention_module(sb).heads) == n - 2
    assert kinds == ({"joint"} if arch_for_transformer(dense.transformer).name == "sd3" else {"joint", "single"})
    assert count_parameters(sliced.transformer) < count_parameters(dense.transformer)
    a, b = _latents(dense), _latents(sliced)
    assert torch.isfinite(a).all()
    assert torch.allclose(a, b, atol=1e-5, rtol=1e-5), float((a - b).abs().max())


def test_prune_structured_counts_and_sizes(random_dir):
    pipe = load_pipeline(random_dir)
    before = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    structure0 = transformer_structure(pipe.transformer)
    report = prune(pipe, PruneConfig(pattern="structured", sparsity=0.3, packages=3, **FAST), progress=False)
    all_blocks = blocks(pipe.transformer)
    untouched = {all_blocks[0].name, all_blocks[-1].name}  # the paper's default: first and last excluded
    assert report["blocks"] == list(range(1, len(all_blocks) - 1))
    structure = transformer_structure(pipe.transformer)
    assert report["structure"] == structure
    for name, entry in structure.items():
        if name in untouched:
            assert entry == structure0[name]
            prefix = name + "."
            state = pipe.transformer.state_dict()
            assert all(torch.equal(v, before[k]) for k, v in state.items() if k.startswith(prefix))
        else:
            assert entry["heads"] == 3  # round(4 * 0.3) = 1 head removed
            assert all(v == 256 - 77 for k, v in entry.items() if k != "heads")  # round(256 * 0.3) = 77
            assert len(entry) == 3 if name.startswith("transformer_blocks") else len(entry) == 2
    assert report["parameters_after"] == count_parameters(pipe.transformer) < report["parameters_before"]
    assert report["macs_after"] < report["macs_before"]
    assert all(rec["heads"]["in_features_after"] < rec["heads"]["in_features_before"]
               for rec in report["layers"].values() if "heads" in rec)
    assert torch.isfinite(_latents(pipe)).all()


def test_save_and_reload_gives_identical_images(random_dir, tmp_path):
    pipe = load_pipeline(random_dir)
    report = prune(pipe, PruneConfig(pattern="structured", sparsity=0.3, packages=2, **FAST), progress=False)
    call = call_kwargs(pipe.obsdiff_generation) | {"num_inference_steps": 2}
    images = generate_images(pipe, PROMPTS, seed=3, call=call, progress=False)
    out = save_pipeline(pipe, tmp_path / "pruned", report)
    reloaded = load_pipeline(out)
    assert transformer_structure(reloaded.transformer) == report["structure"]
    assert np.array_equal(images, generate_images(reloaded, PROMPTS, seed=3, call=call, progress=False))


def test_a_structured_output_pruned_again_unstructured_reloads_and_keeps_its_history(random_dir, tmp_path):
    """The unstructured prune's own report has no "structure"; the save records the transformer's (else the output
    could not be reloaded: the shapes no longer match its config) and the parent's obsdiff.json as "previous"."""
    pipe = load_pipeline(random_dir)
    first = prune(pipe, PruneConfig(pattern="structured", sparsity=0.3, packages=1, **FAST), progress=False)
    structured_dir = save_pipeline(pipe, tmp_path / "structured", first)
    pipe = load_pipeline(structured_dir)
    second = prune(pipe, PruneConfig(sparsity=0.5, packages=1, **FAST), progress=False)
    assert "structure" not in second
    call = call_kwargs(pipe.obsdiff_generation) | {"num_inference_steps": 2}
    images = generate_images(pipe, PROMPTS, seed=3, call=call, progress=False)
    out = save_pipeline(pipe, tmp_path / "again", second)
    saved = json.loads((out / "obsdiff.json").read_text())
    assert saved["structure"] == first["structure"]
    assert saved["previous"]["config"]["pattern"] == "structured" and saved["config"]["pattern"] == "unstructured"
    reloaded = load_pipeline(out)
    assert np.array_equal(images, generate_images(reloaded, PROMPTS, seed=3, call=call, progress=False))
    # a dense-shaped transformer records no structure (its output stays loadable by plain diffusers)
    dense_shaped = load_pipeline(random_dir)
    saved = json.loads((save_pipeline(dense_shaped, tmp_path / "dense", {}) / "obsdiff.json").read_text())
    assert "structure" not in saved


def test_linear_macs_match_a_real_forward(random_dir):
    """linear_macs counts what the block linears really multiply in one transformer call (per sample)."""
    pipe = load_pipeline(random_dir)
    prune(pipe, PruneConfig(pattern="structured", sparsity=0.3, packages=1, **FAST), progress=False)
    call = call_kwargs(pipe.obsdiff_generation)
    geometry = mac_geometry(pipe, call)
    assert (geometry["height"], geometry["width"]) == (32, 32)
    state = {"calls": 0, "batch": 1, "macs": 0}

    def pre(module, args, kwargs):
        state["calls"] += 1
        state["batch"] = kwargs["hidden_states"].shape[0]

    def count(module, args):
        if state["calls"] == 1:
            x = args[0]
            state["macs"] += x.numel() // module.in_features * module.in_features * module.out_features

    handles = [pipe.transformer.register_forward_pre_hook(pre, with_kwargs=True)]
    handles += [m.register_forward_pre_hook(count) for b in blocks(pipe.transformer)
                for m in b.module.modules() if isinstance(m, torch.nn.Linear)]
    try:
        run_pipeline(pipe, PROMPTS[:1], 0, call | {"num_inference_steps": 1}, output_type="latent", progress=False)
    finally:
        for h in handles:
            h.remove()
    expected = linear_macs(pipe.transformer, 32, 32, geometry["text_tokens"], geometry["vae_scale_factor"])
    assert state["macs"] // state["batch"] == expected


def test_obs_removal_is_least_squares():
    """With an exact inverse, the group OBS update is the least-squares refit of the remaining columns."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 12, generator=g, dtype=torch.float64)
    w = torch.randn(5, 12, generator=g, dtype=torch.float64)
    hessian = 2 * x.T @ x / len(x)
    q, k = torch.tensor([2, 3, 7]), torch.tensor([i for i in range(12) if i not in (2, 3, 7)])
    new = obs_remove_columns(w, torch.linalg.inv(hessian), q)
    refit = torch.linalg.lstsq(x[:, k], x @ w.T).solution.T
    assert torch.allclose(new[:, k], refit, atol=1e-9) and bool((new[:, q] == 0).all())


def test_compensation_lowers_reconstruction_error(random_sd3_dir):
    """On calibration inputs, OBS-compensated removal beats zeroing the same columns (FFN and heads)."""
    pipe = load_pipeline(random_sd3_dir)
    arch = arch_for_transformer(pipe.transformer)
    block = pipe.transformer.transformer_blocks[2]
    linears = {"down": block.ff.net[2], "out": block.attn.to_out[0], "add_out": block.attn.to_add_out}
    call = call_kwargs(pipe.obsdiff_generation) | {"num_inference_steps": 2}
    hessians = {k: a.hessian.double() for k, a in calibrate(pipe, arch, linears, PROMPTS, call, progress=False).items()}

    def error(dw, h):
        return float(((dw @ h) * dw).sum())

    w = linears["down"].weight.detach().double()
    new, removed, stats = prune_columns(w, hessians["down"], torch.arange(256), 77)
    assert len(removed) == 77 and bool((new[:, removed] == 0).all())
    zeroed = w.clone()
    zeroed[:, removed] = 0.0
    assert error(w - new, hessians["down"]) < 0.9 * error(w - zeroed, hessians["down"])
    assert stats["recon_error"] == pytest.approx(error(w - new, hessians["down"]) / 2)

    pruners = {k: ColumnPruner(linears[k].weight, hessians[k], name=k) for k in ("out", "add_out")}
    heads, history = prune_heads_obs(pruners, [head_channels([h], 16) for h in range(4)], 1)
    assert len(heads) == 1 and history[0]["head"] == heads[0]
    for k, pruner in pruners.items():
        w = linears[k].weight.detach().double()
        zeroed = w.clone()
        zeroed[:, head_channels(heads, 16)] = 0.0
        assert error(w - pruner.full_weight(), hessians[k]) < error(w - zeroed, hessians[k])


def test_l1_norm_gives_the_same_shapes_without_calibration(random_dir):
    shapes = {}
    for method in ("l1-norm", "obs-diff"):
        pipe = load_pipeline(random_dir)
        report = prune(pipe, PruneConfig(method=method, pattern="structured", sparsity=0.3, packages=2, **FAST),
                       progress=False)
        shapes[method] = report["structure"]
        if method == "l1-norm":
            assert report["timings"]["calibration_s"] == 0.0 and report["calibration_prompts"] == []
            assert torch.isfinite(_latents(pipe)).all()
    assert shapes["l1-norm"] == shapes["obs-diff"]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(method="wanda", pattern="structured"), "obs-diff or l1-norm"),
        (dict(method="l1-norm"), "structured"),
        (dict(pattern="structured", head_sparsity=0.9), "all 4 heads"),
        (dict(pattern="structured", ffn_sparsity=1.2), r"\[0, 1\)"),
        (dict(pattern="unstructured", head_sparsity=0.2), "only to --pattern structured"),
        (dict(pattern="structured", packages=99), "structured units"),
    ],
)
def test_bad_structured_configs_are_refused(random_sd3_dir, kwargs, match):
    pipe = load_pipeline(random_sd3_dir)
    with pytest.raises(ValueError, match=match):
        prune(pipe, PruneConfig(**(FAST | {"sparsity": 0.3} | kwargs)), progress=False)
    assert transformer_structure(pipe.transformer)["transformer_blocks.1"]["heads"] == 4  # refused before any work


def test_cli_structured_prune_and_refusal(random_flux_dir, tmp_path, capsys):
    out = tmp_path / "structured"
    argv = ["prune", str(random_flux_dir), "--output", str(out), "--pattern", "structured", "--sparsity", "0.3",
            "--num-prompts", "2", "--steps", "2", "--packages", "2"]
    assert main(argv) == 0
    assert "structured: parameters" in capsys.readouterr().out
    info = json.loads((out / "obsdiff.json").read_text())
    assert info["structure"]["single_transformer_blocks.1"] == {"heads": 3, "proj_mlp": 179}
    assert info["config"]["pattern"] == "structured" and info["macs_after"] < info["macs_before"]
    reloaded = load_pipeline(out)
    assert reloaded.transformer.single_transformer_blocks[1].proj_out.in_features == 3 * 16 + 179

    code = main(["prune", str(random_flux_dir), "--output", str(tmp_path / "no"), "--method", "wanda",
                 "--pattern", "structured"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("obsdiff: error: ") and "\n" not in err and "structured" in err
    assert not (tmp_path / "no").exists()


def test_sd3_medium_sizes_match_the_paper():
    """Surgery + accounting on an SD3-Medium-shaped transformer (meta device) reproduce Table 9's params/TFLOPs."""
    from diffusers import SD3Transformer2DModel

    config = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                  num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                  pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192)
    with torch.device("meta"):
        model = SD3Transformer2DModel(**config)
    assert round(count_parameters(model) / 1e9, 2) == 2.03
    assert round(linear_macs(model, 1024, 1024, 77) / 1e12, 2) == 2.83  # paper: 2.84 (its rounding)
    for block in blocks(model)[1:23]:  # 10 %: round(24 * 0.1) = 2 heads, round(6144 * 0.1) = 614 neurons
        remove_heads(block, range(22))
        for ffn in block.spec.ffns:
            remove_neurons(block, ffn, torch.arange(6144 - 614))
    assert round(count_parameters(model) / 1e9, 2) == 1.91
    assert round(linear_macs(model, 1024, 1024, 77) / 1e12, 2) == 2.59


def test_kept_ffn_widths_are_rounded_for_full_size_ffns_only():
    from obsdiff_lite.structured import kept_ffn_width

    assert kept_ffn_width(6144, 0.3) == 4288  # 4301 exact -> nearest multiple of 64 (GPU GEMMs need aligned widths)
    assert kept_ffn_width(6144, 0.3, 1) == 4301  # --ffn-multiple 1: the exact fraction
    assert kept_ffn_width(12288, 0.3) % 64 == 0
    assert kept_ffn_width(256, 0.3) == 179  # tiny FFNs keep their exact fraction (results stay reproducible)
    assert kept_ffn_width(6144, 0.0) == 6144  # nothing removed stays nothing removed
    assert kept_ffn_width(6144, 0.999) == 64  # never rounded down to zero
    assert kept_ffn_width(256, 0.3, 64) == 192
    assert kept_ffn_width(100, 0.01, 64) == 64  # the largest multiple that fits
    assert kept_ffn_width(48, 0.5, 64) == 24  # narrower than one multiple: the exact count


def test_ffn_multiple_reaches_the_pruned_model(random_flux_dir, tmp_path):
    pipe = load_pipeline(random_flux_dir)
    report = prune(pipe, PruneConfig(**(FAST | {"sparsity": 0.3, "ffn_multiple": 64, "method": "l1-norm",
                                             "pattern": "structured"})),
                   progress=False)
    widths = [s["proj_mlp"] for name, s in report["structure"].items() if name.startswith("single_transformer_blocks")]
    assert widths == [192, 192, 192, 256]  # 179 exact -> 192; the very last block is not targeted
    with pytest.raises(ValueError, match="ffn_multiple must be a positive integer"):
        PruneConfig(pattern="structured", sparsity=0.3, ffn_multiple=0).validate()


def _head_pruners(seed: int = 0, heads: int = 4, dim: int = 3) -> tuple[dict, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    pruners = {}
    for name in ("out", "add_out"):
        x = torch.randn(200, heads * dim, generator=g, dtype=torch.float64)
        w = torch.randn(5, heads * dim, generator=g, dtype=torch.float64)
        pruners[name] = ColumnPruner(w, 2 * x.T @ x / len(x), damp=0.01, name=name)
    return pruners, [head_channels([h], dim) for h in range(heads)]


def test_trajectory_judge_overrides_the_saliency_pick_within_the_candidates():
    paper, _ = prune_heads_obs(*_head_pruners(), count=1)
    calls = []

    def judge_for(favourite: int):
        def judge(weights: dict) -> float:
            zero = [h for h in range(4) if bool((weights["out"][:, h * 3:(h + 1) * 3] == 0).all())]
            assert len(zero) == 1 and set(weights) == {"out", "add_out"}  # one trial head, both projections
            calls.append(zero[0])
            return 0.0 if zero[0] == favourite else 1.0 + zero[0]
        return judge

    other = next(h for h in range(4) if h != paper[0])
    removed, history = prune_heads_obs(*_head_pruners(), count=1, judge=judge_for(other), candidates=4)
    assert removed == [other] and sorted(calls) == [0, 1, 2, 3]
    assert set(history[0]["trajectory_error"]) == {"0", "1", "2", "3"} and history[0]["trajectory_error"][str(other)] == 0.0
    calls.clear()  # one candidate: the judge cannot change the paper's choice
    removed, _ = prune_heads_obs(*_head_pruners(), count=1, judge=judge_for(other), candidates=1)
    assert removed == paper and calls == paper


def test_trajectory_judge_measures_and_restores(random_flux_dir):
    from obsdiff_lite.structured import TrajectoryJudge

    pipe = load_pipeline(random_flux_dir)
    call = call_kwargs(pipe.obsdiff_generation) | {"num_inference_steps": 2}
    judge = TrajectoryJudge(pipe, PROMPTS, call, seed=0, batch_size=2)
    lin = pipe.transformer.transformer_blocks[1].attn.to_out[0]
    before = lin.weight.detach().clone()
    assert judge.error({lin: before.clone()}) == 0.0  # sampling is deterministic: unchanged weights, no error
    changed = before.clone()
    changed[:, :16] = 0.0  # one head's columns
    assert judge.error({lin: changed}) > 0.0
    assert torch.equal(lin.weight, before)  # restored after the trial


def test_trajectory_head_selection_end_to_end(random_flux_dir, tmp_path):
    pipe = load_pipeline(random_flux_dir)
    config = PruneConfig(**(FAST | {"pattern": "structured", "sparsity": 0.3, "head_selection": "trajectory",
                                    "head_candidates": 2, "trajectory_prompts": 1}))
    report = prune(pipe, config, progress=False)
    order = report["block_records"]["transformer_blocks.1"]["removal_order"]
    assert len(order) == 1 and len(order[0]["trajectory_error"]) == 2
    assert report["config"]["head_selection"] == "trajectory"
    assert transformer_structure(pipe.transformer)["transformer_blocks.1"]["heads"] == 3
    with pytest.raises(ValueError, match="use it with --method obs-diff"):
        PruneConfig(method="l1-norm", pattern="structured", sparsity=0.3, head_selection="trajectory").validate()
    with pytest.raises(ValueError, match="head_candidates must be a positive integer"):
        PruneConfig(pattern="structured", sparsity=0.3, head_candidates=0).validate()
    with pytest.raises(ValueError, match="apply only to --pattern structured"):
        PruneConfig(head_selection="trajectory").validate()
    with pytest.raises(ValueError, match="unknown head selection"):
        PruneConfig(pattern="structured", sparsity=0.3, head_selection="oracle").validate()


def test_structured_leaves_sd35_dual_attention_whole_and_reloads(random_sd35_dual_dir, tmp_path):
    """Heads are the joint attention's (HeadSpec); attn2 keeps its heads and weights, and the pruned model reloads."""
    pipe = load_pipeline(random_sd35_dual_dir)
    attn2 = {k: v.clone() for k, v in pipe.transformer.state_dict().items() if ".attn2." in k}
    report = prune(pipe, PruneConfig(pattern="structured", sparsity=0.3, packages=2, **FAST), progress=False)
    state = pipe.transformer.state_dict()
    assert attn2 and all(torch.equal(state[k], v) for k, v in attn2.items())
    assert report["structure"]["transformer_blocks.1"]["heads"] == 3
    call = call_kwargs(pipe.obsdiff_generation) | {"num_inference_steps": 2}
    images = generate_images(pipe, PROMPTS, seed=3, call=call, progress=False)
    reloaded = load_pipeline(save_pipeline(pipe, tmp_path / "pruned", report))
    assert np.array_equal(images, generate_images(reloaded, PROMPTS, seed=3, call=call, progress=False))


def test_a_sparsity_that_rounds_to_nothing_removed_is_named(random_sd3_dir, caplog):
    """4 heads x 10% rounds to 0: the run changed nothing, which the user must hear about (a 0 asks for nothing)."""
    pipe = load_pipeline(random_sd3_dir)
    with caplog.at_level("WARNING", logger="obsdiff_lite.structured"):
        report = prune(pipe, PruneConfig(pattern="structured", sparsity=None, head_sparsity=0.1, ffn_sparsity=0.001,
                                         packages=1, **FAST), progress=False)
    assert report["parameters_after"] == report["parameters_before"]
    assert "head sparsity 0.1 removes nothing: it rounds to 0 of the 4 heads" in caplog.text
    assert "FFN sparsity 0.001 removes nothing" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="obsdiff_lite.structured"):
        prune(load_pipeline(random_sd3_dir), PruneConfig(pattern="structured", sparsity=None, head_sparsity=0.0,
                                                         ffn_sparsity=0.3, packages=1, **FAST), progress=False)
    assert "removes nothing" not in caplog.text

"""Helpers of notebooks 05/07 on random-init tiny SD3/Flux: highlights, head ranking, surgery check, tables, budgets."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from obsdiff_lite.arch import blocks, build_full_size_transformer
from obsdiff_lite.pipelines import load_pipeline
from obsdiff_lite.prune import PruneConfig, prune
from obsdiff_lite.surgery import transformer_structure
from obsdiff_lite.viz_structured import (
    clip_score,
    comparison_figure,
    format_structure_table,
    head_ranking,
    hessian_budget,
    highlight_image,
    is_tiny_world,
    matmul_times,
    max_output_diff,
    pick_prompts,
    random_units,
    report_summary,
    slice_units,
    structure_rows,
    structured_size,
    time_sampling,
    transformer_calls,
    unit_highlights,
    zero_units,
)

FAST = dict(num_prompts=2, steps=2, batch_size=2)
PROMPTS = ["a large red circle at the top left", "a small blue cross in the center"]


def test_unit_highlights_mark_rows_and_columns(random_dir):
    pipe = load_pipeline(random_dir)
    for block in blocks(pipe.transformer):
        items = {h.name: h for h in unit_highlights(block, head=1, neuron=3)}
        dim = block.module.attn.head_dim if hasattr(block.module.attn, "head_dim") and block.module.attn.head_dim \
            else block.module.attn.to_q.out_features // block.module.attn.heads
        q = items["attn.to_q"]
        assert q.head[dim : 2 * dim].all() and int(q.head.sum()) == dim * q.weight.shape[1] and not q.neuron.any()
        if block.spec.kind == "single":
            out = items["proj_out"]  # first heads*dim columns are attention: head 1; then the MLP: neuron 3 after them
            assert out.head[:, dim : 2 * dim].all() and int(out.head.sum()) == dim * out.weight.shape[0]
            inner = out.weight.shape[1] - items["proj_mlp"].weight.shape[0]
            assert out.neuron[:, inner + 3].all() and int(out.neuron.sum()) == out.weight.shape[0]
            names = list(items)
            assert names.index("proj_mlp") < names.index("proj_out")
        else:
            assert items["attn.to_out.0"].head[:, dim : 2 * dim].all()
            assert items["ff.net.0.proj"].neuron[3].all() and items["ff.net.2"].neuron[:, 3].all()
        image = highlight_image(q)
        assert image.shape == (*q.weight.shape, 3) and 0 <= image.min() and image.max() <= 1


def test_head_ranking_agrees_with_prune(random_dir):
    """Block 1 sits in the first package, calibrated on the dense model: the fused pick is prune's first head."""
    pipe = load_pipeline(random_dir)
    config = PruneConfig(pattern="structured", sparsity=0.3, packages=4, **FAST)
    ranking = head_ranking(pipe, 1, config)
    n = len(ranking.fused)
    assert sorted(ranking.order) == list(range(n)) and sorted(ranking.l1_order) == list(range(n))
    for name, ranks in ranking.ranks.items():
        assert sorted(ranks.tolist()) == list(range(1, n + 1))
        assert int(np.argmin(ranking.saliency[name])) == int(np.argmin(ranks))
    assert np.allclose(ranking.fused, sum(1.0 / (ranking.rrf_k + r) for r in ranking.ranks.values()))
    assert "RRF score" in ranking.table()
    report = prune(pipe, config, progress=False)
    first = report["block_records"][ranking.block]["removal_order"][0]["head"]
    assert first == ranking.order[0]


def test_slicing_equals_zeroing_on_recorded_calls(random_dir):
    pipe = load_pipeline(random_dir)
    choice = random_units(pipe.transformer, [1, 2], 0.5, 0.3, seed=1)
    assert all(entry["heads"] for entry in choice.values())
    calls = transformer_calls(pipe, PROMPTS[:1])
    assert calls and all("timestep" in c for c in calls)
    zeroed, sliced = copy.deepcopy(pipe.transformer).double(), copy.deepcopy(pipe.transformer).double()
    zero_units(zeroed, choice)
    slice_units(sliced, choice)
    assert sum(p.numel() for p in sliced.parameters()) < sum(p.numel() for p in zeroed.parameters())
    assert max_output_diff(zeroed, sliced, calls, torch.float64) < 1e-10
    assert max_output_diff(pipe.transformer, sliced.float(), calls) > 1e-4  # dropping units does change the output


def test_structure_table_and_summary(random_sd3_dir, tmp_path):
    from obsdiff_lite.surgery import save_pipeline

    pipe = load_pipeline(random_sd3_dir)
    before = transformer_structure(pipe.transformer)
    report = prune(pipe, PruneConfig(pattern="structured", sparsity=0.5, packages=2, **FAST), progress=False)
    rows = structure_rows(before, report["structure"])
    assert rows[1]["heads"][1] < rows[1]["heads"][0] and rows[0]["heads"][0] == rows[0]["heads"][1]
    table = format_structure_table(before, report["structure"])
    assert "->" in table and table.splitlines()[0].startswith("block")
    out = save_pipeline(pipe, tmp_path / "p", report)
    summary = report_summary(out)
    assert summary["pattern"] == "structured" and summary["pruned_layers"] == len(report["layers"])
    json.dumps(summary)


def test_time_sampling_is_interleaved_and_complete(random_sd3_dir):
    pipe = load_pipeline(random_sd3_dir)
    t = time_sampling({"a": pipe, "b": pipe}, PROMPTS[:1], repeats=2, warmup=0)
    med = t.medians()
    assert set(med) == {"a", "b"} and all(len(v) == 2 for v in t.total.values())
    assert all(0 < m["transformer"] <= m["total"] for m in med.values())


def test_hessian_budget_full_size_sd3_medium():
    tr = build_full_size_transformer("sd3-medium")  # meta device: shapes only
    one, four = hessian_budget(tr, 1), hessian_budget(tr, 4)
    assert sum(p["hessians"] for p in four) == one[0]["hessians"] == 24 * 8 - 3  # last block: no text out/FFN
    assert sum(p["bytes"] for p in four) == one[0]["bytes"]
    assert max(p["widest"] for p in one) == 4 * 1536
    assert max(p["bytes"] for p in four) < one[0]["bytes"] / 3


def test_pick_prompts(random_sd3_dir, tmp_path):
    pipe = load_pipeline(random_sd3_dir)
    pipe.obsdiff_generation = {"_prompts": "shapes"}
    assert is_tiny_world(pipe)
    calib, show = pick_prompts(pipe, tmp_path / "unused.txt", 3, 2)
    assert len(calib) == 3 and len(show) == 2 and not set(calib) & set(show)
    pipe.obsdiff_generation = {}
    assert not is_tiny_world(pipe)
    file = tmp_path / "p.txt"
    file.write_text("\n".join(f"prompt {i}" for i in range(10)) + "\n")
    calib, show = pick_prompts(pipe, file, 4, 3)
    assert calib == ["prompt 0", "prompt 1", "prompt 2", "prompt 3"] and show == ["prompt 7", "prompt 8", "prompt 9"]
    calib, show = pick_prompts(pipe, file, 9, 3)  # too few lines to hold out: calibrate on the first ones anyway
    assert len(calib) == 9


def test_clip_score_says_what_is_missing():
    images = np.zeros((1, 32, 32, 3), dtype=np.uint8)
    try:
        score = clip_score(images, ["a red circle"])
    except RuntimeError as exc:
        assert "CLIP score needs" in str(exc)
    else:  # torchmetrics and the weights are available here
        assert np.isfinite(score)


def test_comparison_figure():
    import matplotlib

    matplotlib.use("Agg")
    rows = {"dense": np.zeros((3, 32, 32, 3), np.uint8), "pruned": np.full((3, 40, 40, 3), 255, np.uint8)}
    fig = comparison_figure(rows, cell=48)
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["dense", "pruned"]


@pytest.mark.parametrize("fraction", [0.0, 0.99])
def test_random_units_keeps_one_head(random_sd3_dir, fraction):
    from obsdiff_lite.surgery import attention_module

    pipe = load_pipeline(random_sd3_dir)
    choice = random_units(pipe.transformer, [0, 1], fraction, fraction)
    for block in blocks(pipe.transformer)[:2]:
        n = int(attention_module(block).heads)
        assert len(choice[block.name]["heads"]) == (0 if fraction == 0 else n - 1)
        assert len(choice[block.name]["ff.net.0.proj"]) < block.module.ff.net[0].proj.out_features


def test_structured_size_matches_the_paper_table_9():
    size = structured_size("sd3-medium", 0.1)  # the same numbers test_structured checks against Table 9
    assert round(size["parameters_before"] / 1e9, 2) == 2.03 and round(size["parameters_after"] / 1e9, 2) == 1.91
    assert round(size["macs_before"] / 1e12, 2) == 2.83 and round(size["macs_after"] / 1e12, 2) == 2.59


def test_matmul_times_cases():
    times = matmul_times(64, 64, 32, 0.5, repeats=2)
    assert len(times) == 3 and all(t > 0 for t in times.values())

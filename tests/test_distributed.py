"""Data-parallel calibration: shards keep global seeds, all-reduced Hessians, and a 2-process gloo run
(`torchrun --nproc_per_node 2 -m obsdiff_lite prune`) that equals the one-process run to float tolerance."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from obsdiff_lite import distributed
from obsdiff_lite.distributed import allreduce_accumulators, init_from_env, shard
from obsdiff_lite.hessian import HessianAccumulator
from obsdiff_lite.pipelines import call_kwargs, load_pipeline, run_pipeline
from obsdiff_lite.prune import PruneConfig, prune

ROOT = Path(__file__).resolve().parent.parent
RUN = dict(num_prompts=4, steps=3, packages=2, batch_size=2, sparsity=0.5)


def test_shard_keeps_global_indices():
    prompts = [f"p{i}" for i in range(7)]
    shards = [shard(prompts, r, 3) for r in range(3)]
    assert shards[0] == [(0, "p0"), (3, "p3"), (6, "p6")]
    assert sorted(i for s in shards for i, _ in s) == list(range(7))  # every prompt exactly once
    assert shard(prompts[:1], 1, 2) == []  # more ranks than prompts: an empty shard
    with pytest.raises(ValueError, match="rank"):
        shard(prompts, 2, 2)


def test_explicit_seeds_reproduce_the_global_index_seeds(random_sd3_dir):
    """A shard run with seeds seed+global_index gives the same latents as those prompts in the full run."""
    pipe = load_pipeline(random_sd3_dir)
    call = call_kwargs(pipe.obsdiff_generation) | {"num_inference_steps": 2}
    prompts = ["a large red circle at the top left", "a small blue cross in the center", "a green square"]
    full = torch.cat(run_pipeline(pipe, prompts, 5, call, batch_size=1, output_type="latent", progress=False))
    part = shard(prompts, 1, 2)  # global index 1 only
    mine = torch.cat(run_pipeline(pipe, [p for _, p in part], 5, call, batch_size=1, output_type="latent",
                                  progress=False, seeds=[5 + i for i, _ in part]))
    assert torch.equal(mine[0], full[1])
    with pytest.raises(ValueError, match="seeds"):
        run_pipeline(pipe, prompts, 0, call, seeds=[1], output_type="latent", progress=False)


def test_allreduce_renormalises(monkeypatch):
    """With a fake 2-rank all-reduce (both ranks hold the same data) the mean is unchanged, the sums double."""
    torch.manual_seed(0)
    acc = HessianAccumulator(8, name="x", track_mean=True)
    acc.add_batch(torch.randn(32, 8), 1.2)
    acc.add_batch(torch.randn(16, 8), 0.8)
    before, weight_sum, rows = acc.hessian.clone(), acc.weight_sum, acc.num_rows
    mean_before = acc.input_mean.clone()
    monkeypatch.setattr(distributed, "is_distributed", lambda: True)
    monkeypatch.setattr(distributed.dist, "get_backend", lambda *a: "gloo")
    monkeypatch.setattr(distributed.dist, "all_reduce", lambda t, op=None: t.mul_(2))
    allreduce_accumulators({"x": acc})
    assert torch.allclose(acc.hessian, before, rtol=1e-6) and torch.allclose(acc.input_mean, mean_before, rtol=1e-6)
    assert acc.weight_sum == pytest.approx(2 * weight_sum) and acc.num_rows == 2 * rows
    # ... and it is what HessianAccumulator.merge computes for two ranks' halves.
    merged = HessianAccumulator.from_state(
        {"in_features": 8, "hessian": before.clone(), "weight_sum": weight_sum, "num_rows": rows}
    ).merge(HessianAccumulator.from_state({"in_features": 8, "hessian": before, "weight_sum": weight_sum,
                                           "num_rows": rows}))
    assert torch.allclose(acc.hessian, merged.hessian, rtol=1e-6)


def test_init_from_env_is_a_no_op_outside_torchrun(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    info = init_from_env("cpu")
    assert (info.rank, info.world_size, info.device, info.is_main) == (0, 1, "cpu", True)
    assert not dist.is_initialized()


def test_two_gloo_processes_equal_one_process(random_sd3_dir, tmp_path):
    """torchrun, 2 CPU ranks (gloo): only rank 0 writes, and the weights match a one-process prune()."""
    out = tmp_path / "dp"
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "obsdiff_lite", "prune", str(random_sd3_dir), "--output", str(out),
           "--num-prompts", str(RUN["num_prompts"]), "--steps", str(RUN["steps"]), "--packages",
           str(RUN["packages"]), "--batch-size", str(RUN["batch_size"]), "--sparsity", str(RUN["sparsity"])]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    pipe = load_pipeline(random_sd3_dir)  # the one-process reference, computed while the ranks run
    prune(pipe, PruneConfig(**RUN), progress=False)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    assert stdout.count("pruned sd3") == 1, stdout  # rank 0 reports, rank 1 stays quiet
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dp"]  # no partial directory of another rank
    report = json.loads((out / "obsdiff.json").read_text())
    assert report["world_size"] == 2 and report["calibration_prompts"] == pipe_prompts(pipe, RUN["num_prompts"])

    from safetensors.torch import load_file

    saved = {k: v for f in sorted((out / "transformer").glob("*.safetensors")) for k, v in load_file(f).items()}
    reference = pipe.transformer.state_dict()
    assert set(saved) == set(reference)
    for name in report["layers"]:
        a, b = reference[name + ".weight"], saved[name + ".weight"]
        same_mask = float(((a == 0) == (b == 0)).float().mean())
        assert same_mask >= 0.995, f"{name}: masks agree on only {same_mask:.4f}"
        # OBS compensates each row from that row's own mask: rows whose masks agree must agree closely;
        # a flipped mask entry (allowed above) changes its row's compensation, so those rows are excluded.
        rows = ((a == 0) == (b == 0)).all(dim=1)
        assert float(rows.float().mean()) >= 0.9, f"{name}: only {int(rows.sum())} of {len(rows)} rows share masks"
        a, b = a[rows], b[rows]
        kept = a != 0
        # Package 0 sees the dense model: only the Hessians' float32 summation order differs, amplified by the
        # OBS solve through H^-1 (seen: <= 4e-5 in norm, <= 1.5e-4 of the layer's largest weight elementwise).
        # Later packages calibrate through the already pruned ones, whose ~1e-5 differences the forward and the
        # ill-conditioned text-stream Hessians of this random model amplify further; how far depends on float
        # rounding of the in-pytest reference (seen: <= 7e-4, <= 1.5e-3; two torchrun runs are bit-identical).
        first = report["layers"][name]["package"] == 0
        norm_tol, scale_tol = (2e-4, 5e-4) if first else (3e-3, 5e-3)
        diff = float((a[kept] - b[kept]).norm() / a[kept].norm())
        assert diff < norm_tol, f"{name}: relative difference {diff:.2e}"
        assert torch.allclose(a[kept], b[kept], rtol=1e-4, atol=scale_tol * float(a.abs().max())), name
    untouched = [k for k in reference if k.removesuffix(".weight") not in report["layers"]]
    assert all(torch.equal(reference[k], saved[k]) for k in untouched)


def pipe_prompts(pipe, num: int) -> list[str]:
    from obsdiff_lite.prune import default_prompts

    return default_prompts(pipe, num, 0)

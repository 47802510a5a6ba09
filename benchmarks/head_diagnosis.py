"""Which head should go? Per-head removal cost by four measures vs the adherence it really leaves.

    python benchmarks/head_diagnosis.py            # tiny-flux, second double-stream block, seeds 0 1 2

For each head of one block, removed alone with OBS compensation on both out-projections (Hessians
from the calibration prompts of that seed), this measures
  - saliency: the paper's per-projection OBS cost of removing the head (image / text out-projection),
  - block error: squared change of the block's two outputs on the calibration inputs of that block,
  - prediction error: squared change of the transformer's output (the noise/velocity prediction) on
    the dense trajectory's inputs, every call,
  - latent error: mean squared change of the final latents after whole sampling runs (4 prompts),
and the ShapeBench full adherence of the model with that head removed (120 evaluation prompts).
Writes benchmarks/results/head_diagnosis.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from run import EVAL_PROMPTS, EVAL_SEED, dense_reference  # noqa: E402

from obsdiff_lite.arch import arch_for_transformer, blocks  # noqa: E402
from obsdiff_lite.cached import capture_block_inputs  # noqa: E402
from obsdiff_lite.calibrate import calibrate  # noqa: E402
from obsdiff_lite.evaluate import sample_shapebench  # noqa: E402
from obsdiff_lite.pipelines import load_pipeline, pipeline_call  # noqa: E402
from obsdiff_lite.prune import default_prompts  # noqa: E402
from obsdiff_lite.shapes.bench import evaluate  # noqa: E402
from obsdiff_lite.structured import ColumnPruner, StructuredUnit, TrajectoryJudge, group_saliency  # noqa: E402
from obsdiff_lite.surgery import attention_module, head_channels, head_dim  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "head_diagnosis.json"


def _remove_head(transformer, arch, block_index: int, head: int, hessians: dict, dim: int) -> None:
    """Zero one head's out-projection columns with OBS compensation (the same as removing it)."""
    unit = StructuredUnit(blocks(transformer, arch)[block_index], "heads")
    for name, lin in unit.linears().items():
        pruner = ColumnPruner(lin.weight, hessians[name])
        pruner.remove(pruner.positions(head_channels([head], dim)), pruner.inverse())
        lin.weight.data.copy_(pruner.full_weight())


@torch.no_grad()
def diagnose(model: str, block_index: int, seed: int, num_prompts: int, judge_prompts: int) -> dict:
    """All four measures and the adherence, per head, for one calibration seed."""
    pipe = load_pipeline(ROOT / "data" / model)
    arch = arch_for_transformer(pipe.transformer)
    block = blocks(pipe.transformer, arch)[block_index]
    linears = StructuredUnit(block, "heads").linears()
    call = pipeline_call(pipe, None, None)
    prompts = default_prompts(pipe, num_prompts, seed)
    hessians = {n: a.hessian for n, a in calibrate(pipe, arch, dict(linears), prompts, call, seed=seed,
                                                   progress=False).items()}
    attn = attention_module(block)
    heads, dim = int(attn.heads), head_dim(attn)
    saliency = {}
    for name, lin in linears.items():
        pruner = ColumnPruner(lin.weight, hessians[name])
        groups = torch.stack([head_channels([h], dim) for h in range(heads)])
        saliency[name.removeprefix(f"{block.name}.")] = group_saliency(pruner.weight, pruner.inverse(), groups).tolist()

    block_inputs = capture_block_inputs(pipe, arch, block, prompts[:judge_prompts], call, seed, judge_prompts,
                                        progress=False)
    model_inputs = []
    hook = pipe.transformer.register_forward_pre_hook(
        lambda m, a, k: model_inputs.append({key: v.clone() if torch.is_tensor(v) else v for key, v in k.items()}),
        with_kwargs=True)
    judge = TrajectoryJudge(pipe, prompts[:judge_prompts], call, seed, judge_prompts)  # samples once: fills inputs
    hook.remove()

    def outputs(transformer):
        blk = blocks(transformer, arch)[block_index].module
        return ([blk(**r.kwargs) for r in block_inputs], [transformer(**k)[0] for k in model_inputs])

    dense_block, dense_pred = outputs(pipe.transformer)
    specs, dense_images, _ = dense_reference(model)
    rows = []
    for head in range(heads):
        trial = copy.deepcopy(pipe)
        _remove_head(trial.transformer, arch, block_index, head, hessians, dim)
        got_block, got_pred = outputs(trial.transformer)
        block_err = sum(float(((a[0] - b[0]) ** 2).sum() + ((a[1] - b[1]) ** 2).sum())
                        for a, b in zip(got_block, dense_block))
        pred_err = sum(float(((a - b) ** 2).sum()) for a, b in zip(got_pred, dense_pred))
        trial_judge = copy.copy(judge)
        trial_judge.pipe = trial
        latent_err = float(((trial_judge.latents() - judge.reference) ** 2).mean())
        _, images = sample_shapebench(trial, EVAL_PROMPTS, EVAL_SEED, progress=False)
        adherence = evaluate(images, specs, reference=dense_images)["full"]
        rows.append({"head": head, "saliency": {k: v[head] for k, v in saliency.items()}, "block_error": block_err,
                     "prediction_error": pred_err, "latent_error": latent_err, "adherence": adherence})
        print(f"seed {seed} head {head}: {rows[-1]}", flush=True)
    return {"seed": seed, "heads": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-flux")
    parser.add_argument("--block", type=int, default=1, help="block index (tiny-flux 1: its second double-stream block)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--prompts", type=int, default=16, help="calibration prompts (the benchmarks' default)")
    parser.add_argument("--judge-prompts", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(1)
    result = {"command": " ".join(["python benchmarks/head_diagnosis.py", *sys.argv[1:]]), "model": args.model,
              "block": args.block, "calibration_prompts": args.prompts, "judge_prompts": args.judge_prompts,
              "eval_prompts": EVAL_PROMPTS,
              "dense_adherence": dense_reference(args.model)[2]["full"],
              "seeds": [diagnose(args.model, args.block, s, args.prompts, args.judge_prompts) for s in args.seeds]}
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

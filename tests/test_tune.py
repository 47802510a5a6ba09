"""Block tuning after pruning (obsdiff_lite/tune.py, --tune-iters): what it records, what it changes, what it keeps."""

import copy
import gc

import pytest
import torch
from torch import nn

from obsdiff_lite.arch import arch_for_transformer, blocks
from obsdiff_lite.calibrate import StepTracker
from obsdiff_lite.pipelines import call_kwargs, load_pipeline, run_pipeline
from obsdiff_lite.prune import PruneConfig, prune
from obsdiff_lite.tune import RecordedCall, record_block_calls, tune_block

FAST = dict(num_prompts=3, steps=3, batch_size=3)
PROMPTS = ["a small blue cross in the center", "a large green square at the top right"]


class ToyBlock(nn.Module):
    """A residual MLP with a norm, returning two outputs like an MMDiT block."""

    def __init__(self, d: int = 16):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.up, self.down = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, hidden_states, scale=1.0):
        out = hidden_states + self.down(torch.nn.functional.gelu(self.up(self.norm(hidden_states)))) * scale
        return out, None


def _toy_problem(seed: int = 0, calls: int = 6, weights=None):
    """A dense toy block, a 2:4-pruned copy, and recorded calls whose targets are the dense block's outputs."""
    torch.manual_seed(seed)
    dense = ToyBlock()
    pruned = copy.deepcopy(dense)
    with torch.no_grad():
        for lin in (pruned.up, pruned.down):
            w = lin.weight.reshape(lin.weight.shape[0], -1, 4)
            drop = w.abs().argsort(dim=-1)[..., :2]  # the two smallest of every four
            lin.weight.copy_(w.scatter(-1, drop, 0.0).reshape_as(lin.weight))
    recorded = []
    for i in range(calls):
        x = torch.randn(4, 8, 16)
        with torch.no_grad():
            target = dense(x, scale=0.5)
        recorded.append(RecordedCall((x,), {"scale": 0.5}, target, 1.0 if weights is None else weights[i]))
    return dense, pruned, recorded


def _toy_loss(block, calls) -> float:
    with torch.no_grad():
        return sum(float(((block(*c.args, **c.kwargs)[0] - c.targets[0]) ** 2).mean()) for c in calls) / len(calls)


def test_tune_block_lowers_the_block_loss_and_keeps_the_zeros_and_every_other_parameter():
    dense, pruned, calls = _toy_problem()
    zeros = {n: lin.weight == 0 for n, lin in (("up", pruned.up), ("down", pruned.down))}
    norm = {k: v.clone() for k, v in pruned.norm.state_dict().items()}
    before = _toy_loss(pruned, calls)
    record = tune_block(pruned, [pruned.up, pruned.down], calls, iters=300, lr=1e-3)
    after = _toy_loss(pruned, calls)
    # Only one output is compared (the other is None), scaled by the target's mean square.
    scale = sum(float(c.targets[0].pow(2).mean()) for c in calls) / len(calls)
    assert record["tune_loss_before"] == pytest.approx(before / scale, rel=1e-4)
    assert record["tune_loss_after"] == pytest.approx(after / scale, rel=1e-4)
    assert after < 0.5 * before
    for name, lin in (("up", pruned.up), ("down", pruned.down)):
        assert torch.equal(lin.weight == 0, zeros[name]), name  # the 2:4 pattern, exactly
    assert all(torch.equal(v, pruned.norm.state_dict()[k]) for k, v in norm.items())
    assert all(p.requires_grad for p in pruned.parameters())  # flags restored
    assert record["tune_calls"] == len(calls)


def test_tune_block_is_deterministic_and_weights_calls_by_their_step_weight():
    _, a, calls = _toy_problem()
    _, b, _ = _toy_problem()
    tune_block(a, [a.up, a.down], calls, iters=50, lr=1e-3, seed=3)
    tune_block(b, [b.up, b.down], calls, iters=50, lr=1e-3, seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    # A call with weight 0 counts in neither the reported loss nor the steps: only the weighted calls are fitted.
    _, pruned, calls = _toy_problem(weights=[1.0, 0.0, 1.0, 0.0, 1.0, 0.0])
    record = tune_block(pruned, [pruned.up, pruned.down], calls, iters=200, lr=1e-3)
    scale = sum(float(c.targets[0].pow(2).mean()) for c in calls) / len(calls)
    assert record["tune_loss_after"] == pytest.approx(_toy_loss(pruned, calls[0::2]) / scale, rel=1e-4)


def test_half_precision_blocks_are_tuned_in_float32_and_stored_back_in_their_dtype():
    """bfloat16 would round every 1e-4 Adam step away; tuned in float32, the block still learns and stays bfloat16."""
    _, pruned, calls = _toy_problem()
    pruned.to(torch.bfloat16)
    calls = [RecordedCall(tuple(a.bfloat16() for a in c.args), c.kwargs, tuple(t if t is None else t.bfloat16()
                                                                             for t in c.targets), c.weight)
             for c in calls]
    zeros = pruned.up.weight == 0
    record = tune_block(pruned, [pruned.up, pruned.down], calls, iters=300, lr=1e-4)
    assert all(t.dtype == torch.bfloat16 for t in pruned.state_dict().values())
    assert torch.equal(pruned.up.weight == 0, zeros)
    assert record["tune_loss_after"] < 0.8 * record["tune_loss_before"]


def test_a_diverging_block_keeps_its_pruned_weights(caplog):
    _, pruned, calls = _toy_problem()
    start = {k: v.clone() for k, v in pruned.state_dict().items()}
    record = tune_block(pruned, [pruned.up, pruned.down], calls, iters=20, lr=10.0)
    assert record["tune_kept_start"] and record["tune_loss_after"] == record["tune_loss_before"]
    assert all(torch.equal(v, pruned.state_dict()[k]) for k, v in start.items())
    assert "smaller --tune-lr" in caplog.text
    record = tune_block(pruned, [pruned.up, pruned.down], calls, iters=20, lr=1e-3)
    assert not record["tune_kept_start"]


def test_tune_block_refuses_nothing_to_do():
    _, pruned, calls = _toy_problem()
    with pytest.raises(ValueError, match="iters >= 1"):
        tune_block(pruned, [pruned.up], calls, iters=0)
    with pytest.raises(ValueError, match="recorded calls"):
        tune_block(pruned, [pruned.up], [], iters=5)
    with pytest.raises(ValueError, match="step weight 0"):
        tune_block(pruned, [pruned.up], [RecordedCall(c.args, c.kwargs, c.targets, 0.0) for c in calls], iters=5)


def _record(pipe, dense, index, max_calls=256, steps=3, store=None):
    arch = arch_for_transformer(pipe.transformer)
    block = blocks(pipe.transformer, arch)[index]
    dense_block = dict(dense.named_modules())[block.name]
    call = call_kwargs(pipe.obsdiff_generation) | {"num_inference_steps": steps}
    tracker = StepTracker(pipe.scheduler, arch.timestep_scale, "log-decrease")
    return block, call, record_block_calls(pipe, dense, block, dense_block, PROMPTS, call, tracker, batch_size=2,
                                           max_calls=max_calls, store=store)


def test_recorded_targets_are_the_dense_blocks_outputs_on_the_same_calls(random_sd3_dir):
    """Unpruned: every target is the block's own output on the recorded inputs. With block 0 changed, the first
    call (same noise, same latents) still matches a dense pipeline run, and a later call does not."""
    pipe = load_pipeline(random_sd3_dir)
    dense = copy.deepcopy(pipe.transformer)
    block, call, calls = _record(pipe, dense, 2)
    assert len(calls) == 3  # 3 steps, one batch, uncond and cond in one call
    with torch.no_grad():
        for c in calls:
            out = block.module(*c.args, **c.kwargs)
            assert all(torch.allclose(o, t, atol=1e-6) for o, t in zip(out, c.targets) if o is not None)
    assert sorted(c.weight for c in calls) != [1.0, 1.0, 1.0]  # log-decrease weights, not the default

    dense_outputs = []
    h = pipe.transformer.transformer_blocks[2].register_forward_hook(lambda m, a, o: dense_outputs.append(o))
    run_pipeline(pipe, PROMPTS, 0, call, 2, output_type="latent", progress=False)
    h.remove()
    with torch.no_grad():
        pipe.transformer.transformer_blocks[0].ff.net[2].weight[:, ::2] = 0.0  # "prune" block 0
    _, _, pruned_calls = _record(pipe, dense, 2)
    assert all(torch.allclose(o, t, atol=1e-6) for o, t in zip(dense_outputs[0], pruned_calls[0].targets))
    assert not torch.allclose(dense_outputs[2][1], pruned_calls[2].targets[1], atol=1e-4)  # the trajectory moved
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in [*pipe.transformer.modules(), *dense.modules()])


def test_recording_keeps_at_most_max_calls(random_flux_dir):
    pipe = load_pipeline(random_flux_dir)
    _, _, calls = _record(pipe, copy.deepcopy(pipe.transformer), 1, max_calls=2)
    assert len(calls) == 2


def test_recording_over_the_cap_stores_only_the_kept_calls(random_sd3_dir, tmp_path):
    """Past the cap, a call the reservoir passes over is never stored and a replaced one's files are deleted at once:
    on disk the files alive at the end are exactly the kept calls', and they are the calls the in-memory run keeps."""
    from obsdiff_lite.cached import CacheStore

    pipe = load_pipeline(random_sd3_dir)
    dense = copy.deepcopy(pipe.transformer)
    _, _, in_memory = _record(pipe, dense, 1, max_calls=2, steps=8)
    store = CacheStore(f"disk:{tmp_path}")
    try:
        _, _, on_disk = _record(pipe, dense, 1, max_calls=2, steps=8, store=store)

        def tensors(c):
            return [t for t in (*c.args, *c.kwargs.values(), *c.targets) if isinstance(t, torch.Tensor)]

        per_call = len(tensors(on_disk[0]))
        files = list(tmp_path.rglob("*.pt"))
        assert len(files) == 2 * per_call < store._count  # calls were replaced, and their files deleted
        assert store._count < 8 * per_call  # not every call of the 8 was written
        assert [c.weight for c in on_disk] == [c.weight for c in in_memory]
        for a, b in zip(on_disk, in_memory):
            assert all(torch.equal(x, y) for x, y in zip(tensors(a), tensors(b)))
    finally:
        store.close()


@pytest.fixture(params=["sd3", "flux"])
def tuned_pair(request, random_sd3_dir, random_flux_dir):
    """(untuned pipe, tuned pipe, tuned report) pruned with the same 2:4 OBS-Diff settings."""
    path = random_sd3_dir if request.param == "sd3" else random_flux_dir
    config = dict(pattern="2:4", sparsity=None, packages=2, **FAST)
    plain, tuned = load_pipeline(path), load_pipeline(path)
    prune(plain, PruneConfig(**config), progress=False)
    report = prune(tuned, PruneConfig(tune_iters=30, tune_lr=1e-3, **config), progress=False)
    return plain, tuned, report, path, config


def test_prune_with_tuning_moves_only_the_kept_target_weights_and_lowers_every_blocks_loss(tuned_pair):
    plain, tuned, report, _, _ = tuned_pair
    targets = set(report["layers"])
    changed = 0
    for (name, p), q in zip(tuned.transformer.named_parameters(), plain.transformer.parameters()):
        layer = name.rsplit(".", 1)[0]
        if layer in targets:
            if name.endswith("weight"):
                assert torch.equal(p == 0, q == 0), name  # the same 2:4 zeros as without tuning
            changed += not torch.equal(p, q)
        else:
            assert torch.equal(p, q), name  # every other parameter exactly as pruning left it
    assert changed > 0
    arch = arch_for_transformer(tuned.transformer)
    assert set(report["tuning"]) == {b.name for b in blocks(tuned.transformer, arch)}
    for name, record in report["tuning"].items():
        assert record["tune_loss_after"] < record["tune_loss_before"], name
    assert report["timings"]["tune_s"] > 0 and report["config"]["tune_iters"] == 30
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in tuned.transformer.modules())


def test_prune_with_tuning_is_bit_identical_when_repeated(tuned_pair):
    _, tuned, _, path, config = tuned_pair
    again = load_pipeline(path)
    prune(again, PruneConfig(tune_iters=30, tune_lr=1e-3, **config), progress=False)
    assert all(torch.equal(a, b) for a, b in zip(tuned.transformer.state_dict().values(),
                                                 again.transformer.state_dict().values()))


def test_recorded_calls_on_disk_give_identical_weights_and_clean_up(random_sd3_dir, tmp_path, monkeypatch):
    """--cache-device disk: every recorded tensor (the block's keyword inputs too) goes to a memory-mapped file; the
    weights are those of the in-memory run and no file is left behind."""
    import obsdiff_lite.tune as tune

    stores = []

    class CountingStore(tune.CacheStore):
        def __init__(self, where=None):
            super().__init__(where)
            stores.append(self)

    monkeypatch.setattr(tune, "CacheStore", CountingStore)
    states = {}
    config = dict(pattern="2:4", sparsity=None, packages=2, tune_iters=10, **FAST)
    for where in (None, f"disk:{tmp_path}"):
        pipe = load_pipeline(random_sd3_dir)
        report = prune(pipe, PruneConfig(cache_device=where, **config), progress=False)
        states[where] = pipe.transformer.state_dict()
    assert all(torch.equal(states[None][k], states[f"disk:{tmp_path}"][k]) for k in states[None])
    on_disk = [s for s in stores if s.disk]
    assert len(on_disk) == len(report["tuning"])  # one store per tuned block
    # per call: hidden states, text states and temb in, the image stream out (and the text stream, but for the last
    # block, which has none)
    assert all(s._count >= 4 * r["tune_calls"] for s, r in zip(on_disk, report["tuning"].values()))
    del on_disk
    stores.clear()  # the test's own references: prune() keeps none
    gc.collect()
    assert list(tmp_path.iterdir()) == [], "recorded calls must be deleted after the run"


@pytest.mark.parametrize("model", ["sd3", "flux"])
def test_prune_with_tuning_in_half_precision(model, random_sd3_dir, random_flux_dir):
    """A bfloat16 pipeline end to end: the recorded keyword inputs (temb, rotary embeddings, ...) reach the block in
    its float32 working dtype, the loss of every block falls, and the zeros and the dtype are kept."""
    pipe = load_pipeline(random_sd3_dir if model == "sd3" else random_flux_dir, dtype=torch.bfloat16)
    report = prune(pipe, PruneConfig(pattern="2:4", sparsity=None, packages=1, tune_iters=10, tune_lr=1e-3, **FAST),
                   progress=False)
    assert report["tuning"] and all(r["tune_loss_after"] < r["tune_loss_before"] for r in report["tuning"].values())
    for name in report["layers"]:
        weight = pipe.transformer.get_submodule(name).weight
        assert weight.dtype == torch.bfloat16
        assert ((weight.reshape(weight.shape[0], -1, 4) == 0).sum(-1) >= 2).all(), name

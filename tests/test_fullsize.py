"""Full-size SD3-medium / SD3.5-large / Flux architectures (random weights, no download): shapes work."""

from __future__ import annotations

import torch

from obsdiff_lite.arch import JOINT_BLOCK, Block, block_units, blocks, build_full_size_transformer
from obsdiff_lite.hessian import HessianAccumulator
from obsdiff_lite.obs import sparsify_weight


def _targets(transformer):
    return [n for b in blocks(transformer) for unit in block_units(b) for group in unit for n in group]


def test_full_size_architectures_are_described_by_arch():
    """Parameter counts match the published sizes; every block's 12 (or 5) linears are found."""
    sd3 = build_full_size_transformer("sd3-medium")  # meta device: shapes only, no memory
    assert len(blocks(sd3)) == 24
    assert len(_targets(sd3)) == 23 * 12 + 9  # the last block is context_pre_only
    assert abs(sum(p.numel() for p in sd3.parameters()) / 1e9 - 2.03) < 0.01  # paper Table 9: 2.03 B
    large = build_full_size_transformer("sd3.5-large")
    assert abs(sum(p.numel() for p in large.parameters()) / 1e9 - 8.06) < 0.03  # paper Table 4: 8.06 B
    flux = build_full_size_transformer("flux-dev")
    assert len(blocks(flux)) == 19 + 38
    assert len(_targets(flux)) == 19 * 12 + 38 * 5
    assert abs(sum(p.numel() for p in flux.parameters()) / 1e9 - 11.9) < 0.1  # Flux.1-dev: ~12 B


def test_one_sd3_medium_block_hessians_and_solve():
    """One real-size JointTransformerBlock: shared Hessians per input group, then a 50% OBS solve."""
    from diffusers.models.attention import JointTransformerBlock

    torch.manual_seed(0)
    module = JointTransformerBlock(dim=1536, num_attention_heads=24, attention_head_dim=64, context_pre_only=False)
    block = Block(0, "transformer_blocks.0", JOINT_BLOCK, module.eval())
    groups = [g for unit in block_units(block) for g in unit]
    assert len(groups) == 8  # 12 linears, 8 unique inputs (q/k/v and add_q/k/v share theirs)
    accs, handles = {}, []
    for group in groups:
        linear = module.get_submodule(group[0])
        accs[group[0]] = acc = HessianAccumulator(linear.in_features)
        handles.append(linear.register_forward_pre_hook(lambda m, a, acc=acc: acc.add_batch(a[0].reshape(-1, a[0].shape[-1]), 1.1)))
    hidden, context, temb = torch.randn(1, 64, 1536), torch.randn(1, 16, 1536), torch.randn(1, 1536)
    with torch.no_grad():
        module(hidden_states=hidden, encoder_hidden_states=context, temb=temb)
    for h in handles:
        h.remove()
    assert accs["ff.net.2"].hessian.shape == (6144, 6144)
    assert accs["attn.to_q"].num_rows == 64 and accs["attn.add_q_proj"].num_rows == 16
    for name in ("attn.to_q", "attn.to_out.0"):  # the 6144-wide solve is covered by the tiny models' tests
        linear = module.get_submodule(name)
        new, keep, stats = sparsify_weight(linear.weight.data, accs[name].hessian, 0.5)
        assert new.shape == linear.weight.shape and torch.isfinite(new).all()
        assert abs(float((new == 0).float().mean()) - 0.5) < 0.005
    # --refit at full width (a few CG steps: the shapes, the kept mask and a lower error are what is checked here)
    linear = module.get_submodule("attn.to_out.0")
    _, keep, stats = sparsify_weight(linear.weight.data, accs["attn.to_out.0"].hessian, 0.5)
    refit, refit_keep, refit_stats = sparsify_weight(linear.weight.data, accs["attn.to_out.0"].hessian, 0.5, refit_iters=5)
    assert torch.equal(refit_keep, keep) and torch.isfinite(refit).all() and refit_stats["refit_iters"] == 5
    assert refit_stats["recon_error"] < stats["recon_error"]


def test_sd35_medium_dual_attention_blocks_are_described_by_arch():
    """SD3.5-medium: attn2 (4 linears, 2 shared inputs) in blocks 0-12; every block linear but AdaLN's is a target."""
    medium = build_full_size_transformer("sd3.5-medium")
    all_blocks = blocks(medium)
    assert len(all_blocks) == 24
    assert len(_targets(medium)) == 13 * 16 + 10 * 12 + 9
    for block in all_blocks:
        names = {n for unit in block_units(block) for group in unit for n in group}
        assert ("attn2.to_out.0" in names) == (block.index < 13)
        for name, module in block.module.named_modules():
            if isinstance(module, torch.nn.Linear):
                assert name in names or "norm" in name, f"{block.name}.{name} is neither a target nor AdaLN"


def test_one_sd3_medium_block_admm_and_block_tuning():
    """The two steps beyond the paper at full width: ADMM after OBS on the 1536-wide attention output (2:4), and
    block tuning of a bfloat16 block (tuned in float32, rounded back) with its zeros and its other weights kept."""
    from diffusers.models.attention import JointTransformerBlock

    from obsdiff_lite.obs import admm_sparsify_weights
    from obsdiff_lite.tune import RecordedCall, tune_block

    torch.manual_seed(0)
    module = JointTransformerBlock(dim=1536, num_attention_heads=24, attention_head_dim=64, context_pre_only=False).eval()
    out_proj = module.get_submodule("attn.to_out.0")
    acc = HessianAccumulator(1536)
    handle = out_proj.register_forward_pre_hook(lambda m, a: acc.add_batch(a[0].reshape(-1, 1536)))
    calls = []
    for _ in range(2):
        kwargs = {"hidden_states": torch.randn(1, 64, 1536), "encoder_hidden_states": torch.randn(1, 16, 1536),
                  "temb": torch.randn(1, 1536)}
        with torch.no_grad():
            calls.append(RecordedCall((), kwargs, tuple(module(**kwargs)), 1.0))
    handle.remove()

    [(new, keep, stats)] = admm_sparsify_weights([out_proj.weight.data], acc.hessian, n=2, m=4, iters=5)
    assert new.shape == (1536, 1536) and torch.isfinite(new).all()
    assert (keep.reshape(1536, -1, 4).sum(-1) == 2).all() and torch.equal(new != 0, keep)
    assert stats["recon_error"] <= stats["recon_error_obs"]

    module = module.to(torch.bfloat16)
    tuned = [module.get_submodule(name) for name in ("attn.to_q", "ff.net.2")]
    for linear in tuned:  # magnitude 50% per row
        w = linear.weight.data
        w.mul_(w.abs() >= w.abs().float().median(dim=1, keepdim=True).values.to(w.dtype))
    before = {name: p.detach().clone() for name, p in module.named_parameters()}
    record = tune_block(module, tuned, calls, iters=3)
    assert record["tune_loss_after"] < record["tune_loss_before"] and not record["tune_kept_start"]
    assert record["tune_calls"] == 2
    for name, p in module.named_parameters():
        assert p.dtype == torch.bfloat16 and torch.isfinite(p).all(), name
        if name.startswith(("attn.to_q.", "ff.net.2.")):
            assert torch.equal(p == 0, before[name] == 0) if name.endswith("weight") else p.shape == before[name].shape
        else:
            assert torch.equal(p, before[name]), name

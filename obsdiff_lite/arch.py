"""MMDiT architectures described as data: which linears a block has, which share an input, in what order.

A block is a sequence of *units* (the paper's "basic units": layers whose inputs do not depend on
each other). A unit is a tuple of *input groups*; the linears of one input group read the very same
tensor, so they share one Hessian (SD3/Flux: to_q/to_k/to_v; add_q/add_k/add_v; Flux single
blocks: to_q/to_k/to_v and proj_mlp). Supporting another MMDiT is a new ``BlockSpec``/``ArchSpec``,
not an ``if`` chain. Names absent from a concrete block (SD3's last, ``context_pre_only`` block has
no ``to_add_out`` or ``ff_context``; only SD3.5-medium's first 13 blocks have the image-only
self-attention ``attn2``) are skipped.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

InputGroup = tuple[str, ...]
Unit = tuple[InputGroup, ...]


@dataclass(frozen=True)
class HeadSpec:
    """Where attention heads live in a block: rows of the q/k/v projections, columns of the outputs."""

    qkv: tuple[str, ...]  # linears whose output rows are grouped by head
    out: tuple[str, ...]  # linears whose input columns are grouped by head
    out_columns: str = "all"  # "all", or "first" = the first heads*head_dim columns (Flux single proj_out)


@dataclass(frozen=True)
class FFNSpec:
    """An FFN whose hidden neurons are rows of ``up`` and input columns of ``down``."""

    up: str
    down: str
    down_columns: str = "all"  # "all", or "after_attention" (Flux single proj_out: columns past dim)


@dataclass(frozen=True)
class BlockSpec:
    """One kind of transformer block: its units in data-flow order, and its heads and FFNs."""

    kind: str
    units: tuple[Unit, ...]
    heads: HeadSpec | None = None
    ffns: tuple[FFNSpec, ...] = ()
    image_inputs: tuple[str, ...] = ()  # input groups (first names) that read image tokens only


@dataclass(frozen=True)
class ArchSpec:
    """A transformer family: its block lists in forward order and how it passes the timestep."""

    name: str
    pipeline_class: str
    transformer_class: str
    block_lists: tuple[tuple[str, BlockSpec], ...]  # (attribute on the transformer, spec), in forward order
    timestep_scale: float  # multiply the transformer's `timestep` argument by this to get scheduler units
    pipeline_kwargs: tuple[tuple[str, object], ...] = ()  # from_pretrained extras (e.g. no T5 for tiny SD3)
    # How the pipeline runs classifier-free guidance: "batch" = one call with [uncond; cond] along dim 0 (SD3),
    # "calls" = a cond call, then an uncond call (Flux true CFG); which call argument holds the scale, the
    # pipeline's default scale, and whether CFG also needs a negative prompt (Flux: no negative, no true CFG).
    cfg_layout: str = "batch"
    cfg_scale_key: str = "guidance_scale"
    cfg_default_scale: float = 7.0
    cfg_needs_negative_prompt: bool = False


# attn2 (SD3.5 dual attention) is a second, image-only self-attention on its own modulation of the hidden
# states: its q/k/v read a tensor of their own, in parallel with the joint attention's.
_JOINT_UNITS: tuple[Unit, ...] = (
    (("attn.to_q", "attn.to_k", "attn.to_v"), ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
     ("attn2.to_q", "attn2.to_k", "attn2.to_v")),
    (("attn.to_out.0",), ("attn.to_add_out",), ("attn2.to_out.0",)),
    (("ff.net.0.proj",), ("ff_context.net.0.proj",)),
    (("ff.net.2",), ("ff_context.net.2",)),
)

JOINT_BLOCK = BlockSpec(
    kind="joint",
    units=_JOINT_UNITS,
    heads=HeadSpec(
        qkv=("attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
        out=("attn.to_out.0", "attn.to_add_out"),
    ),
    ffns=(FFNSpec("ff.net.0.proj", "ff.net.2"), FFNSpec("ff_context.net.0.proj", "ff_context.net.2")),
    # The add_*/ff_context groups read text tokens. attn2's heads are not structured-pruned (HeadSpec: the joint
    # attention's); unstructured and N:M prune its linears like the others.
    image_inputs=("attn.to_q", "attn.to_out.0", "ff.net.0.proj", "ff.net.2", "attn2.to_q", "attn2.to_out.0"),
)

FLUX_SINGLE_BLOCK = BlockSpec(
    kind="single",
    units=((("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),), (("proj_out",),)),
    heads=HeadSpec(qkv=("attn.to_q", "attn.to_k", "attn.to_v"), out=("proj_out",), out_columns="first"),
    ffns=(FFNSpec("proj_mlp", "proj_out", down_columns="after_attention"),),
)

SD3 = ArchSpec(
    name="sd3",
    pipeline_class="StableDiffusion3Pipeline",
    transformer_class="SD3Transformer2DModel",
    block_lists=(("transformer_blocks", JOINT_BLOCK),),
    timestep_scale=1.0,  # SD3 passes scheduler timesteps (0..1000)
)

FLUX = ArchSpec(
    name="flux",
    pipeline_class="FluxPipeline",
    transformer_class="FluxTransformer2DModel",
    block_lists=(("transformer_blocks", JOINT_BLOCK), ("single_transformer_blocks", FLUX_SINGLE_BLOCK)),
    timestep_scale=1000.0,  # Flux passes timestep / 1000
    cfg_layout="calls",
    cfg_scale_key="true_cfg_scale",  # Flux.1-dev itself is guidance-distilled (no true CFG) by default
    cfg_default_scale=1.0,
    cfg_needs_negative_prompt=True,
)

ARCHS: dict[str, ArchSpec] = {a.name: a for a in (SD3, FLUX)}


def cfg_scale(arch: ArchSpec, call: dict) -> float | None:
    """The classifier-free guidance scale a pipeline call runs with, or None when it runs without CFG."""
    scale = float(call.get(arch.cfg_scale_key, arch.cfg_default_scale))
    if scale <= 1.0 or (arch.cfg_needs_negative_prompt and call.get("negative_prompt") is None):
        return None
    return scale


def cfg_factors(arch: ArchSpec, call: dict) -> tuple[int, int]:
    """(batch factor, calls per step) of a pipeline call: SD3 batches CFG halves, Flux true CFG makes two calls."""
    if cfg_scale(arch, call) is None:
        return 1, 1
    return (2, 1) if arch.cfg_layout == "batch" else (1, 2)


def reads_image_tokens_only(arch: ArchSpec, key: str) -> bool:
    """Whether the input group ``key`` ("<block list>.<i>.<first linear>") reads image tokens only."""
    for attr, spec in arch.block_lists:
        if key.startswith(f"{attr}."):
            name = key[len(attr) + 1 :].split(".", 1)[1]
            return name in spec.image_inputs
    raise ValueError(f"{key!r} is not in any block list of {arch.name} ({', '.join(a for a, _ in arch.block_lists)})")


def arch_for_transformer(transformer: nn.Module) -> ArchSpec:
    """The ArchSpec whose transformer class matches ``transformer`` (clear error otherwise)."""
    name = type(transformer).__name__
    for arch in ARCHS.values():
        if arch.transformer_class == name:
            return arch
    supported = ", ".join(f"{a.transformer_class} ({a.pipeline_class})" for a in ARCHS.values())
    raise ValueError(f"unsupported transformer {name}; obsdiff_lite supports: {supported}")


def arch_for_pipeline_class(class_name: str) -> ArchSpec:
    """The ArchSpec for a diffusers pipeline class name, e.g. 'StableDiffusion3Pipeline'."""
    for arch in ARCHS.values():
        if arch.pipeline_class == class_name:
            return arch
    supported = ", ".join(a.pipeline_class for a in ARCHS.values())
    raise ValueError(f"unsupported pipeline {class_name!r}; obsdiff_lite supports: {supported}")


@dataclass(frozen=True)
class Block:
    """One concrete block of a transformer: its global index, its spec and the module."""

    index: int
    name: str  # e.g. "transformer_blocks.3"
    spec: BlockSpec
    module: nn.Module


def blocks(transformer: nn.Module, arch: ArchSpec | None = None) -> list[Block]:
    """All blocks in forward order with a global index (Flux: double-stream first, then single)."""
    arch = arch or arch_for_transformer(transformer)
    out: list[Block] = []
    for attr, spec in arch.block_lists:
        for i, module in enumerate(getattr(transformer, attr)):
            out.append(Block(len(out), f"{attr}.{i}", spec, module))
    return out


def get_linear(block: nn.Module, name: str) -> nn.Linear | None:
    """The nn.Linear at dotted ``name`` inside ``block``, or None if the block lacks it."""
    module: nn.Module | None = block
    for part in name.split("."):
        module = getattr(module, part, None) if module is not None else None
        if module is None:
            return None
    return module if isinstance(module, nn.Linear) else None


def block_units(block: Block) -> list[list[list[str]]]:
    """The block's units with only the linears it really has (empty groups and units dropped)."""
    units = []
    for unit in block.spec.units:
        groups = [[n for n in group if get_linear(block.module, n) is not None] for group in unit]
        groups = [g for g in groups if g]
        if groups:
            units.append(groups)
    return units


def parse_block_range(text: str | None, num_blocks: int) -> list[int]:
    """'START:END' (Python slice semantics, END exclusive, either may be empty) -> block indices."""
    if text is None or text == "":
        return list(range(num_blocks))
    if not isinstance(text, str):
        raise ValueError(f"--blocks must be a 'START:END' string (e.g. '1:{num_blocks - 1}'), got {text!r}")
    parts = text.split(":")
    if len(parts) != 2:
        raise ValueError(f"--blocks {text!r} must look like START:END (e.g. 1:23), with 0 <= START < END <= {num_blocks}")
    try:
        start = int(parts[0]) if parts[0] else 0
        end = int(parts[1]) if parts[1] else num_blocks
    except ValueError:
        raise ValueError(f"--blocks {text!r}: START and END must be integers (e.g. 1:{num_blocks - 1})") from None
    if not (0 <= start < end <= num_blocks):
        raise ValueError(
            f"--blocks {text!r} selects no block of this model: it has {num_blocks} blocks, "
            f"so use 0 <= START < END <= {num_blocks}"
        )
    return list(range(start, end))


# Full-size transformer configs (public diffusers configs), for random-weight timing/memory checks and
# the memory planner. No weights are ever downloaded: these only describe shapes.
FULL_SIZE_CONFIGS: dict[str, tuple[str, dict]] = {
    "sd3-medium": ("SD3Transformer2DModel", dict(
        sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
        num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
        pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192)),
    "sd3.5-medium": ("SD3Transformer2DModel", dict(
        sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
        num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
        pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=384, qk_norm="rms_norm",
        dual_attention_layers=tuple(range(13)))),
    "sd3.5-large": ("SD3Transformer2DModel", dict(
        sample_size=128, patch_size=2, in_channels=16, num_layers=38, attention_head_dim=64,
        num_attention_heads=38, joint_attention_dim=4096, caption_projection_dim=2432,
        pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192, qk_norm="rms_norm")),
    "flux-dev": ("FluxTransformer2DModel", dict(
        patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
        num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
        axes_dims_rope=(16, 56, 56))),
}


def build_full_size_transformer(name: str, device: str | None = "meta", dtype=None, overrides: dict | None = None):
    """A random-init (or, on the meta device, storage-free) full-size transformer of a known config."""
    import diffusers
    import torch

    if name not in FULL_SIZE_CONFIGS:
        raise ValueError(f"unknown full-size config {name!r}; choose one of {', '.join(FULL_SIZE_CONFIGS)}")
    class_name, config = FULL_SIZE_CONFIGS[name]
    config = dict(config, **(overrides or {}))
    with torch.device(device or "cpu"):
        model = getattr(diffusers, class_name)(**config)
    return model.to(dtype) if dtype is not None else model

"""Build the tiny SD3 and Flux pipelines from scratch, offline, with the real diffusers classes.

Everything here is random-init: tokenizers are trained on the caption grammar, text encoders stay
at a fixed random init (a deterministic function of the caption is all the conditioning needs),
the VAE and the transformer are trained by ``obsdiff_lite.shapes.train``.
"""

from __future__ import annotations

import json

import torch

from .dataset import COLORS, POSITIONS, SHAPES, SIZES

TOKEN_LENGTH = 16  # CLIP/T5 context length of the tiny encoders (captions are <= 10 tokens)
LATENT_CHANNELS = 8

# Architecture of the tiny transformers (hidden 64 = 4 heads x 16). Small on purpose: the tiny
# world must stay *sensitive* to pruning the way SD3-medium is (see the foundation issue).
TINY_SD3 = dict(num_layers=6, num_attention_heads=4, attention_head_dim=16, patch_size=2)
TINY_FLUX = dict(num_layers=2, num_single_layers=4, num_attention_heads=4, attention_head_dim=16)

# Recommended pipeline call arguments, written to each model's generation.json. Keys starting with
# "_" are obsdiff_lite metadata, not call arguments ("_prompts": where calibration prompts come from).
GENERATION = {
    "sd3": {"_prompts": "shapes", "num_inference_steps": 20, "guidance_scale": 4.0, "height": 32, "width": 32, "max_sequence_length": 4},
    "flux": {
        "_prompts": "shapes",
        "num_inference_steps": 20,
        "true_cfg_scale": 4.0,
        "negative_prompt": "",
        "height": 32,
        "width": 32,
        "max_sequence_length": TOKEN_LENGTH,
    },
}


def caption_corpus() -> list[str]:
    """Every word sequence the grammar can produce (used to train the tokenizers)."""
    from .dataset import all_specs

    return [s.caption() for s in all_specs()]


def _vocabulary_words() -> list[str]:
    words = {"a", "at", "the", "in"} | set(SHAPES) | set(COLORS) | set(SIZES)
    for p in POSITIONS:
        words |= set(p.split())
    return sorted(words)


def canonical_bpe_vocab(vocab: dict[str, int], num_merges: int, num_special: int) -> dict[str, int]:
    """The trained BPE vocabulary with its initial alphabet in sorted order, so that token ids are reproducible.

    The ``tokenizers`` trainer numbers the single characters in hash-map order, which changes from process to
    process (the same caption got a different first id in every build); the merges and the special tokens are
    stable. Ids: specials first, then the alphabet sorted, then one token per merge in merge order, as before.
    """
    ordered = sorted(vocab, key=vocab.get)
    alphabet_end = len(ordered) - num_merges
    tokens = ordered[:num_special] + sorted(ordered[num_special:alphabet_end]) + ordered[alphabet_end:]
    return {token: i for i, token in enumerate(tokens)}


def build_clip_tokenizer():
    """A CLIP BPE tokenizer whose merges are learned from the caption grammar."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import CLIPTokenizer

    special = ["<|startoftext|>", "<|endoftext|>"]
    bpe = Tokenizer(models.BPE(unk_token="<|endoftext|>", end_of_word_suffix="</w>"))
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=special, end_of_word_suffix="</w>", show_progress=False)
    # Repeat the word list so that every word earns its own merge chain.
    bpe.train_from_iterator(caption_corpus() + _vocabulary_words() * 4, trainer)
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    tok = CLIPTokenizer(vocab=canonical_bpe_vocab(model["vocab"], len(merges), len(special)), merges=merges)
    tok.model_max_length = TOKEN_LENGTH
    return tok


def build_t5_tokenizer():
    """A T5 Unigram tokenizer over the caption grammar: one piece per word, characters as fallback."""
    from transformers import T5Tokenizer

    # Whole words get a far higher log-probability than any spelling of them from characters,
    # so the Unigram segmentation is one token per word; single characters keep any text encodable.
    letters = sorted(set("".join(_vocabulary_words())) | set("abcdefghijklmnopqrstuvwxyz"))
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -5.0)]
    vocab += [("\u2581" + w, -1.0) for w in _vocabulary_words()]
    vocab += [(c, -10.0) for c in letters]
    tok = T5Tokenizer(vocab=vocab, extra_ids=0)
    tok.model_max_length = TOKEN_LENGTH
    return tok


def build_vae():
    """A tiny AutoencoderKL: 32x32x3 pixels <-> 16x16x8 latents (one 2x downsample)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=8,
        sample_size=32,
        scaling_factor=1.0,
        shift_factor=0.0,
    )


def _clip_text_config(vocab_size: int, tok, with_projection: bool):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=TOKEN_LENGTH,
        projection_dim=32,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )


def build_sd3_pipeline(vae=None, seed: int = 0, num_attention_heads: int | None = None):
    """A random-init tiny ``StableDiffusion3Pipeline`` (no T5: text_encoder_3 = None).

    ``num_attention_heads`` widens the transformer (hidden = heads x 16; default TINY_SD3's 4), for the
    width-scaling experiment; depth, text encoders and VAE stay the same.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tok = build_clip_tokenizer()
    tok2 = build_clip_tokenizer()
    te = CLIPTextModelWithProjection(_clip_text_config(len(tok), tok, True)).eval()
    te2 = CLIPTextModelWithProjection(_clip_text_config(len(tok2), tok2, True)).eval()
    heads = TINY_SD3["num_attention_heads"] if num_attention_heads is None else int(num_attention_heads)
    if heads < 1:
        raise ValueError(f"num_attention_heads must be >= 1, got {heads}")
    inner = heads * TINY_SD3["attention_head_dim"]
    transformer = SD3Transformer2DModel(
        sample_size=16,
        patch_size=TINY_SD3["patch_size"],
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        num_layers=TINY_SD3["num_layers"],
        attention_head_dim=TINY_SD3["attention_head_dim"],
        num_attention_heads=heads,
        joint_attention_dim=64,
        caption_projection_dim=inner,
        pooled_projection_dim=64,
        pos_embed_max_size=16,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=vae if vae is not None else build_vae(),
        text_encoder=te,
        tokenizer=tok,
        text_encoder_2=te2,
        tokenizer_2=tok2,
        text_encoder_3=None,
        tokenizer_3=None,
    )


def build_flux_pipeline(vae=None, seed: int = 0):
    """A random-init tiny ``FluxPipeline`` with double- and single-stream blocks (no guidance embedding)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    tok = build_clip_tokenizer()
    tok2 = build_t5_tokenizer()
    te = CLIPTextModel(_clip_text_config(len(tok), tok, False)).eval()
    te2 = T5EncoderModel(
        T5Config(
            vocab_size=len(tok2), d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2,
            pad_token_id=tok2.pad_token_id, eos_token_id=tok2.eos_token_id, decoder_start_token_id=0,
        )
    ).eval()
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=LATENT_CHANNELS * 4,  # Flux packs 2x2 latent patches into channels
        num_layers=TINY_FLUX["num_layers"],
        num_single_layers=TINY_FLUX["num_single_layers"],
        attention_head_dim=TINY_FLUX["attention_head_dim"],
        num_attention_heads=TINY_FLUX["num_attention_heads"],
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=False,
        axes_dims_rope=(4, 6, 6),
    )
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    return FluxPipeline(
        transformer=transformer, scheduler=scheduler, vae=vae if vae is not None else build_vae(),
        text_encoder=te, tokenizer=tok, text_encoder_2=te2, tokenizer_2=tok2,
    )


def build_pipeline(arch: str, vae=None, seed: int = 0, num_attention_heads: int | None = None):
    """A random-init tiny pipeline of the given architecture ('sd3' or 'flux'); only sd3 takes a head count."""
    builders = {"sd3": build_sd3_pipeline, "flux": build_flux_pipeline}
    if arch not in builders:
        raise ValueError(f"unknown tiny architecture {arch!r}; choose one of {sorted(builders)}")
    if num_attention_heads is None:
        return builders[arch](vae=vae, seed=seed)
    if arch != "sd3":
        raise ValueError(f"num_attention_heads is only supported for the tiny sd3 architecture, not {arch!r}")
    return builders[arch](vae=vae, seed=seed, num_attention_heads=num_attention_heads)

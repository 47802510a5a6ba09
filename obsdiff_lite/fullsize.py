"""Full-size SD3-medium / Flux.1-dev pipelines with random weights, for timing and memory checks.

Nothing is downloaded: the transformer is built from its published config (``arch.FULL_SIZE_CONFIGS``),
and the text encoders and VAE are tiny random stand-ins with the right output widths, so that the
pipeline runs the full-size transformer at real token counts (the part OBS-Diff touches). Images
are meaningless; times and memory are real.
"""

from __future__ import annotations

import torch

from .arch import FULL_SIZE_CONFIGS, build_full_size_transformer


def _tiny_vae(latent_channels: int, dtype):
    """A 4-level (scale factor 8) AutoencoderKL with a few channels: shapes right, compute negligible."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent_channels, layers_per_block=1, norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8), scaling_factor=1.0, shift_factor=0.0,
    ).to(dtype)


def _clip(hidden: int, projection: bool, tok, dtype):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=64, num_hidden_layers=1,
                            num_attention_heads=1, max_position_embeddings=77, projection_dim=hidden,
                            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    return cls(config).to(dtype).eval()


def build_random_pipeline(name: str, device: str = "cpu", dtype: torch.dtype = torch.float32,
                          overrides: dict | None = None):
    """A runnable pipeline around a random-init full-size transformer (``overrides`` shrink it for tests)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, StableDiffusion3Pipeline

    from .shapes.tiny import build_clip_tokenizer, build_t5_tokenizer

    class_name, config = FULL_SIZE_CONFIGS[name]
    config = dict(config, **(overrides or {}))
    # Built directly on the target device (default init: finite, fast on a GPU), then cast.
    transformer = build_full_size_transformer(name, device=device, dtype=dtype, overrides=overrides).eval()
    tok = build_clip_tokenizer()
    tok.model_max_length = 77
    if class_name == "SD3Transformer2DModel":
        # CLIP-L (768) + CLIP-G (1280) pooled = 2048; their token embeddings are zero-padded to 4096.
        pooled = config["pooled_projection_dim"]
        first = min(768, pooled // 2)
        pipe = StableDiffusion3Pipeline(
            transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
            vae=_tiny_vae(config["in_channels"], dtype), text_encoder=_clip(first, True, tok, dtype), tokenizer=tok,
            text_encoder_2=_clip(pooled - first, True, tok, dtype), tokenizer_2=build_clip_tokenizer(),
            text_encoder_3=None, tokenizer_3=None,
        )
        pipe.tokenizer_2.model_max_length = 77
    else:
        from transformers import T5Config, T5EncoderModel

        t5_tok = build_t5_tokenizer()
        t5_tok.model_max_length = 512
        t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tok), d_model=config["joint_attention_dim"], d_kv=8, d_ff=64,
                                     num_layers=1, num_heads=1, pad_token_id=t5_tok.pad_token_id,
                                     eos_token_id=t5_tok.eos_token_id, decoder_start_token_id=0)).to(dtype).eval()
        pipe = FluxPipeline(
            transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True),
            vae=_tiny_vae(config["in_channels"] // 4, dtype), text_encoder=_clip(config["pooled_projection_dim"], False, tok, dtype),
            tokenizer=tok, text_encoder_2=t5, tokenizer_2=t5_tok,
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)

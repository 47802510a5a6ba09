"""Train the tiny world's VAE and transformers on the captioned-shapes dataset (CPU, minutes).

Rectified flow as in SD3/Flux: x_t = (1 - t) x0 + t noise, the transformer predicts noise - x0,
t is logit-normal, captions are dropped 10% of the time (for classifier-free guidance), and the
saved weights are an EMA (0.999) of the trained ones. Seeded; logs the loss every 100 steps and the
EMA model's ShapeBench adherence at every checkpoint to ``training_log.jsonl``.

    python -m obsdiff_lite.shapes.train vae --out runs/tiny-vae --minutes 4
    python -m obsdiff_lite.shapes.train sd3 --vae runs/tiny-vae --out data/tiny-sd3 --minutes 40
    python -m obsdiff_lite.shapes.train flux --vae runs/tiny-vae --out data/tiny-flux --minutes 40
    # the width-scaling models: tiny-sd3's recipe and step count, 1.5x and 2x as wide (6 / 8 heads, hidden 96 / 128)
    python -m obsdiff_lite.shapes.train sd3 --vae data/tiny-sd3/vae --out data/tiny-sd3-mid --heads 6 --steps 5130
    python -m obsdiff_lite.shapes.train sd3 --vae data/tiny-sd3/vae --out data/tiny-sd3-wide --heads 8 --steps 5130
    # and the fit side: tiny-sd3 trained as many steps again at its own width
    python -m obsdiff_lite.shapes.train sd3 --vae data/tiny-sd3/vae --out data/tiny-sd3-long --resume data/tiny-sd3 --steps 5130

Training is not part of CI; the trained pipelines are committed under ``data/``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .dataset import all_specs, make_dataset, to_tensor_range
from .tiny import GENERATION, build_pipeline, build_vae


def _log(path: Path, record: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def train_vae(out: Path, minutes: float = 4.0, batch_size: int = 64, seed: int = 0, kl_weight: float = 1e-6):
    """Train the tiny AutoencoderKL to reconstruct shapes; set its scaling/shift factors; save it."""
    torch.manual_seed(seed)
    vae = build_vae().train()
    images, _ = make_dataset(20_000, seed=seed + 11)
    pixels = to_tensor_range(images)
    opt = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "training_log.jsonl"
    log.unlink(missing_ok=True)
    start, step = time.time(), 0
    with tqdm(desc="vae", unit="step") as bar:
        while time.time() - start < minutes * 60:
            x = pixels[torch.randint(0, len(pixels), (batch_size,), generator=gen)]
            post = vae.encode(x).latent_dist
            recon = vae.decode(post.sample(generator=gen)).sample
            loss = F.mse_loss(recon, x) + kl_weight * post.kl().mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            bar.update()
            if step % 50 == 0:
                bar.set_postfix(loss=f"{loss.item():.4f}")
                _log(log, {"step": step, "seconds": round(time.time() - start, 1), "loss": loss.item()})
    vae.eval()
    with torch.no_grad():
        z = torch.cat([vae.encode(pixels[i : i + 512]).latent_dist.mode() for i in range(0, 4096, 512)])
        recon = vae.decode(vae.encode(pixels[:512]).latent_dist.mode()).sample
    shift, scale = z.mean().item(), 1.0 / z.std().item()
    vae.register_to_config(shift_factor=shift, scaling_factor=scale)
    psnr = 10 * math.log10(4.0 / F.mse_loss(recon, pixels[:512]).item())
    _log(log, {"final": True, "steps": step, "recon_psnr_db": psnr, "shift_factor": shift, "scaling_factor": scale})
    vae.save_pretrained(out, safe_serialization=True)
    print(f"vae: {step} steps, reconstruction PSNR {psnr:.1f} dB, saved to {out}")
    return vae


def _caption_embeddings(pipe, arch: str) -> dict[str, tuple[torch.Tensor, ...]]:
    """Text conditioning for every caption of the grammar and for the empty caption (frozen encoders)."""
    captions = [s.caption() for s in all_specs()] + [""]
    msl = GENERATION[arch]["max_sequence_length"]
    with torch.no_grad():
        if arch == "sd3":
            emb, _, pooled, _ = pipe.encode_prompt(
                captions, None, None, device="cpu", do_classifier_free_guidance=False, max_sequence_length=msl
            )
        else:
            emb, pooled, _ = pipe.encode_prompt(captions, None, device="cpu", max_sequence_length=msl)
    return {"emb": emb, "pooled": pooled, "n_captions": len(captions) - 1}


def _encode_latents(vae, images: np.ndarray) -> torch.Tensor:
    cfg = vae.config
    out = []
    with torch.no_grad():
        for i in range(0, len(images), 512):
            z = vae.encode(to_tensor_range(images[i : i + 512])).latent_dist.mode()
            out.append((z - cfg.shift_factor) * cfg.scaling_factor)
    return torch.cat(out)


def _velocity(pipe, arch: str, model, x_t: torch.Tensor, t: torch.Tensor, emb, pooled) -> torch.Tensor:
    """The transformer's prediction in latent layout (B, C, H, W), called as the pipeline calls it."""
    if arch == "sd3":
        return model(hidden_states=x_t, encoder_hidden_states=emb, pooled_projections=pooled, timestep=t * 1000).sample
    b, c, h, w = x_t.shape
    packed = pipe._pack_latents(x_t, b, c, h, w)
    img_ids = pipe._prepare_latent_image_ids(b, h // 2, w // 2, x_t.device, x_t.dtype)
    txt_ids = torch.zeros(emb.shape[1], 3)
    v = model(
        hidden_states=packed, timestep=t, pooled_projections=pooled, encoder_hidden_states=emb,
        txt_ids=txt_ids, img_ids=img_ids,
    ).sample
    return v.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


def train_transformer(
    arch: str,
    vae_dir: Path,
    out: Path,
    minutes: float = 40.0,
    batch_size: int = 64,
    lr: float = 1e-3,
    ema_decay: float = 0.999,
    caption_dropout: float = 0.1,
    num_images: int = 30_000,
    seed: int = 0,
    checkpoint_minutes: float = 5.0,
    resume: Path | None = None,
    steps: int | None = None,
    num_attention_heads: int | None = None,
):
    """Train the tiny transformer of ``arch`` for a wall-clock budget (or exactly ``steps`` optimizer steps, which
    makes runs on differently loaded machines comparable); save the pipeline with EMA weights."""
    if steps is not None and steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL.from_pretrained(vae_dir).eval()
    pipe = build_pipeline(arch, vae=vae, seed=seed, num_attention_heads=num_attention_heads)
    if resume is not None:  # continue from a saved pipeline's (EMA) transformer, with a fresh optimizer
        from safetensors.torch import load_file

        pipe.transformer.load_state_dict(load_file(Path(resume) / "transformer" / "diffusion_pytorch_model.safetensors"))
        previous = json.loads((Path(resume) / "training.json").read_text())
    model = pipe.transformer.train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    cond = _caption_embeddings(pipe, arch)
    specs = all_specs()
    caption_index = {s: i for i, s in enumerate(specs)}
    images, image_specs = make_dataset(num_images, seed=seed + 101)
    latents = _encode_latents(vae, images)
    labels = torch.tensor([caption_index[s] for s in image_specs])
    empty = cond["n_captions"]

    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    gen = torch.Generator().manual_seed(seed)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "training_log.jsonl"
    log.unlink(missing_ok=True)
    start, step, last_ckpt, running = time.time(), 0, time.time(), None
    with tqdm(desc=f"train {arch}", unit="step") as bar:
        while (step < steps) if steps is not None else (time.time() - start < minutes * 60):
            elapsed = time.time() - start
            idx = torch.randint(0, len(latents), (batch_size,), generator=gen)
            x0 = latents[idx]
            cap = labels[idx].clone()
            cap[torch.rand(batch_size, generator=gen) < caption_dropout] = empty
            t = torch.sigmoid(torch.randn(batch_size, generator=gen))
            noise = torch.randn(x0.shape, generator=gen)
            x_t = (1 - t[:, None, None, None]) * x0 + t[:, None, None, None] * noise
            pred = _velocity(pipe, arch, model, x_t, t, cond["emb"][cap], cond["pooled"][cap])
            loss = F.mse_loss(pred, noise - x0)
            # Linear warm-up, then cosine decay over the budget (wall clock or steps) down to 10%.
            frac = elapsed / (minutes * 60) if steps is None else step / steps
            for g in opt.param_groups:
                g["lr"] = lr * min(1.0, (step + 1) / 200) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            with torch.no_grad():
                for pe, pm in zip(ema.parameters(), model.parameters()):
                    pe.lerp_(pm, 1 - ema_decay)
            step += 1
            running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
            bar.update()
            if step % 100 == 0:
                bar.set_postfix(loss=f"{running:.4f}")
                _log(log, {"step": step, "seconds": round(elapsed, 1), "loss": round(running, 5)})
            if time.time() - last_ckpt > checkpoint_minutes * 60:
                _save(pipe, ema, arch, out, {"steps": step, "minutes": elapsed / 60, "partial": True})
                _log(log, {"step": step, "seconds": round(elapsed, 1), "adherence": checkpoint_adherence(pipe, ema, arch)})
                last_ckpt = time.time()
    done_steps = step + (previous["steps"] if resume is not None else 0)
    done_minutes = (time.time() - start) / 60 + (previous["minutes"] if resume is not None else 0)
    _save(pipe, ema, arch, out, {"steps": done_steps, "minutes": done_minutes, "partial": False,
                                  "resumed_from": str(resume) if resume is not None else None,
                                  "batch_size": batch_size, "lr": lr, "ema_decay": ema_decay,
                                  "caption_dropout": caption_dropout, "num_images": num_images, "seed": seed,
                                  "num_attention_heads": pipe.transformer.config.num_attention_heads})
    return pipe


def checkpoint_adherence(pipe, ema, arch: str, num_prompts: int = 48) -> dict:
    """ShapeBench adherence of the EMA weights on a few balanced prompts (the training log's quality curve)."""
    from .bench import adherence
    from .dataset import balanced_specs

    specs = balanced_specs(num_prompts, seed=999)
    call = {k: v for k, v in GENERATION[arch].items() if not k.startswith("_")}
    trained, pipe.transformer = pipe.transformer, ema
    try:
        with torch.no_grad():
            images = pipe([s.caption() for s in specs], output_type="np",
                          generator=[torch.Generator().manual_seed(i) for i in range(num_prompts)], **call).images
    finally:
        pipe.transformer = trained
    scores = adherence((images * 255).round().clip(0, 255).astype("uint8"), specs)
    return {k: round(float(v), 4) for k, v in scores.items()}


def _save(pipe, ema, arch: str, out: Path, info: dict) -> None:
    """Write the pipeline with the EMA transformer weights, plus generation.json and training info."""
    trained = pipe.transformer
    pipe.transformer = ema
    pipe.save_pretrained(out, safe_serialization=True)
    pipe.transformer = trained
    (out / "generation.json").write_text(json.dumps(GENERATION[arch], indent=2) + "\n")
    (out / "training.json").write_text(json.dumps({"arch": arch, **info}, indent=2) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["vae", "sd3", "flux"])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--vae", type=Path, help="trained VAE directory (for sd3/flux)")
    parser.add_argument("--minutes", type=float, default=40.0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--resume", type=Path, help="continue from this saved pipeline's transformer weights")
    parser.add_argument("--steps", type=int, help="train exactly this many steps instead of --minutes of wall clock")
    parser.add_argument("--heads", type=int, help="sd3 only: attention heads of 16 dims (default 4: hidden 64)")
    args = parser.parse_args(argv)
    if args.steps is not None and args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    if args.heads is not None and (args.what != "sd3" or args.heads < 1):
        parser.error("--heads takes a positive head count and only applies to sd3")
    torch.set_num_threads(args.threads)
    if args.what == "vae":
        train_vae(args.out, minutes=args.minutes, seed=args.seed)
    else:
        if args.vae is None:
            parser.error("--vae DIR is required to train a transformer")
        train_transformer(args.what, args.vae, args.out, minutes=args.minutes, seed=args.seed, lr=args.lr,
                          resume=args.resume, steps=args.steps, num_attention_heads=args.heads)


if __name__ == "__main__":
    main()

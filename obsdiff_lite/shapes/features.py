"""The ShapeBench feature network: a small CNN whose 64-d features stand in for Inception's in FID.

Three conv layers and a linear layer map a 32x32 image to a 64-d feature; four linear heads on that
feature classify shape, color, position and size, which is all the training signal there is. The
Fréchet ShapeBench Distance (``bench.frechet_distance``) fits Gaussians to these features.

    python -m obsdiff_lite.shapes.features --out data/shapebench/feature_net.safetensors

trains it (one CPU thread, about a minute) and writes the weights and a JSON of settings and
held-out accuracies beside them; the trained net is committed and ``load_feature_net()`` loads it.
Set ``OBSDIFF_DATA`` to use a data directory other than the repository's ``data/``.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from .dataset import ATTRIBUTES, COLORS, POSITIONS, SHAPES, SIZES, ShapeSpec, make_dataset

FEATURE_DIM = 64
WEIGHTS_NAME = "feature_net.safetensors"
# Dataset seeds for training and held-out data; far from the small seeds the pipelines train on.
TRAIN_SEED_OFFSET = 5_000
HELDOUT_SEED_OFFSET = 6_000
HELDOUT_IMAGES = 2_000
VOCABS: dict[str, tuple[str, ...]] = {
    "shape": tuple(SHAPES),
    "color": tuple(COLORS),
    "position": tuple(POSITIONS),
    "size": tuple(SIZES),
}


def data_dir() -> Path:
    """The data directory: ``$OBSDIFF_DATA`` if set, else the repository's ``data/``."""
    override = os.environ.get("OBSDIFF_DATA")
    return Path(override) if override else Path(__file__).resolve().parents[2] / "data"


def default_weights_path() -> Path:
    """Where the shipped feature net lives: ``<data dir>/shapebench/feature_net.safetensors``."""
    return data_dir() / "shapebench" / WEIGHTS_NAME


class FeatureNet(nn.Module):
    """Conv(16) -> pool -> Conv(32) -> pool -> Conv(64) -> pool to 4x4 -> Linear(64), plus 4 attribute heads."""

    def __init__(self, feature_dim: int = FEATURE_DIM) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.conv3 = nn.Conv2d(32, 64, 3, padding=1)
        # Flattening a 4x4 map (rather than global pooling) keeps where the shape is.
        self.project = nn.Linear(64 * 4 * 4, feature_dim)
        self.heads = nn.ModuleDict({name: nn.Linear(feature_dim, len(vocab)) for name, vocab in VOCABS.items()})

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        """[N, 3, 32, 32] pixels in [-1, 1] -> [N, feature_dim] features."""
        x = F.max_pool2d(F.relu(self.conv1(pixels)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.avg_pool2d(F.relu(self.conv3(x)), 2)
        return self.project(x.flatten(1))

    def forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Attribute logits per head, keyed by attribute name."""
        feats = self.features(pixels)
        return {name: head(feats) for name, head in self.heads.items()}


def as_pixels(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 images (NHWC or NCHW) or float images in [-1, 1] -> float32 NCHW tensor in [-1, 1]."""
    x = torch.as_tensor(np.asarray(images)) if not isinstance(images, torch.Tensor) else images.detach().cpu()
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or 3 not in (x.shape[1], x.shape[-1]):
        raise ValueError(f"expected N x 32 x 32 x 3 or N x 3 x 32 x 32 images, got shape {tuple(x.shape)}")
    if x.shape[1] != 3:
        x = x.permute(0, 3, 1, 2)
    if x.dtype == torch.uint8:
        return x.float().div(127.5).sub(1.0).contiguous()
    if not x.is_floating_point():
        raise TypeError(f"expected uint8 or float images, got {x.dtype}")
    # Float images are in the pipelines' [-1, 1] range (see dataset.to_tensor_range).
    return x.float().clamp(-1.0, 1.0).contiguous()


def _labels(specs: list[ShapeSpec]) -> dict[str, torch.Tensor]:
    """Class indices per attribute for a list of specs."""
    return {
        name: torch.tensor([VOCABS[name].index(getattr(s, name)) for s in specs], dtype=torch.long)
        for name in ATTRIBUTES
    }


@torch.no_grad()
def attribute_accuracy(net: FeatureNet, images: np.ndarray, specs: list[ShapeSpec]) -> dict[str, float]:
    """Per-attribute and all-four ('full') accuracy of the net's heads."""
    net.eval()
    pixels = as_pixels(images)
    labels = _labels(specs)
    correct = {name: torch.zeros(len(specs), dtype=torch.bool) for name in ATTRIBUTES}
    for start in range(0, len(specs), 500):
        logits = net(pixels[start : start + 500])
        for name in ATTRIBUTES:
            correct[name][start : start + 500] = logits[name].argmax(1) == labels[name][start : start + 500]
    out = {name: round(c.float().mean().item(), 4) for name, c in correct.items()}
    out["full"] = round(torch.stack(list(correct.values())).all(0).float().mean().item(), 4)
    return out


def train_feature_net(
    out_path: str | Path,
    num_images: int = 20_000,
    epochs: int = 6,
    seed: int = 0,
    batch_size: int = 128,
    lr: float = 3e-3,
) -> dict:
    """Train the feature net on jittered dataset images; write weights and a JSON report; return the report."""
    out_path = Path(out_path)
    torch.manual_seed(seed)
    start = time.time()
    images, specs = make_dataset(num_images, seed=TRAIN_SEED_OFFSET + seed)
    pixels, labels = as_pixels(images), _labels(specs)
    net = FeatureNet()
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * ((num_images + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(epochs):
        net.train()
        order = torch.randperm(num_images, generator=gen)
        for i in range(0, num_images, batch_size):
            idx = order[i : i + batch_size]
            logits = net(pixels[idx])
            loss = sum(F.cross_entropy(logits[name], labels[name][idx]) for name in ATTRIBUTES)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        losses.append(round(loss.item(), 4))
    train_seconds = time.time() - start

    heldout_images, heldout_specs = make_dataset(HELDOUT_IMAGES, seed=HELDOUT_SEED_OFFSET + seed)
    net.eval()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in net.state_dict().items()}
    # One metadata key only: safetensors orders several keys arbitrarily, which would change the file's hash.
    save_file(state, str(out_path), metadata={"format": "obsdiff-shapebench-1"})
    report = {
        "weights": out_path.name,
        "sha256": hashlib.sha256(out_path.read_bytes()).hexdigest(),
        "bytes": out_path.stat().st_size,
        "feature_dim": FEATURE_DIM,
        "num_params": sum(p.numel() for p in net.parameters()),
        "num_images": num_images,
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "seed": seed,
        "train_dataset_seed": TRAIN_SEED_OFFSET + seed,
        "heldout_dataset_seed": HELDOUT_SEED_OFFSET + seed,
        "heldout_images": HELDOUT_IMAGES,
        "heldout_accuracy": attribute_accuracy(net, heldout_images, heldout_specs),
        "last_batch_loss_per_epoch": losses,
        "train_seconds": round(train_seconds, 1),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    out_path.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    return report


@functools.lru_cache(maxsize=4)
def _load(path: str) -> FeatureNet:
    """Load (once per path) a feature net in eval mode with frozen weights."""
    net = FeatureNet()
    net.load_state_dict(load_file(path))
    net.eval().requires_grad_(False)
    return net


def load_feature_net(path: str | Path | None = None) -> FeatureNet:
    """The feature net at ``path``, or the shipped one (``default_weights_path()``) when None."""
    path = Path(path) if path is not None else default_weights_path()
    if not path.is_file():
        raise FileNotFoundError(
            f"no feature net at {path}; train one with "
            f"`python -m obsdiff_lite.shapes.features --out {path}` (or set OBSDIFF_DATA)"
        )
    return _load(str(path.resolve()))


@torch.no_grad()
def extract_features(
    images: np.ndarray | torch.Tensor, net: FeatureNet | None = None, batch_size: int = 1000
) -> np.ndarray:
    """[N, 64] float64 features of uint8 NHWC (or float [-1, 1]) images; the shipped net by default."""
    net = net if net is not None else load_feature_net()
    pixels = as_pixels(images)
    if len(pixels) == 0:
        return np.zeros((0, FEATURE_DIM), dtype=np.float64)
    chunks = [net.features(pixels[i : i + batch_size]) for i in range(0, len(pixels), batch_size)]
    return torch.cat(chunks).double().numpy()


def main(argv: list[str] | None = None) -> None:
    """CLI: train the feature net and print its report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help=f"weights path (default: {default_weights_path()})")
    parser.add_argument("--num-images", type=int, default=20_000)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    report = train_feature_net(args.out or default_weights_path(), args.num_images, args.epochs, args.seed)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

"""The captioned-shapes dataset: one anti-aliased shape on black, 32x32 RGB, deterministic by seed.

The exact grammar ``a {size} {color} {shape} at the {position}`` ("in the center" for the center)
is the contract the tiny pipelines, the detector and ShapeBench all rely on.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass

import numpy as np

IMAGE_SIZE = 32
SUPERSAMPLE = 4

SHAPES = ("circle", "square", "triangle", "cross")
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 80, 235),
    "yellow": (230, 215, 40),
    "magenta": (215, 50, 205),
    "cyan": (40, 205, 215),
}
POSITIONS = {
    "top left": (8.5, 8.5),
    "top right": (23.5, 8.5),
    "bottom left": (8.5, 23.5),
    "bottom right": (23.5, 23.5),
    "center": (16.0, 16.0),
}
SIZES = {"small": 4.0, "large": 7.0}
ATTRIBUTES = ("shape", "color", "position", "size")

CENTER_JITTER = 1.0
SIZE_JITTER = 0.5
COLOR_JITTER = 12.0


@dataclass(frozen=True)
class ShapeSpec:
    """What one image shows: the four attributes a caption names."""

    shape: str
    color: str
    position: str
    size: str

    def __post_init__(self) -> None:
        for name, vocab in (("shape", SHAPES), ("color", COLORS), ("position", POSITIONS), ("size", SIZES)):
            if getattr(self, name) not in vocab:
                raise ValueError(f"unknown {name} {getattr(self, name)!r}; expected one of {list(vocab)}")

    def caption(self) -> str:
        """The canonical caption, e.g. 'a large red circle at the top left'."""
        where = "in the center" if self.position == "center" else f"at the {self.position}"
        return f"a {self.size} {self.color} {self.shape} {where}"


_CAPTION_RE = re.compile(
    r"^a (?P<size>\w+) (?P<color>\w+) (?P<shape>\w+) (?:at the (?P<position>.+)|in the (?P<center>center))$"
)


def parse_caption(caption: str) -> ShapeSpec:
    """Inverse of ``ShapeSpec.caption``; raises ValueError for text outside the grammar."""
    match = _CAPTION_RE.match(caption.strip().lower())
    if match is None:
        raise ValueError(f"caption {caption!r} does not follow 'a {{size}} {{color}} {{shape}} at the {{position}}'")
    position = match["center"] or match["position"]
    return ShapeSpec(shape=match["shape"], color=match["color"], position=position, size=match["size"])


def all_specs() -> list[ShapeSpec]:
    """Every combination of the vocabulary (4 x 6 x 5 x 2 = 240), in a fixed order."""
    return [ShapeSpec(s, c, p, z) for s, c, p, z in itertools.product(SHAPES, COLORS, POSITIONS, SIZES)]


def balanced_specs(n: int, seed: int) -> list[ShapeSpec]:
    """n specs drawn by seed so that every combination appears equally often (up to one)."""
    rng = np.random.default_rng(seed)
    combos = all_specs()
    out: list[ShapeSpec] = []
    while len(out) < n:
        out.extend(combos[i] for i in rng.permutation(len(combos)))
    return out[:n]


def random_specs(n: int, seed: int) -> list[ShapeSpec]:
    """n independent uniform specs (used for training data)."""
    rng = np.random.default_rng(seed)
    combos = all_specs()
    return [combos[i] for i in rng.integers(0, len(combos), size=n)]


def _coverage(shape: str, cx: float, cy: float, h: float) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] of one shape, by SUPERSAMPLE x SUPERSAMPLE supersampling."""
    n = IMAGE_SIZE * SUPERSAMPLE
    coords = (np.arange(n) + 0.5) / SUPERSAMPLE
    x = coords[None, :] - cx
    y = coords[:, None] - cy
    if shape == "circle":
        inside = x**2 + y**2 <= h**2
    elif shape == "square":
        inside = (np.abs(x) <= 0.85 * h) & (np.abs(y) <= 0.85 * h)
    elif shape == "triangle":
        # Upward isosceles: apex at cy-h, base at cy+0.8h, half-base h.
        depth = (y + h) / (1.8 * h)
        inside = (y >= -h) & (y <= 0.8 * h) & (np.abs(x) <= h * depth)
    elif shape == "cross":
        arm = 0.35 * h
        inside = ((np.abs(x) <= h) & (np.abs(y) <= arm)) | ((np.abs(y) <= h) & (np.abs(x) <= arm))
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return inside.reshape(IMAGE_SIZE, SUPERSAMPLE, IMAGE_SIZE, SUPERSAMPLE).mean(axis=(1, 3))


def render(spec: ShapeSpec, rng: np.random.Generator | None = None) -> np.ndarray:
    """Render one spec to a uint8 (32, 32, 3) image; with ``rng`` the position, size and color jitter."""
    cx, cy = POSITIONS[spec.position]
    h = SIZES[spec.size]
    color = np.asarray(COLORS[spec.color], dtype=np.float64)
    if rng is not None:
        cx += rng.uniform(-CENTER_JITTER, CENTER_JITTER)
        cy += rng.uniform(-CENTER_JITTER, CENTER_JITTER)
        h += rng.uniform(-SIZE_JITTER, SIZE_JITTER)
        color = np.clip(color + rng.uniform(-COLOR_JITTER, COLOR_JITTER, size=3), 0, 255)
    cover = _coverage(spec.shape, cx, cy, h)
    return np.round(cover[..., None] * color).astype(np.uint8)


def make_dataset(n: int, seed: int, balanced: bool = False) -> tuple[np.ndarray, list[ShapeSpec]]:
    """n jittered images (uint8, N x 32 x 32 x 3) and their specs, deterministic by seed."""
    specs = balanced_specs(n, seed) if balanced else random_specs(n, seed)
    rng = np.random.default_rng(seed + 1_000_003)
    images = np.stack([render(s, rng) for s in specs]) if n else np.zeros((0, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    return images, specs


def to_tensor_range(images: np.ndarray):
    """uint8 NHWC images -> float32 NCHW torch tensor in [-1, 1] (the pipelines' pixel range)."""
    import torch

    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)

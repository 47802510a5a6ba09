"""A classical, deterministic shape detector: reads the four caption attributes back off an image.

No learning is involved. The steps, top to bottom:

1. Foreground: pixels whose brightest channel exceeds ``FOREGROUND_THRESHOLD``; keep the largest
   8-connected component (generated images may hold a stray second blob) and grow it by
   ``RIM_PIXELS`` so the anti-aliased (or blurred) rim is counted.
2. Color: the mean of the strongly covered pixels, matched to the palette by angle (scale-free,
   so dimmed or blurred thin shapes still match).
3. Intensity: every pixel's projection on that palette color, in units of full coverage; its sum
   is the area (blur keeps it) and its centroid locates the shape.
4. Shape: for each of the four shapes, the area gives a half-extent ``h`` and the centroid a
   center (a triangle's centroid sits 0.2h below its center); templates rendered with the
   dataset's geometry over a small grid of sizes (``H_FACTORS``) and blurs (``BLUR_SIGMAS``),
   each with a least-squares brightness, are compared to the intensity; the lowest relative
   L2 error names the shape.
5. Size and position: the winning template's ``h`` against the midpoint of small and large, and
   the nearest of the five position centers to its center.

On clean renders every attribute is read exactly (tests/test_detector.py measures it); noise and
blur of the strength a tiny diffusion model shows cost little.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from .dataset import COLORS, IMAGE_SIZE, POSITIONS, SHAPES, SIZES, SUPERSAMPLE, ShapeSpec

FOREGROUND_THRESHOLD = 60
STRONG_FRACTION = 0.75
MIN_AREA = 4.0
RIM_PIXELS = 2

# Area of each shape in units of h^2 (from the geometry in dataset._coverage).
AREA_PER_H2 = {
    "circle": np.pi,
    "square": 1.7**2,
    "triangle": 1.8,
    "cross": 2 * 2 * 0.7 - 0.7**2,
}
# Vertical offset of each shape's centroid below its nominal center, in units of h.
CENTROID_OFFSET = {"circle": 0.0, "square": 0.0, "triangle": 0.2, "cross": 0.0}
SIZE_SPLIT = (SIZES["small"] + SIZES["large"]) / 2
# Template search grid: size factors around the area estimate, and blurs (Gaussian sigma, px).
H_FACTORS = (0.85, 0.92, 1.0, 1.08, 1.15)
BLUR_SIGMAS = (0.0, 0.6, 1.0, 1.5, 2.0)

_PALETTE_NAMES = tuple(COLORS)
_PALETTE_UNIT = np.array([COLORS[c] for c in _PALETTE_NAMES], dtype=np.float64)
_PALETTE_UNIT /= np.linalg.norm(_PALETTE_UNIT, axis=1, keepdims=True)
_POSITION_NAMES = tuple(POSITIONS)
_POSITION_XY = np.array([POSITIONS[p] for p in _POSITION_NAMES], dtype=np.float64)


@dataclass
class Detection:
    """One image's reading: the four attributes (None when nothing is found) and debug fields."""

    shape: str | None = None
    color: str | None = None
    position: str | None = None
    size: str | None = None
    confidence: float = 0.0  # 1 - best / runner-up template error
    area: float = 0.0  # in pixels of full coverage
    centroid: tuple[float, float] = (float("nan"), float("nan"))  # (x, y) of the intensity, pixels
    center: tuple[float, float] = (float("nan"), float("nan"))  # (x, y) of the winning template
    half_extent: float = float("nan")  # h of the winning template (small 4, large 7)
    mean_color: tuple[float, float, float] = (0.0, 0.0, 0.0)  # RGB of the strongly covered pixels
    num_components: int = 0  # bright connected components before keeping the largest
    shape_errors: dict[str, float] = field(default_factory=dict)  # relative L2 error per shape

    @property
    def found(self) -> bool:
        """Whether a shape was found at all."""
        return self.shape is not None

    @property
    def spec(self) -> ShapeSpec | None:
        """The detected attributes as a ShapeSpec, or None when nothing was found."""
        if not self.found:
            return None
        return ShapeSpec(shape=self.shape, color=self.color, position=self.position, size=self.size)


def _as_uint8(image: np.ndarray) -> np.ndarray:
    """Validate a 32x32x3 uint8 image (float images are refused rather than guessed at)."""
    image = np.asarray(image)
    if image.shape != (IMAGE_SIZE, IMAGE_SIZE, 3):
        raise ValueError(f"expected a {IMAGE_SIZE}x{IMAGE_SIZE}x3 image, got shape {image.shape}")
    if image.dtype != np.uint8:
        raise TypeError(f"expected a uint8 image, got {image.dtype}")
    return image


def _foreground(image: np.ndarray) -> tuple[np.ndarray, int]:
    """The largest 8-connected bright component, grown by the rim, and how many components there were."""
    bright = image.max(axis=2) > FOREGROUND_THRESHOLD
    labels, count = ndimage.label(bright, structure=np.ones((3, 3), dtype=bool))
    if count == 0:
        return np.zeros(bright.shape, dtype=bool), 0
    sizes = ndimage.sum_labels(bright, labels, index=np.arange(1, count + 1))
    largest = labels == (1 + int(np.argmax(sizes)))
    grown = ndimage.binary_dilation(largest, structure=np.ones((3, 3), dtype=bool), iterations=RIM_PIXELS)
    return grown, count


def _color(pixels: np.ndarray) -> tuple[str, np.ndarray]:
    """Palette name by angle to the mean of the strongly covered pixels, and that mean color."""
    peak = pixels.max(axis=1)
    strong = pixels[peak >= STRONG_FRACTION * peak.max()]
    mean = strong.mean(axis=0)
    cosine = _PALETTE_UNIT @ (mean / max(np.linalg.norm(mean), 1e-9))
    return _PALETTE_NAMES[int(np.argmax(cosine))], mean


def _inside(shape: str, x: np.ndarray, y: np.ndarray, h: np.ndarray | float) -> np.ndarray:
    """Point-in-shape test relative to the center (broadcasts); the geometry of ``dataset._coverage``."""
    if shape == "circle":
        return x**2 + y**2 <= h**2
    if shape == "square":
        return (np.abs(x) <= 0.85 * h) & (np.abs(y) <= 0.85 * h)
    if shape == "triangle":
        depth = (y + h) / (1.8 * h)
        return (y >= -h) & (y <= 0.8 * h) & (np.abs(x) <= h * depth)
    if shape == "cross":
        arm = 0.35 * h
        return ((np.abs(x) <= h) & (np.abs(y) <= arm)) | ((np.abs(y) <= h) & (np.abs(x) <= arm))
    raise ValueError(f"unknown shape {shape!r}")


def window_coverage(
    shape: str, cx: float, cy: np.ndarray | float, h: np.ndarray | float, window: tuple[slice, slice]
) -> np.ndarray:
    """Coverage inside a pixel window (rows, cols), equal to ``dataset._coverage``; cy and h may be 1-d."""
    rows, cols = window
    s = SUPERSAMPLE
    cy_k = np.atleast_1d(np.asarray(cy, dtype=np.float64))[:, None, None]
    h_k = np.atleast_1d(np.asarray(h, dtype=np.float64))[:, None, None]
    y = (np.arange(rows.start * s, rows.stop * s) + 0.5)[None, :, None] / s - cy_k
    x = (np.arange(cols.start * s, cols.stop * s) + 0.5)[None, None, :] / s - cx
    inside = _inside(shape, x, y, h_k)
    k, n_rows, n_cols = inside.shape[0], rows.stop - rows.start, cols.stop - cols.start
    # Count the inside sub-samples of each pixel (strided adds: far faster than a mean over two axes).
    sub = inside.view(np.uint8).reshape(k, n_rows, s, n_cols, s)
    counts = sum(sub[:, :, i, :, j].astype(np.int16) for i in range(s) for j in range(s))
    cover = counts / float(s * s)
    return cover if np.ndim(h) or np.ndim(cy) else cover[0]


def _window(cx: float, cy: float, h_max: float, shape_hw: tuple[int, int]) -> tuple[slice, slice]:
    """A pixel window around the centroid large enough for every template and its blur."""
    radius = 1.3 * h_max + 2.0 + 2.5 * max(BLUR_SIGMAS)
    rows = slice(max(0, int(np.floor(cy - radius))), min(shape_hw[0], int(np.ceil(cy + radius))))
    cols = slice(max(0, int(np.floor(cx - radius))), min(shape_hw[1], int(np.ceil(cx + radius))))
    return rows, cols


def _blur_matrix(n: int, sigma: float) -> np.ndarray:
    """The n x n matrix of a 1-d Gaussian blur with zero padding (identity for sigma 0)."""
    if sigma <= 0:
        return np.eye(n)
    offsets = np.arange(n)[:, None] - np.arange(n)[None, :]
    return np.exp(-0.5 * (offsets / sigma) ** 2) / (sigma * np.sqrt(2 * np.pi))


_BLUR = np.stack([_blur_matrix(IMAGE_SIZE, sigma) for sigma in BLUR_SIGMAS])  # [blur, 32, 32], Toeplitz


def _fit_shape(
    shape: str, intensity: np.ndarray, area: float, cx: float, cy: float
) -> tuple[float, float, float]:
    """Best (relative L2 error, h, center y) of one shape over the grid of sizes and blurs."""
    h = np.asarray(H_FACTORS) * float(np.sqrt(area / AREA_PER_H2[shape]))
    center_y = cy - CENTROID_OFFSET[shape] * h
    window = _window(cx, cy, float(h.max()), intensity.shape)
    local = intensity[window]
    energy = max(float((intensity**2).sum()), 1e-9)
    sharp = window_coverage(shape, cx, center_y, h, window)  # [size, rows, cols]
    rows, cols = local.shape
    # Every template under every blur: [blur, size, rows, cols].
    blur_rows = _BLUR[:, None, :rows, :rows]
    blur_cols_t = _BLUR[:, None, :cols, :cols].transpose(0, 1, 3, 2)
    templates = blur_rows @ sharp[None] @ blur_cols_t
    # Least-squares amplitude per template, so the fit ignores the overall brightness.
    cross_term = (templates * local).sum(axis=(2, 3))
    self_term = np.maximum((templates**2).sum(axis=(2, 3)), 1e-9)
    amplitude = cross_term / self_term
    # ||a T - I||^2 = a^2 |T|^2 - 2 a <T, I> + |I|^2, with I's energy outside the window added back.
    errors = (amplitude**2 * self_term - 2 * amplitude * cross_term + energy) / energy
    _, best_size = np.unravel_index(int(np.argmin(errors)), errors.shape)
    return float(errors.min()), float(h[best_size]), float(center_y[best_size])


def detect(image: np.ndarray) -> Detection:
    """Detect the shape, color, position and size in one uint8 32x32x3 image."""
    image = _as_uint8(image)
    mask, count = _foreground(image)
    if count == 0:
        return Detection(num_components=0)

    pixels = image[mask].astype(np.float64)
    color, mean_color = _color(pixels)
    unit = np.asarray(COLORS[color], dtype=np.float64)
    unit_norm = float(np.linalg.norm(unit))
    # Intensity along the palette color, in units of full coverage; blur keeps its sum (the area).
    intensity = np.zeros(image.shape[:2], dtype=np.float64)
    intensity[mask] = np.clip(pixels @ unit / unit_norm**2, 0.0, None)
    area = float(intensity.sum())
    ys, xs = np.mgrid[0 : image.shape[0], 0 : image.shape[1]] + 0.5
    cx = float((intensity * xs).sum() / max(area, 1e-9))
    cy = float((intensity * ys).sum() / max(area, 1e-9))
    base = Detection(
        area=area, centroid=(cx, cy), mean_color=tuple(float(v) for v in mean_color), num_components=count
    )
    if area < MIN_AREA:
        return base

    fits = {shape: _fit_shape(shape, intensity, area, cx, cy) for shape in SHAPES}
    errors = {shape: fit[0] for shape, fit in fits.items()}
    ranked = sorted(errors, key=errors.get)
    best, runner_up = ranked[0], ranked[1]
    _, h, center_y = fits[best]
    distances = np.hypot(_POSITION_XY[:, 0] - cx, _POSITION_XY[:, 1] - center_y)

    base.shape = best
    base.color = color
    base.position = _POSITION_NAMES[int(np.argmin(distances))]
    base.size = "large" if h >= SIZE_SPLIT else "small"
    base.center = (cx, center_y)
    base.half_extent = h
    base.shape_errors = errors
    # Relative margin between the best and the runner-up template: 0 = a tie, 1 = only one fits.
    base.confidence = float(1.0 - errors[best] / max(errors[runner_up], 1e-9))
    return base


def detect_batch(images: np.ndarray | list[np.ndarray]) -> list[Detection]:
    """Detect every image of an N x 32 x 32 x 3 uint8 batch (or a list of such images)."""
    return [detect(image) for image in images]

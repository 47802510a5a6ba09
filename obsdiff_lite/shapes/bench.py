"""ShapeBench: the tiny world's stand-ins for the paper's metrics.

- adherence (for CLIP score / ImageReward): the classical detector reads the image back and we count
  how often it matches the prompt's spec, in full and per attribute;
- Fréchet ShapeBench Distance (for FID): Fréchet distance between Gaussian fits of the feature
  net's 64-d features of generated and real images;
- PSNR and SSIM to the dense model's images for the same prompts and seeds (how faithfully a
  pruned model reproduces its dense parent).

Images are uint8 N x 32 x 32 x 3 arrays; float arrays or tensors are read as the pipelines'
[-1, 1] range (NCHW or NHWC) and converted.
"""

from __future__ import annotations

import math
import textwrap
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from scipy import linalg

from .dataset import ATTRIBUTES, ShapeSpec, make_dataset
from .detector import detect_batch
from .features import FeatureNet, as_pixels, extract_features

# Real images for the Fréchet reference: make_dataset(n, REFERENCE_SEED, balanced=True). The seed is
# distinct from the pipelines' training seeds (seed + 11, seed + 101) and the feature net's
# (5_000 + seed, 6_000 + seed), so the reference is never training data.
REFERENCE_SEED = 777_777
PSNR_CAP_DB = 100.0
SSIM_WINDOW = 7
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03


def to_uint8(images: np.ndarray | torch.Tensor) -> np.ndarray:
    """Any accepted image batch -> uint8 N x 32 x 32 x 3 numpy array."""
    if isinstance(images, np.ndarray) and images.dtype == np.uint8 and images.ndim == 4 and images.shape[-1] == 3:
        return images
    pixels = as_pixels(images)
    return pixels.add(1.0).mul(127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def adherence(images: np.ndarray | torch.Tensor, specs: list[ShapeSpec]) -> dict[str, float]:
    """Fraction of images whose detected spec matches the prompt: 'full' (all four) and per attribute."""
    images = to_uint8(images)
    if len(images) != len(specs):
        raise ValueError(f"{len(images)} images but {len(specs)} specs")
    detections = detect_batch(images)
    n = len(specs)
    out: dict[str, float] = {"n": n}
    out["full"] = sum(d.spec == s for d, s in zip(detections, specs)) / max(n, 1)
    for name in ATTRIBUTES:
        out[name] = sum(getattr(d, name) == getattr(s, name) for d, s in zip(detections, specs)) / max(n, 1)
    out["found"] = sum(d.found for d in detections) / max(n, 1)
    return out


def gaussian_fit(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased) covariance of [N, D] features."""
    if len(features) < 2:
        raise ValueError(f"a Gaussian fit needs at least 2 samples, got {len(features)}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def _sqrtm(matrix: np.ndarray) -> np.ndarray:
    """scipy's matrix square root, quiet about singular input (the caller checks the result)."""
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        warnings.simplefilter("ignore", RuntimeWarning)
        return linalg.sqrtm(matrix)


def frechet_from_stats(mu_a: np.ndarray, cov_a: np.ndarray, mu_b: np.ndarray, cov_b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(cov_a + cov_b - 2 (cov_a cov_b)^(1/2)), as in FID."""
    covmean = _sqrtm(cov_a @ cov_b)
    if not np.isfinite(covmean).all():
        # Singular product (e.g. fewer samples than dimensions): regularize as pytorch-fid does.
        offset = np.eye(len(cov_a)) * 1e-6
        covmean = _sqrtm((cov_a + offset) @ (cov_b + offset))
    if np.iscomplexobj(covmean):
        # Round-off gives tiny imaginary parts; larger ones mean the fit is badly conditioned.
        if np.abs(covmean.imag).max() > 1e-3 * max(np.abs(covmean.real).max(), 1.0):
            warnings.warn("sqrtm returned sizeable imaginary parts; the Fréchet distance is unreliable", stacklevel=2)
        covmean = covmean.real
    diff = mu_a - mu_b
    return float(diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2.0 * np.trace(covmean))


def frechet_distance(
    images_a: np.ndarray | torch.Tensor, images_b: np.ndarray | torch.Tensor, net: FeatureNet | None = None
) -> float:
    """Fréchet ShapeBench Distance between two image sets (the shipped feature net by default).

    Like FID it is biased upwards at small N (the sample covariances are noisy), so compare
    models only at equal N, and against the same reference set.
    """
    feats_a = extract_features(images_a, net)
    feats_b = extract_features(images_b, net)
    return frechet_from_stats(*gaussian_fit(feats_a), *gaussian_fit(feats_b))


def psnr(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> float:
    """Mean per-image PSNR in dB (data range 255); identical images count as PSNR_CAP_DB, not inf."""
    a64, b64 = to_uint8(a).astype(np.float64), to_uint8(b).astype(np.float64)
    if a64.shape != b64.shape:
        raise ValueError(f"shape mismatch {a64.shape} vs {b64.shape}")
    mse = ((a64 - b64) ** 2).reshape(len(a64), -1).mean(axis=1)
    with np.errstate(divide="ignore"):
        per_image = np.where(mse > 0, 10.0 * np.log10(255.0**2 / np.maximum(mse, 1e-300)), PSNR_CAP_DB)
    return float(np.minimum(per_image, PSNR_CAP_DB).mean())


def _valid_gaussian_filter(size: int, length: int) -> torch.Tensor:
    """[length - size + 1, length] matrix of a normalized 1-d Gaussian, 'valid' region only."""
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * SSIM_SIGMA**2))
    g = g / g.sum()
    out = torch.zeros(length - size + 1, length, dtype=torch.float64)
    for i in range(length - size + 1):
        out[i, i : i + size] = g
    return out


def ssim(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> float:
    """Mean SSIM (Wang et al. 2004; 7x7 Gaussian window, sigma 1.5, valid region), per channel, averaged."""
    x = torch.from_numpy(to_uint8(a)).permute(0, 3, 1, 2).double()
    y = torch.from_numpy(to_uint8(b)).permute(0, 3, 1, 2).double()
    if x.shape != y.shape:
        raise ValueError(f"shape mismatch {tuple(x.shape)} vs {tuple(y.shape)}")
    rows = _valid_gaussian_filter(SSIM_WINDOW, x.shape[2])
    cols = _valid_gaussian_filter(SSIM_WINDOW, x.shape[3])

    def blur(t: torch.Tensor) -> torch.Tensor:
        # The Gaussian window is separable: filter columns, then rows, as two matrix products.
        return rows @ t @ cols.T

    c1, c2 = (SSIM_K1 * 255.0) ** 2, (SSIM_K2 * 255.0) ** 2
    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov_xy = blur(x * y) - mu_x * mu_y
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov_xy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return float(ssim_map.mean())


def reference_images(num: int, seed: int = REFERENCE_SEED) -> np.ndarray:
    """Real images for the Fréchet reference: a balanced, jittered dataset draw (fixed seed by default)."""
    return make_dataset(num, seed, balanced=True)[0]


def evaluate(
    images: np.ndarray | torch.Tensor,
    specs: list[ShapeSpec],
    reference: np.ndarray | torch.Tensor | None = None,
    net: FeatureNet | None = None,
) -> dict[str, float]:
    """Adherence, FD to as many real images as there are generated, and PSNR/SSIM to ``reference`` if given.

    The real set is balanced over all 240 specs; use balanced prompts (``balanced_specs``) so the FD
    measures image quality rather than a prompt-mix mismatch.
    """
    images = to_uint8(images)
    out = dict(adherence(images, specs))
    out["fd"] = frechet_distance(images, reference_images(len(images)), net)
    if reference is not None:
        out["psnr"] = psnr(images, reference)
        out["ssim"] = ssim(images, reference)
    return out


COLUMN_ORDER = ("n", "full", "shape", "color", "position", "size", "found", "fd", "psnr", "ssim")
_FORMATS = {"n": "{:d}", "fd": "{:.2f}", "psnr": "{:.2f}", "ssim": "{:.4f}"}


def format_table(rows: dict[str, dict[str, float]]) -> str:
    """A plain-text table, one row per model name and one column per metric ('-' where missing)."""
    keys = {k for row in rows.values() for k in row}
    columns = [c for c in COLUMN_ORDER if c in keys] + sorted(keys - set(COLUMN_ORDER))

    def cell(column: str, value: object) -> str:
        if value is None:
            return "-"
        if column == "n" or isinstance(value, (int, np.integer)) and not isinstance(value, bool):
            return str(int(value))
        if isinstance(value, (float, np.floating)):
            return _FORMATS.get(column, "{:.3f}").format(float(value))
        return str(value)

    header = ["model", *columns]
    body = [[name, *(cell(c, row.get(c)) for c in columns)] for name, row in rows.items()]
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths)))]
    lines.append("  ".join("-" * w for w in widths))
    for r in body:
        lines.append("  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths))))
    return "\n".join(lines)


def image_grid(
    images: np.ndarray | torch.Tensor, nrow: int = 8, captions: list[str] | None = None, scale: int = 4
) -> Image.Image:
    """Tile images into a grid, ``nrow`` per row, upscaled ``scale``x (nearest); captions optional."""
    images = to_uint8(images)
    n = len(images)
    if n == 0:
        raise ValueError("no images to tile")
    if captions is not None and len(captions) != n:
        raise ValueError(f"{n} images but {len(captions)} captions")
    pad = 2
    cell_h, cell_w = images.shape[1] * scale, images.shape[2] * scale
    font = ImageFont.load_default()
    chars_per_line = max(4, cell_w // 6)
    wrapped = [textwrap.wrap(c, chars_per_line)[:3] for c in captions] if captions else None
    text_h = 11 * max(len(w) for w in wrapped) if wrapped else 0
    cols, rows = min(nrow, n), math.ceil(n / nrow)
    grid = Image.new("RGB", (pad + cols * (cell_w + pad), pad + rows * (cell_h + text_h + pad)), (64, 64, 64))
    draw = ImageDraw.Draw(grid)
    for i, image in enumerate(images):
        x = pad + (i % nrow) * (cell_w + pad)
        y = pad + (i // nrow) * (cell_h + text_h + pad)
        grid.paste(Image.fromarray(image).resize((cell_w, cell_h), Image.NEAREST), (x, y))
        for line_no, line in enumerate(wrapped[i] if wrapped else []):
            draw.text((x + 1, y + cell_h + 11 * line_no), line, fill=(230, 230, 230), font=font)
    return grid


def save_grid(
    images: np.ndarray | torch.Tensor,
    path: str | Path,
    nrow: int = 8,
    captions: list[str] | None = None,
    scale: int = 4,
) -> Path:
    """Write ``image_grid(...)`` to ``path`` (format from the suffix, e.g. .png); return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image_grid(images, nrow=nrow, captions=captions, scale=scale).save(path)
    return path

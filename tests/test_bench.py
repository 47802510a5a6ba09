"""ShapeBench: adherence, Fréchet ShapeBench Distance, PSNR/SSIM, the shipped feature net, tables and grids."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from obsdiff_lite.shapes import bench
from obsdiff_lite.shapes.dataset import COLORS, ShapeSpec, make_dataset, render, to_tensor_range
from obsdiff_lite.shapes.features import (
    FEATURE_DIM,
    attribute_accuracy,
    default_weights_path,
    extract_features,
    load_feature_net,
)

N = 400


@pytest.fixture(scope="module")
def real() -> tuple[np.ndarray, list[ShapeSpec]]:
    return make_dataset(N, 21, balanced=True)


def noisy(images: np.ndarray, std: float, seed: int = 0) -> np.ndarray:
    """Add Gaussian noise (0..255 units) and clip back to uint8."""
    rng = np.random.default_rng(seed)
    return np.clip(np.round(images + rng.normal(0, std, images.shape)), 0, 255).astype(np.uint8)


def test_adherence_ground_truth(real) -> None:
    images, specs = real
    result = bench.adherence(images, specs)
    assert result["n"] == N
    assert result["full"] >= 0.99
    for name in ("shape", "color", "position", "size", "found"):
        assert result[name] >= 0.99, (name, result)


def test_adherence_wrong_color(real) -> None:
    _, specs = real
    names = list(COLORS)
    swapped = [ShapeSpec(s.shape, names[(names.index(s.color) + 1) % len(names)], s.position, s.size) for s in specs]
    rng = np.random.default_rng(0)
    images = np.stack([render(s, rng) for s in swapped])
    result = bench.adherence(images, specs)
    assert result["color"] <= 0.01
    assert result["full"] <= 0.01
    assert min(result["shape"], result["position"], result["size"]) >= 0.99


def test_adherence_blank_images(real) -> None:
    _, specs = real
    result = bench.adherence(np.zeros((N, 32, 32, 3), np.uint8), specs)
    assert result["full"] == 0.0 and result["found"] == 0.0


def test_adherence_deterministic(real) -> None:
    images, specs = real
    degraded = noisy(images, 12.0, seed=3)
    assert bench.adherence(degraded, specs) == bench.adherence(degraded.copy(), specs)


def test_adherence_length_mismatch(real) -> None:
    images, specs = real
    with pytest.raises(ValueError):
        bench.adherence(images[:3], specs[:4])


def test_frechet_real_vs_broken(real) -> None:
    images, _ = real
    other = bench.reference_images(N)
    fd_real = bench.frechet_distance(images, other)
    rng = np.random.default_rng(0)
    shuffled = images.reshape(N, -1, 3)[:, rng.permutation(32 * 32)].reshape(images.shape)
    broken = {
        "shuffled": shuffled,
        "blank": np.zeros_like(images),
        "noise": rng.integers(0, 256, images.shape, dtype=np.uint8),
    }
    for name, fake in broken.items():
        assert bench.frechet_distance(fake, other) >= 10 * fd_real, name
    # Milder damage still moves the distance clearly.
    assert bench.frechet_distance(noisy(images, 16.0), other) > 3 * fd_real


def test_frechet_identity_and_symmetry(real) -> None:
    images, _ = real
    feats = extract_features(images)
    mu, cov = bench.gaussian_fit(feats)
    assert abs(bench.frechet_from_stats(mu, cov, mu, cov)) < 1e-6 * np.trace(cov)
    other = bench.reference_images(N)
    assert bench.frechet_distance(images, other) == pytest.approx(bench.frechet_distance(other, images), rel=1e-6)


def test_frechet_small_n_is_finite(real) -> None:
    images, _ = real
    # Fewer samples than feature dimensions: singular covariances, still a finite number.
    assert np.isfinite(bench.frechet_distance(images[:20], bench.reference_images(20)))


def test_psnr(real) -> None:
    images, _ = real
    assert bench.psnr(images, images) == bench.PSNR_CAP_DB
    values = [bench.psnr(images, noisy(images, std)) for std in (2.0, 8.0, 32.0)]
    assert values[0] > values[1] > values[2]
    assert 25.0 < values[1] < 35.0  # std 8 noise on mostly-black images: about 30 dB


def test_ssim(real) -> None:
    images, _ = real
    assert bench.ssim(images, images) == pytest.approx(1.0, abs=1e-12)
    values = [bench.ssim(images, noisy(images, std)) for std in (2.0, 8.0, 32.0)]
    assert 1.0 > values[0] > values[1] > values[2] > 0.0
    degraded = noisy(images, 8.0)
    assert bench.ssim(images, degraded) == pytest.approx(bench.ssim(degraded, images), rel=1e-9)


def test_float_images_accepted(real) -> None:
    images, specs = real
    pixels = to_tensor_range(images[:50])  # [-1, 1] NCHW, as the pipelines produce
    assert np.array_equal(bench.to_uint8(pixels), images[:50])
    assert bench.psnr(pixels, images[:50]) == bench.PSNR_CAP_DB
    assert np.allclose(extract_features(pixels), extract_features(images[:50]))


def test_shipped_feature_net(real) -> None:
    images, specs = real
    path = default_weights_path()
    assert path.is_file() and path.stat().st_size < 1_000_000
    report = json.loads(path.with_suffix(".json").read_text())
    assert report["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert report["heldout_accuracy"]["full"] >= 0.99
    net = load_feature_net()
    feats = extract_features(images, net)
    assert feats.shape == (N, FEATURE_DIM) and np.isfinite(feats).all()
    assert np.array_equal(feats, extract_features(images))  # deterministic
    assert attribute_accuracy(net, images, specs)["full"] >= 0.98


def test_data_dir_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OBSDIFF_DATA", str(tmp_path))
    assert default_weights_path() == tmp_path / "shapebench" / "feature_net.safetensors"
    with pytest.raises(FileNotFoundError, match="OBSDIFF_DATA"):
        load_feature_net()
    monkeypatch.delenv("OBSDIFF_DATA")
    (tmp_path / "shapebench").mkdir()
    shutil.copy(default_weights_path(), tmp_path / "shapebench" / "feature_net.safetensors")
    monkeypatch.setenv("OBSDIFF_DATA", str(tmp_path))
    assert load_feature_net().project.out_features == FEATURE_DIM


def test_evaluate_and_table(real) -> None:
    images, specs = make_dataset(240, 22, balanced=True)  # every spec once, like the reference
    dense = bench.evaluate(images, specs)
    assert set(dense) == {"n", "full", "shape", "color", "position", "size", "found", "fd"}
    pruned = bench.evaluate(noisy(images, 16.0), specs, reference=images)
    assert pruned["psnr"] < bench.PSNR_CAP_DB and 0.0 < pruned["ssim"] < 1.0
    assert pruned["fd"] > dense["fd"]
    table = bench.format_table({"dense": dense, "pruned 50%": pruned})
    lines = table.splitlines()
    assert len(lines) == 4 and lines[0].split()[:2] == ["model", "n"]
    assert "psnr" in lines[0] and lines[2].startswith("dense") and lines[2].rstrip().endswith("-")
    assert lines[3].startswith("pruned 50%")


def test_image_grid(real, tmp_path: Path) -> None:
    images, specs = real
    grid = bench.image_grid(images[:10], nrow=4, scale=2)
    assert grid.size == (2 + 4 * (64 + 2), 2 + 3 * (64 + 2))
    assert np.array_equal(np.asarray(grid)[2:66:2, 2:66:2], images[0])  # nearest-neighbour upscaling
    captioned = bench.image_grid(images[:4], nrow=4, captions=[s.caption() for s in specs[:4]])
    assert captioned.size[1] > bench.image_grid(images[:4], nrow=4).size[1]
    path = bench.save_grid(images[:8], tmp_path / "grid.png", nrow=8)
    assert Image.open(path).size == (2 + 8 * (128 + 2), 2 + 128 + 2)

"""The classical detector reads the four attributes back off rendered (and degraded) images."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from obsdiff_lite.shapes.dataset import ATTRIBUTES, SHAPES, ShapeSpec, _coverage, make_dataset, render
from obsdiff_lite.shapes.detector import Detection, detect, detect_batch, window_coverage


def degrade(images: np.ndarray, seed: int, noise_std: float = 8.0) -> np.ndarray:
    """A 3x3 box blur then Gaussian noise (std in 0..255 units), like a tiny model's output."""
    rng = np.random.default_rng(seed)
    blurred = ndimage.uniform_filter(images.astype(np.float64), size=(1, 3, 3, 1), mode="constant")
    noisy = blurred + rng.normal(0.0, noise_std, size=images.shape)
    return np.clip(np.round(noisy), 0, 255).astype(np.uint8)


def accuracies(detections: list[Detection], specs: list[ShapeSpec]) -> dict[str, float]:
    """Exact-spec accuracy ('full') and per-attribute accuracy."""
    out = {"full": float(np.mean([d.spec == s for d, s in zip(detections, specs)]))}
    for name in ATTRIBUTES:
        out[name] = float(np.mean([getattr(d, name) == getattr(s, name) for d, s in zip(detections, specs)]))
    return out


@pytest.mark.parametrize("seed", [0, 1])
def test_clean_accuracy(seed: int) -> None:
    images, specs = make_dataset(2000, seed)
    acc = accuracies(detect_batch(images), specs)
    assert acc["full"] >= 0.99, acc
    for name in ATTRIBUTES:
        assert acc[name] >= 0.995, (name, acc)


def test_noisy_blurred_accuracy() -> None:
    images, specs = make_dataset(1000, 7)
    acc = accuracies(detect_batch(degrade(images, seed=7)), specs)
    assert acc["full"] >= 0.95, acc


def test_balanced_every_combination() -> None:
    images, specs = make_dataset(240, 3, balanced=True)
    assert len(set(specs)) == 240
    assert accuracies(detect_batch(images), specs)["full"] >= 0.99


def test_unjittered_renders_exact() -> None:
    for spec in make_dataset(240, 4, balanced=True)[1]:
        assert detect(render(spec)).spec == spec


def test_empty_image_has_no_spec() -> None:
    detection = detect(np.zeros((32, 32, 3), np.uint8))
    assert detection.spec is None and not detection.found and detection.shape is None


def test_faint_noise_only_has_no_spec() -> None:
    noise = np.clip(np.random.default_rng(0).normal(0, 8, (32, 32, 3)), 0, 255).astype(np.uint8)
    assert detect(noise).spec is None


def test_largest_blob_wins() -> None:
    spec = ShapeSpec("square", "red", "bottom right", "large")
    image = render(spec)
    image[2:4, 2:4] = (40, 200, 60)  # a small green speck in the corner
    detection = detect(image)
    assert detection.spec == spec
    assert detection.num_components == 2


def test_debug_fields() -> None:
    spec = ShapeSpec("triangle", "blue", "center", "large")
    detection = detect(render(spec))
    assert detection.spec == spec
    assert abs(detection.half_extent - 7.0) < 0.7
    assert np.hypot(detection.center[0] - 16.0, detection.center[1] - 16.0) < 0.7
    assert detection.centroid[1] > detection.center[1]  # a triangle's mass sits below its center
    assert 0.0 < detection.confidence <= 1.0
    assert min(detection.shape_errors, key=detection.shape_errors.get) == "triangle"


def test_deterministic() -> None:
    images, _ = make_dataset(50, 11)
    noisy = degrade(images, seed=11)
    first = [d.spec for d in detect_batch(noisy)]
    second = [d.spec for d in detect_batch(list(noisy))]
    assert first == second


def test_refuses_float_and_wrong_shape() -> None:
    with pytest.raises(TypeError):
        detect(np.zeros((32, 32, 3), np.float32))
    with pytest.raises(ValueError):
        detect(np.zeros((3, 32, 32), np.uint8))


@pytest.mark.parametrize("shape", SHAPES)
def test_window_coverage_matches_dataset(shape: str) -> None:
    rng = np.random.default_rng(0)
    for _ in range(10):
        cx, cy = rng.uniform(6, 26, size=2)
        h = rng.uniform(3.5, 7.5)
        full = _coverage(shape, cx, cy, h)
        window = (slice(3, 21), slice(5, 30))
        assert np.array_equal(window_coverage(shape, cx, cy, h, (slice(0, 32), slice(0, 32))), full)
        assert np.array_equal(window_coverage(shape, cx, cy, h, window), full[window])

"""The captioned-shapes dataset follows its exact spec and is deterministic by seed."""

from __future__ import annotations

import numpy as np
import pytest

from obsdiff_lite.shapes.dataset import (
    COLORS, POSITIONS, SHAPES, SIZES, ShapeSpec, all_specs, balanced_specs, make_dataset, parse_caption, render,
)


def test_vocabulary_and_grammar():
    assert len(all_specs()) == 4 * 6 * 5 * 2
    assert ShapeSpec("circle", "red", "top left", "large").caption() == "a large red circle at the top left"
    assert ShapeSpec("cross", "cyan", "center", "small").caption() == "a small cyan cross in the center"
    for spec in all_specs():
        assert parse_caption(spec.caption()) == spec
    for bad in ("a large red circle", "a huge red circle at the top left", "two cats"):
        with pytest.raises(ValueError):
            parse_caption(bad)
    with pytest.raises(ValueError, match="color"):
        ShapeSpec("circle", "purple", "center", "small")


def test_deterministic_by_seed_and_balanced():
    a, specs_a = make_dataset(64, seed=3)
    b, specs_b = make_dataset(64, seed=3)
    c, _ = make_dataset(64, seed=4)
    assert np.array_equal(a, b) and specs_a == specs_b and not np.array_equal(a, c)
    assert a.shape == (64, 32, 32, 3) and a.dtype == np.uint8
    counts = {}
    for s in balanced_specs(480, seed=0):
        counts[s] = counts.get(s, 0) + 1
    assert set(counts.values()) == {2}


def test_rendering_geometry_and_colors():
    """Black background, palette colour at the centre, extent as specified (no jitter)."""
    for spec in all_specs():
        img = render(spec).astype(float)
        cx, cy = POSITIONS[spec.position]
        h = SIZES[spec.size]
        assert img[0, 0].sum() == 0 or spec.position == "top left"  # far corner stays black
        core = img[int(cy), int(cx)] if spec.shape != "triangle" else img[int(cy + 0.4 * h), int(cx)]
        assert np.allclose(core, COLORS[spec.color], atol=1), spec
        covered = (img.max(axis=2) > 0).sum()
        expected = {"circle": np.pi * h**2, "square": (1.7 * h) ** 2, "triangle": 0.5 * 2 * h * 1.8 * h,
                    "cross": 2 * (2 * h * 0.7 * h) - (0.7 * h) ** 2}[spec.shape]
        assert 0.8 * expected < covered < 1.25 * expected + 4 * 2 * h, (spec, covered, expected)
    assert set(SHAPES) == {"circle", "square", "triangle", "cross"}


def test_jitter_stays_within_spec():
    rng = np.random.default_rng(0)
    spec = ShapeSpec("square", "green", "center", "small")
    for _ in range(20):
        img = render(spec, rng)
        ys, xs = np.nonzero(img.max(axis=2) > 128)
        assert abs(xs.mean() + 0.5 - 16) <= 1.5 and abs(ys.mean() + 0.5 - 16) <= 1.5
        color = img[ys, xs].reshape(-1, 3).max(axis=0)
        assert np.all(np.abs(color.astype(int) - np.array(COLORS["green"])) <= 13)


def test_shipped_calibration_prompts_for_real_models():
    from pathlib import Path

    from obsdiff_lite.prune import read_prompts

    prompts = read_prompts(Path(__file__).resolve().parent.parent / "data" / "prompts" / "calibration.txt")
    assert len(prompts) >= 100 and len(set(prompts)) == len(prompts)
    # A real model's default prompts come from that list: the first N, and never silently fewer than asked for.
    from types import SimpleNamespace

    from obsdiff_lite.prune import default_prompts

    real_model = SimpleNamespace(obsdiff_generation={})
    assert default_prompts(real_model, 100, seed=0) == prompts[:100]
    with pytest.raises(ValueError, match=f"more than the {len(prompts)} prompts .* or --prompts FILE"):
        default_prompts(real_model, len(prompts) + 1, seed=0)


def test_prompt_files_in_json_are_read_as_lists_not_as_lines(tmp_path):
    from obsdiff_lite.prune import read_prompts

    listed = tmp_path / "prompts.json"
    listed.write_text('[\n  "a red fox in snow",\n  " a lighthouse ",\n  ""\n]\n')
    assert read_prompts(listed) == ["a red fox in snow", "a lighthouse"]
    broken = tmp_path / "broken.json"
    broken.write_text('["a cat",')
    with pytest.raises(ValueError, match="not valid JSON"):
        read_prompts(broken)

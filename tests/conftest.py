"""Shared fixtures: random-init tiny SD3 and Flux pipelines saved once per session (fast, offline)."""

from __future__ import annotations

import json
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)

# Few steps and a tiny call keep engine tests to seconds; the trained models live in data/.
FAST_CALL = {"num_inference_steps": 3, "height": 32, "width": 32}


def _save_random_pipeline(arch: str, path):
    from obsdiff_lite.shapes.tiny import GENERATION, build_pipeline

    pipe = build_pipeline(arch, seed=0)
    pipe.save_pretrained(path, safe_serialization=True)
    generation = dict(GENERATION[arch], num_inference_steps=FAST_CALL["num_inference_steps"])
    (path / "generation.json").write_text(json.dumps(generation))
    return path


@pytest.fixture(scope="session")
def random_sd3_dir(tmp_path_factory):
    return _save_random_pipeline("sd3", tmp_path_factory.mktemp("random-sd3"))


@pytest.fixture(scope="session")
def random_flux_dir(tmp_path_factory):
    return _save_random_pipeline("flux", tmp_path_factory.mktemp("random-flux"))


@pytest.fixture(scope="session")
def random_sd35_dual_dir(tmp_path_factory, random_sd3_dir):
    """The random tiny SD3 with SD3.5-medium's dual attention (an image-only ``attn2``) in its first 3 blocks."""
    from diffusers import SD3Transformer2DModel

    from obsdiff_lite.pipelines import load_pipeline

    pipe = load_pipeline(random_sd3_dir)
    torch.manual_seed(1)
    pipe.transformer = SD3Transformer2DModel.from_config({**pipe.transformer.config, "dual_attention_layers": (0, 1, 2)})
    path = tmp_path_factory.mktemp("random-sd35-dual")
    pipe.save_pretrained(path, safe_serialization=True)
    (path / "generation.json").write_text((random_sd3_dir / "generation.json").read_text())
    return path


@pytest.fixture(params=["sd3", "flux"])
def random_dir(request, random_sd3_dir, random_flux_dir):
    return {"sd3": random_sd3_dir, "flux": random_flux_dir}[request.param]

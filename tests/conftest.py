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


@pytest.fixture(params=["sd3", "flux"])
def random_dir(request, random_sd3_dir, random_flux_dir):
    return {"sd3": random_sd3_dir, "flux": random_flux_dir}[request.param]

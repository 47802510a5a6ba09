"""The shipped tiny pipelines: load with plain diffusers, small, and good enough to make pruning measurable."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from obsdiff_lite.evaluate import sample_shapebench
from obsdiff_lite.pipelines import load_pipeline
from obsdiff_lite.shapes.bench import adherence

DATA = Path(__file__).resolve().parent.parent / "data"
RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results"


@pytest.mark.parametrize("name", ["tiny-sd3", "tiny-flux", "tiny-sd3-mid", "tiny-sd3-wide", "tiny-sd3-long"])
def test_loads_with_plain_diffusers_and_generates(name):
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    path = DATA / name
    if name.startswith("tiny-sd3"):
        pipe = StableDiffusion3Pipeline.from_pretrained(path, text_encoder_3=None, tokenizer_3=None)
    else:
        pipe = FluxPipeline.from_pretrained(path)
    call = {k: v for k, v in json.loads((path / "generation.json").read_text()).items() if not k.startswith("_")}
    images = pipe("a large red circle at the top left", generator=torch.Generator().manual_seed(0),
                  output_type="np", **call).images
    assert images.shape == (1, 32, 32, 3)
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    assert size <= 15 * 2**20, f"{name} is {size / 2**20:.1f} MB"
    assert (path / "README.md").is_file() and (path / "training.json").is_file()
    assert json.loads((path / "training.json").read_text())["partial"] is False


@pytest.mark.parametrize("name", ["tiny-sd3", "tiny-flux"])
def test_quality_bar_on_fresh_prompts(name):
    """The model card's 500-prompt bar is >= 0.90; 48 other prompts must not fall below 0.85."""
    pipe = load_pipeline(DATA / name)
    specs, images = sample_shapebench(pipe, 48, seed=123, progress=False)
    assert adherence(images, specs)["full"] >= 0.85
    measured = json.loads((RESULTS / "tiny_world.json").read_text())[name]
    assert measured["dense"]["full"] >= 0.90 and measured["num_prompts"] >= 500
    # The sensitivity requirement: 50% magnitude pruning costs at least 10 points of adherence.
    assert measured["dense"]["full"] - measured["curves"]["magnitude"]["0.50"]["full"] >= 0.10
    assert f"{measured['dense']['full']:.3f}" in (DATA / name / "README.md").read_text()


@pytest.mark.parametrize("name, heads", [("tiny-sd3-mid", 6), ("tiny-sd3-wide", 8)])
def test_wider_models_are_tiny_sd3_with_more_heads_and_the_same_recipe(name, heads):
    """The width experiment compares like with like: only the head count (and the text projection that must match
    it) differs from tiny-sd3, and it was trained with the same data, settings and number of steps."""
    def config(model):
        return json.loads((DATA / model / "transformer" / "config.json").read_text())

    narrow, wide = config("tiny-sd3"), config(name)
    assert (narrow["num_attention_heads"], wide["num_attention_heads"]) == (4, heads)
    assert wide["caption_projection_dim"] == wide["num_attention_heads"] * wide["attention_head_dim"]
    differing = {k for k in narrow.keys() | wide.keys() if narrow.get(k) != wide.get(k)} - {"_diffusers_version"}
    assert differing == {"num_attention_heads", "caption_projection_dim"}
    recipe = ("steps", "batch_size", "lr", "ema_decay", "caption_dropout", "num_images", "seed", "partial")
    trained = [json.loads((DATA / model / "training.json").read_text()) for model in ("tiny-sd3", name)]
    assert {k: trained[0][k] for k in recipe} == {k: trained[1][k] for k in recipe}
    assert trained[1]["num_attention_heads"] == heads
    assert (DATA / name / "vae" / "diffusion_pytorch_model.safetensors").read_bytes() == (
        DATA / "tiny-sd3" / "vae" / "diffusion_pytorch_model.safetensors").read_bytes()


def test_long_model_is_tiny_sd3_trained_further_at_the_same_width():
    """The fit side of the width experiment: tiny-sd3's architecture and weights as the start, as many steps again."""
    def read(model, *parts):
        return json.loads((DATA / model / Path(*parts)).read_text())

    base, long = read("tiny-sd3", "transformer", "config.json"), read("tiny-sd3-long", "transformer", "config.json")
    assert {k: v for k, v in base.items() if k != "_diffusers_version"} == {
        k: v for k, v in long.items() if k != "_diffusers_version"}
    trained, base_training = read("tiny-sd3-long", "training.json"), read("tiny-sd3", "training.json")
    assert trained["resumed_from"] == "data/tiny-sd3" and trained["steps"] == 2 * base_training["steps"]
    recipe = ("batch_size", "lr", "ema_decay", "caption_dropout", "num_images", "seed", "partial")
    assert {k: trained[k] for k in recipe} == {k: base_training[k] for k in recipe}
    assert (DATA / "tiny-sd3-long" / "vae" / "diffusion_pytorch_model.safetensors").read_bytes() == (
        DATA / "tiny-sd3" / "vae" / "diffusion_pytorch_model.safetensors").read_bytes()


def test_shipped_models_are_found_by_name_from_any_directory(tmp_path, monkeypatch, capsys):
    """`obsdiff prune tiny-sd3 ...` works outside the repository; a folder of that name in the cwd still wins."""
    from obsdiff_lite.cli import main
    from obsdiff_lite.pipelines import PipelineError, shipped_models

    assert {"tiny-sd3", "tiny-flux"} <= set(shipped_models())
    monkeypatch.chdir(tmp_path)
    pipe = load_pipeline("tiny-flux")
    assert type(pipe).__name__ == "FluxPipeline" and pipe.obsdiff_source == str(DATA / "tiny-flux")
    assert main(["plan", "tiny-sd3"]) == 0 and "estimated peak" in capsys.readouterr().out
    with pytest.raises(PipelineError, match="shipped tiny model: .*tiny-sd3"):
        load_pipeline("tiny-nothing")
    (tmp_path / "tiny-sd3").mkdir()  # a local path named like a shipped model is that path
    with pytest.raises(PipelineError, match="StableDiffusion3Pipeline|model_index"):
        load_pipeline("tiny-sd3")

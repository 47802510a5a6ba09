"""The trainer that made data/tiny-*: a few seconds of it runs end to end and logs loss and adherence."""

from __future__ import annotations

import json

from obsdiff_lite.pipelines import load_pipeline
from obsdiff_lite.shapes.train import train_transformer, train_vae


def test_trainer_runs_and_writes_a_loadable_pipeline_with_logs(tmp_path):
    vae = train_vae(tmp_path / "vae", minutes=0.02)
    assert vae.config.scaling_factor > 0
    train_transformer("flux", tmp_path / "vae", tmp_path / "flux", minutes=0.1, num_images=256, checkpoint_minutes=0.02)
    log = [json.loads(line) for line in (tmp_path / "flux" / "training_log.jsonl").read_text().splitlines()]
    assert any("adherence" in r and 0.0 <= r["adherence"]["full"] <= 1.0 for r in log)
    info = json.loads((tmp_path / "flux" / "training.json").read_text())
    assert info["partial"] is False and info["steps"] > 0
    pipe = load_pipeline(tmp_path / "flux")
    assert pipe.obsdiff_generation["_prompts"] == "shapes"

"""The trainer that made data/tiny-*: a few seconds of it runs end to end and logs loss and adherence."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from obsdiff_lite.pipelines import load_pipeline
from obsdiff_lite.shapes.tiny import build_pipeline
from obsdiff_lite.shapes.train import main, train_transformer, train_vae

DATA = Path(__file__).resolve().parent.parent / "data"


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


def test_trainer_runs_exact_steps_and_widens_sd3(tmp_path):
    """``steps`` trains exactly that many optimizer steps (the width-scaling model's budget: tiny-sd3's 5,130), and
    ``num_attention_heads`` widens tiny-sd3 while the text width and depth stay as they are."""
    out = tmp_path / "sd3"
    train_transformer("sd3", DATA / "tiny-sd3" / "vae", out, steps=2, num_attention_heads=2, num_images=64,
                      checkpoint_minutes=0.0)  # a checkpoint after every step: the logging path runs too
    log = [json.loads(line) for line in (out / "training_log.jsonl").read_text().splitlines()]
    assert len([r for r in log if "adherence" in r]) == 2 and all(r["seconds"] >= 0 for r in log)
    info = json.loads((out / "training.json").read_text())
    assert (info["steps"], info["num_attention_heads"], info["partial"]) == (2, 2, False)
    config = json.loads((out / "transformer" / "config.json").read_text())
    dense = json.loads((DATA / "tiny-sd3" / "transformer" / "config.json").read_text())
    assert config["num_attention_heads"] == 2 and config["caption_projection_dim"] == 2 * config["attention_head_dim"]
    assert (config["num_layers"], config["joint_attention_dim"]) == (dense["num_layers"], dense["joint_attention_dim"])


def test_width_options_refuse_what_they_cannot_build(tmp_path, capsys):
    with pytest.raises(ValueError, match="only supported for the tiny sd3"):
        build_pipeline("flux", num_attention_heads=8)
    with pytest.raises(ValueError, match="num_attention_heads must be >= 1"):
        build_pipeline("sd3", num_attention_heads=0)
    for argv, message in ((["flux", "--heads", "8"], "--heads takes a positive head count and only applies to sd3"),
                          (["sd3", "--steps", "0"], "--steps must be >= 1")):
        with pytest.raises(SystemExit) as exit_info:
            main([*argv, "--out", str(tmp_path / "x"), "--vae", str(DATA / "tiny-sd3" / "vae")])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_tokenizer_builds_are_identical_across_processes(tmp_path):
    """The BPE trainer numbers its alphabet in hash-map order, different in every process; ``canonical_bpe_vocab``
    sorts it, so a retrained tiny model gets the same token ids as the shipped one's recipe (two fresh processes)."""
    import subprocess
    import sys

    saved = []
    for i in range(2):
        out = tmp_path / str(i)
        script = ("from obsdiff_lite.shapes.tiny import build_clip_tokenizer; "
                  f"build_clip_tokenizer().save_pretrained({str(out)!r})")
        subprocess.run([sys.executable, "-c", script], check=True, capture_output=True)
        saved.append({p.name: p.read_bytes() for p in out.iterdir()})
    assert saved[0] == saved[1] and "tokenizer.json" in saved[0]


def test_canonical_bpe_vocab_sorts_only_the_alphabet():
    from obsdiff_lite.shapes.tiny import canonical_bpe_vocab

    vocab = {"<s>": 0, "</s>": 1, "b": 2, "a": 3, "c": 4, "ab": 5, "abc": 6}
    assert canonical_bpe_vocab(vocab, num_merges=2, num_special=2) == {
        "<s>": 0, "</s>": 1, "a": 2, "b": 3, "c": 4, "ab": 5, "abc": 6}

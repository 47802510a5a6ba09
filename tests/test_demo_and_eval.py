"""`obsdiff demo` and `obsdiff eval` end to end (on a random tiny pipeline), and the README's numbers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from obsdiff_lite.cli import main
from obsdiff_lite.evaluate import run_demo

ROOT = Path(__file__).resolve().parent.parent


def test_demo_writes_report_and_grid(random_sd3_dir, tmp_path):
    result = run_demo(output=tmp_path / "demo", model=random_sd3_dir, num_prompts=4, calibration_prompts=2, progress=False)
    report = json.loads((tmp_path / "demo" / "report.json").read_text())
    assert report["grid_rows"] == ["dense", "obs-diff", "obs-diff + refit", "obs-diff + admm", "magnitude"]
    assert set(report["scores"]) == {"dense", "obs-diff 50%", "obs-diff + refit 50%", "obs-diff + admm 50%",
                                     "magnitude 50%"}
    assert "psnr" in report["scores"]["obs-diff 50%"] and "psnr" not in report["scores"]["dense"]
    for method in ("obs-diff", "obs-diff + refit", "obs-diff + admm", "magnitude"):
        assert abs(report["pruning"][method]["achieved_sparsity"] - 0.5) < 0.005
    grid = Image.open(tmp_path / "demo" / "grid.png")
    assert grid.size[1] >= 5 * 32 and result["num_prompts"] == 4


def test_eval_cli_prints_table_and_writes_json_and_grid(random_sd3_dir, tmp_path, capsys):
    code = main(["eval", str(random_sd3_dir), "--num-prompts", "4", "--reference", str(random_sd3_dir),
                 "--json", str(tmp_path / "e.json"), "--grid", str(tmp_path / "g.png")])
    assert code == 0
    out = capsys.readouterr().out
    assert "full" in out and "fd" in out
    assert "fd: 4 images cannot fit the 64-dimensional feature covariance" in out  # small N: the fd is mostly noise
    scores = json.loads((tmp_path / "e.json").read_text())["scores"][str(random_sd3_dir)]
    assert scores["psnr"] == 100.0 and abs(scores["ssim"] - 1.0) < 1e-9  # same model, same seeds: identical
    assert (tmp_path / "g.png").is_file()


def test_eval_refuses_an_unwritable_grid_before_sampling_and_writes_whole_files(random_sd3_dir, tmp_path,
                                                                                   monkeypatch):
    from obsdiff_lite import evaluate as evaluate_module

    def no_sampling(*args, **kwargs):
        raise AssertionError("a refused output path must be caught before any model is loaded")

    with monkeypatch.context() as patch:
        patch.setattr(evaluate_module, "load_pipeline", no_sampling)
        with pytest.raises(ValueError, match="suffixes"):
            evaluate_module.evaluate_models({"m": random_sd3_dir}, num_prompts=2, grid=tmp_path / "grid.gif")

    # A write that fails half way leaves neither the file nor its temporary sibling behind.
    def half_written(path):
        path.write_text("{")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        evaluate_module.write_file_atomic(tmp_path / "out" / "scores.json", half_written)
    assert list((tmp_path / "out").iterdir()) == []
    written = evaluate_module.write_file_atomic(tmp_path / "out" / "scores.json", lambda p: p.write_text("{}"))
    assert written.read_text() == "{}" and list((tmp_path / "out").iterdir()) == [written]
    plain = tmp_path / "plain.json"
    plain.write_text("{}")
    assert written.stat().st_mode == plain.stat().st_mode  # permissions of any file the user writes (mkstemp: 0600)


def test_eval_samples_with_the_steps_and_guidance_asked_for(random_sd3_dir, tmp_path):
    import torch

    from obsdiff_lite.evaluate import sample_shapebench
    from obsdiff_lite.pipelines import load_pipeline

    pipe = load_pipeline(random_sd3_dir)
    batches = []
    pipe.transformer.register_forward_pre_hook(lambda module, args, kwargs: batches.append(kwargs["hidden_states"].shape[0]),
                                               with_kwargs=True)
    _, default = sample_shapebench(pipe, 3, progress=False)
    steps = pipe.obsdiff_generation["num_inference_steps"]
    assert batches == [2 * 3] * steps  # generation.json: CFG batches uncond and cond together
    batches.clear()
    _, fewer = sample_shapebench(pipe, 3, progress=False, steps=2, guidance=1.0)
    assert batches == [3, 3]  # two steps, and CFG 1 runs no unconditional half
    assert not torch.equal(torch.as_tensor(default), torch.as_tensor(fewer))

    code = main(["eval", str(random_sd3_dir), "--num-prompts", "2", "--steps", "2", "--guidance", "1.5",
                 "--json", str(tmp_path / "e.json")])
    saved = json.loads((tmp_path / "e.json").read_text())
    assert code == 0 and (saved["steps"], saved["guidance"]) == (2, 1.5)


def test_readme_numbers_match_results_files():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "readme.py"), "--check"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_readme_section_links_point_at_headings():
    import re

    text = (ROOT / "README.md").read_text()
    anchors = {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")  # GitHub's heading anchors
               for h in re.findall(r"^#+ (.+)$", text, flags=re.M)}
    links = re.findall(r"\]\(#([^)]+)\)", text)
    assert len(links) >= 10, "the Results section's list of sections is missing"
    assert not [a for a in links if a not in anchors], "README links to headings that do not exist"
    local = re.findall(r"\]\(((?:notebooks|data|benchmarks)/[^)#]+)\)", text)
    assert local and not [p for p in local if not (ROOT / p).exists()], "README links to files that do not exist"


def test_readme_prune_commands_parse_into_valid_configs(monkeypatch):
    """Every `obsdiff prune` line in the README's code blocks parses and validates (nothing is loaded or run)."""
    import re
    import shlex

    from obsdiff_lite.cli import _prune_config, build_parser

    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    commands = [line for block in blocks for line in block.replace("\\\n", " ").splitlines()
                if line.strip().startswith("obsdiff prune")]
    assert len(commands) >= 4, commands
    monkeypatch.chdir(ROOT)  # the commands name data/prompts/... relative to the checkout
    for command in commands:
        args = build_parser().parse_args(shlex.split(command)[1:])
        _prune_config(args).validate()

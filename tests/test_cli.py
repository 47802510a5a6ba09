"""The `obsdiff` command line: a complete, loadable output, and one readable line for every bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from obsdiff_lite.cli import main

FAST = ["--num-prompts", "2", "--steps", "2", "--packages", "2"]


def test_prune_writes_a_complete_pipeline_loadable_by_plain_diffusers(random_sd3_dir, tmp_path, capsys):
    out = tmp_path / "pruned"
    assert main(["prune", str(random_sd3_dir), "--output", str(out), "--sparsity", "0.5", *FAST]) == 0
    assert "pruned sd3" in capsys.readouterr().out
    info = json.loads((out / "obsdiff.json").read_text())
    assert info["config"]["method"] == "obs-diff" and info["config"]["weighting"] == "log-decrease"
    assert info["num_packages"] == 2 and set(info["timings"]) >= {"calibration_s", "solve_s", "total_s"}
    assert {"torch", "diffusers", "obsdiff_lite"} <= set(info["versions"])
    assert info["peak_memory_bytes"] > 0 and "high-water mark (CPU)" in info["peak_memory_scope"]  # what it means
    assert len(info["calibration_prompts"]) == 2
    assert json.loads((out / "generation.json").read_text())["num_inference_steps"] == 3
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary directory left behind"

    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(out, text_encoder_3=None, tokenizer_3=None)
    for name, layer in info["layers"].items():
        module = pipe.transformer.get_submodule(name)
        assert abs(float((module.weight == 0).float().mean()) - 0.5) < 0.005, name
    assert len(info["layers"]) == 69


def test_nm_pattern_implies_sparsity(random_flux_dir, tmp_path):
    out = tmp_path / "nm"
    assert main(["prune", str(random_flux_dir), "--output", str(out), "--pattern", "2:4", "--method", "wanda", *FAST]) == 0
    info = json.loads((out / "obsdiff.json").read_text())
    assert info["target_sparsity"] == 0.5 and info["arch"] == "flux"


def test_refit_flag_reaches_the_solver(random_flux_dir, tmp_path):
    out = tmp_path / "refit"
    assert main(["prune", str(random_flux_dir), "--output", str(out), "--pattern", "2:4", "--refit", *FAST]) == 0
    info = json.loads((out / "obsdiff.json").read_text())
    assert info["config"]["refit"] is True
    assert all(v["recon_error"] <= v["recon_error_obs"] * (1 + 1e-6) for v in info["layers"].values())


def test_tune_flags_reach_block_tuning(random_sd3_dir, tmp_path, capsys):
    out = tmp_path / "tuned"
    assert main(["prune", str(random_sd3_dir), "--output", str(out), "--pattern", "2:4", "--tune-iters", "4",
                 "--tune-lr", "0.001", "--tune-max-calls", "2", *FAST]) == 0
    info = json.loads((out / "obsdiff.json").read_text())
    assert (info["config"]["tune_iters"], info["config"]["tune_lr"], info["config"]["tune_max_calls"]) == (4, 0.001, 2)
    printed = capsys.readouterr().out
    assert {r["tune_calls"] for r in info["tuning"].values()} == {2} and "block tuning" in printed
    ratio = sum(r["tune_loss_after"] / r["tune_loss_before"] for r in info["tuning"].values()) / len(info["tuning"])
    assert f"block tuning: loss to the dense blocks x{ratio:.2f} on average over {len(info['tuning'])} blocks" in printed


def test_solver_flag_reaches_the_admm_solver(random_sd3_dir, tmp_path):
    out = tmp_path / "admm"
    assert main(["prune", str(random_sd3_dir), "--output", str(out), "--pattern", "2:4", "--solver", "admm", *FAST]) == 0
    info = json.loads((out / "obsdiff.json").read_text())
    assert info["config"]["solver"] == "admm"
    assert all(v["recon_error"] <= v["recon_error_obs"] * (1 + 1e-6) and v["admm_iters"] > 0
               for v in info["layers"].values())


def test_dense_targets_flag_moves_the_later_packages(random_flux_dir, tmp_path):
    out = tmp_path / "dense-targets"
    assert main(["prune", str(random_flux_dir), "--output", str(out), "--packages", "2", "--dense-targets", *FAST]) == 0
    info = json.loads((out / "obsdiff.json").read_text())
    assert info["config"]["dense_targets"] is True
    shifts = [[v["dense_target_shift"] for v in info["layers"].values() if v["package"] == p] for p in (0, 1)]
    assert not any(shifts[0]) and all(s > 0 for s in shifts[1])


def test_block_sparsity_flag_sets_each_block(random_flux_dir, tmp_path):
    out = tmp_path / "per-block"
    values = "0.3,0.4,0.5,0.6,0.6,0.7"  # the random tiny Flux: 2 double-stream + 4 single-stream blocks
    assert main(["prune", str(random_flux_dir), "--output", str(out), "--block-sparsity", values, *FAST]) == 0
    info = json.loads((out / "obsdiff.json").read_text())
    assert list(info["block_sparsity"].values()) == [float(v) for v in values.split(",")]
    assert info["config"]["sparsity"] is None and 0.3 < info["target_sparsity"] < 0.7
    assert abs(info["achieved_sparsity"] - info["target_sparsity"]) < 0.005


def _bad_cases(model, tmp_path):
    nonempty = tmp_path / "nonempty"
    nonempty.mkdir()
    (nonempty / "x").write_text("x")
    empty_prompts = tmp_path / "empty.txt"
    empty_prompts.write_text("\n  \n")
    csv_prompts = tmp_path / "prompts.csv"
    csv_prompts.write_text("id,caption\n1,a cat\n")
    dict_prompts = tmp_path / "prompts.json"
    dict_prompts.write_text('{"prompts": ["a cat"]}')
    latin1_prompts = tmp_path / "latin1.txt"
    latin1_prompts.write_bytes("un café\n".encode("latin-1"))
    not_a_pipeline = tmp_path / "notpipe"
    not_a_pipeline.mkdir()
    out = str(tmp_path / "out")
    damaged = {}  # copies of the model, each broken in one way a copy or an edit can break it
    for label, (file, text) in {"obsdiff.json": ("obsdiff.json", "{not json"), "generation": ("generation.json", "[1]"),
                                "index": ("model_index.json", "{"), "weights": ("transformer", None)}.items():
        damaged[label] = tmp_path / f"damaged-{label}"
        shutil.copytree(model, damaged[label])
        if text is None:
            for weights in (damaged[label] / file).glob("*.safetensors"):
                weights.unlink()
        else:
            (damaged[label] / file).write_text(text)
    cases = {
        "sparsity 1.5": (["prune", model, "--output", out, "--sparsity", "1.5"], "[0, 1)"),
        "negative sparsity": (["prune", model, "--output", out, "--sparsity", "-0.1"], "[0, 1)"),
        "N:M reversed": (["prune", model, "--output", out, "--pattern", "4:2"], "4:2"),
        "N:M malformed": (["prune", model, "--output", out, "--pattern", "2:"], "2:"),
        "unknown method": (["prune", model, "--output", out, "--method", "random"], "obs-diff"),
        "unknown pattern": (["prune", model, "--output", out, "--pattern", "blocky"], "blocky"),
        "unknown weighting": (["prune", model, "--output", out, "--weighting", "quadratic"], "log-decrease"),
        "missing model": (["prune", str(tmp_path / "nope"), "--output", out], "does not exist"),
        "not a pipeline": (["prune", str(not_a_pipeline), "--output", out], "StableDiffusion3Pipeline"),
        "a component folder": (["prune", str(Path(model) / "transformer"), "--output", out],
                               f"give the pipeline folder that holds it: {model}"),
        "blocks out of range": (["prune", model, "--output", out, "--blocks", "3:99"], "6 blocks"),
        "blocks empty": (["prune", model, "--output", out, "--blocks", "4:4"], "blocks"),
        "packages 0": (["prune", model, "--output", out, "--packages", "0"], "packages"),
        "packages too many": (["prune", model, "--output", out, "--packages", "999", "--num-prompts", "1"], "units"),
        "prompt file missing": (["prune", model, "--output", out, "--prompts", str(tmp_path / "p.txt")], "does not exist"),
        "prompt file empty": (["prune", model, "--output", out, "--prompts", str(empty_prompts)], "no prompts"),
        "prompt file a directory": (["prune", model, "--output", out, "--prompts", str(tmp_path)], "is a directory"),
        "prompt file not UTF-8": (["prune", model, "--output", out, "--prompts", str(latin1_prompts)], "not UTF-8"),
        "prompt file a CSV table": (["prune", model, "--output", out, "--prompts", str(csv_prompts)], "is a .csv file"),
        "prompt file a JSON object": (["prune", model, "--output", out, "--prompts", str(dict_prompts)],
                                      "JSON list of strings"),
        "unsupported dtype": (["prune", model, "--output", out, "--dtype", "float64"], "float32"),
        "output not empty": (["prune", model, "--output", str(nonempty)], "--overwrite"),
        "output under a file": (["prune", model, "--output", str(nonempty / "x" / "out")], "which is a file"),
        "N:M with other sparsity": (["prune", model, "--output", out, "--pattern", "2:4", "--sparsity", "0.3"], "implies"),
        "refit of structured": (["prune", model, "--output", out, "--pattern", "structured", "--refit"], "--refit"),
        "dense targets of wanda": (["prune", model, "--output", out, "--method", "wanda", "--dense-targets"],
                                   "no OBS update"),
        "admm of wanda": (["prune", model, "--output", out, "--method", "wanda", "--solver", "admm"],
                          "refines an OBS solution"),
        "unknown solver": (["prune", model, "--output", out, "--solver", "newton"], "unknown solver"),
        "tuning of structured": (["prune", model, "--output", out, "--pattern", "structured", "--tune-iters", "5"],
                                 "--tune-iters applies"),
        "tuning step size": (["prune", model, "--output", out, "--tune-iters", "5", "--tune-lr", "-1"], "tune_lr"),
        "block size zero": (["prune", model, "--output", out, "--block-size", "0"], "block_size"),
        "ramp too steep": (["prune", model, "--output", out, "--sparsity-ramp", "0.6"], "smaller ramp"),
        "block sparsity not numbers": (["prune", model, "--output", out, "--block-sparsity", "0.3,x"], "comma-separated"),
        "block sparsity count": (["prune", model, "--output", out, "--block-sparsity", "0.3,0.5", "--num-prompts", "1"],
                                 "one value per block"),
        "block sparsity with sparsity": (["prune", model, "--output", out, "--block-sparsity", "0.5,0.5", "--sparsity",
                                          "0.5"], "replaces --sparsity"),
        "unknown hessian device": (["prune", model, "--output", out, "--hessian-device", "tpu"], "--hessian-device"),
        "weight range all zero": (["prune", model, "--output", out, "--weight-range", "0", "0"], "weight 0"),
        "one step weighing 0": (["prune", model, "--output", out, "--steps", "1", "--weighting", "log-increase",
                                 "--weight-range", "0", "1"], "gives all 1 denoising step(s) weight 0"),
        "eval without prompts": (["eval", model, "--num-prompts", "0"], "num_prompts must be an integer >= 1"),
        "eval with zero steps": (["eval", model, "--num-prompts", "2", "--steps", "0"], "steps must be an integer"),
        "eval batch size zero": (["eval", model, "--num-prompts", "2", "--batch-size", "0"], "batch_size must be"),
        "eval negative guidance": (["eval", model, "--num-prompts", "2", "--guidance", "-1"], "guidance must be"),
        "eval negative seed": (["eval", model, "--num-prompts", "2", "--seed", "-5"],
                               "seed must be an integer in [0, 2**32)"),
        "seed beyond int64": (["prune", model, "--output", out, "--seed", str(2**70)],
                              "seed must be an integer in [0, 2**32)"),
        "demo without prompts": (["demo", "--num-prompts", "0", "--output", out], "num_prompts must be"),
        "demo output a file": (["demo", "--num-prompts", "2", "--output", str(nonempty / "x")], "is a file"),
        "demo of a missing model": (["demo", "--num-prompts", "2", "--model", str(tmp_path / "nope"), "--output", out],
                                    "does not exist"),
        "eval grid a directory": (["eval", model, "--num-prompts", "2", "--grid", str(tmp_path)], "is a directory"),
        "eval grid not an image": (["eval", model, "--num-prompts", "2", "--grid", out + ".txt"], ".png"),
        "eval json under a file": (["eval", model, "--num-prompts", "2", "--json", str(nonempty / "x" / "s.json")],
                                   "which is a file"),
        "plan json a directory": (["plan", "sd3-medium", "--json", str(tmp_path)], "is a directory"),
        "broken obsdiff.json": (["prune", str(damaged["obsdiff.json"]), "--output", out], "obsdiff.json is not valid JSON"),
        "generation.json a list": (["prune", str(damaged["generation"]), "--output", out], "must hold a JSON object"),
        "broken model_index.json": (["prune", str(damaged["index"]), "--output", out], "model_index.json is not valid"),
        "weights missing": (["prune", str(damaged["weights"]), "--output", out], "cannot load the pipeline from"),
    }
    if not torch.cuda.is_available():  # on a GPU machine this request is legitimate
        cases["cuda without cuda"] = (["prune", model, "--output", out, "--device", "cuda"], "CUDA")
    return cases


def test_bad_input_gives_one_readable_line(random_sd3_dir, tmp_path, capsys):
    cases = _bad_cases(str(random_sd3_dir), tmp_path)
    assert len(cases) >= 12
    for label, (argv, needle) in cases.items():
        code = main(argv)
        err = capsys.readouterr().err.strip()
        assert code == 2, f"{label}: exit {code}"
        assert err.startswith("obsdiff: error: ") and "\n" not in err, f"{label}: {err!r}"
        assert needle in err, f"{label}: {err!r} does not mention {needle!r}"
        assert "Traceback" not in err
    assert not (tmp_path / "out").exists(), "a refused run must not create its output"
    assert (tmp_path / "nonempty" / "x").read_text() == "x"


def test_an_output_folder_that_cannot_be_written_is_refused_before_any_work(random_sd3_dir, tmp_path, monkeypatch,
                                                                            capsys):
    """A read-only disk (or a folder without write permission) failed only when saving, after the whole prune."""
    import tempfile

    import obsdiff_lite.pipelines as pipelines

    def read_only(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    def no_loading(*args, **kwargs):
        raise AssertionError("the output path must be checked before the model is loaded")

    monkeypatch.setattr(tempfile, "mkdtemp", read_only)
    monkeypatch.setattr(pipelines, "load_pipeline", no_loading)
    for argv in (["prune", str(random_sd3_dir), "--output", str(tmp_path / "out")],
                 ["eval", str(random_sd3_dir), "--num-prompts", "2", "--json", str(tmp_path / "scores.json")]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "cannot be written" in err and "Permission denied" in err and "Traceback" not in err


def test_a_full_disk_while_saving_is_one_line_and_leaves_nothing(random_sd3_dir, tmp_path, monkeypatch, capsys):
    import diffusers

    def disk_full(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(diffusers.DiffusionPipeline, "save_pretrained", disk_full)
    argv = ["prune", str(random_sd3_dir), "--output", str(tmp_path / "out"), "--num-prompts", "1", "--steps", "1"]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "obsdiff: error: [Errno 28] No space left on device (no partial output is left behind)"
    assert list(tmp_path.iterdir()) == []  # neither the output nor its temporary sibling


def test_a_mistyped_local_path_that_looks_like_a_hub_id_is_named_as_such(tmp_path, monkeypatch, capsys):
    import huggingface_hub

    def offline(*args, **kwargs):
        raise OSError("offline")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    assert main(["eval", "runs/sd3-5O", "--num-prompts", "2"]) == 2
    err = capsys.readouterr().err
    assert "cannot fetch 'runs/sd3-5O' from the hub" in err
    assert "if you meant a local folder: 'runs' has no 'sd3-5O'" in err
    assert main(["eval", "stabilityai/sd3", "--num-prompts", "2"]) == 2  # no such local folder: no local hint
    assert "local folder" not in capsys.readouterr().err


def test_console_entry_point_runs_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "obsdiff_lite", "prune", str(tmp_path / "missing"), "--output",
                           str(tmp_path / "o")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("obsdiff: error:") and "Traceback" not in proc.stderr

"""Reliability: nothing half-written when a run is killed, and bit-identical reruns from obsdiff.json.

Kill tests: a real `python -m obsdiff_lite prune` killed by SIGTERM/SIGINT at different moments. The
runs go in parallel (one module fixture starts them all) to keep the file fast. Two moments:

* during calibration: the signal is sent when the first package's calibration bar appears on stderr
  (the run then still has two calibration passes of 8 prompts x 16 steps ahead of it);
* during saving: ``save_pretrained`` is slowed down *from the test only*, through a ``sitecustomize``
  module on the subprocess's PYTHONPATH that wraps diffusers' ``ModelMixin.save_pretrained``: after the
  transformer's weights are written into the temporary directory it prints a marker and sleeps, so the
  signal lands in the middle of the save (the VAE is not written yet). The package's code is unchanged.

Every run must exit non-zero with one ``obsdiff: interrupted`` line and no traceback, leave no
``.OUT.partial-*`` / ``.OUT.old-*`` sibling, and leave OUT absent. The narrower windows (a signal
during the commit rename, a second signal during the cleanup, SIGTERM without the CLI's handler,
--overwrite) are driven in-process, deterministically, by signalling from inside the save.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

# Calibration runs long enough to be caught in it; the others get to saving quickly.
ARGS = {"calibration": ["--num-prompts", "8", "--steps", "16", "--packages", "2", "--batch-size", "2"],
        "saving": ["--num-prompts", "2", "--steps", "2", "--packages", "2"]}
ROOT = Path(__file__).resolve().parent.parent

SLOW_SAVE = r'''
# Written by tests/test_reliability.py: slow down saving so that a signal lands in the middle of it.
import sys, time
import diffusers

_original = diffusers.ModelMixin.save_pretrained


def _slow_save_pretrained(self, save_directory, *args, **kwargs):
    _original(self, save_directory, *args, **kwargs)
    if str(save_directory).rstrip("/").endswith("transformer"):
        sys.stderr.write("[test] transformer saved\n")  # one write: the signal may follow at once
        sys.stderr.flush()
        time.sleep(120)


diffusers.ModelMixin.save_pretrained = _slow_save_pretrained
'''

CASES = {
    "sigterm-calibration": (signal.SIGTERM, "calibration"),
    "sigterm-saving": (signal.SIGTERM, "saving"),
    "sigint-saving": (signal.SIGINT, "saving"),
}


class Run:
    """One obsdiff subprocess, its stderr collected by a thread, killed when its moment comes."""

    def __init__(self, name: str, model: Path, root: Path):
        self.name, (self.signum, self.moment) = name, CASES[name]
        self.output = root / name / "OUT"
        self.output.parent.mkdir(parents=True)
        env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
        if self.moment == "saving":
            site = root / f"{name}-site"
            site.mkdir()
            (site / "sitecustomize.py").write_text(SLOW_SAVE)
            env["PYTHONPATH"] = f"{site}{os.pathsep}{ROOT}"
        self.stderr = ""
        self.sent_at: str | None = None
        # SIGINT must reach Python's default handler even if this test runs with SIGINT ignored.
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "obsdiff_lite", "prune", str(model), "--output", str(self.output),
             *ARGS[self.moment]],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=root,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        fd = self.proc.stderr.fileno()
        while chunk := os.read(fd, 4096):
            self.stderr += chunk.decode(errors="replace")

    def partials(self) -> list[str]:
        return sorted(p.name for p in self.output.parent.iterdir() if p.name.startswith(f".{self.output.name}."))

    def ready(self) -> bool:
        if self.moment == "calibration":
            return "package 1/2" in self.stderr
        return "[test] transformer saved" in self.stderr

    def poll(self) -> None:
        if self.sent_at is None and self.proc.poll() is None and self.ready():
            self.proc.send_signal(self.signum)
            self.sent_at = self.moment
            self.t_sent = time.monotonic()


@pytest.fixture(scope="module")
def killed_runs(random_sd3_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("kill")
    runs = {name: Run(name, random_sd3_dir, root) for name in CASES}
    deadline = time.monotonic() + 150
    try:
        while any(r.proc.poll() is None for r in runs.values()) and time.monotonic() < deadline:
            for r in runs.values():
                r.poll()
            time.sleep(0.002)
    finally:
        for r in runs.values():
            if r.proc.poll() is None:
                r.proc.kill()
            r.proc.wait()
            r._reader.join(timeout=10)
    return runs


@pytest.mark.parametrize("name", list(CASES))
def test_killed_run_leaves_nothing_half_written(killed_runs, name):
    run = killed_runs[name]
    assert run.sent_at == run.moment, f"{name}: the signal was never sent; stderr:\n{run.stderr[-2000:]}"
    assert run.proc.returncode == 130, f"{name}: exit {run.proc.returncode}; stderr:\n{run.stderr[-2000:]}"
    assert "Traceback" not in run.stderr, run.stderr
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("obsdiff: interrupted"), last
    assert not run.partials(), f"{name}: left {run.partials()}"
    assert not run.output.exists(), f"{name}: {run.output} exists after an interrupt during {run.moment}"
    assert "nothing was written" in last
    assert not any(run.output.parent.iterdir())


# --- In-process: the narrow windows of save_pipeline, driven deterministically ---------------------------


def _siblings(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def _complete(out: Path) -> bool:
    return (out / "obsdiff.json").is_file() and (out / "model_index.json").is_file() and \
        any((out / "transformer").glob("*.safetensors"))


@pytest.fixture(scope="module")
def tiny_pipe(random_sd3_dir):
    from obsdiff_lite.pipelines import load_pipeline

    return load_pipeline(random_sd3_dir)


def test_sigterm_during_save_without_cli_handler(tiny_pipe, tmp_path, monkeypatch):
    """A library caller has no SIGTERM handler: save_pipeline still turns SIGTERM into a clean interrupt."""
    from obsdiff_lite.surgery import save_pipeline

    original = type(tiny_pipe).save_pretrained

    def save_then_terminate(self, directory, **kwargs):
        original(self, directory, **kwargs)
        signal.raise_signal(signal.SIGTERM)

    monkeypatch.setattr(type(tiny_pipe), "save_pretrained", save_then_terminate)
    previous = signal.signal(signal.SIGTERM, signal.SIG_DFL)  # as in a plain script (would kill this process)
    try:
        out = tmp_path / "out"
        with pytest.raises(KeyboardInterrupt) as info:
            save_pipeline(tiny_pipe, out, {"x": 1})
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # handlers restored
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert not hasattr(info.value, "output")
    assert not out.exists() and not _siblings(out)


def test_signal_during_commit_is_deferred_and_output_complete(tiny_pipe, tmp_path, monkeypatch):
    """A signal that arrives while the finished output is renamed into place waits for the rename."""
    from obsdiff_lite import surgery

    out = tmp_path / "out"
    original = Path.rename

    def rename_after_signal(self, target):
        if self.name.startswith(".out.partial-"):
            signal.raise_signal(signal.SIGTERM)  # deferred: the rename still happens
        return original(self, target)

    monkeypatch.setattr(Path, "rename", rename_after_signal)
    with pytest.raises(KeyboardInterrupt) as info:
        surgery.save_pipeline(tiny_pipe, out, {"x": 1})
    assert isinstance(info.value, surgery.OutputCompleteInterrupt) and info.value.output == out
    assert _complete(out) and not _siblings(out)


def test_second_signal_during_cleanup_still_removes_partial(tiny_pipe, tmp_path, monkeypatch):
    from obsdiff_lite import surgery

    out = tmp_path / "out"
    original_rmtree = surgery.shutil.rmtree

    def interrupted_save(self, directory, **kwargs):
        (Path(directory) / "half-written").write_text("x")
        raise KeyboardInterrupt

    def rmtree_with_signal(path, *args, **kwargs):
        signal.raise_signal(signal.SIGTERM)  # a second Ctrl-C / SIGTERM while cleaning up
        return original_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(type(tiny_pipe), "save_pretrained", interrupted_save)
    monkeypatch.setattr(surgery.shutil, "rmtree", rmtree_with_signal)
    with pytest.raises(KeyboardInterrupt):
        surgery.save_pipeline(tiny_pipe, out, {"x": 1})
    assert not out.exists() and not _siblings(out)


def test_overwrite_keeps_the_old_output_until_the_new_one_is_complete(tiny_pipe, tmp_path, monkeypatch):
    from obsdiff_lite.surgery import save_pipeline

    out = tmp_path / "out"
    save_pipeline(tiny_pipe, out, {"run": 1})
    original = type(tiny_pipe).save_pretrained

    def save_then_interrupt(self, directory, **kwargs):
        original(self, directory, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(type(tiny_pipe), "save_pretrained", save_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        save_pipeline(tiny_pipe, out, {"run": 2}, overwrite=True)
    assert json.loads((out / "obsdiff.json").read_text()) == {"run": 1} and _complete(out)
    monkeypatch.setattr(type(tiny_pipe), "save_pretrained", original)
    save_pipeline(tiny_pipe, out, {"run": 3}, overwrite=True)
    assert json.loads((out / "obsdiff.json").read_text()) == {"run": 3} and not _siblings(out)


# --- Determinism: same seed, same weights; obsdiff.json is enough to reproduce a run ------------------------


def _config_from_report(report: dict):
    """The PruneConfig recorded in obsdiff.json (its calibration prompts made explicit)."""
    from dataclasses import fields

    from obsdiff_lite.prune import PruneConfig

    names = {f.name for f in fields(PruneConfig)}
    values = {k: v for k, v in report["config"].items() if k in names}
    assert names <= set(report["config"]), "every setting must be recorded"
    values["weight_range"] = tuple(values["weight_range"])
    if report["calibration_prompts"]:
        values["prompts"] = list(report["calibration_prompts"])
    else:  # no calibration data (magnitude, l1-norm)
        values.pop("num_prompts")
    return PruneConfig(**values)


def test_two_structured_runs_with_the_same_seed_are_bit_identical(random_sd3_dir):
    from obsdiff_lite.pipelines import load_pipeline
    from obsdiff_lite.prune import PruneConfig, prune

    states = []
    for _ in range(2):
        pipe = load_pipeline(random_sd3_dir)
        prune(pipe, PruneConfig(pattern="structured", sparsity=0.3, packages=2, num_prompts=2, steps=2, batch_size=2),
              progress=False)
        states.append(pipe.transformer.state_dict())
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


@pytest.mark.parametrize("options", [
    ["--sparsity", "0.5", "--seed", "7", "--weighting", "linear-decrease", "--damp", "0.02"],
    ["--pattern", "structured", "--head-sparsity", "0.25", "--ffn-sparsity", "0.3", "--seed", "3"],
], ids=["unstructured", "structured"])
def test_rerun_from_recorded_config_is_bit_identical(random_sd3_dir, tmp_path, options):
    """obsdiff.json records versions, seed, dtype and every setting: rerunning from it gives the same weights."""
    from obsdiff_lite.cli import main
    from obsdiff_lite.pipelines import load_pipeline
    from obsdiff_lite.prune import prune

    out = tmp_path / "run"
    assert main(["prune", str(random_sd3_dir), "--output", str(out), "--num-prompts", "2", "--steps", "2",
                 "--packages", "2", *options]) == 0
    report = json.loads((out / "obsdiff.json").read_text())
    assert {"obsdiff_lite", "torch", "diffusers", "transformers", "python"} <= set(report["versions"])
    assert report["config"]["seed"] == int(options[options.index("--seed") + 1])
    assert report["dtype"] == "float32" and report["model"] == str(random_sd3_dir)

    pipe = load_pipeline(report["model"], dtype=report["dtype"])
    prune(pipe, _config_from_report(report), progress=False)
    saved = load_pipeline(out).transformer.state_dict()
    again = pipe.transformer.state_dict()
    assert saved.keys() == again.keys()
    assert all(torch.equal(saved[k], again[k]) for k in saved)


@pytest.mark.parametrize("settings", [dict(), dict(pattern="structured", sparsity=0.3)],
                         ids=["unstructured", "structured"])
def test_a_prune_stopped_half_way_is_named_by_the_next_one(random_sd3_dir, monkeypatch, caplog, settings):
    """Ctrl-C in a notebook after the first package leaves some blocks pruned: running the cell again must say so
    (it would prune those blocks twice). A refused config changes nothing and leaves no mark."""
    import obsdiff_lite.prune as prune_module
    import obsdiff_lite.structured as structured_module
    from obsdiff_lite.pipelines import load_pipeline
    from obsdiff_lite.prune import PruneConfig, prune

    config = PruneConfig(**(dict(packages=2, num_prompts=2, steps=2, batch_size=2) | settings))
    pipe = load_pipeline(random_sd3_dir)
    with pytest.raises(ValueError):
        prune(pipe, PruneConfig(sparsity=1.5), progress=False)
    assert getattr(pipe, "obsdiff_partial", None) is None
    module = structured_module if settings else prune_module
    calibrate, calls = module.calibrate, []

    def interrupted_second_package(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return calibrate(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(module, "calibrate", interrupted_second_package)
        with pytest.raises(KeyboardInterrupt):
            prune(pipe, config, progress=False)
    assert "method obs-diff" in pipe.obsdiff_partial
    with caplog.at_level("WARNING", logger="obsdiff_lite.prune"):
        prune(pipe, config, progress=False)
    assert "left partially pruned" in caplog.text and "load_pipeline()" in caplog.text
    assert pipe.obsdiff_partial is None  # the run completed
    caplog.clear()
    fresh = load_pipeline(random_sd3_dir)
    with caplog.at_level("WARNING", logger="obsdiff_lite.prune"):
        prune(fresh, config, progress=False)
    assert "partially pruned" not in caplog.text

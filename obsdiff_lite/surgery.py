"""Saving pruned pipelines safely: complete directories or nothing.

The output is written to a hidden temporary sibling (``.NAME.partial-XXXX``) and renamed into place
only when everything, ``obsdiff.json`` included, is on disk; an interrupted run leaves no directory
that looks like a model.
"""

from __future__ import annotations

import json
import shutil
import signal
import tempfile
from contextlib import contextmanager
from pathlib import Path


def check_output_dir(output: str | Path, overwrite: bool = False) -> Path:
    """Refuse an existing non-empty output directory unless ``overwrite`` (checked before any work)."""
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise ValueError(f"--output {str(output)!r} exists and is a file; choose a directory path")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise ValueError(f"--output {str(output)!r} exists and is not empty; choose a new path or pass --overwrite")
    return output


@contextmanager
def terminate_as_interrupt():
    """Within the block, SIGTERM raises KeyboardInterrupt so that cleanup code (finally) runs."""

    def handler(signum, frame):
        raise KeyboardInterrupt(f"terminated by signal {signum}")

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _json_default(value):
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return list(value)
    return str(value)


def save_pipeline(pipe, output: str | Path, report: dict, overwrite: bool = False,
                  extra_files: dict[str, str] | None = None) -> Path:
    """Atomically write ``pipe`` (safetensors) plus ``obsdiff.json`` (and extra text files) to ``output``."""
    output = check_output_dir(output, overwrite)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-", dir=output.parent))
    try:
        pipe.save_pretrained(tmp, safe_serialization=True)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        (tmp / "obsdiff.json").write_text(json.dumps(report, indent=2, default=_json_default) + "\n")
        if output.exists():
            shutil.rmtree(output)
        tmp.rename(output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return output

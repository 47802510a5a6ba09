"""Course notebooks: committed structure (parameters cell, figures, nbval checks) and papermill parameters.

Re-executing the committed notebooks and comparing outputs is nbval's job:
    pytest --nbval-lax notebooks/
"""
from __future__ import annotations

import os
from pathlib import Path

import nbformat
import pytest

from obsdiff_lite.notebooks import NOTEBOOK_DIR, check_kernel, find_notebooks, run_notebook

NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
CHECK_MARK = "# NBVAL_CHECK_OUTPUT"
VERIFY_LINE = "OBS update matches brute force:"


def _tagged(nb, tag):
    """Cells carrying `tag` in metadata.tags."""
    return [c for c in nb.cells if tag in c.get("metadata", {}).get("tags", [])]


def _checked_cells(nb):
    """Code cells whose first line is the nbval-lax marker."""
    return [c for c in nb.cells if c.cell_type == "code" and c.source.lstrip().startswith(CHECK_MARK)]


def _stream_text(cells):
    """All stdout text of the given cells, concatenated."""
    return "".join(o.get("text", "") for c in cells for o in c.get("outputs", []) if o.get("output_type") == "stream")


def test_notebooks_exist():
    assert NOTEBOOKS, f"no notebooks in {NOTEBOOK_DIR}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_committed_notebook_structure(path: Path):
    nb = nbformat.read(str(path), as_version=4)
    params = _tagged(nb, "parameters")
    assert len(params) == 1, f"{path.name}: need exactly one cell tagged 'parameters', found {len(params)}"
    assert params[0].cell_type == "code"
    assert not _tagged(nb, "injected-parameters"), (
        f"{path.name} was rendered with non-default parameters; re-render with defaults: "
        "python -m obsdiff_lite.notebooks --render"
    )
    figures = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    assert figures, f"{path.name}: no PNG figure in the committed outputs; render it: python -m obsdiff_lite.notebooks --render"
    checked = _checked_cells(nb)
    assert checked, f"{path.name}: no cell starts with {CHECK_MARK!r}, so nbval-lax checks nothing"
    assert all(c.outputs for c in checked), f"{path.name}: a {CHECK_MARK} cell has no committed output to compare"
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.get("output_type") == "error"]
    assert not errors, f"{path.name}: committed outputs contain an error: {errors[0].get('ename')}"
    assert path.stat().st_size < 1_000_000, f"{path.name} is {path.stat().st_size} bytes; keep notebooks < 1 MB"


def test_kernel_is_this_interpreter():
    check_kernel()  # raises with the install command if papermill/nbval would use another python


def test_find_notebooks_by_prefix():
    assert find_notebooks(["01"]) == [NOTEBOOK_DIR / "01_obs_from_scratch.ipynb"]
    with pytest.raises(SystemExit):
        find_notebooks(["no-such-notebook"])


@pytest.mark.slow
def test_papermill_parameters_01(tmp_path: Path):
    out = tmp_path / "01_obs_from_scratch.ipynb"
    nb = run_notebook(NOTEBOOK_DIR / "01_obs_from_scratch.ipynb", out, {"seed": 1, "in_features": 32}, timeout=300)
    assert out.exists()
    injected = _tagged(nb, "injected-parameters")
    assert len(injected) == 1 and "seed = 1" in injected[0].source and "in_features = 32" in injected[0].source
    text = _stream_text(_checked_cells(nb))
    line = next((ln for ln in text.splitlines() if ln.startswith(VERIFY_LINE)), None)
    assert line is not None, f"verification line missing from the outputs:\n{text}"
    assert line.startswith(f"{VERIFY_LINE} True"), line
    assert "X (512, 32)" in _stream_text(nb.cells)  # the parameter really reached the computation
    # Exact identities must hold for any parameters; the empirical ranking line may legitimately vary.
    exact = [ln for ln in text.splitlines() if ":" in ln and not ln.startswith("OBS has the lowest error")]
    assert not [ln for ln in exact if "False" in ln], f"a verification check failed with seed=1, in_features=32:\n{text}"
    assert os.path.getsize(out) < 1_000_000


@pytest.mark.slow
@pytest.mark.parametrize("name", ["02_error_accumulation", "03_timestep_aware_hessian"])
def test_sd3_notebooks_also_run_on_flux(tmp_path: Path, name: str):
    """Their `model` parameter takes the tiny Flux too: the studied layer defaults per model, and the CFG halves are
    read from Flux's two calls per step (SD3 batches them)."""
    out = tmp_path / f"{name}.ipynb"
    nb = run_notebook(NOTEBOOK_DIR / f"{name}.ipynb", out, {"model": "../data/tiny-flux", "steps": 6}, timeout=600)
    text = _stream_text(nb.cells)
    assert "single_transformer_blocks.0.proj_out" in text  # the middle block of tiny Flux's six
    if name.startswith("03"):
        assert "H == (H_uncond + H_cond) / 2: True" in text and "one CFG half per call" in text

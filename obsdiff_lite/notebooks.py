"""Execute the course notebooks with papermill so committed notebooks carry fresh outputs.

    python -m obsdiff_lite.notebooks --render                     # every notebooks/*.ipynb, in place
    python -m obsdiff_lite.notebooks --render 01_obs_from_scratch # by stem (or file name / path)
    python -m obsdiff_lite.notebooks --render 01 -p seed 1        # with papermill parameters

Notebooks run with kernel ``python3`` and cwd = notebooks/.  The kernel must be this
interpreter (the venv's python); ``check_kernel()`` verifies that and says how to fix it.
Per-run noise (papermill timestamps and durations) is stripped from the saved notebook so
that re-rendering an unchanged notebook gives a small git diff.
"""
from __future__ import annotations

import argparse
import ast
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import nbformat

logger = logging.getLogger(__name__)

KERNEL_NAME = "python3"
NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
KERNEL_INSTALL_HINT = f"{sys.executable} -m ipykernel install --sys-prefix --name {KERNEL_NAME}"


def check_kernel(kernel_name: str = KERNEL_NAME) -> str:
    """Return the interpreter the kernel `kernel_name` will launch; raise RuntimeError unless it is this one."""
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        spec = KernelSpecManager().get_kernel_spec(kernel_name)
    except NoSuchKernel as exc:
        raise RuntimeError(
            f"no Jupyter kernel named {kernel_name!r}; install one for this venv with: {KERNEL_INSTALL_HINT}"
        ) from exc
    exe = spec.argv[0]
    # jupyter_client launches a bare "python"/"python3"/"python3.X" as sys.executable.
    bare = {"python", f"python{sys.version_info[0]}", "python{}.{}".format(*sys.version_info[:2])}
    resolved = sys.executable if exe in bare else exe
    # Compare bin folders without resolving symlinks: a venv's python links to the base interpreter.
    if Path(os.path.abspath(resolved)).parent != Path(os.path.abspath(sys.executable)).parent:
        raise RuntimeError(
            f"Jupyter kernel {kernel_name!r} ({spec.resource_dir}) launches {resolved}, not this "
            f"interpreter {sys.executable}; notebooks would run without this venv's packages. "
            f"Fix: {KERNEL_INSTALL_HINT}  (or set JUPYTER_PREFER_ENV_PATH=1 if a user-level kernel shadows it)"
        )
    return resolved


def _strip_run_noise(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """Drop papermill/nbclient timing metadata (changes every run) but keep tags and parameters."""
    papermill_meta = nb.metadata.get("papermill")
    if papermill_meta is not None:
        keep = {k: papermill_meta[k] for k in ("parameters",) if papermill_meta.get(k)}
        if keep:
            nb.metadata["papermill"] = keep
        else:
            del nb.metadata["papermill"]
    for cell in nb.cells:
        cell.metadata.pop("papermill", None)
        cell.metadata.pop("execution", None)
    return nb


def run_notebook(
    path: str | os.PathLike,
    out_path: str | os.PathLike,
    parameters: dict | None = None,
    timeout: int = 600,
    cwd: str | os.PathLike | None = None,
) -> nbformat.NotebookNode:
    """Execute `path` with papermill into `out_path` (may equal `path`) and return the executed notebook.

    `parameters` are injected after the cell tagged ``parameters``; `timeout` is per cell in
    seconds; `cwd` defaults to the notebook's own folder.  Raises papermill's
    PapermillExecutionError (with the failing cell's traceback) if a cell fails.
    """
    import papermill as pm

    check_kernel(KERNEL_NAME)
    path, out_path = Path(path), Path(out_path)
    os.environ.setdefault("MPLBACKEND", "Agg")  # for this process only; the kernel uses %matplotlib inline
    pm.execute_notebook(
        str(path),
        str(out_path),
        parameters=dict(parameters or {}),
        kernel_name=KERNEL_NAME,
        cwd=str(cwd if cwd is not None else path.resolve().parent),
        execution_timeout=timeout,
        progress_bar=False,
        log_output=False,
        report_mode=False,
    )
    nb = _strip_run_noise(nbformat.read(str(out_path), as_version=4))
    nbformat.write(nb, str(out_path))
    return nb


def find_notebooks(names: list[str] | None = None, notebook_dir: Path = NOTEBOOK_DIR) -> list[Path]:
    """Resolve names (stem, stem prefix, file name or path) to notebooks; no names = every notebooks/*.ipynb."""
    all_nbs = sorted(notebook_dir.glob("*.ipynb"))
    if not names:
        return all_nbs
    found: list[Path] = []
    for name in names:
        p = Path(name)
        if p.suffix == ".ipynb" and p.exists():
            found.append(p.resolve())
            continue
        matches = [nb for nb in all_nbs if nb.stem == p.stem] or [nb for nb in all_nbs if nb.stem.startswith(name)]
        if len(matches) != 1:
            choices = ", ".join(nb.stem for nb in all_nbs) or "(none)"
            what = "no notebook" if not matches else f"{len(matches)} notebooks"
            raise SystemExit(f"{what} in {notebook_dir} match {name!r}; choices: {choices}")
        found.append(matches[0])
    return found


def _parse_value(text: str):
    """Parse a -p value like papermill's CLI: Python literal if it is one, else the raw string."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: ``--render [names...] [-p key value ...]``."""
    parser = argparse.ArgumentParser(prog="python -m obsdiff_lite.notebooks", description=__doc__.split("\n")[0])
    parser.add_argument("--render", nargs="*", metavar="NAME", help="execute notebooks in place (default: all)")
    parser.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"))
    parser.add_argument("--timeout", type=int, default=600, help="per-cell timeout in seconds (default 600)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.render is None:
        parser.print_help()
        return 2
    params = {key: _parse_value(value) for key, value in args.parameter}
    if params:
        logger.warning("rendering IN PLACE with non-default parameters %s: the saved notebook records them", params)
    for nb_path in find_notebooks(args.render):
        start = time.perf_counter()
        tmp = Path(tempfile.mkdtemp(prefix="render-")) / nb_path.name  # outside notebooks/: nbval would collect it
        try:
            run_notebook(nb_path, tmp, parameters=params, timeout=args.timeout, cwd=nb_path.parent)
        except Exception:
            logger.error("%s failed; %s is left untouched, the partial run is in %s", nb_path.name, nb_path, tmp)
            raise
        shutil.move(str(tmp), str(nb_path))  # only replace the committed notebook on success
        tmp.parent.rmdir()
        size_kb = nb_path.stat().st_size / 1024
        logger.info("rendered %s in %.1f s (%.0f KB)", nb_path.name, time.perf_counter() - start, size_kb)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Saving pruned pipelines safely: complete directories or nothing.

The output is written to a hidden temporary sibling (``.NAME.partial-XXXX``) and renamed into place
only when everything, ``obsdiff.json`` included, is on disk; an interrupted run leaves no directory
that looks like a model. The structural surgery below (slice modules, set head counts, rebuild a
structurally pruned transformer from its recorded structure) lives here too.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
import uuid
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor, nn

from .arch import Block, FFNSpec, blocks, get_linear


def check_output_dir(output: str | Path, overwrite: bool = False) -> Path:
    """Refuse an existing non-empty output directory unless ``overwrite`` (checked before any work)."""
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise ValueError(f"--output {str(output)!r} exists and is a file; choose a directory path")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise ValueError(f"--output {str(output)!r} exists and is not empty; choose a new path or pass --overwrite")
    _check_writable_parent(output, "--output")
    return output


def _check_writable_parent(path: Path, option: str) -> None:
    """Refuse ``path`` when its nearest existing ancestor is a file or cannot take new entries, found by creating
    (and removing) an empty folder there: a long run must not end on a path it can never write."""
    parent = next((p for p in Path(os.path.abspath(path)).parents if p.exists()), None)
    if parent is None:
        return
    if not parent.is_dir():
        raise ValueError(f"{option} {str(path)!r} lies under {str(parent)!r}, which is a file, not a directory")
    try:
        Path(tempfile.mkdtemp(prefix=".obsdiff-write-check-", dir=parent)).rmdir()
    except OSError as exc:
        raise ValueError(f"{option} {str(path)!r} cannot be written: {parent} does not take new files "
                         f"({exc.strerror or exc}); choose another path") from None


def check_output_file(path: str | Path, option: str, suffixes: Sequence[str] | None = None) -> Path:
    """Refuse an output file path that could not be written after the work: a directory, a path under a file, or a
    suffix outside ``suffixes`` (checked before any work, so a long run never ends on an unwritable path)."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{option} {str(path)!r} is a directory; give a file path inside it")
    _check_writable_parent(path, option)
    if suffixes is not None and path.suffix.lower() not in suffixes:
        raise ValueError(f"{option} {str(path)!r} needs one of the suffixes {', '.join(sorted(suffixes))}")
    return path


def write_file_atomic(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Create the parents, call ``write`` on a hidden temporary sibling, then rename it onto ``path``: the file is
    either complete or absent, never half written. Returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Not mkstemp: its files are private (0600); this one gets the permissions of any file the user writes.
    tmp = path.parent / f".{path.stem}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}{path.suffix}"
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


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


@contextmanager
def deferred_signals(signums: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM)):
    """Within the block, SIGINT/SIGTERM are only recorded; on leaving it they are re-raised (same handlers).

    For the few steps that must not be cut in half: the commit rename and the cleanup of a partial output.
    """
    pending: list[int] = []
    try:
        previous = {s: signal.signal(s, lambda signum, frame: pending.append(signum)) for s in signums}
    except ValueError:  # not the main thread: signals cannot reach us here anyway
        yield
        return
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for s in dict.fromkeys(pending):
            signal.raise_signal(s)  # the restored handler runs now (KeyboardInterrupt, or the default action)


def _json_default(value):
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return list(value)
    return str(value)


def config_structure(transformer: nn.Module) -> dict[str, dict[str, int]]:
    """``transformer_structure`` of a fresh transformer built from the same config (on the meta device: no memory)."""
    with torch.device("meta"):
        fresh = type(transformer).from_config(transformer.config)
    return transformer_structure(fresh)


def with_lineage(pipe, report: dict) -> dict:
    """``report`` plus what a later load and a reader need of the pipeline's past: the "structure" of a transformer
    whose heads or neurons were removed earlier (an unstructured prune of a structured output, whose own report has
    none: without it the output could not be reloaded) and, as "previous", the obsdiff.json of the directory the
    pipeline was loaded from (a pruned output pruned again keeps its history)."""
    report = dict(report)
    transformer = getattr(pipe, "transformer", None)
    if transformer is not None and "structure" not in report:
        structure = transformer_structure(transformer)
        if structure != config_structure(transformer):
            report["structure"] = structure
    source = getattr(pipe, "obsdiff_source", None)
    if source is not None and "previous" not in report and (Path(source) / "obsdiff.json").is_file():
        from .pipelines import read_json_object

        report["previous"] = read_json_object(Path(source) / "obsdiff.json")
    return report


def save_pipeline(pipe, output: str | Path, report: dict, overwrite: bool = False,
                  extra_files: dict[str, str] | None = None) -> Path:
    """Atomically write ``pipe`` (safetensors), ``obsdiff.json``, its generation.json and extra files to ``output``.

    The pipeline's recommended call arguments (``pipe.obsdiff_generation``, read from the source
    model's generation.json by ``load_pipeline``) travel with it, so the output samples like its parent.

    SIGTERM is an interrupt while saving (as SIGINT is), so an interrupted save removes its temporary
    directory; the commit (rename into place) and that cleanup are not interruptible. An interrupt that
    arrives during the commit surfaces after it as ``OutputCompleteInterrupt``: the output is complete.
    """
    if not hasattr(pipe, "save_pretrained") or not hasattr(pipe, "transformer"):
        raise TypeError(f"save_pipeline() takes a diffusers SD3/Flux pipeline, got {type(pipe).__name__}")
    if not isinstance(report, dict):
        raise TypeError(f"save_pipeline() takes the report dict that prune() returned, got {type(report).__name__}")
    output = check_output_dir(output, overwrite)
    report = with_lineage(pipe, report)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp: Path | None = None
    committed = False
    with terminate_as_interrupt():
        try:
            with deferred_signals():
                tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-", dir=output.parent))
            pipe.save_pretrained(tmp, safe_serialization=True)
            generation = getattr(pipe, "obsdiff_generation", None)
            files = ({"generation.json": json.dumps(generation, indent=2) + "\n"} if generation else {}) | (extra_files or {})
            for name, text in files.items():
                (tmp / name).write_text(text)
            (tmp / "obsdiff.json").write_text(json.dumps(report, indent=2, default=_json_default) + "\n")
            with deferred_signals():
                old = None
                if output.exists():  # --overwrite: move the old output aside first, delete it after the commit
                    old = Path(tempfile.mkdtemp(prefix=f".{output.name}.old-", dir=output.parent))
                    output.rename(old / output.name)
                try:
                    tmp.rename(output)
                except OSError:
                    if old is not None:  # put the old output back
                        (old / output.name).rename(output)
                        old.rmdir()
                    raise
                committed = True
                if old is not None:
                    shutil.rmtree(old, ignore_errors=True)
        except BaseException as exc:
            if not committed:
                _remove_partial(tmp)
            elif isinstance(exc, KeyboardInterrupt):  # deferred past the commit: the output is complete
                raise OutputCompleteInterrupt(output) from exc
            raise
    return output


class OutputCompleteInterrupt(KeyboardInterrupt):
    """An interrupt that arrived while a complete output was being committed: ``output`` is complete."""

    def __init__(self, output: Path):
        super().__init__(f"interrupted after {output} was completely written")
        self.output = output


def _remove_partial(tmp: Path | None) -> None:
    """Remove a partial output directory; a second interrupt waits until it is gone."""
    if tmp is not None:
        with deferred_signals():
            shutil.rmtree(tmp, ignore_errors=True)


# --- Structural surgery: physically remove attention heads and FFN neurons -------------------------
#
# A *structure* records, for every block, its head count and the hidden size of each FFN (keyed by the
# up projection's name), e.g. {"transformer_blocks.3": {"heads": 3, "ff.net.0.proj": 180,
# "ff_context.net.0.proj": 180}}. Together with the model's config.json it fixes every module shape,
# so ``apply_structure`` can shrink a freshly built transformer before its pruned weights are loaded.


def slice_linear_rows(linear: nn.Linear, keep: Tensor) -> None:
    """Keep only the output rows ``keep`` of ``linear`` (weight and bias), in place."""
    keep = keep.to(linear.weight.device)
    linear.weight = nn.Parameter(linear.weight.detach().index_select(0, keep).clone(), linear.weight.requires_grad)
    if linear.bias is not None:
        linear.bias = nn.Parameter(linear.bias.detach().index_select(0, keep).clone(), linear.bias.requires_grad)
    linear.out_features = int(keep.numel())


def slice_linear_cols(linear: nn.Linear, keep: Tensor) -> None:
    """Keep only the input columns ``keep`` of ``linear``, in place (the bias is unchanged)."""
    keep = keep.to(linear.weight.device)
    linear.weight = nn.Parameter(linear.weight.detach().index_select(1, keep).clone(), linear.weight.requires_grad)
    linear.in_features = int(keep.numel())


def attention_module(block: Block) -> nn.Module:
    """The attention module of ``block`` (the parent of its first q/k/v projection)."""
    if block.spec.heads is None:
        raise ValueError(f"{block.name} ({block.spec.kind} block) has no attention heads")
    return block.module.get_submodule(block.spec.heads.qkv[0].rsplit(".", 1)[0])


def head_dim(attn: nn.Module) -> int:
    """Channels per head (Flux stores it; diffusers' Attention only has heads and the q width)."""
    return int(getattr(attn, "head_dim", None) or attn.to_q.out_features // attn.heads)


def head_channels(heads: Sequence[int] | Tensor, dim: int) -> Tensor:
    """Channel indices of ``heads`` (head h owns channels h*dim .. h*dim+dim-1), in the given order."""
    heads = torch.as_tensor(heads, dtype=torch.long).reshape(-1, 1)
    return (heads * dim + torch.arange(dim)).reshape(-1)


def set_heads(attn: nn.Module, heads: int) -> None:
    """Make ``attn`` consistent with ``heads`` heads (SD3's processor derives head_dim from ``attn.heads``)."""
    dim = head_dim(attn)
    attn.heads = heads
    attn.inner_dim = heads * dim
    if hasattr(attn, "inner_kv_dim"):
        attn.inner_kv_dim = heads * dim


def _check_per_head_norms(attn: nn.Module, dim: int) -> None:
    """Refuse q/k norms across all heads: removing a head would change the other heads' normalisation."""
    for name in ("norm_q", "norm_k", "norm_added_q", "norm_added_k"):
        norm = getattr(attn, name, None)
        shape = getattr(norm, "normalized_shape", None) or getattr(norm, "dim", None)  # LpNorm's int dim: per head
        if isinstance(shape, (tuple, list, torch.Size)) and torch.Size(shape).numel() != dim:
            raise ValueError(
                f"attention {name} normalises across heads (width {torch.Size(shape).numel()}); "
                "head pruning needs per-head q/k norms"
            )


def _sync_single_block(block: Block) -> None:
    """Flux single blocks remember their MLP width and how proj_out's input splits; keep both current."""
    module = block.module
    if block.spec.kind != "single":
        return
    mlp = block.spec.ffns[0]
    hidden = get_linear(module, mlp.up).out_features
    if hasattr(module, "mlp_hidden_dim"):
        module.mlp_hidden_dim = hidden
    down = get_linear(module, mlp.down)
    if hasattr(down, "_tp_packed_row_blocks"):
        down._tp_packed_row_blocks = [down.in_features - hidden, hidden]


def remove_heads(block: Block, keep_heads: Sequence[int]) -> None:
    """Keep only heads ``keep_heads`` of ``block``: q/k/v rows, out-projection columns and ``attn.heads``."""
    spec, attn = block.spec.heads, attention_module(block)
    dim, old = head_dim(attn), int(attn.heads)
    keep_heads = sorted(int(h) for h in keep_heads)
    if not keep_heads or len(set(keep_heads)) != len(keep_heads) or keep_heads[-1] >= old or keep_heads[0] < 0:
        raise ValueError(f"{block.name}: cannot keep heads {keep_heads} of {old} (need at least one, each once)")
    _check_per_head_norms(attn, dim)
    rows = head_channels(keep_heads, dim)
    for name in spec.qkv:
        linear = get_linear(block.module, name)
        if linear is not None:
            slice_linear_rows(linear, rows)
    for name in spec.out:
        linear = get_linear(block.module, name)
        if linear is None:
            continue
        rest = torch.arange(old * dim, linear.in_features) if spec.out_columns == "first" else torch.arange(0)
        slice_linear_cols(linear, torch.cat([rows, rest]))
    set_heads(attn, len(keep_heads))
    _sync_single_block(block)


def remove_neurons(block: Block, ffn: FFNSpec, keep: Sequence[int] | Tensor) -> None:
    """Keep only hidden neurons ``keep`` of one FFN of ``block``: rows of its up and columns of its down projection."""
    up, down = get_linear(block.module, ffn.up), get_linear(block.module, ffn.down)
    keep = torch.as_tensor(keep, dtype=torch.long).sort().values
    hidden = up.out_features
    if keep.numel() == 0 or int(keep[-1]) >= hidden or int(keep[0]) < 0 or len(keep.unique()) != len(keep):
        raise ValueError(
            f"{block.name}.{ffn.up}: cannot keep {keep.numel()} of {hidden} neurons (need at least one, each once)"
        )
    offset = down.in_features - hidden  # 0, or the attention columns that precede the MLP ones (Flux single)
    slice_linear_rows(up, keep)
    slice_linear_cols(down, torch.cat([torch.arange(offset), keep + offset]))
    _sync_single_block(block)


def block_structure(block: Block) -> dict[str, int]:
    """{"heads": n, <up projection>: hidden size, ...} for one block (enough to rebuild its shapes)."""
    out: dict[str, int] = {}
    if block.spec.heads is not None:
        out["heads"] = int(attention_module(block).heads)
    for ffn in block.spec.ffns:
        up = get_linear(block.module, ffn.up)
        if up is not None:
            out[ffn.up] = int(up.out_features)
    return out


def transformer_structure(transformer: nn.Module) -> dict[str, dict[str, int]]:
    """``block_structure`` of every block, keyed by block name (e.g. "transformer_blocks.3")."""
    return {b.name: block_structure(b) for b in blocks(transformer)}


def apply_structure(transformer: nn.Module, structure: dict[str, dict[str, int]]) -> None:
    """Shrink a freshly built transformer to ``structure`` (keeps the first heads/neurons; weights load later)."""
    by_name = {b.name: b for b in blocks(transformer)}
    unknown = sorted(set(structure) - set(by_name))
    if unknown:
        raise ValueError(f"the saved structure names blocks this transformer lacks: {', '.join(unknown)}")
    for name, entry in structure.items():
        block = by_name[name]
        current = block_structure(block)
        for key, value in entry.items():
            if key not in current:
                raise ValueError(f"the saved structure of {name} has {key!r}, which this block lacks")
            if not 1 <= int(value) <= current[key]:
                raise ValueError(
                    f"the saved structure of {name} asks for {key}={value}, but the model has {current[key]}"
                )
        if entry.get("heads", current.get("heads")) != current.get("heads"):
            remove_heads(block, range(int(entry["heads"])))
        for ffn in block.spec.ffns:
            if ffn.up in entry and int(entry[ffn.up]) != current[ffn.up]:
                remove_neurons(block, ffn, torch.arange(int(entry[ffn.up])))


def load_structured_transformer(directory: str | Path, class_name: str, structure: dict[str, dict[str, int]],
                                dtype: torch.dtype | None = None) -> nn.Module:
    """Build ``class_name`` from ``directory``/config.json, shrink it to ``structure``, load its weights strictly."""
    import diffusers
    from safetensors.torch import load_file

    directory = Path(directory)
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{directory} has no .safetensors weights to load the structurally pruned transformer from")
    cls = getattr(diffusers, class_name)
    config = cls.load_config(directory)
    state: dict[str, Tensor] = {}
    for file in files:  # clone: tensors viewing the file buffer can be misaligned, and BLAS then rounds differently
        state.update({k: v.clone() for k, v in load_file(file).items()})
    with torch.device("meta"):  # no random init of weights that are overwritten anyway
        model = cls.from_config(config)
    apply_structure(model, structure)
    model.load_state_dict(state, strict=True, assign=True)
    if any(t.is_meta for t in (*model.parameters(), *model.buffers())):  # a non-persistent buffer: build for real
        model = cls.from_config(config)
        apply_structure(model, structure)
        model.load_state_dict(state, strict=True)
    model.eval()  # as from_pretrained leaves it
    return model.to(dtype) if dtype is not None else model

"""Load SD3/Flux pipelines (tiny local ones, hub ids, pruned outputs) and run them reproducibly."""

from __future__ import annotations

import json
import logging
import math
import numbers
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .arch import ARCHS, arch_for_pipeline_class

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class PipelineError(ValueError):
    """A model path or id that cannot be loaded as a supported pipeline."""


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    """'float32' | 'float16' | 'bfloat16' (or a torch dtype) -> torch dtype, with a readable error."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def parse_device(device: str | torch.device | None, option: str = "--device") -> torch.device:
    """'cpu' | 'cuda' | 'cuda:N' | 'mps' -> torch.device (syntax only; ``option`` names the setting in errors)."""
    try:
        parsed = torch.device(device or "cpu")
    except (RuntimeError, TypeError):
        raise ValueError(f"unsupported device {str(device)!r} for {option}; use cpu, cuda or cuda:N") from None
    if parsed.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"unsupported device {str(device)!r} for {option}; use cpu, cuda or cuda:N")
    return parsed


def resolve_device(device: str | torch.device | None, option: str = "--device") -> torch.device:
    """``parse_device``, also refusing a CUDA or MPS device this machine does not have."""
    device = parse_device(device, option)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{option} {device} was requested but this machine has no CUDA GPU visible to torch; "
                         f"use {option} cpu")
    if device.type == "cuda" and device.index is not None and device.index >= (count := torch.cuda.device_count()):
        raise ValueError(f"{option} {device} was requested but this machine has {count} CUDA GPU"
                         f"{'s' * (count != 1)} (cuda:0{f' .. cuda:{count - 1}' if count > 1 else ''})")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"{option} mps was requested but this machine has no MPS device; use {option} cpu")
    return device


def _pipeline_class_name(path: Path) -> str:
    index = path / "model_index.json"
    if not index.is_file():
        supported = ", ".join(a.pipeline_class for a in ARCHS.values())
        # A file of the pipeline, or one of its component folders (transformer/, vae/): name the folder to give.
        parent = path.parent if path.parent != path else None
        hint = (f"; give the pipeline folder that holds it: {parent}" if parent is not None and
                (parent / "model_index.json").is_file() else "")
        raise PipelineError(f"{path} is not a diffusers pipeline directory (no model_index.json); expected one of: "
                            f"{supported}{hint}")
    config = read_json_object(index)
    if "_class_name" not in config:
        raise PipelineError(f"{index} names no pipeline class (no \"_class_name\"); it is not a diffusers model_index.json")
    return config["_class_name"]


def read_json_object(file: Path) -> dict:
    """A JSON file that must hold an object ({...}); a broken or edited one is refused with its name."""
    try:
        value = json.loads(Path(file).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PipelineError(f"{file} is not valid JSON ({exc}); restore or delete it") from None
    if not isinstance(value, dict):
        raise PipelineError(f"{file} must hold a JSON object {{...}}, got {type(value).__name__}")
    return value


def _saved_structure(path: Path) -> dict | None:
    """The "structure" recorded in a pruned output's obsdiff.json (None for dense or unstructured outputs)."""
    report = path / "obsdiff.json"
    return read_json_object(report).get("structure") if report.is_file() else None


DATA_DIR = Path(__file__).resolve().parent.parent / "data"  # the repository's tiny models, prompts, references


def shipped_models() -> list[str]:
    """Names of the tiny pipelines in the repository's data/ folder (tiny-sd3, tiny-flux, ...)."""
    return sorted(p.parent.name for p in DATA_DIR.glob("*/model_index.json"))


def resolve_model_path(path_or_id: str | Path) -> str | Path:
    """A path that exists as given; else a shipped tiny model's name ("tiny-sd3") as its folder in data/, so it
    works from any directory; else unchanged (a hub id)."""
    if not Path(path_or_id).exists() and str(path_or_id) in shipped_models():
        return DATA_DIR / str(path_or_id)
    return path_or_id


def load_pipeline(path_or_id: str | Path, device: str | torch.device | None = "cpu", dtype=None, **kwargs):
    """Load an SD3 or Flux pipeline from a local directory, a shipped tiny model's name or a hub id (pruned outputs
    included)."""
    import diffusers
    import transformers

    # Loading bars and info chatter of the libraries would drown our own progress output.
    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    device, torch_dtype = resolve_device(device), resolve_dtype(dtype)
    path_or_id = resolve_model_path(path_or_id)
    path = Path(path_or_id)
    if path.exists():
        class_name = _pipeline_class_name(path)
        arch_for_pipeline_class(class_name)  # refuses unsupported pipelines with a clear message
        index = read_json_object(path / "model_index.json")
        # Components saved as null (tiny SD3 has no T5) must be passed explicitly as None.
        for name, value in index.items():
            if not name.startswith("_") and isinstance(value, list) and value[0] is None:
                kwargs.setdefault(name, None)
        source = str(path)
        structure = _saved_structure(path)
        if structure and "transformer" not in kwargs:  # structurally pruned: plain from_pretrained cannot shape it
            from .surgery import load_structured_transformer

            kwargs["transformer"] = load_structured_transformer(
                path / "transformer", index["transformer"][1], structure, torch_dtype
            )
    else:
        looks_like_id = str(path_or_id).count("/") == 1 and not str(path_or_id).startswith((".", "/"))
        if not looks_like_id:
            raise PipelineError(f"model path {str(path_or_id)!r} does not exist (and is not a hub id like 'org/name' "
                                f"or a shipped tiny model: {', '.join(shipped_models())})")
        source = str(path_or_id)
        class_name = kwargs.pop("pipeline_class", None)
        if class_name is None:
            from huggingface_hub import hf_hub_download

            try:
                class_name = json.loads(Path(hf_hub_download(source, "model_index.json")).read_text())["_class_name"]
            except Exception as exc:  # offline, gated, or missing
                # "runs/sd3-50" with a runs/ folder here is more likely a mistyped local path than a hub id.
                local = (f"; or, if you meant a local folder: {str(path.parent)!r} has no {path.name!r}"
                         if path.parent.is_dir() else "")
                raise PipelineError(f"cannot fetch {source!r} from the hub ({type(exc).__name__}: {exc}){local}"
                                    ) from None
        arch_for_pipeline_class(class_name)
    try:
        pipe = getattr(diffusers, class_name).from_pretrained(source, dtype=torch_dtype, **kwargs)
    except OSError as exc:  # a component's config or weights missing (an incomplete copy or download)
        raise PipelineError(f"cannot load the pipeline from {source}: {exc}") from None
    pipe.set_progress_bar_config(disable=True)
    # Remember where it came from and how it likes to be called (generation.json, if any).
    pipe.obsdiff_source = source
    pipe.obsdiff_generation = generation_config(path) if path.exists() else {}
    return pipe.to(device)


def generation_config(path: str | Path) -> dict:
    """The recommended call arguments of a model directory (its generation.json), metadata keys included."""
    file = Path(path) / "generation.json"
    return read_json_object(file) if file.is_file() else {}


def call_kwargs(config: dict) -> dict:
    """Only the pipeline call arguments of a generation config (drops '_'-prefixed metadata)."""
    return {k: v for k, v in config.items() if not k.startswith("_")}


def check_guidance(guidance: float | None) -> None:
    """Refuse a CFG scale override (``resolve_call``'s ``guidance``) that is negative or not finite."""
    if guidance is not None and not (guidance >= 0 and math.isfinite(guidance)):
        raise ValueError(f"guidance must be a finite number >= 0 (values <= 1 turn classifier-free guidance off), "
                         f"got {guidance}")


def check_prompts(prompts, allow_empty: bool = False) -> None:
    """Refuse prompts that are not a list of strings (a bare string would be read as one prompt per character) or,
    unless ``allow_empty`` (a data-parallel rank may get none), an empty list."""
    if not (isinstance(prompts, (list, tuple)) and all(isinstance(p, str) for p in prompts)):
        raise ValueError(f"prompts must be a list of strings, got {type(prompts).__name__}"
                         + (" (wrap one prompt in a list: prompts=[...])" if isinstance(prompts, str) else ""))
    if not prompts and not allow_empty:
        raise ValueError("the prompt list is empty; give at least one prompt")


MAX_SEED = 2**32  # seeds are in [0, MAX_SEED): numpy refuses negative ones, torch.Generator ones beyond int64


def check_seed(seed: int) -> None:
    """Refuse a seed the random generators cannot take (a negative one, or one beyond int64), with the valid range."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < MAX_SEED:
        raise ValueError(f"seed must be an integer in [0, 2**32), got {seed!r}")


def resolve_call(generation: dict, steps: int | None = None, guidance: float | None = None) -> dict:
    """Call arguments from a generation config, with the step count and CFG scale overridden if given."""
    call = call_kwargs(generation)
    if steps is not None:
        call["num_inference_steps"] = int(steps)
    if guidance is not None:  # Flux without guidance embedding uses true CFG
        call["true_cfg_scale" if "true_cfg_scale" in call else "guidance_scale"] = float(guidance)
    return call


def pipeline_call(pipe, steps: int | None = None, guidance: float | None = None) -> dict:
    """A loaded pipeline's call arguments (its generation.json), with steps and CFG scale overridden if given."""
    return resolve_call(getattr(pipe, "obsdiff_generation", {}), steps, guidance)


def run_pipeline(pipe, prompts: list[str], seed: int, call: dict, batch_size: int = 16,
                 output_type: str = "np", progress: bool = True, desc: str = "sampling",
                 seeds: list[int] | None = None):
    """Run ``pipe`` over prompts in batches; prompt i uses generator seed ``seeds[i]`` (default ``seed + i``).

    Explicit ``seeds`` let a shard of a prompt list keep the seeds of the prompts' global indices
    (data-parallel calibration, ``distributed.shard``).
    """
    check_prompts(prompts, allow_empty=True)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if seeds is None:
        seeds = [seed + i for i in range(len(prompts))]
    elif len(seeds) != len(prompts):
        raise ValueError(f"got {len(seeds)} seeds for {len(prompts)} prompts; give one seed per prompt")
    outputs = []
    for start in tqdm(range(0, len(prompts), batch_size), desc=desc, disable=not progress, leave=False):
        batch = prompts[start : start + batch_size]
        generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds[start : start + batch_size]]
        with torch.no_grad():
            result = pipe(prompt=batch, generator=generators, output_type=output_type, **call)
        outputs.append(result.images)
    if output_type == "np":
        return np.concatenate(outputs)
    return outputs


def generate_images(pipe, prompts: list[str], seed: int = 0, call: dict | None = None, batch_size: int = 16,
                    progress: bool = True) -> np.ndarray:
    """uint8 NHWC images for prompts (deterministic per prompt index and seed)."""
    images = run_pipeline(pipe, prompts, seed, call or {}, batch_size, "np", progress)
    return np.clip(np.round(images * 255), 0, 255).astype(np.uint8)

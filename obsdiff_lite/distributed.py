"""Data-parallel calibration with torch.distributed: each rank runs a shard of the prompts.

Calibration (running the pipeline over the prompts) dominates OBS-Diff's cost and is embarrassingly
parallel: the Hessian of a layer is a weighted mean over calibration rows, so every rank can run its
own shard of the prompts and the per-rank means are combined exactly by

    H = sum_r H_r * W_r / sum_r W_r        (W_r: the rank's sum of timestep weight x rows)

which ``allreduce_accumulators`` computes with one all-reduce of ``H_r * W_r`` per accumulator (and
one of the scalars). Every rank then holds the full H and solves the OBS problem itself (the solve is
deterministic); ``broadcast_module_`` copies rank 0's pruned weights to the others anyway, so the
ranks can never drift apart. Prompt i keeps generator seed ``seed + i`` (its *global* index) on
whichever rank runs it, so the sharded run sees the same latents as a one-process run; only the
summation order of the Hessians differs (float tolerance, not bit identity).

On a multi-GPU node (one process per GPU, NCCL; rank r uses cuda:LOCAL_RANK):

    torchrun --nproc_per_node 8 -m obsdiff_lite prune stabilityai/stable-diffusion-3-medium-diffusers \\
        --output runs/sd3-50 --sparsity 0.5 --num-prompts 100 --device cuda --dtype float16

On CPUs (gloo), e.g. to test: ``OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 -m obsdiff_lite prune
data/tiny-sd3 --output runs/x``. Only rank 0 writes the output. Every rank loads the whole pipeline;
the Hessians of a package exist once per rank. Exact calibration only: ``--calibration cached`` runs
one trajectory whose cache is not sharded, so it is refused under torchrun.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from .hessian import HessianAccumulator


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: its rank, the world size, its local rank and its compute device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def is_distributed() -> bool:
    """True when a process group with more than one rank is initialized."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the default process group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_from_env(device: str | None = "cpu", timeout_s: float = 1800.0) -> DistInfo:
    """Join the process group that ``torchrun`` describes in the environment (no-op outside torchrun).

    Reads RANK, WORLD_SIZE, LOCAL_RANK (and MASTER_ADDR/MASTER_PORT through ``env://``). A CUDA
    ``device`` becomes ``cuda:LOCAL_RANK`` with the NCCL backend; anything else uses gloo.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = str(device or "cpu")
    if world <= 1:
        return DistInfo(device=device)
    cuda = torch.device(device).type == "cuda"
    if cuda:
        if not torch.cuda.is_available():
            raise ValueError("--device cuda under torchrun, but this machine has no CUDA GPU visible to torch")
        if local_rank >= torch.cuda.device_count():
            raise ValueError(
                f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPUs are visible; "
                "use --nproc_per_node <= the number of GPUs"
            )
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(local_rank)
    backend = "nccl" if cuda else "gloo"
    if not dist.is_initialized():
        kwargs = {"device_id": torch.device(device)} if cuda else {}
        dist.init_process_group(backend, rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
    return DistInfo(rank, world, local_rank, device, backend)


def shutdown() -> None:
    """Leave the process group (if one was joined)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def shard(prompts: list[str], rank: int, world: int) -> list[tuple[int, str]]:
    """This rank's prompts as (global index, prompt), round-robin: rank r gets r, r + world, ...

    Keeping the global index is what keeps generator seeds ``seed + index`` independent of the
    number of ranks. Shards differ in length by at most one (a rank may get none).
    """
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in 0..{world - 1}")
    return [(i, prompts[i]) for i in range(rank, len(prompts), world)]


def _reduce_device(tensor: torch.Tensor) -> torch.device:
    """NCCL reduces CUDA tensors only: CPU-resident Hessians go through the current GPU."""
    if dist.get_backend() == "nccl" and tensor.device.type != "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return tensor.device


def allreduce_accumulators(accs: Mapping[str, HessianAccumulator]) -> Mapping[str, HessianAccumulator]:
    """Combine every rank's accumulators in place into the weighted mean over all ranks' rows.

    All ranks must pass the same keys. Ranks that saw no rows (an empty shard) contribute zeros.
    """
    if not is_distributed():
        return accs
    keys = sorted(accs)
    if not keys:
        return accs
    scalars = torch.tensor([[accs[k].weight_sum, float(accs[k].num_rows)] for k in keys], dtype=torch.float64)
    for key in keys:  # same order on every rank
        acc = accs[key]
        for state in (acc.hessian, *([acc.input_mean] if acc.track_mean else [])):
            work = state.to(_reduce_device(state)).mul(acc.weight_sum)  # un-normalise: sum over rows, not mean
            dist.all_reduce(work, op=dist.ReduceOp.SUM)
            state.copy_(work)
    reduce_on = _reduce_device(scalars)
    total = scalars.to(reduce_on)
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    total = total.cpu()
    for key, (weight_sum, num_rows) in zip(keys, total.tolist()):
        acc = accs[key]
        if weight_sum > 0:
            acc.hessian.div_(weight_sum)
            if acc.track_mean:
                acc.input_mean.div_(weight_sum)
        acc.weight_sum, acc.num_rows = float(weight_sum), int(round(num_rows))
    return accs


def broadcast_module_(module: nn.Module, src: int = 0) -> nn.Module:
    """Overwrite ``module``'s parameters and buffers with rank ``src``'s, in place (no-op without a group)."""
    if not is_distributed():
        return module
    for tensor in [*module.parameters(), *module.buffers()]:
        data = tensor.data
        work = data if _reduce_device(data) == data.device else data.to(_reduce_device(data))
        dist.broadcast(work, src=src)
        if work is not data:
            data.copy_(work)
    return module


def all_equal(obj) -> bool:
    """True when every rank passed an equal (picklable) ``obj``."""
    if not is_distributed():
        return True
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return all(g == gathered[0] for g in gathered)


def barrier() -> None:
    """Wait for every rank (no-op without a group)."""
    if is_distributed():
        dist.barrier()

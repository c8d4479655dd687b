"""Multi-process training on PyTorch's own engine: FSDP2 sharding and rank-count-independent checkpoints.

Launch with `torchrun --nproc-per-node N -m llamaforge train ...`: torchrun sets RANK / WORLD_SIZE / LOCAL_RANK,
`init_distributed` joins the process group (nccl on CUDA, gloo on CPU) and the Trainer shards the model with
`fully_shard` (each Block, then the root). Checkpoints are gathered into the very files a single-process run writes
(spec.yaml + model.safetensors + checkpoint/optimizer.safetensors with integer-indexed optimizer state), so a run
resumes on any number of ranks, one included, and `llamaforge.load_model` reads it unchanged.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import nn

from llamaforge.errors import LlamaforgeError

T = TypeVar("T")


class DistributedError(LlamaforgeError):
    """The distributed environment is inconsistent or a model cannot be sharded as asked."""


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    backend: str | None  # None: a single process, no process group

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


SINGLE = DistInfo(rank=0, world_size=1, local_rank=0, backend=None)


def env_info() -> DistInfo | None:
    """What torchrun (or any launcher using its variables) says about this process; None when not launched so."""
    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        return None
    try:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local = int(os.environ.get("LOCAL_RANK", rank))
    except ValueError:
        raise DistributedError(
            "RANK/WORLD_SIZE/LOCAL_RANK must be integers; launch with torchrun --nproc-per-node N"
        ) from None
    if not 0 <= rank < world:
        raise DistributedError(f"RANK={rank} is outside WORLD_SIZE={world}; launch with torchrun")
    return DistInfo(rank=rank, world_size=world, local_rank=local, backend=None)


def init_distributed(device: str = "auto", *, timeout_s: float = 1800.0) -> DistInfo:
    """Join the process group torchrun describes (idempotent); a plain process, or WORLD_SIZE=1, stays single.

    On CUDA each process takes GPU LOCAL_RANK as its current device, so `torch.device("cuda")` means that GPU."""
    import torch.distributed as dist

    info = env_info()
    if info is None or info.world_size == 1:
        return SINGLE
    use_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        if info.local_rank >= torch.cuda.device_count():
            raise DistributedError(
                f"LOCAL_RANK {info.local_rank} but only {torch.cuda.device_count()} GPUs are visible; "
                f"use --nproc-per-node {torch.cuda.device_count()} or fewer"
            )
        torch.cuda.set_device(info.local_rank)
    backend = "nccl" if use_cuda else "gloo"
    if not dist.is_initialized():
        kwargs: dict[str, Any] = {"timeout": datetime.timedelta(seconds=timeout_s)}
        if use_cuda:
            kwargs["device_id"] = torch.device("cuda", info.local_rank)
        dist.init_process_group(backend, **kwargs)
    return DistInfo(info.rank, info.world_size, info.local_rank, dist.get_backend())


def shutdown(*, wait_for_all: bool = True) -> None:
    """Leave the process group. By default every rank first waits for the others: a gloo rank that tore its group
    down while another was still finishing (rank 0 writing the final checkpoint) sometimes aborted the process
    ("terminate called without an active exception", exit -6) after a successful run. On an error path pass
    `wait_for_all=False`: the other ranks may never arrive."""
    import torch.distributed as dist

    if dist.is_initialized():
        if wait_for_all and dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def shard_model(
    model: nn.Module,
    *,
    param_dtype: torch.dtype | None = None,
    reduce_dtype: torch.dtype | None = torch.float32,
    reshard_after_forward: bool = True,
    mesh: Any = None,
    shard_integer_buffers: bool = True,
) -> nn.Module:
    """FSDP2-shard `model` in place: each Block its own unit (all-gathered just before it runs, freed after),
    then the root (embedding, final norm, head). Returns the same object, now a DTensor-parameter FSDP module.

    `param_dtype=torch.bfloat16` computes in bf16 while the sharded fp32 master weights and the optimizer stay
    fp32; gradients are reduced in `reduce_dtype`. Activation checkpointing stays the model's own switch
    (`model.gradient_checkpointing`), which re-runs each Block (and its all-gather) in backward.

    FSDP shards parameters only. Quantized modules keep their packed weights in integer buffers (nf4: uint8 codes),
    so with `shard_integer_buffers` those become frozen Parameters first (see `integer_buffers_to_parameters`):
    a frozen 4-bit base is then sharded across ranks while LoRA parameters train (FSDP + QLoRA).
    """
    import torch.distributed as dist
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if not dist.is_initialized():
        raise DistributedError("shard_model needs a process group; launch with torchrun (see init_distributed)")
    if is_sharded(model):
        return model
    if mesh is None:
        from torch.distributed.device_mesh import init_device_mesh

        device = next(iter(model.parameters())).device
        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    if shard_integer_buffers:
        integer_buffers_to_parameters(model)
    blocks = list(model.blocks()) if hasattr(model, "blocks") else []
    if not blocks:
        raise DistributedError(f"{type(model).__name__} has no blocks() to shard; FSDP needs the per-layer units")
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    return model


def integer_buffers_to_parameters(model: nn.Module) -> list[str]:
    """Turn persistent integer buffers of rank >= 1 into frozen Parameters (in place); returns their names.

    The state-dict names and values do not change (a parameter and a buffer of one name save alike), so checkpoints
    are the single-process files. Why integer only: FSDP2 all-gathers mixed dtypes as bytes and never casts a
    non-floating parameter, whereas a floating one (an nf4 absmax, an int8 scale) would be cast to the mixed-precision
    `param_dtype` and lose the precision dequantisation needs; those stay replicated buffers (for nf4 one fp32 per 64
    weights, 1/8 of the packed codes)."""
    names = []
    for prefix, module in model.named_modules():
        for name, buf in list(module._buffers.items()):
            if buf is None or buf.is_floating_point() or buf.dim() == 0 or name in module._non_persistent_buffers_set:
                continue
            del module._buffers[name]
            module.register_parameter(name, nn.Parameter(buf, requires_grad=False))
            names.append(f"{prefix}.{name}" if prefix else name)
    return names


# ----- full state dicts in the single-process layout -----------------------------------------------------------------
def _aliases(model: nn.Module) -> set[str]:
    """Parameter names that are a second name of an earlier parameter (tied weights)."""
    seen: set[int] = set()
    out: set[str] = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            out.add(name)
        seen.add(id(p))
    return out


def _param_fqns(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The parameter names in the optimizer's own order: position i is what `optimizer.state_dict()` calls i."""
    names: dict[int, str] = {}
    for name, p in model.named_parameters():
        names.setdefault(id(p), name)
    out = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) not in names:
                raise DistributedError("the optimizer holds a parameter that is not in the model")
            out.append(names[id(p)])
    return out


def gather_full_state(
    model: nn.Module, optimizer: torch.optim.Optimizer | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Collective: every rank calls it; rank 0 gets full CPU tensors, other ranks empty dicts.

    The weights come without tied-weight aliases and the optimizer state keyed by integer position, exactly what
    `model.state_dict()` / `optimizer.state_dict()` give in a single process, so the files do not depend on how
    many ranks wrote them."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(model, options=options)
    opt: dict[str, Any] = {}
    if optimizer is not None:
        full = get_optimizer_state_dict(model, optimizer, options=options)
        if dist.get_rank() == 0:
            opt = fqn_to_indexed(full, _param_fqns(model, optimizer))
    if dist.get_rank() != 0:
        return {}, {}
    drop = _aliases(model)
    return {k: v for k, v in weights.items() if k not in drop}, opt


def fqn_to_indexed(state: dict[str, Any], order: list[str]) -> dict[str, Any]:
    """An FQN-keyed optimizer state dict (torch.distributed.checkpoint) -> the integer-keyed layout."""
    index = {name: i for i, name in enumerate(order)}
    groups = []
    for group in state["param_groups"]:
        missing = [n for n in group["params"] if n not in index]
        if missing:
            raise DistributedError(f"optimizer state names parameters the model lacks: {missing[:3]}")
        groups.append({**group, "params": [index[n] for n in group["params"]]})
    return {"state": {index[n]: dict(v) for n, v in state["state"].items()}, "param_groups": groups}


def indexed_to_fqn(state: dict[str, Any], order: list[str]) -> dict[str, Any]:
    """The inverse of `fqn_to_indexed`."""
    if len({i for g in state["param_groups"] for i in g["params"]}) != len(order):
        raise DistributedError(
            f"the checkpoint's optimizer has {sum(len(g['params']) for g in state['param_groups'])} parameters, "
            f"this model trains {len(order)}; resume with the same model, adapters and frozen parameters"
        )
    groups = [{**g, "params": [order[int(i)] for i in g["params"]]} for g in state["param_groups"]]
    return {"state": {order[int(i)]: dict(v) for i, v in state["state"].items()}, "param_groups": groups}


def load_full_state(
    model: nn.Module,
    weights: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer | None = None,
    optimizer_state: dict[str, Any] | None = None,
) -> None:
    """Collective: every rank passes the full (CPU) state it read from disk; each keeps its own shard.

    Reading the files on every rank needs the run directory on a filesystem all ranks see (one host, or shared
    storage) and one full CPU copy per rank while loading."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True)
    weights = dict(weights)
    for alias in _aliases(model):  # tied weights are stored once: give every name its tensor
        if alias not in weights:
            first = _first_name_of(model, alias)
            if first in weights:
                weights[alias] = weights[first]
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(weights)), sorted(set(weights) - expected)
    if missing or unexpected:
        raise DistributedError(
            f"checkpoint weights do not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    set_model_state_dict(model, weights, options=options)
    if optimizer is not None and optimizer_state is not None:
        osd = indexed_to_fqn(optimizer_state, _param_fqns(model, optimizer))
        set_optimizer_state_dict(model, optimizer, osd, options=options)


def _first_name_of(model: nn.Module, alias: str) -> str:
    target = model.get_parameter(alias)
    for name, p in model.named_parameters():
        if p is target:
            return name
    return alias


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(value, op=dist.ReduceOp.SUM)  # gloo has no AVG
        value /= dist.get_world_size()
    return value


def from_rank0(make: Callable[[], T]) -> T:
    """Run `make` on rank 0 only and give its (picklable) result to every rank: work that must agree across ranks
    and need not be repeated (training a tokenizer). An error on rank 0 is raised on every rank, not a hang."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return make()
    box: list[Any] = [None]
    if dist.get_rank() == 0:
        try:
            box[0] = ("ok", make())
        except Exception as exc:  # handed to the other ranks, then raised here too
            box[0] = ("error", exc)
    dist.broadcast_object_list(box, src=0)
    status, value = box[0]
    if status == "error":
        raise value
    return value

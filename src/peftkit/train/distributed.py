"""What :func:`peftkit.train.fit` needs to train on several processes with ``torch.distributed``.

``fit`` stays one loop; this module holds the pieces that differ when it runs under ``torchrun``
(or any launcher that sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT``): who this process is (:class:`World`), starting the process group, wrapping the model
in ``DistributedDataParallel`` (``train.distributed: ddp``) or sharding its frozen base with FSDP2
(``fsdp``), and the few collectives the loop uses (sum a loss, agree on a flag,
hand rank 0's answer to everyone, gather every rank's random state).

Every helper is a no-op, or returns its input, in a single process, so the non-distributed path of
``fit`` runs exactly the code it ran before. The roles, documented in ``docs/distributed.md``:

- rank 0 owns the run directory: it reads checkpoints, writes checkpoints, ``best/``, ``final/``,
  ``metrics.jsonl`` and TensorBoard, logs and draws the progress bar; the other ranks never touch
  the run directory, so a multi-node run needs no shared filesystem;
- rank 0 evaluates (``evaluate(model)`` sees the whole validation split) and hands the metrics to the
  others, so that every rank takes the same best-checkpoint and early-stopping decisions;
- decisions that end or change a step (a non-finite loss, Ctrl-C) are agreed on by all ranks, so no
  rank waits forever in a collective that another one skipped.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

T = TypeVar("T")

ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class World:
    """This process's place among the training processes.

    Attributes:
        rank: Global rank, 0 .. ``size - 1``; rank 0 writes files and logs.
        size: Number of processes (1: not distributed).
        local_rank: Rank on this machine; picks the GPU ``cuda:<local_rank>``.
    """

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        """More than one process takes part."""
        return self.size > 1

    @property
    def is_main(self) -> bool:
        """This is rank 0, the process that writes files and logs."""
        return self.rank == 0


def launched_by_torchrun() -> bool:
    """The environment names a distributed job (``torchrun`` sets these for every worker)."""
    return all(name in os.environ for name in ENV_VARS) and int(os.environ["WORLD_SIZE"]) > 1


def current_world() -> World:
    """The :class:`World` of the initialised process group, or a single process."""
    if not (dist.is_available() and dist.is_initialized()):
        return World()
    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def init_from_env(device_type: str) -> bool:
    """Start the process group from ``torchrun``'s environment when it is set and none is running.

    The backend follows the device: NCCL for CUDA (each process then uses ``cuda:LOCAL_RANK``), gloo
    for CPU. A process group the caller started is used as it is.

    Args:
        device_type: ``"cuda"`` or ``"cpu"``: the device the training will run on.

    Returns:
        True when this call started the group. Destroy it (``torch.distributed.destroy_process_group``)
        only when the process is done with it: under torchrun it cannot be started a second time.
    """
    if not dist.is_available() or dist.is_initialized() or not launched_by_torchrun():
        return False
    if device_type == "cuda":
        # set before the first collective: NCCL binds each process to the device current at init
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return True


def training_device(device: torch.device, world: World) -> torch.device:
    """The device of this rank: ``cuda:LOCAL_RANK`` for a CUDA run with several processes."""
    if world.active and device.type == "cuda":
        return torch.device("cuda", world.local_rank)
    return device


def unused_adapter_parameters(model: nn.Module) -> list[str]:
    """Trainable parameters that the forward pass cannot reach: those of inactive or merged adapters.

    DistributedDataParallel waits for a gradient of every parameter that requires one; a parameter
    the forward pass does not use never gets one, and the backward pass then fails ("Expected to have
    finished reduction in the prior iteration"). Found by walking peftkit's adapter layers and the
    adapter names they declare, not by matching parameter names.
    """
    from ..core.inject import adapter_layers, model_parts, saved_modules

    idle: list[tuple[str, nn.Module]] = []  # (where, module holding one adapter's parameters)
    for name, layer in adapter_layers(model):
        live = [] if layer.disabled else [n for n in layer.active if n not in layer.merged]
        idle += [(f"{name}.adapters.{n}", m) for n, m in layer.adapters.items() if n not in live]
    for name, saved in saved_modules(model):
        current = saved.current()
        idle += [(f"{name}.copies.{n}", m) for n, m in saved.copies.items() if m is not current]
    idle += [(f"peftkit_parts.{n}", part) for n, part in model_parts(model).items() if not part.enabled]
    return [
        f"{where}.{p}"
        for where, module in idle
        for p, param in module.named_parameters()
        if param.requires_grad
    ]


class _DataParallel(DistributedDataParallel):
    """DistributedDataParallel whose missing attributes are read from the wrapped model.

    Loss functions written for the bare model read its attributes (``model.config.is_encoder_decoder``
    in the causal-LM task); through a plain DDP wrapper those reads fail. Calls still go through
    DDP's ``forward``, which is what arms the gradient all-reduce.
    """

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("module"), name)


def wrap(
    model: nn.Module, device: torch.device, world: World, log: Callable[[str], None], strategy: str = "ddp"
) -> nn.Module:
    """What ``loss(model, batch)`` gets in a run of several processes; ``model`` itself in one.

    ``strategy="fsdp"`` shards ``model`` in place (:func:`shard_frozen`) and returns it; ``"ddp"``
    wraps it in DistributedDataParallel.

    Only parameters with ``requires_grad`` are all-reduced (DDP skips frozen ones), so the frozen base
    of an adapter costs no communication. ``find_unused_parameters`` (an extra graph traversal every
    step) is switched on only when the model holds trainable parameters of an inactive or merged
    adapter, which the forward pass cannot reach.
    """
    if not world.active:
        return model
    if strategy == "fsdp":
        shard_frozen(model, device, world)
        return model
    unused = unused_adapter_parameters(model)
    if unused:
        log(
            f"{len(unused)} trainable parameter(s) belong to inactive or merged adapters (e.g. {unused[0]}): "
            "DistributedDataParallel runs with find_unused_parameters=True"
        )
    device_ids = [device.index] if device.type == "cuda" else None
    return _DataParallel(model, device_ids=device_ids, find_unused_parameters=bool(unused))


def shard_frozen(model: nn.Module, device: torch.device, world: World) -> None:
    """Shard the frozen parameters of ``model`` over the ranks with FSDP2; leave the trainable ones whole.

    Each transformer block (the classes a transformers model names in ``_no_split_modules``) and
    then the model itself become ``fully_shard`` units, so a forward pass gathers one block's weights
    at a time. The trainable parameters (the adapter) are passed as ``ignored_params``: they stay
    ordinary tensors, replicated on every rank, their gradients averaged by
    :func:`average_gradients`. An adapter is small next to the base it adapts, so sharding it would
    save little, while keeping it whole keeps the optimizer, the checkpoints and the saved adapter
    exactly those of one process: no adapter can be saved from a shard (checked here).

    Raises:
        ConfigError: nothing is frozen (full fine-tuning): there is no base to shard.
        RuntimeError: a trainable parameter came out sharded or empty.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from ..errors import ConfigError

    trainable = {p for p in model.parameters() if p.requires_grad}
    if all(p.requires_grad for p in model.parameters()):
        raise ConfigError(
            [
                "train.distributed: fsdp shards the frozen base model, and every parameter of this one "
                "is trainable (full fine-tuning): use train.distributed: ddp"
            ],
            what="distributed training",
        )
    mesh = init_device_mesh(device.type, (world.size,))
    blocks = set(getattr(model, "_no_split_modules", None) or ())
    # bottom-up, as fully_shard requires: in reversed pre-order every module comes before its parent
    for module in reversed(list(model.modules())):
        if module is not model and type(module).__name__ in blocks:
            fully_shard(module, mesh=mesh, ignored_params=trainable)
    fully_shard(model, mesh=mesh, ignored_params=trainable)
    bad = [
        name
        for name, p in model.named_parameters()
        if p.requires_grad and (isinstance(p, DTensor) or p.numel() == 0)
    ]
    if bad:
        raise RuntimeError(
            f"after sharding, trainable parameter(s) {bad[:3]} are sharded or empty: an adapter saved "
            "from them would be incomplete"
        )


def average_gradients(params: list[torch.Tensor], world: World) -> None:
    """Replace the gradients of ``params`` by their mean over the ranks (one all-reduce per dtype).

    With ``fsdp`` the replicated adapter is outside both FSDP and DDP; this is the average DDP
    would have computed for it.
    """
    if not world.active:
        return
    grads = [p.grad for p in params if p.grad is not None]
    for dtype in sorted({g.dtype for g in grads}, key=str):
        same = [g for g in grads if g.dtype == dtype]
        flat = torch.cat([g.reshape(-1) for g in same])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= world.size
        offset = 0
        for g in same:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()


def unwrap(model: nn.Module) -> nn.Module:
    """The user's model inside a DDP wrapper (its parameter names have no ``module.`` prefix)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def sum_across(value: torch.Tensor, world: World) -> torch.Tensor:
    """The sum of ``value`` over all ranks (``value`` itself in one process)."""
    if not world.active:
        return value
    value = value.clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def any_across(flag: bool, device: torch.device, world: World) -> bool:
    """True on every rank when ``flag`` is true on any (e.g. Ctrl-C reached one process first)."""
    if not world.active:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def broadcast(value: T, world: World) -> T:
    """Rank 0's ``value`` on every rank (any picklable object)."""
    if not world.active:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(value: T, world: World) -> list[T] | None:
    """Every rank's ``value`` on rank 0 (in rank order); None on the other ranks."""
    if not world.active:
        return [value]
    out: list[Any] | None = [None] * world.size if world.is_main else None
    dist.gather_object(value, out, dst=0)
    return out


def on_main(fn: Callable[[], T], world: World, what: str) -> T:
    """Run ``fn`` on rank 0 and return its result on every rank.

    When ``fn`` raises on rank 0 it re-raises there, and every other rank raises a RuntimeError
    naming ``what`` and rank 0's error, instead of waiting forever for a result.
    """
    if not world.active:
        return fn()
    result: Any = None
    error: BaseException | None = None
    if world.is_main:
        try:
            result = fn()
        except Exception as exc:  # noqa: BLE001 - re-raised below, after telling the other ranks
            error = exc
    ok, payload = broadcast(
        (error is None, result if error is None else f"{type(error).__name__}: {error}"), world
    )
    if error is not None:
        raise error
    if not ok:
        raise RuntimeError(f"rank 0 failed while {what} ({payload}); see rank 0's output")
    return payload


def barrier(world: World) -> None:
    """Wait until every rank gets here (a no-op in one process)."""
    if world.active:
        dist.barrier()

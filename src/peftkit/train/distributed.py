"""What :func:`peftkit.train.fit` needs to train on several processes with ``torch.distributed``.

``fit`` stays one loop; this module holds the pieces that differ when it runs under ``torchrun``
(or any launcher that sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT``): launching torchrun (:func:`launch`), who this process is (:class:`World`), the one
owner that starts and ends the process group (:func:`process_group`), wrapping the model
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

import atexit
import contextlib
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .runtime import resolve_device

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


def launched_world_size() -> int:
    """The number of processes torchrun started for this job (1 when it did not start this process)."""
    return int(os.environ["WORLD_SIZE"]) if launched_by_torchrun() else 1


def launch(nproc: int, args: Sequence[str]) -> int:
    """Run ``python -m torch.distributed.run --standalone --nproc-per-node <nproc> <args>`` and wait for it.

    ``--standalone`` runs the rendezvous on this machine at a free port; torchrun sets ``RANK``,
    ``WORLD_SIZE`` ... for each process it starts. Several machines: launch torchrun yourself.

    Returns:
        torchrun's exit code (1 when any process failed, whatever that process's own code).
    """
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        *args,
    ]
    print(f"starting {nproc} training processes: {' '.join(command[1:])}", flush=True)
    return subprocess.run(command).returncode


@contextlib.contextmanager
def process_group(device: str | torch.device = "auto") -> Iterator[World]:
    """Own the process group for the block: start it from torchrun's environment, and end it however the
    block ends.

    This is the one place peftkit starts and destroys a process group. The outermost caller enters it
    (``peftkit train`` does, on every rank); a block inside a running group (an outer owner's, or one the
    caller started with ``torch.distributed.init_process_group``) uses that group and ends nothing.

    A group left running when the process exits is what aborts a rank at exit with "terminate called
    without an active exception" (gloo's threads outlive the interpreter), so the group is destroyed on
    every way out: the block returns, raises, is interrupted by Ctrl-C, or gets SIGTERM, which torchrun
    sends the other ranks when one fails; while the block runs, SIGTERM raises ``SystemExit(143)`` (unless
    the program installed its own handler), so that it unwinds like an error.

    Args:
        device: Where training runs (``"auto"``, ``"cpu"``, ``"cuda:1"`` ...): NCCL for CUDA, each process
            on ``cuda:LOCAL_RANK``; gloo for CPU. Read only when a group is started.

    Yields:
        This process's :class:`World` (a single process outside torchrun).
    """
    if not _needs_group():
        yield current_world()
        return
    previous = _exit_on_sigterm()  # first: no moment with a group and SIGTERM still killing outright
    try:
        _start(device)
        yield current_world()
    finally:
        _end(previous)


def ensure_process_group(device: str | torch.device = "auto") -> World:
    """This process's :class:`World`, starting the group when torchrun's environment asks for one and no
    owner started it (``fit`` or ``train_run`` called from a script launched by torchrun).

    A group started here belongs to the rest of the process, because under torchrun a group cannot be
    started twice: a second ``fit``, or the script's own collectives, use it. It is destroyed when the
    process exits (an ``atexit`` hook; SIGTERM exits through it too), or earlier by the script
    (``torch.distributed.destroy_process_group()``).
    """
    if _needs_group():
        owner = contextlib.ExitStack()
        owner.enter_context(process_group(device))
        atexit.register(owner.close)
    return current_world()


def _needs_group() -> bool:
    return dist.is_available() and not dist.is_initialized() and launched_by_torchrun()


def _start(device: str | torch.device) -> None:
    device_type = resolve_device(str(device)).type
    if device_type == "cuda":
        # set before the first collective: NCCL binds each process to the device current at init
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")


def _exit_on_sigterm() -> Any:
    """Make SIGTERM raise SystemExit(143) (main thread, default handler only); the handler to restore, or
    None when none was installed."""
    if threading.current_thread() is not threading.main_thread():
        return None
    previous = signal.getsignal(signal.SIGTERM)
    if previous not in (signal.SIG_DFL, None):
        return None  # the program's own handler decides what SIGTERM does

    def exit_now(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, exit_now)
    return previous


def _end(previous_handler: Any) -> None:
    # signals wait until the group is down: a SIGTERM in the middle of destroy_process_group would leave
    # it half destroyed; delivered after it, it finds the handler the program had before
    masked = hasattr(signal, "pthread_sigmask") and threading.current_thread() is threading.main_thread()
    before = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT}) if masked else None
    try:
        if dist.is_initialized():  # the program may have destroyed it itself
            dist.destroy_process_group()
    finally:
        if previous_handler is not None:
            signal.signal(signal.SIGTERM, previous_handler)
        if before is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, before)


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

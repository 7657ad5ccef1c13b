"""Atomic, complete training checkpoints, and the weight directories ``best/`` and ``final/``.

A checkpoint ``checkpoints/step-00000120/`` holds everything a resumed run needs to continue exactly
as an uninterrupted one would have:

- ``model.safetensors``: every trainable parameter and every persistent buffer (by module path; the
  buffers because frozen BatchNorm layers still update their running statistics in training mode);
- ``adapter/``: the adapter in the interchange format (``peftkit.load_adapter`` and the reference
  library read it), when the model has peftkit adapters;
- ``optimizer.pt``, ``scheduler.pt``: their ``state_dict()``s;
- ``rng.pt``: Python ``random``, torch CPU, CUDA (when training on CUDA) and NumPy (when imported);
  with several processes (``torch.distributed``) one ``rng-rank<r>.pt`` per rank instead, all
  written by rank 0 from the states the ranks sent it;
- ``trainer_state.json``: step, data position, best metric and step, early-stopping counter, the
  evaluation history and losses, and the settings a resume must match.

A checkpoint is written into a hidden temporary directory beside its final name, every file and the
directory are fsync'ed, and only then is it renamed into place: a crash leaves either no checkpoint or
a complete one, and any ``step-*`` directory is complete (``tests/train/test_crash_resume.py`` kills a run
at every file operation of a save to prove it). A write that fails (disk full, read-only directory)
raises :class:`~peftkit.errors.SaveError` naming the path and the fix, and leaves earlier checkpoints
as they were. Pickled files are read with ``weights_only=True``.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..core.io import save_adapter, write_error
from ..core.state_dict import adapter_state_dict, load_adapter_state_dict
from ..errors import ConfigError

CHECKPOINT_PREFIX = "step-"
KEEP_CHECKPOINTS = 2
STATE_NAME = "trainer_state.json"
MODEL_STATE_NAME = "model.safetensors"
TRAINING_INFO_NAME = "training_info.json"


# ---------------------------------------------------------------------------------------- tensors


def _persistent_buffers(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    for module_name, module in model.named_modules():
        for name, buffer in module._buffers.items():
            # plain tensors only: quantization backends keep packed tensor subclasses that
            # safetensors cannot write and that training never changes
            if (
                buffer is not None
                and type(buffer) is torch.Tensor
                and name not in module._non_persistent_buffers_set
            ):
                yield (f"{module_name}.{name}" if module_name else name), buffer


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """CPU copies of every trainable parameter and persistent buffer of ``model``, by module path.

    For full fine-tuning this is the whole state dict (tied weights once); for an adapter it is the
    adapter's trainable tensors, any other trainable parameter, and the buffers.
    """
    tensors = {name: p for name, p in model.named_parameters() if p.requires_grad}
    seen = set(tensors)
    for name, buffer in _persistent_buffers(model):
        if name not in seen:
            tensors[name] = buffer
    return {name: t.detach().to("cpu", copy=True).contiguous() for name, t in tensors.items()}


def load_trainable_state(
    model: nn.Module, tensors: dict[str, torch.Tensor], source: str = "checkpoint"
) -> None:
    """Copy :func:`trainable_state` tensors back into ``model``; nothing is copied unless all fit.

    Raises:
        ConfigError: names or shapes differ (a different model, adapter or set of trainable parameters).
    """
    targets = {name: p for name, p in model.named_parameters() if p.requires_grad}
    targets.update((name, b) for name, b in _persistent_buffers(model) if name not in targets)
    problems = []
    missing, unexpected = sorted(set(targets) - set(tensors)), sorted(set(tensors) - set(targets))
    if missing:
        problems.append(f"{len(missing)} tensor(s) of the model are not in the {source}: {missing[:3]}")
    if unexpected:
        problems.append(
            f"{len(unexpected)} tensor(s) of the {source} are not trainable in the model: {unexpected[:3]}"
        )
    for name in sorted(set(targets) & set(tensors)):
        if targets[name].shape != tensors[name].shape:
            problems.append(
                f"{name}: {source} {tuple(tensors[name].shape)} vs model {tuple(targets[name].shape)}"
            )
    if problems:
        problems.append(
            "build the model and adapter exactly as the run that wrote it did (same method, "
            "targets, rank), or start a new run"
        )
        raise ConfigError(problems, what=f"{source} for this model")
    with torch.no_grad():
        for name, target in targets.items():
            target.copy_(tensors[name])


# -------------------------------------------------------------------------------------------- RNG


def rng_state(device: torch.device) -> dict[str, Any]:
    """Every random generator a training step may draw from."""
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state_all()
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        kind, keys, pos, has_gauss, cached = numpy.random.get_state()
        # as a tensor and plain numbers, so that a weights_only load accepts it
        state["numpy"] = (kind, torch.from_numpy(keys.astype("int64")), pos, has_gauss, cached)
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    random.setstate(_as_tuple(state["python"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy

        kind, keys, pos, has_gauss, cached = state["numpy"]
        numpy.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, cached))


def _as_tuple(value: Any) -> Any:
    return tuple(_as_tuple(v) for v in value) if isinstance(value, list | tuple) else value


@contextlib.contextmanager
def preserved_rng(device: torch.device) -> Iterator[None]:
    """Run a block (an evaluation) without moving any generator the training steps draw from."""
    saved = rng_state(device)
    try:
        yield
    finally:
        set_rng_state(saved)


def seed_everything(seed: int) -> None:
    """Seed Python ``random``, torch (CPU and every GPU) and NumPy (when imported)."""
    random.seed(seed)
    torch.manual_seed(seed)
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        numpy.random.seed(seed % 2**32)


# ------------------------------------------------------------------------------- atomic directories


def _fsync_tree(root: Path) -> None:
    for directory, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(directory, name), "rb") as handle:
                os.fsync(handle.fileno())
        _fsync_dir(Path(directory))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_directory(target: Path) -> Iterator[Path]:
    """Yield a temporary directory that becomes ``target`` (replacing it) once the block succeeds.

    If the block raises, the temporary directory is removed and ``target`` is untouched. An
    ``OSError`` (disk full, read-only directory) becomes a :class:`~peftkit.errors.SaveError` that
    names ``target`` and the fix.
    """
    kept = f"{target.name} and everything else in {str(target.parent)!r} are as they were"
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    except OSError as exc:
        raise write_error(target, exc, kept) from exc
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it owner-only; give it a plain mkdir's mode
    try:
        yield tmp
        _fsync_tree(tmp)
        if target.exists():
            # Linux cannot rename over a non-empty directory: move the old one aside first
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, old / target.name)
            try:
                os.replace(tmp, target)
            except BaseException:
                os.replace(old / target.name, target)  # put the previous one back
                raise
            shutil.rmtree(old)
        else:
            os.replace(tmp, target)
        _fsync_dir(target.parent)
    except OSError as exc:  # also a SaveError of save_adapter: name the folder being saved, not its part
        shutil.rmtree(tmp, ignore_errors=True)
        raise write_error(target, exc, kept) from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ------------------------------------------------------------------------------------ checkpoints


def checkpoint_dirs(root: Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        step = path.name[len(CHECKPOINT_PREFIX) :]
        if path.name.startswith(CHECKPOINT_PREFIX) and step.isdigit() and (path / STATE_NAME).is_file():
            found.append((int(step), path))
    return [path for _, path in sorted(found)]


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint under ``root``, or None."""
    dirs = checkpoint_dirs(root)
    return dirs[-1] if dirs else None


def remove_stale_temporaries(root: Path, names: tuple[str, ...] = (CHECKPOINT_PREFIX,)) -> None:
    """Delete what a crash during :func:`atomic_directory` left in ``root``: hidden folders
    ``.<name>*.tmp-*`` (half written) and ``.<name>*.old-*`` (a replaced copy not yet deleted).

    Args:
        root: The folder holding the atomic directories.
        names: Their name prefixes: ``step-`` for checkpoints, ``("best", "final")`` in a run directory.
    """
    if root.is_dir():
        for path in root.iterdir():
            hidden = path.name.startswith(tuple(f".{name}" for name in names))
            if hidden and (".tmp-" in path.name or ".old-" in path.name) and path.is_dir():
                shutil.rmtree(path, ignore_errors=True)


def save_checkpoint(
    root: Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    trainer_state: dict[str, Any],
    device: torch.device,
    adapter_name: str | None,
    keep: int = KEEP_CHECKPOINTS,
    rng_states: list[dict[str, Any]] | None = None,
) -> Path:
    """Write ``root/step-<step>`` atomically and delete all but the newest ``keep`` checkpoints.

    ``rng_states`` (one per rank, from a run of several processes) are written as ``rng-rank<r>.pt``;
    without them this process's generators go to ``rng.pt``.
    """
    target = root / f"{CHECKPOINT_PREFIX}{step:08d}"
    with atomic_directory(target) as tmp:
        save_file(trainable_state(model), str(tmp / MODEL_STATE_NAME))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        if rng_states is None:
            torch.save(rng_state(device), tmp / "rng.pt")
        else:
            for rank, state in enumerate(rng_states):
                torch.save(state, tmp / rank_rng_name(rank))
        if adapter_name is not None:
            save_adapter(model, tmp / "adapter", adapter_name)
        (tmp / STATE_NAME).write_text(json.dumps(trainer_state, indent=1, allow_nan=True))
    for old in checkpoint_dirs(root)[:-keep]:
        _remove_directory(old)
    return target


def _remove_directory(path: Path) -> None:
    """Delete ``path`` so that no crash leaves it half deleted under its own name.

    It is renamed to a hidden ``.<name>.old-*`` folder first (one atomic step), then deleted; a crash
    during the deletion leaves only that hidden folder, which the next start removes. Deleting in
    place could leave a ``step-*`` folder that still has its ``trainer_state.json`` but lost other files.
    """
    try:
        hidden = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
        os.replace(path, hidden / path.name)
    except OSError:
        return  # already gone, or the folder cannot be changed: leaving an old checkpoint is harmless
    shutil.rmtree(hidden, ignore_errors=True)


def read_trainer_state(path: Path) -> dict[str, Any]:
    """The ``trainer_state.json`` of checkpoint ``path``."""
    try:
        return json.loads((path / STATE_NAME).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(
            [
                f"cannot read {path / STATE_NAME}: {exc}; delete that checkpoint folder to "
                "resume from the one before it"
            ],
            what="checkpoint",
        ) from exc


def rank_rng_name(rank: int) -> str:
    """The file of rank ``rank``'s random state in a checkpoint of a run of several processes."""
    return f"rng-rank{rank}.pt"


def read_checkpoint(path: Path, world_size: int = 1) -> dict[str, Any]:
    """The files of checkpoint ``path`` as CPU objects, without touching any model.

    Returns ``{"model": tensors, "optimizer": state dict, "scheduler": state dict, "rng": [state per
    rank]}``: what rank 0 of a distributed run reads and hands to the other ranks, so that only rank 0
    needs to see the run directory.

    Raises:
        ConfigError: the checkpoint holds the random state of another number of processes.
    """
    names = ["rng.pt"] if world_size == 1 else [rank_rng_name(r) for r in range(world_size)]
    missing = [name for name in names if not (path / name).is_file()]
    if missing:
        written = sorted(p.name for p in path.glob("rng*.pt"))
        raise ConfigError(
            [
                f"checkpoint {path} has no {missing[0]} (it holds {written}): it was written by a run of "
                f"another number of processes than this one ({world_size}); resume with the same "
                "number of processes"
            ],
            what="resume",
        )
    return {
        "model": load_file(str(path / MODEL_STATE_NAME)),
        "optimizer": torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True),
        "scheduler": torch.load(path / "scheduler.pt", weights_only=True),
        "rng": [torch.load(path / name, weights_only=True) for name in names],
    }


def load_checkpoint(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> dict[str, Any]:
    """Restore model tensors, optimizer and scheduler from checkpoint ``path``; returns its RNG state.

    The generators are not touched here: the caller sets them (:func:`set_rng_state`) right before
    the next step, after anything else that might draw from them.
    """
    load_trainable_state(model, load_file(str(path / MODEL_STATE_NAME)), source=f"checkpoint {path}")
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    return torch.load(path / "rng.pt", weights_only=True)


# ------------------------------------------------------------------------------- best/ and final/


def save_weights(
    model: nn.Module, directory: Path, adapter_name: str | None, info: dict[str, Any], portable: bool = False
) -> Path:
    """Write the model's trained weights to ``directory`` atomically (``best/``, ``final/``).

    With an adapter: the interchange format (``peftkit.save_adapter``). For full fine-tuning:
    ``model.safetensors`` with every trainable parameter and persistent buffer (the model's
    ``state_dict`` keys), which ``model.load_state_dict(load_file(...), strict=False)`` reads.
    ``info`` (step, metrics) goes to ``training_info.json`` beside them. ``portable``: an adapter whose
    init rewrote the base is written relative to the original base (``save_adapter(portable=True)``).
    """
    with atomic_directory(directory) as tmp:
        if adapter_name is not None:
            save_adapter(model, tmp, adapter_name, portable=portable)
        else:
            save_file(trainable_state(model), str(tmp / MODEL_STATE_NAME))
        (tmp / TRAINING_INFO_NAME).write_text(json.dumps(info, indent=1, allow_nan=True))
    return directory


def load_weights(model: nn.Module, directory: str | os.PathLike, adapter_name: str = "default") -> nn.Module:
    """Put weights saved by :func:`save_weights` (e.g. ``run_dir/best``) back into ``model``.

    ``model`` must be built as for training (for an adapter: with the adapter injected under
    ``adapter_name``); the weights are copied into it in place.
    """
    directory = Path(directory)
    full = (directory / MODEL_STATE_NAME).is_file()
    put_weights(model, read_weights(directory), None if full else adapter_name, source=str(directory))
    return model


def read_weights(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a folder :func:`save_weights` wrote (an adapter's, in the interchange format, or
    ``model.safetensors``), on the CPU."""
    directory = Path(directory)
    for name in (MODEL_STATE_NAME, "adapter_model.safetensors"):
        if (directory / name).is_file():
            return load_file(str(directory / name))
    raise FileNotFoundError(
        f"{directory} holds neither {MODEL_STATE_NAME} nor an adapter: is it a "
        "best/ or final/ folder written by peftkit.train.fit?"
    )


def weights_in_memory(model: nn.Module, adapter_name: str | None) -> dict[str, torch.Tensor]:
    """CPU copies of the tensors :func:`save_weights` would write now, which :func:`put_weights` puts back."""
    if adapter_name is None:
        return trainable_state(model)
    tensors = adapter_state_dict(model, adapter_name)
    return {key: t.to("cpu", copy=True).contiguous() for key, t in tensors.items()}


def put_weights(
    model: nn.Module, tensors: dict[str, torch.Tensor], adapter_name: str | None, source: str
) -> None:
    """Copy :func:`weights_in_memory` or :func:`read_weights` tensors into ``model``; nothing is copied
    unless all fit.

    Raises:
        AdapterMismatchError: the adapter's saved shapes changed since (AdaLoRA prunes its ranks).
        ConfigError: full fine-tuning tensors of another model.
    """
    if adapter_name is None:
        load_trainable_state(model, tensors, source=source)
    else:
        load_adapter_state_dict(model, tensors, adapter_name)

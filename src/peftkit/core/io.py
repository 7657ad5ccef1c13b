"""Adapter directories in the interchange format: ``adapter_config.json`` + ``adapter_model.safetensors``.

Both files are written to temporary names in the target directory, flushed to disk, then renamed
over the old ones, so an interrupted save leaves either the previous adapter or the new one, never
half a file. The base-model fingerprint travels in the safetensors header metadata: the reference
library ignores that metadata, whereas an extra key in ``adapter_config.json`` would make it warn
that the file needs a newer version of itself.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from ..errors import AdapterFileError, AdapterMismatchError, BaseModelMismatchWarning
from .config import AdapterConfig
from .inject import inject, remove_adapter, require_adapter, set_active, state_of, unload
from .state_dict import LoadReport, adapter_state_dict, load_adapter_state_dict
from .targeting import user_modules

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAMES = ("adapter_model.bin", "adapter_model.pt")
FINGERPRINT_KEY = "peftkit.base_fingerprint"


def base_fingerprint(model: nn.Module, module_names: list[str]) -> str:
    """Hash of the adapted modules' names and weight shapes: equal for the same architecture."""
    modules = dict(user_modules(model))
    digest = hashlib.sha256()
    for name in sorted(module_names):
        weight = getattr(modules.get(name), "weight", None)
        shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else ()
        digest.update(f"{name}:{shape};".encode())
    return digest.hexdigest()[:16]


def _fingerprint_of(model: nn.Module, adapter_name: str) -> str:
    plan = state_of(model).plans[adapter_name]
    return base_fingerprint(model, [t.name for t in plan.targets] + plan.modules_to_save)


def _atomic_write(path: Path, write) -> Path:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        # mkstemp (and safetensors, which recreates the file) make it owner-only; give it the
        # permissions a plain open() would
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
    except BaseException:
        os.unlink(tmp)
        raise
    return Path(tmp)


def save_adapter(
    model: nn.Module, directory: str | os.PathLike, adapter_name: str = "default", *, portable: bool = False
) -> Path:
    """Save one adapter to ``directory`` in the interchange format; returns the directory.

    Args:
        model: A model with adapters.
        directory: Created if missing; existing adapter files in it are replaced atomically.
        adapter_name: Which adapter to save.
        portable: For adapters whose init rewrote the base weights (PiSSA, OLoRA): save an equivalent
            plain adapter relative to the *original* weights (LoRA at twice the rank), which serving
            engines and other readers that do not re-run the init apply correctly. Other adapters are
            saved unchanged.

    Raises:
        AdapterFileError: the adapter holds NaN or inf values (nothing on disk is changed).
    """
    state = require_adapter(model, adapter_name, AdapterMismatchError)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in adapter_state_dict(model, adapter_name, portable).items()}
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise AdapterFileError(
            f"adapter {adapter_name!r} holds non-finite values in {bad[:3]}; not saved (nothing on disk was changed). "
            "Training probably diverged: lower the learning rate or resume from an earlier checkpoint."
        )
    config = state.configs[adapter_name]
    config = (config.portable() if portable else config).replace(inference_mode=True).to_dict()
    metadata = {"format": "pt", FINGERPRINT_KEY: _fingerprint_of(model, adapter_name)}

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tmp_weights = _atomic_write(directory / WEIGHTS_NAME, lambda p: save_file(tensors, p, metadata=metadata))
    try:
        tmp_config = _atomic_write(
            directory / CONFIG_NAME, lambda p: Path(p).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        )
    except BaseException:
        os.unlink(tmp_weights)
        raise
    os.replace(tmp_weights, directory / WEIGHTS_NAME)
    os.replace(tmp_config, directory / CONFIG_NAME)
    return directory


def read_adapter_config(directory: str | os.PathLike) -> AdapterConfig:
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in {str(directory)!r}: is this an adapter directory?")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise AdapterFileError(f"{path} is not valid JSON ({exc}); the file is corrupt or was cut short") from exc
    return AdapterConfig.from_dict(data)


def read_adapter_tensors(directory: str | os.PathLike, allow_pickle: bool = False) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors (and header metadata) of an adapter directory; pickle files only when allowed."""
    directory = Path(directory)
    weights = directory / WEIGHTS_NAME
    if weights.is_file():
        try:
            with safe_open(str(weights), framework="pt") as handle:
                return {key: handle.get_tensor(key) for key in handle.keys()}, handle.metadata() or {}
        except (SafetensorError, OSError, ValueError) as exc:
            raise AdapterFileError(
                f"cannot read {weights}: {exc}. The file is truncated or corrupt; save the adapter again."
            ) from exc
    for name in PICKLE_NAMES:
        path = directory / name
        if path.is_file():
            if not allow_pickle:
                raise AdapterFileError(
                    f"{path} is a pickle file, which can run arbitrary code when loaded; peftkit refuses it "
                    "by default. If you trust its source, pass allow_pickle=True (it is then read with "
                    "weights_only=True), or convert it to safetensors."
                )
            try:
                return torch.load(path, map_location="cpu", weights_only=True), {}
            except Exception as exc:  # torch raises several types for bad or unsafe pickles
                raise AdapterFileError(f"cannot read {path} safely (weights_only=True): {exc}") from exc
    raise FileNotFoundError(f"no {WEIGHTS_NAME} (or pickle {', '.join(PICKLE_NAMES)}) in {str(directory)!r}")


def load_adapter(
    model: nn.Module,
    directory: str | os.PathLike,
    adapter_name: str = "default",
    *,
    is_trainable: bool = False,
    strict: bool = True,
    allow_pickle: bool = False,
) -> nn.Module:
    """Add the adapter saved in ``directory`` to ``model`` as ``adapter_name`` and activate it.

    Reads directories written by peftkit or by the reference library. On any error the model is left
    as it was. A fingerprint mismatch (the adapter came from a differently shaped or named model)
    warns, or raises under ``strict=True`` when the keys do not line up either.
    """
    config = read_adapter_config(directory).replace(inference_mode=not is_trainable)
    tensors, metadata = read_adapter_tensors(directory, allow_pickle=allow_pickle)
    previous = list(state_of(model).active) if "_peftkit" in model.__dict__ else []
    inject(model, config, adapter_name, require_every_entry=False)
    try:
        # everything is checked before any tensor is copied: a refused load must not leave base
        # tensors (trained biases, embedding weights) changed
        load_adapter_state_dict(model, tensors, adapter_name, strict=strict, check_only=True)
        saved_fp, here_fp = metadata.get(FINGERPRINT_KEY), _fingerprint_of(model, adapter_name)
        if saved_fp and saved_fp != here_fp:
            message = (
                f"adapter in {str(directory)!r} was saved from a different base model than this one "
                f"(fingerprint of adapted module names and shapes {saved_fp} vs {here_fp}; saved from "
                f"{config.base_model_name_or_path!r})"
            )
            if strict:
                raise AdapterMismatchError(message + "; pass strict=False to load it anyway")
            warnings.warn(message + "; outputs may be meaningless", BaseModelMismatchWarning, stacklevel=2)
        report: LoadReport = load_adapter_state_dict(model, tensors, adapter_name, strict=strict)
    except BaseException:
        remove_adapter(model, adapter_name)
        if previous:
            set_active(model, previous)
        elif not state_of(model).configs:
            unload(model)
        raise
    if report.missing or report.unexpected:
        warnings.warn(
            f"loaded adapter {adapter_name!r} with {len(report.missing)} missing and "
            f"{len(report.unexpected)} unexpected key(s) (strict=False)",
            stacklevel=2,
        )
    return model

"""Adapter directories in the interchange format: ``adapter_config.json`` + ``adapter_model.safetensors``.

Both files are written to temporary names in the target directory, flushed to disk, then renamed
over the old ones, so an interrupted save leaves either the previous adapter or the new one, never
half a file. The base-model fingerprint travels in the safetensors header metadata: the reference
library ignores that metadata, whereas an extra key in ``adapter_config.json`` would make it warn
that the file needs a newer version of itself.

Adapter directories come from strangers, so reading treats both files as hostile (docs/security.md):
only regular files are read, the config must be a JSON object of bounded size naming a registered
method, tensors come from safetensors (pickles only on request, and then weights-only), and every
failure is a peftkit error naming the file. A save is refused when the adapter is incomplete or
non-finite, and the written weights are read back and compared before they replace anything.
"""

from __future__ import annotations

import contextlib
import errno
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

from ..errors import AdapterFileError, AdapterMismatchError, BaseModelMismatchWarning, ConfigError, SaveError
from . import registry
from .config import AdapterConfig
from .inject import (
    adapter_layers,
    inject,
    remove_adapter,
    require_adapter,
    saved_modules,
    set_active,
    state_of,
    unload,
)
from .state_dict import LoadReport, adapter_state_dict, load_adapter_state_dict
from .targeting import user_modules

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAMES = ("adapter_model.bin", "adapter_model.pt")
FINGERPRINT_KEY = "peftkit.base_fingerprint"
# A real adapter_config.json is a few KiB (a list of thousands of module names stays under 1 MiB);
# anything larger is not a config, and reading it whole would let a file exhaust memory.
MAX_CONFIG_BYTES = 16 * 2**20


def base_fingerprint(model: nn.Module, module_names: list[str]) -> str:
    """Hash of the adapted modules' names and weight shapes: equal for the same architecture."""
    modules = dict(user_modules(model))
    digest = hashlib.sha256()
    for name in sorted(module_names):
        module = modules.get(name)
        weight = getattr(module, "weight", None)
        if module is None:  # a parameter adapted directly (target_parameters): its own shape
            weight = _parameter(modules, name)
        shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else ()
        access = registry.base_access(module) if module is not None else None
        if access is not None and access.shape is not None:
            # a quantized layer stores a packed weight: its logical shape is what identifies the base,
            # so an adapter trained on the quantized model matches the dense one too (and back)
            shape = tuple(access.shape(module))
        digest.update(f"{name}:{shape};".encode())
    return digest.hexdigest()[:16]


def _parameter(modules: dict[str, nn.Module], name: str) -> torch.Tensor | None:
    owner, _, param = name.rpartition(".")
    return getattr(modules.get(owner), param, None)


def _fingerprint_of(model: nn.Module, adapter_name: str) -> str:
    plan = state_of(model).plans[adapter_name]
    names = [t.name for t in plan.targets if not t.parameters]
    names += [p.full_name for t in plan.targets for p in t.parameters.values()]
    return base_fingerprint(model, names + plan.modules_to_save)


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
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return Path(tmp)


def write_error(path: str | os.PathLike, exc: OSError, kept: str) -> SaveError:
    """A :class:`SaveError` for a failed write of ``path``: what happened, what is intact, the fix.

    Args:
        path: The file or directory that was being written.
        exc: The operating system's error.
        kept: What is still on disk unchanged, e.g. "the adapter files already there are unchanged".
    """
    code = exc.errno
    if code in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        fix = "the disk (or your quota) is full: free space there, or save somewhere else"
    elif code in (errno.EACCES, errno.EPERM, errno.EROFS):
        fix = "the directory is read-only or not yours: fix its permissions, or save somewhere else"
    else:
        fix = "check that the directory exists, is writable and has free space, or save somewhere else"
    return SaveError(
        f"cannot write {str(path)!r}: {exc.strerror or exc}; {kept}. Fix: {fix}",
        errno=code,
        strerror=exc.strerror,
        filename=str(path),
    )


def _incomplete_modules(model: nn.Module, adapter_name: str) -> list[str]:
    """Modules the adapter was built on that no longer carry it (replaced or deleted after inject)."""
    plan = state_of(model).plans[adapter_name]
    layers = {name for name, layer in adapter_layers(model) if adapter_name in layer.adapters}
    copies = {name for name, wrapper in saved_modules(model) if adapter_name in wrapper.copies}
    return [t.name for t in plan.targets if t.name not in layers] + [
        n for n in plan.modules_to_save if n not in copies
    ]


def _verify_written(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Read the written weights back: every key, non-empty and equal to the tensor in memory.

    Costs one read of a file that was just written (usually still in the page cache); it turns a
    filesystem that silently drops or truncates data into an error before anything is replaced.
    """
    try:
        with safe_open(str(path), framework="pt") as handle:
            keys = set(handle.keys())
            differ = [
                k for k in sorted(keys & set(tensors)) if not torch.equal(handle.get_tensor(k), tensors[k])
            ]
    except (SafetensorError, OSError, ValueError) as exc:
        raise AdapterFileError(
            f"the adapter weights just written to {path} cannot be read back ({exc}); "
            "nothing was replaced. Check the disk and save again."
        ) from exc
    missing, extra = sorted(set(tensors) - keys), sorted(keys - set(tensors))
    if missing or extra or differ:
        raise AdapterFileError(
            f"the adapter weights just written to {path} read back differently from memory (missing "
            f"{missing[:3]}, unexpected {extra[:3]}, different {differ[:3]}); nothing was replaced. The disk "
            "or filesystem lost data: check it and save again."
        )


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
            saved unchanged. Adapters whose config's ``saves_portable()`` is true (CorDA: its
            decomposition needs the data) are always saved so.

    Raises:
        AdapterMismatchError: a module the adapter was built on no longer carries it (it was replaced or
            deleted after ``inject``), or the adapter holds no tensors or only empty ones.
        AdapterFileError: the adapter holds NaN or inf values, or the written file did not read back
            equal to memory.
        SaveError: the directory cannot be written (disk full, read-only, permissions).

    Whatever the error, nothing on disk is changed.
    """
    state = require_adapter(model, adapter_name, AdapterMismatchError)
    # an init no reader can re-run from the file alone (CorDA needs the data): portable whatever was asked
    portable = portable or state.configs[adapter_name].saves_portable()
    lost = _incomplete_modules(model, adapter_name)
    if lost:
        raise AdapterMismatchError(
            f"adapter {adapter_name!r} was built on {len(lost)} module(s) that no longer carry it: {lost[:5]} (replaced "
            "or deleted after inject?); saving would write an incomplete adapter, so nothing was saved. Save before "
            "changing the model, or inject the adapter again."
        )
    tensors = adapter_state_dict(model, adapter_name, portable)
    return write_adapter(model, directory, adapter_name, tensors, portable=portable)


def write_adapter(
    model: nn.Module,
    directory: str | os.PathLike,
    adapter_name: str,
    tensors: dict[str, torch.Tensor],
    *,
    portable: bool = False,
) -> Path:
    """Write ``tensors`` (interchange keys) as adapter ``adapter_name`` of ``model``: the end of
    :func:`save_adapter`, for callers that hold the adapter's tensors elsewhere than in the live model
    (a state dict gathered by a distributed trainer). Same checks, same errors, same atomicity."""
    state = require_adapter(model, adapter_name, AdapterMismatchError)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    # One empty tensor is legitimate (AdaLoRA prunes a module to rank 0, and the reference library
    # saves and loads that); an adapter whose tensors are all empty carries no weights at all.
    if not tensors or all(v.numel() == 0 for v in tensors.values()):
        what = f"only empty tensors ({len(tensors)})" if tensors else "no tensors at all"
        raise AdapterMismatchError(
            f"adapter {adapter_name!r} has {what}; an adapter file without weights would load "
            "as a silent no-op, so nothing was saved"
        )
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v.float()).all()]
    if bad:
        raise AdapterFileError(
            f"adapter {adapter_name!r} holds non-finite values in {bad[:3]}; not saved (nothing on disk was changed). "
            "Training probably diverged: lower the learning rate or resume from an earlier checkpoint."
        )
    config = state.configs[adapter_name]
    config = (config.portable() if portable else config).replace(inference_mode=True).to_dict()
    metadata = {"format": "pt", FINGERPRINT_KEY: _fingerprint_of(model, adapter_name)}

    directory = Path(directory)
    temporaries: list[Path] = []
    try:
        directory.mkdir(parents=True, exist_ok=True)
        temporaries.append(
            _atomic_write(directory / WEIGHTS_NAME, lambda p: save_file(tensors, p, metadata=metadata))
        )
        _verify_written(temporaries[0], tensors)
        text = json.dumps(config, indent=2, sort_keys=True) + "\n"
        temporaries.append(_atomic_write(directory / CONFIG_NAME, lambda p: Path(p).write_text(text)))
        for temporary, name in zip(list(temporaries), (WEIGHTS_NAME, CONFIG_NAME), strict=True):
            os.replace(temporary, directory / name)
            temporaries.remove(temporary)
    except OSError as exc:
        if isinstance(exc, SaveError):
            raise
        raise write_error(directory, exc, "the adapter files already there are unchanged") from exc
    finally:
        for leftover in temporaries:  # only after a failure
            with contextlib.suppress(OSError):
                os.unlink(leftover)
    return directory


def _regular_file(path: Path) -> bool:
    """Whether ``path`` is a regular file (after symlinks); a device, FIFO or directory there is an error.

    Symlinks themselves are followed: the Hugging Face cache links every snapshot file to a blob
    outside the snapshot directory. What is refused is reading something that is not a file, such as
    ``/dev/zero`` (endless) or a FIFO (blocks forever).
    """
    if not os.path.lexists(path):
        return False
    if not path.is_file():
        raise AdapterFileError(
            f"{path} is not a regular file (a directory, device, FIFO or broken link); an adapter "
            "directory holds plain files. Replace it with the real file."
        )
    return True


def read_adapter_config(directory: str | os.PathLike) -> AdapterConfig:
    """The checked config of the adapter directory ``directory``.

    Raises:
        FileNotFoundError: there is no ``adapter_config.json``.
        AdapterFileError: it is not a regular file, too large, not UTF-8 JSON, not a JSON object, has no
            ``peft_type`` or names a method peftkit does not have.
        ConfigError: a value is wrong (every problem is listed, headed by the file's path).
    """
    path = Path(directory) / CONFIG_NAME
    if not _regular_file(path):
        raise FileNotFoundError(f"no {CONFIG_NAME} in {str(directory)!r}: is this an adapter directory?")
    size = path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise AdapterFileError(
            f"{path} is {size:,} bytes, more than any adapter config ({MAX_CONFIG_BYTES:,} at most); "
            "it is not an adapter_config.json"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise AdapterFileError(
            f"{path} is not valid JSON ({exc}); the file is corrupt or was cut short"
        ) from None
    if not isinstance(data, dict):
        kind = {list: "array", str: "string", int: "number", float: "number", bool: "boolean"}.get(
            type(data), "null"
        )
        raise AdapterFileError(f"{path} must hold a JSON object of config keys, got a JSON {kind}")
    peft_type = data.get("peft_type")
    if not isinstance(peft_type, str) or not peft_type:
        got = "it has none" if "peft_type" not in data else f"got {peft_type!r}"
        raise AdapterFileError(
            f'{path} needs peft_type, the method\'s name as a string such as "LORA" ({got}): it '
            "is not an adapter config, or it was edited"
        )
    try:
        registry.config_class(peft_type)
    except KeyError as exc:
        raise AdapterFileError(
            f"{path}: {exc.args[0]}. The adapter was made with a method peftkit does not "
            "implement (or a newer version); it cannot be loaded."
        ) from None
    try:
        return AdapterConfig.from_dict(data)
    except ConfigError as exc:
        raise ConfigError(exc.problems, what=f"{peft_type} adapter config {str(path)!r}") from None
    except (TypeError, ValueError, AttributeError, KeyError, IndexError) as exc:
        # a check a config class makes without ConfigError, tripped by a value of an unexpected type
        raise AdapterFileError(
            f"{path}: cannot build a {peft_type} config from it ({type(exc).__name__}: {exc}); "
            "a value has the wrong type"
        ) from exc


def read_adapter_tensors(
    directory: str | os.PathLike, allow_pickle: bool = False
) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors (and header metadata) of an adapter directory; pickle files only when allowed.

    Raises:
        FileNotFoundError: neither ``adapter_model.safetensors`` nor a pickle file is there.
        AdapterFileError: the file is not a regular file, is truncated or corrupt (header length,
            offsets, dtypes), or is a pickle and ``allow_pickle`` is False, or holds more than tensors.
    """
    directory = Path(directory)
    weights = directory / WEIGHTS_NAME
    if _regular_file(weights):
        try:
            with safe_open(str(weights), framework="pt") as handle:
                return {key: handle.get_tensor(key) for key in handle.keys()}, handle.metadata() or {}
        except (SafetensorError, OSError, ValueError, RuntimeError, TypeError) as exc:
            raise AdapterFileError(
                f"cannot read {weights}: {exc}. The file is truncated or corrupt; save the adapter again."
            ) from None
    for name in PICKLE_NAMES:
        path = directory / name
        if _regular_file(path):
            if not allow_pickle:
                raise AdapterFileError(
                    f"{path} is a pickle file, which can run arbitrary code when loaded; peftkit refuses it "
                    "by default. If you trust its source, pass allow_pickle=True (it is then read with "
                    "weights_only=True), or convert it to safetensors."
                )
            try:
                return torch.load(path, map_location="cpu", weights_only=True), {}
            except Exception as exc:  # torch raises several types for bad or unsafe pickles
                raise AdapterFileError(
                    f"cannot read {path} safely (weights_only=True refuses anything but tensors and plain "
                    f"containers): {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}. "
                    "Convert it to safetensors where it was made."
                ) from None
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
    config = config.matching_tensors(tensors)
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

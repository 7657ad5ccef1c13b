"""The adapters a server knows, which of them are resident on the base, and loading them safely.

Clients name adapters freely (``sql-v1.2``); on the model each resident adapter gets an internal name
(``served_3``) so that a client's name can never collide with a module attribute or contain a dot.
At most ``max_resident`` adapters live on the model; the least recently used one that no request is
using leaves when another must load, and loads again from its directory when asked for.

Every method here that changes the model runs on the engine's worker thread, between forward passes.
"""

from __future__ import annotations

import itertools
import re
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from .. import api
from ..core.inject import remove_adapter, state_of
from ..core.mixed import check_names
from ..errors import PeftkitError
from .model import adapter_directory, run_labels

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")


class AdapterRefused(Exception):
    """An adapter could not be served; ``status`` is the HTTP status the client gets."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class ServedAdapter:
    name: str
    directory: Path  # the adapter directory (adapter_config.json)
    source: str  # what the operator or client gave (a run or adapter directory)
    labels: list[str] | None = None
    internal: str | None = None  # its name on the model while resident
    last_used: float = 0.0
    in_use: int = 0  # requests admitted and not finished
    retired: bool = False  # unloaded while in use: leaves the model when its last request ends
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def resident(self) -> bool:
        return self.internal is not None


class AdapterPool:
    """Known adapters (name -> directory) and the resident ones, bounded by ``max_resident``.

    Args:
        model: The base; adapters are injected into it.
        base_id: The name that means "no adapter" (refused as an adapter name).
        max_resident: Most adapters on the model at once (LRU beyond it).
        adapters_dir: Looked up for a name nobody registered: ``adapters_dir/NAME`` (a run or adapter
            directory) is loaded on first use.
        load_roots: Directories ``/v1/load_lora_adapter`` may load from (``adapters_dir`` is one);
            empty: runtime loading is refused.
    """

    def __init__(
        self,
        model: nn.Module,
        base_id: str,
        *,
        max_resident: int,
        adapters_dir: Path | None = None,
        load_roots: Iterable[Path] = (),
    ) -> None:
        if max_resident < 1:
            raise ValueError(f"--max-adapters must be at least 1, got {max_resident}")
        self.model = model
        self.base_id = base_id
        self.max_resident = max_resident
        self.adapters_dir = adapters_dir
        self.load_roots = [p.resolve() for p in load_roots] + (
            [adapters_dir.resolve()] if adapters_dir else []
        )
        self._known: dict[str, ServedAdapter] = {}
        # the HTTP threads look names up while the worker loads and evicts: one lock over the registry
        self._lock = threading.RLock()
        self._counter = itertools.count()

    # -- names and lookup ---------------------------------------------------------------------------

    def check_name(self, name: str) -> None:
        if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
            raise AdapterRefused(
                f"adapter name {name!r} is not allowed: use 1-128 letters, digits and . _ : - (starting "
                "with a letter or digit)"
            )
        if name == self.base_id:
            raise AdapterRefused(f"{name!r} is the base model's name; choose another name for the adapter")

    def find(self, name: str) -> ServedAdapter | None:
        """The adapter called ``name``: registered, or found in ``adapters_dir`` (registered then)."""
        with self._lock:
            adapter = self._known.get(name)
        if adapter is not None or self.adapters_dir is None or not NAME_PATTERN.fullmatch(name):
            return adapter
        candidate = self.adapters_dir / name
        if name in (".", "..") or not candidate.is_dir():
            return None
        try:
            directory, run = adapter_directory(candidate)
        except FileNotFoundError:
            return None
        with self._lock:
            return self._known.setdefault(
                name, ServedAdapter(name, directory, str(candidate), run_labels(run))
            )

    def get(self, name: str) -> ServedAdapter | None:
        """The registered adapter called ``name`` (None if there is none)."""
        with self._lock:
            return self._known.get(name)

    def resident(self) -> list[ServedAdapter]:
        with self._lock:
            return [a for a in self._known.values() if a.resident]

    def forget(self, adapter: ServedAdapter) -> None:
        """Drop ``adapter`` from the registry (its files were refused: do not retry them for every request)."""
        with self._lock:
            if self._known.get(adapter.name) is adapter:
                del self._known[adapter.name]

    def available(self) -> list[ServedAdapter]:
        """Registered adapters and those ``adapters_dir`` holds, by name."""
        if self.adapters_dir is not None and self.adapters_dir.is_dir():
            for child in sorted(self.adapters_dir.iterdir()):
                self.find(child.name)
        with self._lock:
            return sorted(self._known.values(), key=lambda a: a.name)

    def register(self, name: str, path: str | Path, *, runtime: bool = False) -> ServedAdapter:
        """Make ``name`` known as the adapter at ``path`` (loaded on first use, or by :meth:`make_resident`).

        Raises:
            AdapterRefused: a bad name, a name in use, a path outside the load roots (runtime) or one
                holding no adapter.
        """
        self.check_name(name)
        if self.get(name) is not None:
            raise AdapterRefused(f"The lora adapter '{name}' has already been loaded.")
        if runtime:
            self._check_root(Path(path))
        try:
            directory, run = adapter_directory(path)
        except FileNotFoundError as exc:
            raise AdapterRefused(f"cannot load adapter {name!r}: {exc}", 404 if runtime else 400) from None
        adapter = ServedAdapter(name, directory, str(path), run_labels(run))
        with self._lock:
            if name in self._known:
                raise AdapterRefused(f"The lora adapter '{name}' has already been loaded.")
            self._known[name] = adapter
        return adapter

    def _check_root(self, path: Path) -> None:
        if not self.load_roots:
            raise AdapterRefused(
                "runtime loading is off: start the server with --adapters-dir DIR or --allow-load-from DIR to "
                "let clients load adapters from those directories",
                403,
            )
        resolved = path.resolve()
        if not any(resolved == root or root in resolved.parents for root in self.load_roots):
            raise AdapterRefused(
                f"lora_path {str(path)!r} is outside the directories this server loads from "
                f"({', '.join(map(str, self.load_roots))}); copy the adapter there, or restart with "
                "--allow-load-from",
                403,
            )

    # -- residency (worker thread) ------------------------------------------------------------------

    def make_resident(self, adapter: ServedAdapter, *, over_limit: bool = False) -> bool:
        """Load ``adapter`` onto the model if it is not there; False when every slot is held by requests
        (``over_limit``: load it anyway, one beyond the bound until a slot frees).

        Raises:
            AdapterRefused: the files are bad, hostile, for another base, or for a method that cannot be
                routed per example. The model is left as it was.
        """
        adapter.last_used = time.monotonic()
        if adapter.resident:
            return True
        resident = self.resident()
        while len(resident) >= self.max_resident:
            idle = [a for a in resident if a.in_use == 0]
            if not idle:
                if over_limit:
                    break
                return False
            victim = min(idle, key=lambda a: a.last_used)
            self._evict(victim)
            resident.remove(victim)
        internal = f"served_{next(self._counter)}"
        try:
            api.load_adapter(self.model, adapter.directory, internal, strict=True)
        except (PeftkitError, OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
            raise AdapterRefused(f"adapter {adapter.name!r} was refused: {_first_line(exc)}") from None
        try:
            self.model.eval()
            check_names(self.model, [internal])
            if state_of(self.model).extra_trainable.get(internal):
                raise ValueError(
                    "it changes base tensors in place (trained biases or embedding rows), which every "
                    "request would see; serve it alone with `peftkit merge` and a server of its own"
                )
        except (PeftkitError, ValueError, TypeError) as exc:
            self._remove(internal)
            raise AdapterRefused(
                f"adapter {adapter.name!r} cannot be served with per-request routing: {_first_line(exc)}"
            ) from None
        adapter.internal = internal
        return True

    def release(self, adapter: ServedAdapter) -> None:
        """A request using ``adapter`` finished; a retired adapter leaves with its last request."""
        adapter.in_use -= 1
        if adapter.retired and adapter.in_use == 0 and adapter.resident:
            self._evict(adapter)

    def unload(self, name: str) -> None:
        """Forget ``name``; it leaves the model now, or when the requests using it finish.

        Raises:
            AdapterRefused: (404) no adapter of that name is known.
        """
        with self._lock:
            adapter = self._known.pop(name, None)
        if adapter is None:
            raise AdapterRefused(f"The lora adapter '{name}' cannot be found.", 404)
        adapter.retired = True
        if adapter.in_use == 0 and adapter.resident:
            self._evict(adapter)

    def _evict(self, adapter: ServedAdapter) -> None:
        internal, adapter.internal = adapter.internal, None
        if internal is not None:
            self._remove(internal)

    def _remove(self, internal: str) -> None:
        remove_adapter(self.model, internal)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"

"""``peftkit serve``: build the base, the adapter pool, the engine and the app, then run uvicorn.

Everything named on the command line is checked before the port opens: a missing base, a malformed
``--adapter``, or an adapter refused by strict loading stops the server with the reason (exit 2), so
that a server that answers is one that serves what it was asked to.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError
from ..run.runner import CONFIG_NAME as RUN_CONFIG
from ..train.runtime import resolve_device
from .adapters import AdapterPool, AdapterRefused
from .engine import Engine
from .model import ServedBase, load_base

API_KEY_ENV = "PEFTKIT_API_KEY"


@dataclass
class ServerOptions:
    """What ``peftkit serve`` was asked for (the command line's options, with their defaults)."""

    base: str
    adapters: Sequence[str] = ()  # NAME=DIR
    adapters_dir: str | None = None
    allow_load_from: Sequence[str] = ()
    max_adapters: int = 8
    task: str | None = None
    name: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    max_batch: int = 16
    max_queue: int = 256
    request_timeout: float = 120.0
    batch_window_ms: float = 5.0
    drain_seconds: float = 30.0
    device: str = "auto"
    mixed: bool = True


@dataclass
class Server:
    base: ServedBase
    pool: AdapterPool
    engine: Engine
    app: Any


def parse_adapter(spec: str) -> tuple[str, str]:
    """``NAME=DIR`` -> (name, dir); a bare DIR is named after its last path part."""
    name, sep, path = spec.partition("=")
    if not sep:
        path = spec
        name = Path(spec.rstrip("/")).name
    if not name or not path:
        raise ConfigError(
            [f"--adapter {spec!r}: expected NAME=DIR (e.g. --adapter support=runs/support-lora)"],
            what="serve",
        )
    return name, path


def build_server(options: ServerOptions, log: Callable[[str], None] = print) -> Server:
    """Load the base and the adapters named on the command line; the app is ready to run.

    Raises:
        ConfigError: bad options, or an adapter that cannot be served (each problem named).
        FileNotFoundError: the base or an adapter directory does not exist.
        ImportError: FastAPI is not installed (the message says which extra to install).
    """
    _require_server_packages()
    from .app import create_app

    problems = _option_problems(options)
    if problems:
        raise ConfigError(problems, what="serve")
    if not (Path(options.base) / RUN_CONFIG).is_file():
        from ..models import source_problem

        problem = source_problem(options.base, None)
        if problem:
            raise ConfigError([f"BASE: {problem.rstrip('; ')}; or give a run directory"], what="serve")
    device = _device(options.device)
    base = load_base(options.base, task=options.task, name=options.name)
    base.model.to(device)  # before any adapter: each loads where its layer is
    adapters_dir = Path(options.adapters_dir) if options.adapters_dir else None
    pool = AdapterPool(
        base.model,
        base.id,
        max_resident=options.max_adapters,
        adapters_dir=adapters_dir,
        load_roots=[Path(p) for p in options.allow_load_from],
    )
    named = [parse_adapter(spec) for spec in options.adapters]
    # the run given as BASE serves its adapter under the run directory's name, unless an --adapter names
    # that run already (e.g. --adapter sentiment=RUN to choose the name)
    given = {Path(path).resolve() for _, path in named}
    if (
        base.adapter is not None
        and base.adapter[0] not in {n for n, _ in named}
        and base.adapter[0] != base.id
        and Path(options.base).resolve() not in given
        and base.adapter[1].resolve() not in given
    ):
        named.insert(0, (base.adapter[0], str(base.adapter[1])))
    refused = []
    for name, path in named:
        try:
            adapter = pool.register(name, path)
            if len(pool.resident()) < options.max_adapters:
                pool.make_resident(adapter)  # check it now; beyond the bound it loads on first use
        except AdapterRefused as exc:
            refused.append(f"--adapter {name}={path}: {exc}")
    if refused:
        raise ConfigError(refused, what="serve")
    engine = Engine(
        base,
        pool,
        max_batch=options.max_batch,
        max_queue=options.max_queue,
        timeout=options.request_timeout,
        window=options.batch_window_ms / 1000,
        mixed=options.mixed,
        log=log,
    )
    api_key = options.api_key or os.environ.get(API_KEY_ENV) or None
    app = create_app(base, pool, engine, api_key=api_key, drain_seconds=options.drain_seconds, log=log)
    return Server(base, pool, engine, app)


def _device(name: str) -> torch.device:
    try:
        device = resolve_device(name)
        if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
            raise RuntimeError(f"{torch.cuda.device_count()} CUDA device(s)")
        return device
    except (ConfigError, RuntimeError):
        raise ConfigError(
            [f"--device {name}: no such device here (no CUDA GPU is available?); use auto or cpu"],
            what="serve",
        ) from None


def _option_problems(options: ServerOptions) -> list[str]:
    problems = []
    for flag, value, least in [
        ("--max-adapters", options.max_adapters, 1),
        ("--max-batch", options.max_batch, 1),
        ("--max-queue", options.max_queue, 1),
    ]:
        if value < least:
            problems.append(f"{flag}: expected at least {least}, got {value}")
    if options.request_timeout <= 0:
        problems.append(
            f"--request-timeout: expected a positive number of seconds, got {options.request_timeout}"
        )
    if options.adapters_dir and not Path(options.adapters_dir).is_dir():
        problems.append(f"--adapters-dir: {options.adapters_dir!r} is not a directory")
    for root in options.allow_load_from:
        if not Path(root).is_dir():
            problems.append(f"--allow-load-from: {root!r} is not a directory")
    return problems


def _require_server_packages() -> None:
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        raise ImportError(
            f"peftkit serve needs FastAPI and uvicorn ({exc.name} is missing): pip install 'peftkit[serve]'"
        ) from None


def run_server(options: ServerOptions, log: Callable[[str], None] = print) -> None:
    """Serve until SIGINT / SIGTERM; requests in flight finish first (up to ``drain_seconds``).

    ``port`` 0 takes a free port; the line logged at start names the one taken.
    """
    import uvicorn

    server = build_server(options, log)
    try:
        sock = socket.create_server((options.host, options.port))
    except OSError as exc:
        raise ConfigError(
            [
                f"--port {options.port}: cannot listen on {options.host}:{options.port} ({exc.strerror}); choose another port, or 0 for a free one"
            ],
            what="serve",
        ) from None
    host, port = sock.getsockname()[:2]
    names = [a.name for a in server.pool.available()]
    keyed = options.api_key or os.environ.get(API_KEY_ENV)
    log(
        f"peftkit serve: {server.base.id!r} ({server.base.kind}) with adapters {names or '(none)'} on "
        f"http://{host}:{port}" + ("; bearer token required" if keyed else "") + " (Ctrl-C stops it)"
    )
    config = uvicorn.Config(
        server.app, log_level="warning", timeout_graceful_shutdown=int(options.drain_seconds)
    )

    class Uvicorn(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            super().handle_exit(sig, frame)
            # uvicorn re-raises the signal after its graceful stop; a stop that finished its requests is
            # the expected end of a server (exit 0), not a death by SIGTERM
            self._captured_signals.clear()

    try:
        Uvicorn(config).run(sockets=[sock])
    finally:
        sock.close()
    log("peftkit serve: stopped")

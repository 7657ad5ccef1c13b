"""The engine: one worker thread owns the model; requests reach it through a bounded queue.

Generation is batched continuously (rows join and leave the running batch between decode steps, see
``decode.py``); classification requests are gathered for a short window and run as one batch. Rows of
one batch may name different adapters: each goes through its own (``per_example_adapters``). With
``mixed=False`` a batch holds one adapter's rows at a time and the active adapter is switched between
batches: the baseline that ``benchmarks/serve.py`` measures mixed batching against.

Everything that changes the model (adapters loading, leaving) runs on the worker between forward passes,
so a request never sees a half-loaded adapter. Results travel back to the asyncio loop of the request
that asked, as events on its queue.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import api
from ..core.mixed import Router
from .adapters import AdapterPool, AdapterRefused, ServedAdapter
from .decode import DecodeBatch, Row, Sampling
from .model import ServedBase


class QueueFull(Exception):
    """More requests are waiting than ``--max-queue`` allows (HTTP 429)."""


class ShuttingDown(Exception):
    """The server is stopping and takes no new requests (HTTP 503)."""


# events a job sends to its request: ("text", str) | ("done", finish_reason, prompt_tokens, completion_tokens)
# | ("result", list of per-text results) | ("error", http_status, message)
Event = tuple


@dataclass
class Job:
    """One request row (a prompt to continue, or texts to classify) and where its events go."""

    kind: str  # "generate" | "classify"
    adapter: ServedAdapter | None
    deadline: float
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    prompt: list[int] = field(default_factory=list)
    sampling: Sampling | None = None
    texts: list[str] = field(default_factory=list)
    arrived: float = field(default_factory=time.monotonic)
    cancelled: bool = False
    row: Row | None = None
    holds_adapter: bool = False
    index: int = 0  # which of its request's prompts (choices) this job is

    def send(self, *event: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the request's loop has closed: nobody is listening
            self.loop.call_soon_threadsafe(self.events.put_nowait, (self.index, event))


class Engine:
    """Runs requests against ``base`` with the adapters of ``pool`` on one worker thread.

    Args:
        max_batch: Most rows in one forward pass.
        max_queue: Most requests waiting or running; one more is refused (:class:`QueueFull`).
        timeout: Seconds a request may take from arrival to its last token.
        window: Seconds a classification request waits for others to batch with.
        mixed: Batch rows of different adapters together (else one adapter per batch, switching).
    """

    def __init__(
        self,
        base: ServedBase,
        pool: AdapterPool,
        *,
        max_batch: int = 16,
        max_queue: int = 256,
        timeout: float = 120.0,
        window: float = 0.005,
        mixed: bool = True,
        log: Callable[[str], None] = print,
    ) -> None:
        self.base, self.pool = base, pool
        self.max_batch, self.max_queue, self.timeout, self.window = max_batch, max_queue, timeout, window
        self.mixed, self.log = mixed, log
        pad = base.tokenizer.pad_token_id
        self.batch = DecodeBatch(
            base.model, base.tokenizer, base.stop_ids, base.context, pad if pad is not None else 0
        )
        self._waiting: list[Job] = []  # generation, in arrival order
        self._classify: list[Job] = []
        self._running: list[Job] = []  # rows of the decode batch, in its order
        self._admitting: list[Job] = []  # taken from the queue, being prefilled
        self._ops: list[tuple[Callable[[], Any], concurrent.futures.Future]] = []
        self._router = Router(base.model)  # finds the adapter layers once per set of adapters, not per step
        self._wake = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

    # -- from the HTTP side --------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="peftkit-serve-engine", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        """Queue ``job``. Raises QueueFull or ShuttingDown instead of queueing."""
        with self._wake:
            if self._stopping:
                raise ShuttingDown("the server is shutting down and takes no new requests")
            if self.load >= self.max_queue:
                raise QueueFull(
                    f"{self.load} requests are already waiting or running (the server's --max-queue is "
                    f"{self.max_queue}); retry shortly"
                )
            (self._classify if job.kind == "classify" else self._waiting).append(job)
            self._wake.notify()

    @property
    def load(self) -> int:
        """Requests queued or running (a request of several prompts counts once per prompt)."""
        return len(self._waiting) + len(self._classify) + len(self._admitting) + len(self._running)

    def call(self, fn: Callable[[], Any]) -> concurrent.futures.Future:
        """Run ``fn`` on the worker between forward passes (it may change the model)."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._wake:
            self._ops.append((fn, future))
            self._wake.notify()
        return future

    def stop(self, drain_seconds: float = 30.0) -> None:
        """Take no new requests, let those queued and running finish (up to ``drain_seconds``), then stop."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        deadline = time.monotonic() + drain_seconds
        while self.load and time.monotonic() < deadline:
            time.sleep(0.01)
        with self._wake:
            for job in self._waiting + self._classify + self._running:
                job.send("error", 503, "the server shut down before this request finished")
            self._waiting, self._classify, self._running = [], [], []
            self._thread_should_exit = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout=10)

    # -- the worker ----------------------------------------------------------------------------------

    _thread_should_exit = False

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not (self._work_ready() or self._thread_should_exit):
                    self._wake.wait(self._wait_time())
                if self._thread_should_exit:
                    return
                ops, self._ops = self._ops, []
            try:
                self._tick(ops)
            except Exception:  # noqa: BLE001 - a fault must fail its requests, never the server
                self._fail_everything(traceback.format_exc())

    def _work_ready(self) -> bool:
        return bool(self._ops or self._running or self._waiting or self._classify_due())

    def _wait_time(self) -> float:
        if self._classify:
            return max(0.0, self._classify[0].arrived + self.window - time.monotonic())
        return 0.1

    def _classify_due(self) -> bool:
        if not self._classify:
            return False
        full = len(self._classify) >= self.max_batch
        return full or time.monotonic() >= self._classify[0].arrived + self.window

    def _tick(self, ops: list[tuple[Callable[[], Any], concurrent.futures.Future]]) -> None:
        for fn, future in ops:
            try:
                future.set_result(fn())
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                future.set_exception(exc)
        self._expire()
        if self._classify_due():
            self._run_classify()
        self._admit()
        if self._running:
            self._step()

    def _expire(self) -> None:
        """Requests cancelled by their client, or past their deadline, leave (queued or running)."""
        now = time.monotonic()
        with self._wake:
            for queue in (self._waiting, self._classify):
                for job in [j for j in queue if j.cancelled or now > j.deadline]:
                    queue.remove(job)
                    self._timed_out(job)
        gone = [i for i, j in enumerate(self._running) if j.cancelled or now > j.deadline]
        if gone:
            for i in gone:
                self._finish(self._running[i])
                self._timed_out(self._running[i])
            self.batch.drop(gone)
            with self._wake:
                self._running = [j for i, j in enumerate(self._running) if i not in set(gone)]

    def _timed_out(self, job: Job) -> None:
        if not job.cancelled:
            job.send(
                "error",
                504,
                f"the request did not finish within the server's --request-timeout ({self.timeout:g} s)",
            )

    # -- generation ----------------------------------------------------------------------------------

    def _admit(self) -> None:
        room = self.max_batch - len(self._running)
        if room <= 0 or not self._waiting:
            return
        current = self._running[0].adapter if (self._running and not self.mixed) else None
        chosen: list[Job] = []
        with self._wake:
            candidates = list(self._waiting)
        for job in candidates:
            if len(chosen) >= room:
                break
            if not self.mixed:
                first = current if self._running else (chosen[0].adapter if chosen else job.adapter)
                if job.adapter is not first:
                    continue
            if not self._hold(job):
                continue
            chosen.append(job)
        if not chosen:
            return
        with self._wake:
            for job in chosen:
                self._waiting.remove(job)
            self._admitting = chosen
        try:
            self._prefill(chosen)
        finally:
            with self._wake:
                self._admitting = []

    def _prefill(self, chosen: list[Job]) -> None:
        rows = []
        for job in chosen:
            assert job.sampling is not None
            job.row = Row(job.prompt, job.sampling, _route(job), _sender(job))
            rows.append(job.row)
        try:
            self.batch.admit(rows, self._routing)
        except Exception:  # noqa: BLE001 - these requests fail; the running batch is untouched
            self._fail(chosen, traceback.format_exc())
            return
        for job in chosen:
            assert job.row is not None
            if job.row.finish is not None:
                self._done(job)
            else:
                with self._wake:
                    self._running.append(job)

    def _hold(self, job: Job) -> bool:
        """Make ``job``'s adapter resident and count the job on it; False: wait for a free slot."""
        adapter = job.adapter
        if adapter is None:
            return True
        if adapter.retired:
            self._refuse(job, 404, f"adapter {adapter.name!r} was unloaded")
            return False
        try:
            if not self.pool.make_resident(adapter):
                return False
        except AdapterRefused as exc:
            self.pool.forget(adapter)
            self._refuse(job, exc.status, str(exc))
            return False
        adapter.in_use += 1
        job.holds_adapter = True
        return True

    def _refuse(self, job: Job, status: int, message: str) -> None:
        with self._wake:
            for queue in (self._waiting, self._classify):
                if job in queue:
                    queue.remove(job)
        job.send("error", status, message)

    def _step(self) -> None:
        self.batch.step(self._routing)
        still = []
        for job in self._running:
            assert job.row is not None
            if job.row.finish is not None:
                self._done(job)
            else:
                still.append(job)
        with self._wake:
            self._running = still

    def _done(self, job: Job) -> None:
        assert job.row is not None
        self._finish(job)  # before the answer goes out: whoever reads it sees the adapter released
        job.send("done", job.row.finish, len(job.prompt), len(job.row.generated))

    def _finish(self, job: Job) -> None:
        if job.holds_adapter and job.adapter is not None:
            job.holds_adapter = False
            self.pool.release(job.adapter)

    @contextlib.contextmanager
    def _routing(self, routes: list[str | None]) -> Iterator[None]:
        """Each row through its own adapter (mixed), or the batch's one adapter made active (switching)."""
        model = self.base.model
        if "_peftkit" not in model.__dict__ or not api.adapter_names(model):
            yield
        elif self.mixed or routes[0] is None:  # the base rows of a switching batch: routed to no adapter
            with self._router.route(routes):
                yield
        else:
            if api.active_adapters(model) != [routes[0]]:  # switch only when the batch's adapter changes
                api.set_active(model, routes[0])
            yield

    # -- classification ------------------------------------------------------------------------------

    def _run_classify(self) -> None:
        with self._wake:
            jobs, self._classify = self._classify[: self.max_batch], self._classify[self.max_batch :]
        if not self.mixed:  # one adapter per batch: the others wait for the next one
            first = jobs[0].adapter
            with self._wake:
                self._classify = [j for j in jobs if j.adapter is not first] + self._classify
            jobs = [j for j in jobs if j.adapter is first]
        held = [job for job in jobs if self._hold_classify(job)]
        if not held:
            return
        texts = [t for job in held for t in job.texts]
        routes = [_route(job) for job in held for _ in job.texts]
        task, model = self.base.task, self.base.model
        batch = task.collate([{"text": t} for t in texts])
        device = self.base.device
        try:
            with torch.inference_mode(), self._routing(routes):
                logits = model(**{k: v.to(device) for k, v in batch.items()}).logits.float()
            probs = torch.softmax(logits, -1).cpu()
        except Exception:  # noqa: BLE001 - these requests fail; the server goes on
            self._fail(held, traceback.format_exc())
            return
        for job in held:
            self._finish(job)  # before the answers go out
        start = 0
        for job in held:
            labels = (job.adapter.labels if job.adapter else None) or self.base.labels or []
            rows = probs[start : start + len(job.texts)]
            start += len(job.texts)
            job.send("result", [_classified(r, labels) for r in rows])

    def _hold_classify(self, job: Job) -> bool:
        if self._hold(job):
            return True
        if (
            job.adapter is not None
            and not job.adapter.retired
            and self.pool.get(job.adapter.name) is job.adapter
        ):
            with self._wake:  # no free slot: try again with the next batch
                self._classify.append(job)
        return False

    # -- faults --------------------------------------------------------------------------------------

    def _fail_everything(self, trace: str) -> None:
        with self._wake:
            running, self._running = self._running, []
        self.batch.drop(list(range(len(self.batch.rows))))
        self._fail(running, trace)

    def _fail(self, jobs: list[Job], trace: str) -> None:
        self.log(f"peftkit serve: a batch failed; its {len(jobs)} request(s) get HTTP 500:\n{trace}")
        for job in jobs:
            self._finish(job)
            job.send("error", 500, "the server failed while running this request (see the server log)")


def _route(job: Job) -> str | None:
    return job.adapter.internal if job.adapter is not None else None


def _sender(job: Job) -> Callable[[str], None]:
    return lambda text: job.send("text", text)


def _classified(probs: torch.Tensor, labels: list[str]) -> dict[str, Any]:
    best = int(probs.argmax())
    names = labels if len(labels) == len(probs) else [f"LABEL_{i}" for i in range(len(probs))]
    return {"label": names[best], "probs": [round(float(p), 6) for p in probs], "num_classes": len(probs)}

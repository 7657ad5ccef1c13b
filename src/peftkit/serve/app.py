"""The HTTP side of ``peftkit serve``: OpenAI-compatible endpoints over the engine (docs/serving.md).

``/v1/models``, ``/v1/completions``, ``/v1/chat/completions`` (both streaming as server-sent events),
``/v1/classify`` (a peftkit extension, vLLM's ``/classify`` payload), and vLLM's runtime adapter
management: ``/v1/load_lora_adapter`` and ``/v1/unload_lora_adapter``. Errors use OpenAI's shape,
``{"error": {"message", "type", "param", "code"}}``, so the official clients raise their usual
exceptions. ``/health`` answers without a key (for load balancers).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError

from .adapters import AdapterPool, AdapterRefused, ServedAdapter
from .decode import Sampling
from .engine import Engine, Job, QueueFull, ShuttingDown
from .model import CLASSIFY, GENERATE, ServedBase
from .protocol import (
    ChatRequest,
    ClassifyRequest,
    CompletionRequest,
    LoadAdapterRequest,
    UnloadAdapterRequest,
    describe,
)

DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions
SAFETY_SECONDS = 10.0  # beyond the engine's timeout, before the HTTP side stops waiting for events


class HttpError(Exception):
    def __init__(
        self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None
    ):
        super().__init__(message)
        self.status, self.message, self.kind, self.code = status, message, kind, code


def create_app(
    base: ServedBase,
    pool: AdapterPool,
    engine: Engine,
    *,
    api_key: str | None = None,
    drain_seconds: float = 30.0,
    log: Callable[[str], None] = print,
) -> FastAPI:
    """The FastAPI application serving ``base`` with the adapters of ``pool`` through ``engine``."""
    started = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        yield
        # uvicorn has stopped accepting connections and waited for open ones; finish what is queued
        await asyncio.to_thread(engine.stop, drain_seconds)

    app = FastAPI(title="peftkit serve", lifespan=lifespan)

    @app.exception_handler(HttpError)
    async def _http_error(request: Request, exc: HttpError) -> JSONResponse:
        headers = {"Retry-After": "1"} if exc.status in (429, 503) else None
        return JSONResponse(_error(exc.message, exc.kind, exc.code), status_code=exc.status, headers=headers)

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise HttpError(
                401,
                "missing or wrong API key: send the header `Authorization: Bearer <key>` with the key the "
                "server was started with (--api-key or $PEFTKIT_API_KEY)",
                "authentication_error",
                "invalid_api_key",
            )

    async def body(request: Request, model: type[BaseModel]) -> Any:
        authorize(request)
        try:
            data = await request.json()
        except (ValueError, UnicodeDecodeError):
            raise HttpError(400, "the request body is not valid JSON") from None
        try:
            parsed = model.model_validate(data)
        except ValidationError as exc:
            raise HttpError(400, describe(exc, model)) from None
        problems = parsed.unsupported() if hasattr(parsed, "unsupported") else []
        if problems:
            raise HttpError(400, "; ".join(problems))
        return parsed

    async def adapter_for(name: str, kind: str) -> ServedAdapter | None:
        """The adapter a request's ``model`` names (None: the base), resident and checked."""
        if base.kind != kind:
            endpoint = "/v1/classify" if base.kind == CLASSIFY else "/v1/completions or /v1/chat/completions"
            raise HttpError(400, f"this server's base model is a {base.kind} model: use {endpoint}")
        if name == base.id:
            return None
        adapter = await asyncio.to_thread(pool.find, name)
        if adapter is None:
            names = [base.id] + [a.name for a in pool.available()]
            raise HttpError(
                404,
                f"The model `{name}` does not exist. Models on this server: {', '.join(names)} (GET /v1/models)",
                code="model_not_found",
            )
        if not adapter.resident:  # load it now, so that bad files are refused before any answer starts
            try:
                await asyncio.wrap_future(engine.call(lambda: _resident_or_wait(pool, adapter)))
            except AdapterRefused as exc:
                pool.forget(adapter)
                raise HttpError(exc.status, str(exc)) from None
        return adapter

    def submit(jobs: list[Job]) -> None:
        try:
            for job in jobs:
                engine.submit(job)
        except (QueueFull, ShuttingDown) as exc:
            for job in jobs:
                job.cancelled = True
            raise HttpError(
                429 if isinstance(exc, QueueFull) else 503, str(exc), "rate_limit_error"
            ) from None

    def new_job(index: int, queue: asyncio.Queue, adapter: ServedAdapter | None, **fields: Any) -> Job:
        job = Job(
            adapter=adapter,
            deadline=time.monotonic() + engine.timeout,
            loop=asyncio.get_running_loop(),
            events=queue,
            index=index,
            **fields,
        )
        return job

    # -- the model list ----------------------------------------------------------------------------

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "load": engine.load}

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        authorize(request)
        data = [
            {
                "id": base.id,
                "object": "model",
                "created": started,
                "owned_by": "peftkit",
                "root": base.source,
                "parent": None,
                "max_model_len": base.context,
            }
        ]
        for adapter in await asyncio.to_thread(pool.available):
            data.append(
                {
                    "id": adapter.name,
                    "object": "model",
                    "created": adapter.created,
                    "owned_by": "peftkit",
                    "root": adapter.source,
                    "parent": base.id,
                    "resident": adapter.resident,
                }
            )
        return {"object": "list", "data": data}

    # -- generation --------------------------------------------------------------------------------

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        req: CompletionRequest = await body(request, CompletionRequest)
        adapter = await adapter_for(req.model, GENERATE)
        prompts = [base.encode_text(p) for p in req.prompts()]
        limit = req.max_tokens or DEFAULT_COMPLETION_TOKENS
        return await generate(req, adapter, prompts, limit, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        req: ChatRequest = await body(request, ChatRequest)
        adapter = await adapter_for(req.model, GENERATE)
        try:
            prompt = base.encode_chat(req.conversation())
        except (ValueError, KeyError, TypeError) as exc:
            raise HttpError(
                400, f"messages: cannot render this conversation with the model's chat template: {exc}"
            ) from None
        limit = req.limit() or max(1, base.context - len(prompt))
        return await generate(req, adapter, [prompt], limit, chat=True)

    async def generate(
        req: Any, adapter: ServedAdapter | None, prompts: list[list[int]], limit: int, chat: bool
    ) -> Response:
        for prompt in prompts:
            if not prompt:
                raise HttpError(
                    400, f"{'messages' if chat else 'prompt'}: encodes to no tokens; send some text"
                )
            if len(prompt) + limit > base.context:
                raise HttpError(
                    400,
                    f"This model's maximum context length is {base.context} tokens. However, you requested "
                    f"{len(prompt) + limit} tokens ({len(prompt)} in the {'messages' if chat else 'prompt'}, "
                    f"{limit} in the completion). Please reduce the length of the "
                    f"{'messages' if chat else 'prompt'} or the completion.",
                    code="context_length_exceeded",
                )
        queue: asyncio.Queue = asyncio.Queue()
        jobs = [
            new_job(
                i,
                queue,
                adapter,
                kind="generate",
                prompt=prompt,
                sampling=Sampling(limit, req.temperature, req.top_p, req.stop, req.seed),
            )
            for i, prompt in enumerate(prompts)
        ]
        submit(jobs)
        ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        if req.stream:
            usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(
                _stream(jobs, queue, ident, req.model, chat, usage, engine.timeout),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        texts = [""] * len(jobs)
        finish: list[str | None] = [None] * len(jobs)
        tokens = [0] * len(jobs)
        try:
            async for index, event in _events(jobs, queue, engine.timeout):
                if event[0] == "text":
                    texts[index] += event[1]
                elif event[0] == "done":
                    finish[index], tokens[index] = event[1], event[3]
        finally:
            for job in jobs:
                job.cancelled = True  # a no-op for finished jobs; frees the rows of an abandoned request
        choices = [
            (
                {
                    "index": i,
                    "message": {"role": "assistant", "content": t},
                    "logprobs": None,
                    "finish_reason": f,
                }
                if chat
                else {"index": i, "text": t, "logprobs": None, "finish_reason": f}
            )
            for i, (t, f) in enumerate(zip(texts, finish))
        ]
        prompt_tokens = sum(len(p) for p in prompts)
        return JSONResponse(
            {
                "id": ident,
                "object": "chat.completion" if chat else "text_completion",
                "created": int(time.time()),
                "model": req.model,
                "choices": choices,
                "usage": {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": sum(tokens),
                    "total_tokens": prompt_tokens + sum(tokens),
                },
            }
        )

    # -- classification --------------------------------------------------------------------------------

    async def classify(request: Request) -> Response:
        req: ClassifyRequest = await body(request, ClassifyRequest)
        adapter = await adapter_for(req.model, CLASSIFY)
        texts = req.texts()
        queue: asyncio.Queue = asyncio.Queue()
        chunks = [texts[i : i + engine.max_batch] for i in range(0, len(texts), engine.max_batch)]
        jobs = [new_job(i, queue, adapter, kind="classify", texts=chunk) for i, chunk in enumerate(chunks)]
        submit(jobs)
        results: list[list[dict[str, Any]]] = [[] for _ in jobs]
        try:
            async for index, event in _events(jobs, queue, engine.timeout):
                results[index] = event[1]
        finally:
            for job in jobs:
                job.cancelled = True
        data = [dict(index=i, **r) for i, r in enumerate(r for chunk in results for r in chunk)]
        tokens = sum(len(base.tokenizer(t)["input_ids"]) for t in texts)
        return JSONResponse(
            {
                "id": f"classify-{uuid.uuid4().hex}",
                "object": "list",
                "created": int(time.time()),
                "model": req.model,
                "data": data,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            }
        )

    app.post("/v1/classify")(classify)
    app.post("/classify")(classify)  # vLLM's path for the same payload

    # -- adapters at runtime (vLLM's endpoints and payloads) ----------------------------------------

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(request: Request) -> Response:
        req: LoadAdapterRequest = await body(request, LoadAdapterRequest)

        def load() -> None:
            if req.load_inplace and pool.get(req.lora_name) is not None:
                pool.unload(req.lora_name)
            adapter = pool.register(req.lora_name, req.lora_path, runtime=True)
            try:
                pool.make_resident(adapter, over_limit=True)
            except AdapterRefused:
                pool.forget(adapter)
                raise

        try:
            await asyncio.wrap_future(engine.call(load))
        except AdapterRefused as exc:
            log(f"peftkit serve: refused adapter {req.lora_name!r} from {req.lora_path!r}: {exc}")
            raise HttpError(exc.status, str(exc)) from None
        log(f"peftkit serve: loaded adapter {req.lora_name!r} from {req.lora_path!r}")
        return PlainTextResponse(f"Success: LoRA adapter '{req.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(request: Request) -> Response:
        req: UnloadAdapterRequest = await body(request, UnloadAdapterRequest)
        try:
            await asyncio.wrap_future(engine.call(lambda: pool.unload(req.lora_name)))
        except AdapterRefused as exc:
            raise HttpError(exc.status, str(exc)) from None
        log(f"peftkit serve: unloaded adapter {req.lora_name!r}")
        return PlainTextResponse(f"Success: LoRA adapter '{req.lora_name}' removed successfully.")

    return app


def _resident_or_wait(pool: AdapterPool, adapter: ServedAdapter) -> None:
    # False (every slot busy) is fine here: the engine loads it when a slot frees
    pool.make_resident(adapter)


def _error(message: str, kind: str, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


async def _events(jobs: list[Job], queue: asyncio.Queue, timeout: float) -> AsyncIterator[tuple[int, tuple]]:
    """``(job index, event)`` until every job is done; an error event raises it as an HttpError."""
    open_jobs = len(jobs)
    while open_jobs:
        try:
            index, event = await asyncio.wait_for(queue.get(), timeout + SAFETY_SECONDS)
        except asyncio.TimeoutError:
            raise HttpError(504, "the server did not answer in time") from None
        if event[0] == "error":
            raise HttpError(
                event[1], event[2], "server_error" if event[1] >= 500 else "invalid_request_error"
            )
        yield index, event
        if event[0] in ("done", "result"):
            open_jobs -= 1


async def _stream(
    jobs: list[Job], queue: asyncio.Queue, ident: str, model: str, chat: bool, usage: bool, timeout: float
) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's chunk format, ending with ``data: [DONE]``."""
    created = int(time.time())
    kind = "chat.completion.chunk" if chat else "text_completion"

    def chunk(choices: list[dict[str, Any]], **extra: Any) -> str:
        body = {"id": ident, "object": kind, "created": created, "model": model, "choices": choices, **extra}
        return f"data: {json.dumps(body)}\n\n"

    def choice(index: int, text: str | None, finish: str | None, role: bool = False) -> dict[str, Any]:
        if not chat:
            return {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish}
        delta: dict[str, Any] = {"role": "assistant"} if role else {}
        if text is not None:
            delta["content"] = text
        return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}

    prompt_tokens = completion_tokens = 0
    try:
        if chat:
            yield chunk([choice(j.index, "", None, role=True) for j in jobs])
        async for index, event in _events(jobs, queue, timeout):
            if event[0] == "text":
                yield chunk([choice(index, event[1], None)])
            elif event[0] == "done":
                prompt_tokens, completion_tokens = prompt_tokens + event[2], completion_tokens + event[3]
                yield chunk([choice(index, None if chat else "", event[1])])
        if usage:
            total = prompt_tokens + completion_tokens
            yield chunk(
                [],
                usage={
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": completion_tokens,
                    "total_tokens": total,
                },
            )
        yield "data: [DONE]\n\n"
    except HttpError as exc:  # the answer has started: the error goes in the stream
        yield f"data: {json.dumps(_error(exc.message, exc.kind, exc.code))}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        for job in jobs:
            job.cancelled = True  # the client went away, or the stream ended: free the rows

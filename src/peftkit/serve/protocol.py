"""Request bodies of the OpenAI-compatible endpoints, checked strictly.

Unknown fields are refused (a typo such as ``max_token`` would otherwise be silently ignored), and so
are OpenAI fields this server does not implement when they ask for something (``n: 2``, ``logprobs``,
penalties): the client is told which field and what to do, instead of getting an answer that ignored it.
"""

from __future__ import annotations

import difflib
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

MAX_STOPS = 4  # as OpenAI's API


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class _Sampled(BaseModel):
    """What completions and chat completions share."""

    model_config = ConfigDict(extra="forbid")

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    stop: str | list[str] | None = Field(default=None, validate_default=True)
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # accepted at their defaults only (see unsupported())
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > MAX_STOPS:
            raise ValueError(f"at most {MAX_STOPS} stop sequences, got {len(stops)}")
        if any(not s for s in stops):
            raise ValueError("a stop sequence must not be empty")
        return stops

    def unsupported(self) -> list[str]:
        """Fields asking for what this server does not do, each with what to send instead."""
        out = []
        if self.n != 1:
            out.append(
                f"n: this server returns one choice per prompt (got n={self.n}); send n=1 and repeat the request"
            )
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                out.append(f"{name}: not supported; leave it out (or 0)")
        if self.logit_bias:
            out.append("logit_bias: not supported; leave it out")
        return out


class CompletionRequest(_Sampled):
    prompt: str | list[str]
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and not value:
            raise ValueError("give at least one prompt")
        return value

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    def unsupported(self) -> list[str]:
        out = super().unsupported()
        if self.echo:
            out.append("echo: not supported; leave it out (the prompt is what you sent)")
        if self.logprobs is not None:
            out.append("logprobs: not supported; leave it out")
        if self.best_of not in (None, 1):
            out.append("best_of: not supported; leave it out")
        if self.suffix:
            out.append("suffix: not supported (no fill-in-the-middle); leave it out")
        return out


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatRequest(_Sampled):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False

    def limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def conversation(self) -> list[dict[str, str]]:
        # "developer" is the newer name of the system role
        return [
            {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
            for m in self.messages
        ]

    def unsupported(self) -> list[str]:
        out = super().unsupported()
        if self.logprobs:
            out.append("logprobs: not supported; leave it out")
        return out


class ClassifyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    input: str | list[str]
    user: str | None = None

    def texts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)

    @field_validator("input")
    @classmethod
    def _input(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and not value:
            raise ValueError("give at least one text")
        return value


class LoadAdapterRequest(BaseModel):
    """vLLM's payload for ``/v1/load_lora_adapter``."""

    model_config = ConfigDict(extra="forbid")
    lora_name: str
    lora_path: str
    load_inplace: bool = False


class UnloadAdapterRequest(BaseModel):
    """vLLM's payload for ``/v1/unload_lora_adapter``."""

    model_config = ConfigDict(extra="forbid")
    lora_name: str
    lora_int_id: int | None = None


def describe(error: ValidationError | Any, model: type[BaseModel] | None) -> str:
    """One message naming every invalid field, with the close field name for a misspelt one."""
    problems = []
    for item in error.errors():
        loc = [part for part in item["loc"] if part != "body"]
        where = ".".join(str(part) for part in loc) or "body"
        if item["type"] == "extra_forbidden" and model is not None and len(loc) == 1:
            known = list(model.model_fields)
            close = difflib.get_close_matches(str(item["loc"][-1]), known, n=1, cutoff=0.6)
            hint = f"did you mean {close[0]!r}?" if close else f"fields: {', '.join(known)}"
            problems.append(f"{where}: unknown field; {hint}")
        else:
            problems.append(f"{where}: {item['msg']}")
    return "; ".join(problems)

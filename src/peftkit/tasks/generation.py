"""Text generation for the generation tasks: the run's decoding settings as a transformers
``GenerationConfig``, batched generation in input order, and streaming one answer to a terminal.

The settings come from the run config's ``generation`` section (``peftkit.tasks.config.GenerationSettings``):
greedy unless sampling is asked for, so evaluation metrics are deterministic. Sampling draws from a
generator seeded with ``generation.seed`` inside a forked random state, so a sampled evaluation can be
repeated and does not disturb the caller's random numbers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from ..data.config import padded_width
from ..models import quiet_transformers
from .base import eval_mode
from .config import EvalConfig, GenerationSettings


def settings_of(generation: GenerationSettings, eval: EvalConfig) -> GenerationSettings:
    """The settings generation runs with: the ``generation`` section, with the older
    ``eval.max_new_tokens`` applied when it is set."""
    import dataclasses

    if eval.max_new_tokens is not None:
        return dataclasses.replace(generation, max_new_tokens=eval.max_new_tokens)
    return generation


def samples(settings: GenerationSettings) -> bool:
    """Whether the settings sample: ``do_sample`` when given, else whenever a sampling knob is set."""
    if settings.do_sample is not None:
        return settings.do_sample
    return bool(settings.temperature) or settings.top_p is not None or settings.top_k is not None


def generation_config(settings: GenerationSettings, model: nn.Module, tokenizer: Any, pad_id: int) -> Any:
    """A transformers ``GenerationConfig`` for ``settings`` that stops at any of the model's stop tokens."""
    from transformers import GenerationConfig

    sampling = samples(settings)
    knobs: dict[str, Any] = {}
    if sampling:
        knobs = {
            "temperature": settings.temperature or 1.0,
            "top_p": settings.top_p or 1.0,
            "top_k": settings.top_k or 0,
        }
    return GenerationConfig(
        max_new_tokens=settings.max_new_tokens,
        do_sample=sampling,
        num_beams=settings.num_beams,
        repetition_penalty=settings.repetition_penalty,
        pad_token_id=pad_id,
        eos_token_id=stop_ids(model, tokenizer),
        decoder_start_token_id=getattr(model.config, "decoder_start_token_id", None),
        **knobs,
    )


def stop_ids(model: nn.Module, tokenizer: Any) -> list[int] | None:
    """The tokenizer's EOS and any end-of-turn tokens the model's own generation config lists."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    own = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids += [own] if isinstance(own, int) else list(own or [])
    return list(dict.fromkeys(ids)) or None


def pad(
    sequences: Sequence[Sequence[int]], value: int, side: str, multiple: int = 1, limit: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(padded [B, T], mask [B, T])``: sequences padded with ``value`` on the ``side`` ("left"/"right"),
    T the longest length, rounded up by :func:`padded_width`."""
    width = padded_width(max((len(s) for s in sequences), default=0), multiple, limit)
    out = torch.full((len(sequences), width), value, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, seq in enumerate(sequences):
        if seq:
            where = slice(width - len(seq), width) if side == "left" else slice(0, len(seq))
            out[i, where] = torch.tensor(list(seq), dtype=torch.long)
            mask[i, where] = 1
    return out, mask


def generate_texts(
    model: nn.Module,
    tokenizer: Any,
    inputs: Sequence[Sequence[int]],
    batch_size: int,
    settings: GenerationSettings,
    pad_id: int,
    *,
    left_pad: bool,
    streamer: Any = None,
) -> list[str]:
    """Generations for token-id inputs, decoded without special tokens and stripped, in input order.

    Decoders get left-padded prompts and their output after the prompt; encoder-decoders get
    right-padded sources and their whole decoder output. ``streamer`` (a transformers streamer) gets
    the tokens as they come; it needs a single input.
    """
    check_batch_size(batch_size)
    if streamer is not None and len(inputs) != 1:
        raise ValueError(f"streaming shows one answer at a time; got {len(inputs)} inputs")
    config = generation_config(settings, model, tokenizer, pad_id)
    device = next(model.parameters()).device
    # Similar lengths in a batch keep padding, and so generation time, small.
    order = sorted(range(len(inputs)), key=lambda i: len(inputs[i]))
    out = [""] * len(inputs)
    with eval_mode(model), quiet_transformers(), _seeded(settings, device):
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            ids, mask = pad([inputs[i] for i in idx], pad_id, side="left" if left_pad else "right")
            generated = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                generation_config=config,
                streamer=streamer,
            )
            new = generated[:, ids.shape[1] :] if left_pad else generated
            for i, text in zip(idx, tokenizer.batch_decode(new, skip_special_tokens=True)):
                out[i] = text.strip()
    return out


def check_batch_size(batch_size: int) -> None:
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")


@contextlib.contextmanager
def _seeded(settings: GenerationSettings, device: torch.device) -> Iterator[None]:
    if not samples(settings):
        yield
        return
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(settings.seed)
        yield


def terminal_streamer(tokenizer: Any) -> Any:
    """A streamer printing the answer (not the prompt) to standard output as tokens arrive."""
    from transformers import TextStreamer

    return TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)

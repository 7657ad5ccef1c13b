"""Continuous batching for generation: rows join and leave the running batch between decode steps.

Each row is one request with its own adapter, sampling settings and random generator. New rows are
prefilled together (left-padded), then their key/value caches are left-padded to the running batch's
length and concatenated to it; finished rows are cut out and all-padding columns trimmed. Positions
are given explicitly (real tokens before each one), so padding never shifts a row's rotary positions,
and padded cache entries are masked: a row's tokens are those it would get alone, within float rounding.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

STOP, LENGTH = "stop", "length"


@dataclass
class Sampling:
    """A request's decoding settings (OpenAI semantics: temperature 0 is greedy)."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: Sequence[str] = ()
    seed: int | None = None


@dataclass
class Row:
    """One generation: its prompt, its tokens so far and the text already delivered."""

    prompt: list[int]
    sampling: Sampling
    route: str | None  # the adapter's name on the model; None: the base
    on_text: Callable[[str], None]
    generated: list[int] = field(default_factory=list)
    sent: int = 0  # characters of the text delivered through on_text
    finish: str | None = None
    generator: torch.Generator = field(init=False)

    def __post_init__(self) -> None:
        seed = self.sampling.seed if self.sampling.seed is not None else random.getrandbits(63)
        self.generator = torch.Generator().manual_seed(seed)

    def choose(self, logits: torch.Tensor) -> int:
        """The next token from this row's last-position ``logits`` (vocab,)."""
        s = self.sampling
        if s.temperature == 0:
            return int(logits.argmax())
        probs = torch.softmax(logits.float().cpu() / s.temperature, dim=-1)
        if s.top_p < 1:
            ordered, order = probs.sort(descending=True)
            # keep the smallest set of tokens whose mass reaches top_p (the top token always stays)
            drop = ordered.cumsum(-1) - ordered >= s.top_p
            ordered[drop] = 0
            probs = torch.zeros_like(probs).scatter_(0, order, ordered)
        return int(torch.multinomial(probs, 1, generator=self.generator))

    def add(self, token: int, tokenizer: Any, stop_ids: Sequence[int], context: int) -> None:
        """Take ``token``; deliver the new text and set ``finish`` when the row is done."""
        s = self.sampling
        if token in stop_ids:
            self.finish = STOP
        else:
            self.generated.append(token)
        text = tokenizer.decode(self.generated, skip_special_tokens=True)
        if s.stop:
            hits = [i for i in (text.find(stop, max(0, self.sent - len(stop))) for stop in s.stop) if i >= 0]
            if hits:
                text, self.finish = text[: min(hits)], STOP
        if self.finish is None and (
            len(self.generated) >= s.max_tokens or len(self.prompt) + len(self.generated) >= context
        ):
            self.finish = LENGTH
        safe = len(text)
        if self.finish is None:
            # hold back what may be the start of a stop string, or half of a multi-byte character
            safe -= max((len(stop) - 1 for stop in s.stop), default=0)
            while safe > self.sent and text[safe - 1] == "\ufffd":
                safe -= 1
        if safe > self.sent:
            self.on_text(text[self.sent : safe])
            self.sent = safe


class DecodeBatch:
    """The running batch: rows, their key/value cache, attention mask and next input tokens."""

    def __init__(self, model: nn.Module, tokenizer: Any, stop_ids: Sequence[int], context: int, pad_id: int):
        self.model, self.tokenizer, self.stop_ids, self.context = model, tokenizer, list(stop_ids), context
        self.pad_id = pad_id
        self.rows: list[Row] = []
        self.cache: Any = None
        self.mask: torch.Tensor | None = None
        self.next: torch.Tensor | None = None  # (rows,) the token each row feeds next
        self.device = next(model.parameters()).device
        accepted = _parameters(model)
        self._keep_one = "logits_to_keep" in accepted
        # transformers >= 5.2x names the cache argument `cache`; older releases `past_key_values`
        self._cache_arg = "cache" if "cache" in accepted else "past_key_values"

    # -- rows join -----------------------------------------------------------------------------------

    def admit(self, rows: list[Row], routing: Callable[[list[str | None]], Any]) -> None:
        """Prefill ``rows`` together, take their first token and add the unfinished ones to the batch."""
        width = max(len(r.prompt) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, width - len(row.prompt) :] = torch.tensor(row.prompt)
            mask[i, width - len(row.prompt) :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        cache = _new_cache()
        with routing([r.route for r in rows]):
            logits = self._forward(ids, mask, (mask.cumsum(-1) - 1).clamp(min=0), cache)
        firsts = self._take(rows, logits)
        live = [i for i, r in enumerate(rows) if r.finish is None]
        if not live:
            return
        cache, mask, firsts = _select(cache, live), mask[live], firsts[live]
        if not self.rows:
            self.rows, self.cache, self.mask, self.next = [rows[i] for i in live], cache, mask, firsts
            return
        width = max(self.mask.shape[1], mask.shape[1])
        self.cache = _concat(self.cache, self.mask.shape[1], cache, mask.shape[1], width)
        self.mask = torch.cat([_pad_left(self.mask, width), _pad_left(mask, width)])
        self.next = torch.cat([self.next, firsts])
        self.rows += [rows[i] for i in live]

    # -- one decode step -----------------------------------------------------------------------------

    def step(self, routing: Callable[[list[str | None]], Any]) -> None:
        """Feed every row its next token, take the following one; finished rows leave."""
        assert self.mask is not None and self.next is not None
        self.mask = torch.cat([self.mask, self.mask.new_ones((len(self.rows), 1))], dim=1)
        positions = self.mask.sum(-1, keepdim=True) - 1
        with routing([r.route for r in self.rows]):
            logits = self._forward(self.next[:, None], self.mask, positions, self.cache)
        self.next = self._take(self.rows, logits)
        self.drop([i for i, r in enumerate(self.rows) if r.finish is not None])

    def drop(self, indices: Sequence[int]) -> None:
        """Remove the rows at ``indices`` (finished, cancelled or out of time)."""
        if not indices:
            return
        keep = [i for i in range(len(self.rows)) if i not in set(indices)]
        self.rows = [self.rows[i] for i in keep]
        if not keep:
            self.cache = self.mask = self.next = None
            return
        assert self.mask is not None and self.next is not None
        mask = self.mask[keep]
        start = int(mask.any(0).nonzero()[0])  # columns every remaining row has as padding go
        self.cache = _select(self.cache, keep, start)
        self.mask, self.next = mask[:, start:], self.next[keep]

    # -- helpers -------------------------------------------------------------------------------------

    def _forward(
        self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: Any
    ) -> torch.Tensor:
        kwargs = {"logits_to_keep": 1} if self._keep_one else {}
        kwargs[self._cache_arg] = cache
        with torch.inference_mode():
            out = self.model(
                input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **kwargs
            )
        return out.logits[:, -1]

    def _take(self, rows: Sequence[Row], logits: torch.Tensor) -> torch.Tensor:
        tokens = [row.choose(logits[i]) for i, row in enumerate(rows)]
        for row, token in zip(rows, tokens):
            row.add(token, self.tokenizer, self.stop_ids, self.context)
        return torch.tensor(tokens, device=self.device)


def _parameters(model: nn.Module) -> set[str]:
    import inspect

    try:
        return set(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return set()


def _new_cache(layers: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> Any:
    from transformers import DynamicCache

    return DynamicCache(ddp_cache_data=layers) if layers is not None else DynamicCache()


def _layers(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(layer.keys, layer.values) for layer in cache.layers]


def _select(cache: Any, rows: Sequence[int], start: int = 0) -> Any:
    index = torch.tensor(list(rows), device=cache.layers[0].keys.device)
    return _new_cache([(k[index, :, start:], v[index, :, start:]) for k, v in _layers(cache)])


def _pad_left(t: torch.Tensor, width: int) -> torch.Tensor:
    """Zero-pad the last dimension of a mask (B, T) on the left to ``width``."""
    return F.pad(t, (width - t.shape[-1], 0))


def _concat(a: Any, a_len: int, b: Any, b_len: int, width: int) -> Any:
    """Two caches as one batch, each left-padded along the sequence to ``width`` positions."""

    def pad(t: torch.Tensor, length: int) -> torch.Tensor:  # (B, heads, T, dim)
        return F.pad(t, (0, 0, width - length, 0))

    return _new_cache(
        [
            (torch.cat([pad(ka, a_len), pad(kb, b_len)]), torch.cat([pad(va, a_len), pad(vb, b_len)]))
            for (ka, va), (kb, vb) in zip(_layers(a), _layers(b))
        ]
    )

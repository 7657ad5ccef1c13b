"""Sequence-to-sequence generation with an encoder-decoder (T5, BART, Marian ...): ``task: seq2seq``.

An example is ``{"source": str, "target": str}`` (``data.columns`` maps file columns to these roles;
the bundled ``freedict_eng_fra`` gives English headwords and French translations). The encoder reads
the source, truncated to ``data.max_length`` tokens; the decoder learns the target, which always ends
with the EOS token so generation learns to stop (appended when the tokenizer's own post-processing
does not add it). Targets are padded with -100, so padding is outside the loss; the decoder's inputs
are the targets shifted right (the model builds them from ``labels``).

``evaluate`` reports the token-mean loss on targets (teacher forcing), its perplexity, and normalised
exact match and corpus chrF of greedy generations (``generation.max_new_tokens``, greedy unless ``generation`` asks to sample); ``predict`` returns the
generated strings for sources.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..data.config import padding_multiple
from ..data.general_text import GENERAL_TEXT_SOURCE, general_texts
from ..errors import ConfigError
from ..models import explain_missing
from ..models.loading import load_pretrained
from .base import Batch, Example, eval_mode, register_task
from .causal_lm import IGNORE, GenerationTask, role_text, token_nll
from .generation import generate_texts, pad, settings_of
from .probes import BehaviourProbe, mean_pooled

ROLES = ["source", "target"]


@register_task("seq2seq")
class Seq2SeqTask(GenerationTask):
    """Encoder-decoder generation; see the module docstring for batches and metrics."""

    roles = ROLES
    input_role = ROLES[0]  # the key `peftkit predict` reads from a JSON input
    reference_role = "target"

    def load_model(self) -> nn.Module:
        """The pretrained encoder-decoder (``AutoModelForSeq2SeqLM``) in ``model.dtype``; loads the tokenizer.

        Raises:
            ConfigError: the model is not an encoder-decoder (use ``task: causal-lm`` for decoders).
            OSError: the model cannot be found (the message says where it was looked for).
        """
        from transformers import AutoConfig, AutoModelForSeq2SeqLM

        source, gguf = self.model_source(), self.model_config.gguf_file
        with explain_missing(self.model_config.name_or_path):
            model_config = AutoConfig.from_pretrained(source, **({"gguf_file": gguf} if gguf else {}))
        if not getattr(model_config, "is_encoder_decoder", False):
            raise ConfigError(
                [
                    f"model.name_or_path: {self.model_config.name_or_path!r} is a {model_config.model_type} model without "
                    "an encoder-decoder structure; use task: causal-lm for decoder-only models"
                ],
                what="seq2seq config",
            )
        return load_pretrained(
            AutoModelForSeq2SeqLM, self.model_config, source, self._load_tokenizer, ["lm_head"]
        )

    def encode_source(self, source: str) -> list[int]:
        """Encoder token ids of a source text (with the tokenizer's special tokens), truncated."""
        ids = list(self._load_tokenizer()(source, add_special_tokens=True)["input_ids"])
        return ids[: self.data.max_length]

    def encode_target(self, target: str) -> list[int]:
        """Decoder label ids of a target text, truncated, always ending with EOS."""
        tokenizer = self._load_tokenizer()
        ids = list(tokenizer(text_target=target, add_special_tokens=True)["input_ids"])
        eos = tokenizer.eos_token_id
        if eos is not None and (not ids or ids[-1] != eos):
            ids.append(eos)
        limit = self.data.max_length
        return ids if len(ids) <= limit else ids[: limit - 1] + ids[-1:]

    def collate(self, examples: Sequence[Example]) -> Batch:
        """``input_ids`` / ``attention_mask`` of the sources and ``labels`` of the targets (-100 padded)."""
        width = {"multiple": padding_multiple(self.data), "limit": self.data.max_length}
        sources = [self.encode_source(role_text(e, "source")) for e in examples]
        ids, mask = pad(sources, self._pad_id(), side="right", **width)
        targets = [self.encode_target(role_text(e, "target")) for e in examples]
        labels, _ = pad(targets, IGNORE, side="right", **width)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """Mean cross entropy over every target token of the batch (padding excluded)."""
        nll, count = token_nll(model, batch)
        return nll.sum() / count.sum().clamp(min=1)

    def behaviour_probe(self, model: nn.Module, n: int, batch_size: int) -> BehaviourProbe:
        """Mean-pooled encoder outputs for ``n`` held-out general texts (``peftkit.data.general_text``):
        what ``peftkit compare`` measures forgetting with."""
        texts = general_texts(n)
        start_id = model.config.decoder_start_token_id
        start_id = self._pad_id() if start_id is None else start_id
        features = []
        with eval_mode(model):
            device = next(model.parameters()).device
            for begin in range(0, len(texts), batch_size):
                ids, mask = pad(
                    [self.encode_source(t) for t in texts[begin : begin + batch_size]],
                    self._pad_id(),
                    side="right",
                )
                out = model(
                    input_ids=ids.to(device),
                    attention_mask=mask.to(device),
                    decoder_input_ids=torch.full((len(ids), 1), start_id, device=device),
                )
                features.append(mean_pooled(out.encoder_last_hidden_state, mask))
        return BehaviourProbe("features", GENERAL_TEXT_SOURCE, features=torch.cat(features))

    def predict(
        self, model: nn.Module, inputs: Sequence[Any], batch_size: int, *, streamer: Any = None
    ) -> list[str]:
        """The output for each source, in order, generated with the run's ``generation`` settings
        (greedy by default, ``generation.max_new_tokens`` tokens at most).

        Args:
            model: The encoder-decoder (with or without an adapter).
            inputs: Source strings, or mappings with a ``"source"`` key.
            batch_size: Sources per ``generate`` call.
        """
        sources = [self.encode_source(role_text(item, "source")) for item in inputs]
        return generate_texts(
            model,
            self._load_tokenizer(),
            sources,
            batch_size,
            settings_of(self.generation, self.eval),
            self._pad_id(),
            left_pad=False,
            streamer=streamer,
        )

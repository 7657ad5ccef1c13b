"""Prompt tuning (Lester et al. 2021, arXiv:2104.08691): ``num_virtual_tokens`` trainable embeddings in
front of the input's word embeddings. The hooks that show them to the model are in ``prompt.py``.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
from torch import nn

from ..core.registry import register_method
from ..errors import ConfigError
from .prompt import PromptLearningConfig, PromptPart, SoftPromptPart

_INITS = ("RANDOM", "TEXT", "SAMPLE_VOCAB")


@register_method("PROMPT_TUNING")
@dataclass
class PromptTuningConfig(PromptLearningConfig):
    """Prompt tuning: ``num_virtual_tokens`` trainable embeddings before the input (Lester et al. 2021).

    Attributes:
        prompt_tuning_init: ``"RANDOM"`` (N(0, 1), as the reference), ``"TEXT"`` (the word embeddings
            of ``prompt_tuning_init_text``, repeated or cut to length; the paper's ablation found inits
            from real words better than random ones) or ``"SAMPLE_VOCAB"`` (embeddings of random
            vocabulary tokens). Skipped under ``inference_mode`` (a loaded adapter overwrites it).
        prompt_tuning_init_text: The text for ``"TEXT"``.
        tokenizer_name_or_path: The tokenizer for ``"TEXT"`` (loaded with ``AutoTokenizer``).
        tokenizer_kwargs: Extra ``AutoTokenizer.from_pretrained`` arguments for ``"TEXT"``
            (``trust_remote_code`` is dropped, as the reference does).
    """

    pick_when = "you have a large model and many tasks: a few virtual token embeddings per task make the smallest files (weak on small models)"

    prompt_tuning_init: str = "RANDOM"
    prompt_tuning_init_text: str | None = None
    tokenizer_name_or_path: str | None = None
    tokenizer_kwargs: dict | None = None

    def __post_init__(self) -> None:
        if isinstance(self.tokenizer_name_or_path, os.PathLike):  # saved as JSON: keep a plain string
            self.tokenizer_name_or_path = os.fspath(self.tokenizer_name_or_path)
        super().__post_init__()

    def problems(self) -> list[str]:
        out = super().problems()
        if self.prompt_tuning_init not in _INITS:
            out.append(f"prompt_tuning_init: one of {', '.join(_INITS)}; got {self.prompt_tuning_init!r}")
        if self.prompt_tuning_init == "TEXT":
            if not self.prompt_tuning_init_text:
                out.append("prompt_tuning_init_text: required (non-empty) with prompt_tuning_init='TEXT'")
            if not self.tokenizer_name_or_path:
                out.append("tokenizer_name_or_path: required with prompt_tuning_init='TEXT'")
        elif self.tokenizer_kwargs:
            out.append("tokenizer_kwargs: only used with prompt_tuning_init='TEXT'; remove it")
        return out

    def make_part(self, model: nn.Module) -> PromptPart:
        total = self.num_virtual_tokens
        embedding = nn.Embedding(total, self.token_dim)
        if not self.inference_mode and self.prompt_tuning_init != "RANDOM":
            words = model.get_input_embeddings().weight
            ids = (
                _text_ids(self, words.shape[0])
                if self.prompt_tuning_init == "TEXT"
                else (torch.randint(0, words.shape[0], (total,)).tolist())
            )
            with torch.no_grad():
                embedding.weight.copy_(words.detach()[torch.tensor(ids, device=words.device)].float())
        return SoftPromptPart(embedding, None, total)


def _text_ids(config: PromptTuningConfig, vocab_size: int) -> list[int]:
    """The init text's token ids, repeated or cut to ``num_virtual_tokens`` (as the reference does)."""
    from transformers import AutoTokenizer

    kwargs = dict(config.tokenizer_kwargs or {})
    kwargs.pop("trust_remote_code", None)  # a saved config must not make loading run remote code
    try:
        tokenizer = AutoTokenizer.from_pretrained(config.tokenizer_name_or_path, **kwargs)
    except (OSError, ValueError) as exc:
        raise ConfigError(
            [
                f"tokenizer_name_or_path: cannot load a tokenizer from {config.tokenizer_name_or_path!r} "
                f"({exc})"
            ],
            what="PromptTuningConfig with prompt_tuning_init='TEXT'",
        ) from exc
    ids = list(tokenizer(config.prompt_tuning_init_text)["input_ids"])
    if not ids or max(ids) >= vocab_size:
        raise ConfigError(
            [
                f"prompt_tuning_init_text: tokenised to {ids[:8]!r}, which the model's {vocab_size}-word "
                "embedding cannot look up; is tokenizer_name_or_path the model's own tokenizer?"
            ],
            what="PromptTuningConfig",
        )
    need = config.num_virtual_tokens
    return (ids * math.ceil(need / len(ids)))[:need]

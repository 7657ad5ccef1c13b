"""Which pooling a text classifier's fresh head reads (``model.pooling``), decided from the model itself.

A head should read a pretrained model the way the model was trained to be read:

- a sentence-transformers model declares its pooling in ``modules.json`` and the pooling module's
  ``config.json`` (all-MiniLM-L6-v2: mean over tokens);
- a decoder's own classification head already reads the last real token;
- a plain BERT-style model keeps its trained pooler (transformers' own head).

``auto`` applies these rules in that order. The result says whether transformers' own
``AutoModelForSequenceClassification`` implements it ("native") or peftkit's
:class:`~peftkit.tasks.pooled_classifier.PooledModelForSequenceClassification` does.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

CHOICES = ("auto", "mean", "cls", "max", "last", "pooler")
# sentence-transformers' Pooling config keys, in the order a combined pooling is read
_ST_MODES = (
    ("pooling_mode_mean_tokens", "mean"),
    ("pooling_mode_cls_token", "cls"),
    ("pooling_mode_max_tokens", "max"),
    ("pooling_mode_lasttoken", "last"),
    ("pooling_mode_mean_sqrt_len_tokens", "mean"),
    ("pooling_mode_weightedmean_tokens", "mean"),
)
_ST_POOLING_TYPE = "sentence_transformers.models.Pooling"


@dataclass(frozen=True)
class Pooling:
    """The head's pooling.

    Attributes:
        mode: "mean", "cls", "max", "last" or "pooler" (the model's own head).
        native: True when transformers' own classification head does this pooling.
        reason: Why this pooling (recorded in the run's log and ``metrics.json``).
    """

    mode: str
    native: bool
    reason: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "pooling": self.mode,
            "head": "transformers" if self.native else "peftkit pooled",
            "why": self.reason,
        }


def is_decoder(config: Any) -> bool:
    """A decoder-only language model (its own classification head reads the last real token)."""
    if getattr(config, "is_encoder_decoder", False):
        return False
    names = list(getattr(config, "architectures", None) or [])
    return (
        bool(getattr(config, "is_decoder", False))
        or any(n.endswith(("ForCausalLM", "LMHeadModel")) for n in names)
        or _causal_only(config)
    )


def _causal_only(config: Any) -> bool:
    # a config built in code has no architectures: ask transformers whether this model type is causal-only
    try:
        from transformers.models.auto.modeling_auto import (
            MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
            MODEL_MAPPING_NAMES,
        )
        from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES as MASKED
    except ImportError:  # pragma: no cover - older transformers
        return False
    kind = getattr(config, "model_type", None)
    return kind in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and kind in MODEL_MAPPING_NAMES and kind not in MASKED


def declared_pooling(source: str) -> tuple[str, str] | None:
    """``(mode, file)`` of the pooling a sentence-transformers model at ``source`` declares, or None.

    ``source`` is a local directory or a hub id (read from the hub's cache or, with a network, the hub).
    """
    modules = _read_json(source, "modules.json")
    if not isinstance(modules, list):
        return None
    for module in modules:
        if isinstance(module, dict) and module.get("type") == _ST_POOLING_TYPE:
            where = "/".join(p for p in (str(module.get("path") or "").strip("/"), "config.json") if p)
            settings = _read_json(source, where)
            if not isinstance(settings, dict):
                return None
            mode = settings.get("pooling_mode")  # newer files may name it directly
            if mode in ("mean", "cls", "max", "lasttoken"):
                return ("last" if mode == "lasttoken" else mode), where
            for key, name in _ST_MODES:
                if settings.get(key):
                    return name, where
    return None


def choose_pooling(requested: str, source: str, config: Any) -> Pooling:
    """The pooling for ``model.pooling: requested`` on the model at ``source`` (its ``config``).

    Raises:
        ValueError: ``requested`` is not one of :data:`CHOICES`.
    """
    if requested not in CHOICES:
        raise ValueError(f"model.pooling must be one of {', '.join(CHOICES)}, got {requested!r}")
    decoder = is_decoder(config)
    if requested == "auto":
        declared = declared_pooling(source)
        if declared is not None:
            mode, where = declared
            return _built(mode, decoder, f"declared by the model's sentence-transformers {where}")
        if decoder:
            return Pooling("last", True, "a decoder: its own head reads the last real token")
        return Pooling(
            "pooler", True, "the model's own classification head (no sentence-transformers pooling declared)"
        )
    if requested == "pooler":
        return Pooling("pooler", True, "model.pooling: pooler (the model's own classification head)")
    return _built(requested, decoder, f"model.pooling: {requested}")


def _built(mode: str, decoder: bool, reason: str) -> Pooling:
    # a decoder's own head already pools the last real token: keep it (it exports as plain transformers)
    return Pooling(mode, mode == "last" and decoder, reason)


def _read_json(source: str, name: str) -> Any:
    try:
        from transformers.utils import cached_file

        path = cached_file(
            source,
            name,
            _raise_exceptions_for_missing_entries=False,
            _raise_exceptions_for_connection_errors=False,
        )
    except (OSError, ValueError):  # not a directory and not reachable on the hub
        return None
    if not path:
        return None
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, json.JSONDecodeError):
        return None

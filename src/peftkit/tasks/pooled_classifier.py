"""A sequence classifier that pools an encoder's token states the way the encoder was trained to be read.

transformers' ``AutoModelForSequenceClassification`` reads a BERT-style model through its ``pooler`` (a
tanh layer over [CLS] trained for next-sentence prediction). A sentence-transformers model such as
all-MiniLM-L6-v2 was trained to be read by mean pooling instead: its pooler output is small and nearly
the same for every text, so a fresh head on it has little to separate until the encoder itself moves
(docs/task-text-classification.md has the measurement). This class puts the head on the pooling the
model declares.

This file imports only torch and transformers, on purpose: ``save_pretrained`` copies it into the saved
directory (``register_for_auto_class``), so an exported model loads anywhere with
``AutoModelForSequenceClassification.from_pretrained(path, trust_remote_code=True)``, peftkit not needed.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import AutoModel, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput

POOLINGS = ("mean", "cls", "max", "last")
POOLING_KEY = "classifier_pooling"  # the config.json field naming the pooling


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor | None, mode: str) -> torch.Tensor:
    """One vector per sequence from token states ``hidden`` (batch, tokens, width).

    ``mean`` and ``max`` read only real tokens (mask 1). ``last`` takes the last real token: with left
    padding that is the final position, with right padding the position before the first pad.
    """
    if attention_mask is None:
        attention_mask = torch.ones(hidden.shape[:2], dtype=torch.long, device=hidden.device)
    mask = attention_mask.to(hidden.device)
    if mode == "cls":
        return hidden[:, 0]
    if mode == "mean":
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
    if mode == "max":
        return hidden.masked_fill(~mask.bool().unsqueeze(-1), torch.finfo(hidden.dtype).min).amax(1)
    if mode == "last":
        positions = torch.arange(mask.shape[1], device=mask.device)
        last = (positions * mask.bool()).amax(1)  # index of the last real token, whatever the padding side
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, got {mode!r}")


class PooledModelForSequenceClassification(PreTrainedModel):
    """Encoder -> pooling (``config.classifier_pooling``) -> dropout -> linear head.

    The encoder sits under its own ``base_model_prefix`` (``bert`` for BERT), and the head is called
    ``classifier`` as in ``BertForSequenceClassification``, so adapter and head keys read the same as for
    transformers' own classifier. The encoder's own pooler, unused here, is dropped.
    """

    config_class = PretrainedConfig
    supports_gradient_checkpointing = True
    _supports_sdpa = True

    def __init__(self, config: PretrainedConfig, encoder: nn.Module | None = None) -> None:
        super().__init__(config)
        if getattr(config, POOLING_KEY, None) not in POOLINGS:
            raise ValueError(
                f"config.{POOLING_KEY} must be one of {', '.join(POOLINGS)}, "
                f"got {getattr(config, POOLING_KEY, None)!r}"
            )
        if encoder is None:
            encoder = AutoModel.from_config(config)
        if getattr(encoder, "pooler", None) is not None:
            encoder.pooler = None
        self.encoder_name = getattr(encoder, "base_model_prefix", "") or "encoder"
        self.base_model_prefix = self.encoder_name
        setattr(self, self.encoder_name, encoder)
        dropout = getattr(config, "classifier_dropout", None)
        if dropout is None:
            dropout = getattr(config, "hidden_dropout_prob", 0.0)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()
        # after post_init, which leaves the pretrained encoder alone (see _init_weights)
        std = getattr(config, "initializer_range", 0.02)
        nn.init.normal_(self.classifier.weight, std=std)
        nn.init.zeros_(self.classifier.bias)

    def _init_weights(self, module: nn.Module) -> None:
        # the encoder comes pretrained and the head is initialised in __init__: nothing to redo here
        return None

    def get_input_embeddings(self) -> nn.Module:
        return getattr(self, self.encoder_name).get_input_embeddings()

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        **kwargs: Any,
    ) -> SequenceClassifierOutput:
        encoder = getattr(self, self.encoder_name)
        passed = dict(
            token_type_ids=token_type_ids,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            output_hidden_states=output_hidden_states,
            **kwargs,
        )
        passed = {k: v for k, v in passed.items() if v is not None and k != "return_dict"}
        out = encoder(input_ids=input_ids, attention_mask=attention_mask, **passed)
        mask = attention_mask
        if mask is None:
            shape = (input_ids if input_ids is not None else inputs_embeds).shape[:2]
            mask = torch.ones(shape, dtype=torch.long, device=out.last_hidden_state.device)
        pooled = pool(out.last_hidden_state, mask, getattr(self.config, POOLING_KEY))
        logits = self.classifier(self.dropout(pooled))
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(logits.float(), labels.to(logits.device))
        return SequenceClassifierOutput(
            loss=loss,
            logits=logits,
            hidden_states=out.hidden_states,
            attentions=getattr(out, "attentions", None),
        )


# save_pretrained copies this file beside the weights and names it in config.json's auto_map, so that
# AutoModelForSequenceClassification.from_pretrained(path, trust_remote_code=True) rebuilds this class.
PooledModelForSequenceClassification.register_for_auto_class("AutoModelForSequenceClassification")

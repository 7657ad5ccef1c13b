"""Soft prompts (prompt tuning, P-tuning, prefix tuning) on tiny transformers models.

These methods need a model with word embeddings and attention, so the rows build their own tiny BERT
classifier and Llama language model instead of the one-layer nets of ``_tiny.py``.
"""

import torch
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

from contract_rows import Row
from peftkit.methods.p_tuning import PromptEncoderConfig
from peftkit.methods.prefix_tuning import PrefixTuningConfig
from peftkit.methods.prompt_tuning import PromptTuningConfig

KINDS = ["bert-cls", "llama-lm"]
VOCAB = 50


def build(kind: str, seed: int = 0):
    """A tiny model of ``kind`` and a padded batch for it (row 1 ends in two padding positions)."""
    torch.manual_seed(seed)
    if kind == "bert-cls":
        model = BertForSequenceClassification(
            BertConfig(
                hidden_size=16,
                num_hidden_layers=2,
                num_attention_heads=2,
                intermediate_size=32,
                vocab_size=VOCAB,
                max_position_embeddings=32,
                num_labels=3,
            )
        )
    elif kind == "llama-lm":
        model = LlamaForCausalLM(
            LlamaConfig(
                hidden_size=16,
                intermediate_size=32,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                vocab_size=VOCAB,
                max_position_embeddings=32,
                tie_word_embeddings=False,
            )
        )
    else:
        raise ValueError(kind)
    input_ids = torch.randint(0, VOCAB, (2, 5))
    attention_mask = torch.ones(2, 5, dtype=torch.long)
    attention_mask[1, -2:] = 0
    return model, {"input_ids": input_ids, "attention_mask": attention_mask}


VARIANTS = {
    "prompt-tuning": lambda kind: PromptTuningConfig(num_virtual_tokens=3),
    "p-tuning-mlp": lambda kind: PromptEncoderConfig(num_virtual_tokens=3, encoder_hidden_size=8),
    "p-tuning-lstm": lambda kind: PromptEncoderConfig(
        num_virtual_tokens=3,
        encoder_hidden_size=8,
        encoder_reparameterization_type="LSTM",
        encoder_num_layers=1,
    ),
    "prefix-tuning": lambda kind: PrefixTuningConfig(num_virtual_tokens=3),
    "prefix-tuning-projection": lambda kind: PrefixTuningConfig(
        num_virtual_tokens=3, prefix_projection=True, encoder_hidden_size=8
    ),
}

ROWS = [
    Row(name=name, config=config, kinds=list(KINDS), mergeable=False, starts_at_base=False, build=build)
    for name, config in VARIANTS.items()
]

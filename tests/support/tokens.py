"""Tiny Llama causal LMs with tied or untied embeddings, for trainable tokens and tied-weight tests."""

from __future__ import annotations

import torch

VOCAB = 100
NEW = [96, 97, 98, 99]  # "added" tokens: the last rows, as after resize_token_embeddings


def tiny_llama(tied: bool, seed: int = 0, vocab: int = VOCAB):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab,
        max_position_embeddings=64,
        tie_word_embeddings=tied,
    )
    return LlamaForCausalLM(config).eval()


def batch(seed: int = 1) -> dict[str, torch.Tensor]:
    """Two rows of 8 tokens that use the new tokens (as inputs and as targets)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB - len(NEW), (2, 8), generator=gen)
    ids[0, 1], ids[0, 5], ids[1, 2], ids[1, 7] = NEW[0], NEW[1], NEW[2], NEW[0]
    mask = torch.ones_like(ids)
    mask[1, -1:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.clone()}


def train(model, steps: int = 3, lr: float = 1e-2) -> None:
    """A few AdamW steps on the causal-LM loss of :func:`batch` (adapters move visibly)."""
    torch.manual_seed(2)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    inputs = batch()
    for _ in range(steps):
        optimizer.zero_grad()
        model(**inputs).loss.backward()
        optimizer.step()
    model.eval()


def logits(model) -> torch.Tensor:
    inputs = {k: v for k, v in batch().items() if k != "labels"}
    with torch.no_grad():
        return model(**inputs).logits

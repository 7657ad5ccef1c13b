"""Tiny decoder and encoder-decoder models with a character tokenizer, for the generation tasks."""

from __future__ import annotations

import json

import torch

from peftkit.data.config import DataConfig
from peftkit.tasks import task_class
from peftkit.tasks.causal_lm import CausalLMTask
from peftkit.tasks.config import EvalConfig

SPECIAL = ["<pad>", "<s>", "</s>", "<unk>"]


CHARS = [chr(c) for c in range(32, 127)] + list("éèêàâçôîûù\n")


def char_tokenizer(chat_template: str | None = None):
    """A character-level fast tokenizer (pad 0, bos 1, eos 2, unk 3): offline, deterministic, tiny."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL + CHARS)}
    # BPE without merges and without a pre-tokenizer splits any text into single characters.
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    tokenizer.chat_template = chat_template
    return tokenizer


CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant: {% endif %}"
)


def tiny_llama(vocab_size: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return LlamaForCausalLM(config).eval()


def make_task(chat_template: str | None = None, **overrides) -> CausalLMTask:
    task = task_class("causal-lm")(
        data=DataConfig(max_length=overrides.pop("max_length", 64)),
        eval=EvalConfig(
            max_new_tokens=overrides.pop("max_new_tokens", 8), metrics=overrides.pop("metrics", [])
        ),
    )
    task.tokenizer = char_tokenizer(chat_template)
    return task


def tiny_t5(vocab_size: int, seed: int = 0):
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=vocab_size,
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        pad_token_id=0,
        eos_token_id=2,
        decoder_start_token_id=0,
        dropout_rate=0.0,
    )
    return T5ForConditionalGeneration(config).eval()


WORDS = ["cat", "dog", "sun", "sea", "sky", "tree", "leaf", "rock"] * 3


def llama_with_pairs(tmp_path):
    """A saved tiny Llama with a character tokenizer, and a JSONL file of prompt/response pairs."""
    model_dir = tmp_path / "llama"
    tokenizer = char_tokenizer(CHAT_TEMPLATE)
    tiny_llama(len(tokenizer)).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"say {w}", "response": w}) + "\n" for w in WORDS))
    return model_dir, pairs


def t5_with_pairs(tmp_path):
    """A saved tiny T5 with a character tokenizer, and a JSONL file of source/target (reversed) pairs."""
    model_dir = tmp_path / "t5"
    tokenizer = char_tokenizer()
    tiny_t5(len(tokenizer)).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"source": w, "target": w[::-1]}) + "\n" for w in WORDS))
    return model_dir, pairs

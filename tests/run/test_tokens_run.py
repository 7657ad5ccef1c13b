"""A run that adds chat special tokens to a base model (``data.add_special_tokens``, issue 21 item 3): the
tokenizer gains them, the embeddings grow, the adapter trains their rows (in the input embedding and the
untied head; a tied head follows), the tokenizer is saved beside the adapter and used again by
predict and merge, and the reference library reads the adapter directory as it is. Tiny Llama models
with a character tokenizer, as in tests/run/test_chat.py."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors import safe_open

import peftkit
from peftkit.data.config import DataConfig
from peftkit.errors import ConfigError
from peftkit.models.config import ModelConfig
from peftkit.run.config import load_config
from peftkit.run.runner import load_run, merge_run, predict_run, train_run
from peftkit.run.schema import RunConfig
from support.generation import WORDS, char_tokenizer, tiny_llama

TOKENS = ["<|im_start|>", "<|im_end|>"]
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _base(directory, tied: bool):
    tokenizer = char_tokenizer()
    model = tiny_llama(len(tokenizer))
    if tied:
        model.config.tie_word_embeddings = True
        model.lm_head.weight = model.model.embed_tokens.weight
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return len(tokenizer)


def _config(root, adapter, tied=False) -> RunConfig:
    vocab = _base(root / "base", tied)
    pairs = root / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"say {w}", "response": w}) + "\n" for w in WORDS))
    config = RunConfig(
        task="causal-lm",
        model=ModelConfig(name_or_path=str(root / "base")),
        data=DataConfig(
            files=str(pairs), max_length=48, chat_template=CHATML, add_special_tokens=list(TOKENS)
        ),
        adapter=adapter,
        output_dir=str(root / "run"),
    )
    config.train.steps, config.train.batch_size, config.train.lr = 8, 8, 2e-2
    config.train.progress = config.train.tensorboard = False
    config.generation.max_new_tokens = 4
    return config, vocab


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokens-lora")
    config, vocab = _config(root, {"method": "lora", "r": 4, "target_modules": ["q_proj", "v_proj"]})
    assert train_run(config, log=lambda line: None).ok
    return root, vocab


def test_the_run_trains_the_new_rows_of_the_embedding_and_the_untied_head(lora_run):
    root, vocab = lora_run
    adapter = root / "run" / "adapter"
    ids = [vocab, vocab + 1]
    saved = json.loads((adapter / "adapter_config.json").read_text())
    assert saved["trainable_token_indices"] == {"model.embed_tokens": ids, "lm_head": ids}
    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as handle:
        rows = {k: handle.get_tensor(k) for k in handle.keys() if "token_adapter" in k}
    assert set(rows) == {
        "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta",
        "base_model.model.lm_head.token_adapter.trainable_tokens_delta",
    }
    base = load_run(root / "run").model
    start = base.model.embed_tokens.base_layer.weight[:vocab].float().mean(0)  # where new rows began
    embedded = rows["base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"]
    assert (embedded - start).abs().max() > 1e-3  # trained away from the mean start


def test_the_tokenizer_is_saved_with_the_adapter_and_used_again(lora_run):
    root, vocab = lora_run
    adapter = root / "run" / "adapter"
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(adapter)
    assert len(tokenizer) == vocab + 2 and tokenizer.convert_tokens_to_ids(TOKENS) == [vocab, vocab + 1]
    loaded = load_run(root / "run")
    assert len(loaded.task.tokenizer) == vocab + 2
    assert loaded.model.get_input_embeddings().weight.shape[0] == vocab + 2
    assert len(predict_run(root / "run", ["say cat"])) == 1


def test_merge_exports_the_grown_model_with_its_tokenizer(lora_run):
    root, vocab = lora_run
    out = merge_run(root / "run", root / "merged")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert merged.config.vocab_size == vocab + 2 and len(AutoTokenizer.from_pretrained(out)) == vocab + 2
    ids = torch.tensor([[vocab, 5, 6, vocab + 1, 7]])
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, load_run(root / "run").model(ids).logits, atol=1e-5)


def test_the_reference_library_reads_the_adapter_directory_as_it_is(lora_run):
    """A peft user: tokenizer from the adapter directory, the base resized to it, the adapter loaded."""
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root, vocab = lora_run
    adapter = root / "run" / "adapter"
    tokenizer = AutoTokenizer.from_pretrained(adapter)
    base = AutoModelForCausalLM.from_pretrained(root / "base")
    base.resize_token_embeddings(len(tokenizer))  # new rows sampled at random: the adapter replaces them
    theirs = peft.PeftModel.from_pretrained(base, adapter).eval()
    ids = torch.tensor([[vocab, 5, 6, vocab + 1, 7]])
    with torch.no_grad():
        assert torch.allclose(theirs(ids).logits, load_run(root / "run").model(ids).logits, atol=1e-5)


def test_on_a_tied_model_trainable_tokens_take_the_new_ids_and_the_head_follows(tmp_path):
    config, vocab = _config(tmp_path, {"method": "trainable_tokens"}, tied=True)
    assert train_run(config, log=lambda line: None).ok
    saved = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert saved["token_indices"] == [vocab, vocab + 1] and saved["target_modules"] == "model.embed_tokens"
    loaded = load_run(tmp_path / "run")
    assert isinstance(loaded.model.lm_head, peftkit.core.layer.AdapterLayer)
    adapted = copy.deepcopy(loaded.model)
    merged = merge_run(tmp_path / "run", tmp_path / "merged")
    from transformers import AutoModelForCausalLM

    again = AutoModelForCausalLM.from_pretrained(merged).eval()
    assert again.config.tie_word_embeddings and again.lm_head.weight is again.model.embed_tokens.weight
    ids = torch.tensor([[vocab, 5, vocab + 1]])
    with torch.no_grad():
        assert torch.allclose(again(ids).logits, adapted(ids).logits, atol=1e-5)


def test_a_method_that_cannot_train_token_rows_is_refused_up_front(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        "task: causal-lm\nmodel: {name_or_path: smollm2-135m-instruct}\ndata: {name: freedict_eng_fra, "
        "add_special_tokens: ['<|a|>']}\nadapter: {method: ia3}\n",
        encoding="utf-8",
    )
    with pytest.raises(
        ConfigError, match=r"data.add_special_tokens: adapter.method 'ia3' cannot train.*lora"
    ):
        load_config(path)
    path.write_text("task: text-classification\ndata: {name: rotten_tomatoes, add_special_tokens: ['<x>']}\n")
    with pytest.raises(ConfigError, match="data.add_special_tokens: only causal-lm runs read it"):
        load_config(path)
    path.write_text("task: causal-lm\ndata: {name: freedict_eng_fra, add_special_tokens: ['<x>', '<x>']}\n")
    with pytest.raises(ConfigError, match="listed more than once"):
        load_config(path)

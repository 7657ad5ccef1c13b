"""Seq2seq task (``task: seq2seq``) on a tiny T5 with a character-level tokenizer, with and without LoRA."""

from __future__ import annotations

import math
import random

import pytest
import torch

import peftkit
from peftkit.data.config import DataConfig
from peftkit.errors import ConfigError
from peftkit.models.config import ModelConfig
from peftkit.tasks import task_class
from peftkit.tasks.causal_lm import IGNORE, token_nll
from peftkit.tasks.config import EvalConfig
from peftkit.tasks.seq2seq import Seq2SeqTask
from support.generation import char_tokenizer, tiny_t5

PAIRS = [
    {"source": "cat", "target": "chat"},
    {"source": "the dog", "target": "le chien"},
    {"source": "bread", "target": "pain"},
]


def make_task(**overrides) -> Seq2SeqTask:
    task = task_class("seq2seq")(
        data=DataConfig(max_length=overrides.pop("max_length", 32)),
        eval=EvalConfig(max_new_tokens=overrides.pop("max_new_tokens", 12)),
    )
    task.tokenizer = char_tokenizer()
    return task


def test_registered():
    assert task_class("seq2seq") is Seq2SeqTask
    assert Seq2SeqTask.default_metric == "chrf" and Seq2SeqTask.greater_is_better


def test_collate_pads_labels_with_ignore_and_ends_targets_with_eos():
    task = make_task()
    batch = task.collate(PAIRS)
    eos, pad_id = task.tokenizer.eos_token_id, task.tokenizer.pad_token_id
    assert batch["input_ids"].shape == (3, len("the dog"))
    assert batch["attention_mask"].sum(1).tolist() == [3, 7, 5]
    assert (batch["input_ids"][0, 3:] == pad_id).all()
    for row, pair in enumerate(PAIRS):
        n = len(pair["target"]) + 1
        assert batch["labels"][row, n - 1].item() == eos
        assert task.tokenizer.decode(batch["labels"][row, : n - 1]) == pair["target"]
        assert (batch["labels"][row, n:] == IGNORE).all()


def test_truncation_keeps_eos():
    task = make_task(max_length=5)
    labels = task.encode_target("a long target")
    assert len(labels) == 5 and labels[-1] == task.tokenizer.eos_token_id
    assert len(task.encode_source("a long source")) == 5


def test_loss_is_the_mean_over_target_tokens_and_batch_invariant():
    task = make_task()
    model = tiny_t5(len(task.tokenizer))
    batch = task.collate(PAIRS)
    with torch.no_grad():
        loss = task.loss(model, batch)
        reference = model(**batch).loss  # transformers' own mean over non-ignored label tokens
        nll, count = token_nll(model, batch)
        assert loss.item() == pytest.approx(reference.item(), rel=1e-5)
        for i, pair in enumerate(PAIRS):
            alone_nll, alone_count = token_nll(model, task.collate([pair]))
            assert alone_count.item() == count[i].item() == len(pair["target"]) + 1
            assert alone_nll.item() == pytest.approx(nll[i].item(), rel=1e-5, abs=1e-5)


def test_batched_generation_equals_one_at_a_time():
    task = make_task(max_new_tokens=6)
    model = tiny_t5(len(task.tokenizer), seed=2)
    sources = ["a", "a much longer source", {"source": "medium"}]
    together = task.predict(model, sources, batch_size=3)
    assert together == [task.predict(model, [s], batch_size=1)[0] for s in sources]


def _train(task, model, steps: int, lr: float) -> list[float]:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    model.train()
    for step in range(steps):
        loss = task.loss(model, task.collate(random.Random(step).sample(PAIRS, len(PAIRS))))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_trained_model_generates_the_targets():
    task = make_task()
    model = tiny_t5(len(task.tokenizer))
    before = task.evaluate(model, PAIRS, batch_size=2)
    losses = _train(task, model, steps=150, lr=1e-2)
    assert losses[-1] < 0.1 * losses[0]
    after = task.evaluate(model, PAIRS, batch_size=2)
    assert task.predict(model, PAIRS, batch_size=3) == [p["target"] for p in PAIRS]
    assert after["exact_match"] == 1.0 and after["chrf"] == pytest.approx(100.0)
    assert before["exact_match"] == 0.0 and after["loss"] < before["loss"]
    assert after["perplexity"] == pytest.approx(math.exp(after["loss"]))


def test_lora_on_q_v_learns_and_round_trips(tmp_path):
    task = make_task()
    model = tiny_t5(len(task.tokenizer))
    peftkit.inject(model, peftkit.make_config("lora", r=4, lora_alpha=8, target_modules=["q", "v"]))
    adapted = [n for n, m in model.named_modules() if type(m).__name__ == "LoraLinear"]
    assert len(adapted) == 2 * (
        2 + 2 * 2
    )  # q and v of 2 encoder self-, 2 decoder self- and 2 cross-attentions
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    losses = _train(task, model, steps=40, lr=1e-2)
    assert losses[-1] < 0.5 * losses[0]
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    peftkit.save_adapter(model, tmp_path / "adapter")
    fresh = tiny_t5(len(task.tokenizer))
    peftkit.load_adapter(fresh, tmp_path / "adapter")
    assert task.predict(fresh, PAIRS, batch_size=3) == task.predict(model, PAIRS, batch_size=3)


def test_load_model_from_a_local_dir_and_refuses_a_decoder(tmp_path):
    from support.generation import tiny_llama

    tokenizer = char_tokenizer()
    t5_dir, llama_dir = tmp_path / "t5", tmp_path / "llama"
    for model, folder in ((tiny_t5(len(tokenizer)), t5_dir), (tiny_llama(len(tokenizer)), llama_dir)):
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    task = Seq2SeqTask(model=ModelConfig(name_or_path=str(t5_dir)))
    assert task.load_model().config.is_encoder_decoder
    assert task.tokenizer.eos_token == "</s>"
    with pytest.raises(ConfigError, match="use task: causal-lm"):
        Seq2SeqTask(model=ModelConfig(name_or_path=str(llama_dir))).load_model()


def test_freedict_gives_source_target_examples():
    from peftkit.data.rotten_tomatoes import DataNotInstalledError

    task = Seq2SeqTask(data=DataConfig(name="freedict_eng_fra", max_eval_examples=5))
    try:
        splits = task.load_data()
    except DataNotInstalledError as exc:
        pytest.skip(str(exc))
    assert len(splits["test"]) == 5 and {"source", "target"} <= set(splits["train"][0])
    task.tokenizer = char_tokenizer()
    assert task.collate(splits["test"])["labels"].shape[0] == 5

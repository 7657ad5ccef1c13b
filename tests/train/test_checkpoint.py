"""Checkpoints of ``peftkit.train.fit``: atomic, complete, and a resumed run is bit-identical."""

from __future__ import annotations

import json
import os
import random
import signal
import threading

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import peftkit
from peftkit.errors import ConfigError
from peftkit.train import fit, load_weights
from peftkit.train.checkpoint import checkpoint_dirs, rng_state, set_rng_state
from support.training import (
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

# dropout on (tiny_bert), accumulation of 2 over 37 examples (a smaller last batch per epoch),
# warm-up then linear decay, evaluation that draws random numbers, checkpoints at 3, 4, 6, 8, 9, 10
CONFIG = dict(
    steps=10,
    batch_size=4,
    grad_accum=2,
    lr=5e-3,
    warmup_steps=3,
    schedule="linear",
    save_every=3,
    eval_every=4,
    log_every=1,
    seed=3,
    metric="accuracy",
    greater_is_better=True,
)
EXAMPLES = make_examples(37)
VALIDATION = make_examples(8, seed=5)


class CrashAt:
    """A loss that raises on its ``call``-th micro-batch (0-based), as a crash or a kill would stop a run."""

    def __init__(self, call: int) -> None:
        self.call, self.calls = call, 0

    def __call__(self, model, batch):
        if self.calls == self.call:
            raise RuntimeError("simulated crash")
        self.calls += 1
        return bert_loss(model, batch)


def _run(run_dir, loss=bert_loss, resume=False, **overrides):
    model = tiny_bert()
    result = fit(
        model,
        EXAMPLES,
        collate,
        loss,
        quiet(**{**CONFIG, **overrides}),
        evaluate=make_evaluate(VALIDATION),
        run_dir=run_dir,
        resume=resume,
        log=no_log,
    )
    return model, result


def _events(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [
        {k: v for k, v in json.loads(line).items() if k not in ("elapsed", "examples_per_s")}
        for line in lines
    ]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    model, result = _run(run_dir)
    assert result.status == "completed"
    return run_dir, trainable(model), result


# micro-batch calls: step s (1-based) runs calls 2s-2 and 2s-1; checkpoints after steps 3, 4, 6, 8, 9
@pytest.mark.parametrize(
    "call",
    [6, 9, 13, 19],
    ids=[
        "right-after-checkpoint-3",
        "mid-accumulation-after-eval",
        "mid-accumulation-step-7",
        "last-micro-batch",
    ],
)
def test_a_run_stopped_anywhere_and_resumed_ends_bit_identical(tmp_path, reference, call):
    ref_dir, ref_weights, ref_result = reference
    with pytest.raises(RuntimeError, match="simulated crash"):
        _run(tmp_path, loss=CrashAt(call))
    model, result = _run(tmp_path, resume=True)
    assert_bit_identical(trainable(model), ref_weights)
    assert result.status == "completed" and result.steps == 10
    assert result.losses == ref_result.losses
    assert result.history == ref_result.history
    assert (result.best_metric, result.best_step) == (ref_result.best_metric, ref_result.best_step)
    assert _events(tmp_path) == _events(ref_dir)  # the redone steps are not logged twice
    for folder in ("best", "final"):
        saved = load_file(str(tmp_path / folder / "adapter_model.safetensors"))
        expected = load_file(str(ref_dir / folder / "adapter_model.safetensors"))
        assert_bit_identical(saved, expected)


def test_ctrl_c_checkpoints_after_the_step_and_resume_is_bit_identical(tmp_path, reference):
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signal handlers work in the main thread only")
    calls = []

    def interrupt_in_step_5(model, batch):
        calls.append(1)
        if len(calls) == 9:  # step 5's second micro-batch
            os.kill(os.getpid(), signal.SIGINT)
        return bert_loss(model, batch)

    _, stopped = _run(tmp_path, loss=interrupt_in_step_5)
    assert stopped.status == "interrupted" and stopped.steps == 5 and "resume=True" in stopped.stop_reason
    assert checkpoint_dirs(tmp_path / "checkpoints")[-1].name == "step-00000005"
    assert not (tmp_path / "final").exists()
    model, result = _run(tmp_path, resume=True)
    assert_bit_identical(trainable(model), reference[1])
    assert result.losses == reference[2].losses


def test_resuming_a_finished_run_does_nothing(tmp_path, reference):
    _run(tmp_path, steps=4)
    model, result = _run(tmp_path, steps=4, resume=True)
    assert result.status == "completed" and result.steps == 4 and len(result.losses) == 4


def test_only_the_last_two_checkpoints_are_kept_and_each_is_complete(tmp_path):
    _run(tmp_path, save_every=1, eval_every=0)
    dirs = checkpoint_dirs(tmp_path / "checkpoints")
    assert [d.name for d in dirs] == ["step-00000009", "step-00000010"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000009", "step-00000010"]
    files = {p.name for p in dirs[-1].iterdir()}
    assert files == {
        "model.safetensors",
        "adapter",
        "optimizer.pt",
        "scheduler.pt",
        "rng.pt",
        "trainer_state.json",
    }
    state = json.loads((dirs[-1] / "trainer_state.json").read_text())
    assert state["step"] == 10 and len(state["losses"]) == 10 and state["status"] == "completed"
    # 10 steps x 2 micro-batches of 4 over 37 examples (10 batches per epoch): epoch 2 begins next
    assert state["data_position"] == {"epoch": 2, "batch": 0, "example": 0}
    assert state["resume_key"]["seed"] == 3
    assert set(torch.load(dirs[-1] / "rng.pt", weights_only=True)) >= {"python", "torch", "numpy"}
    # the checkpoint's adapter is a regular adapter directory
    fresh = tiny_bert(seed=9, lora=False)
    peftkit.load_adapter(fresh, dirs[-1] / "adapter", is_trainable=True)
    saved = load_file(str(dirs[-1] / "model.safetensors"))
    assert all(torch.equal(p, saved[name]) for name, p in fresh.named_parameters() if ".lora_" in name)


def test_a_crash_while_writing_a_checkpoint_leaves_the_previous_one(tmp_path, monkeypatch):
    original_save = torch.save
    rng_saves = []

    def save_failing_the_second_time(obj, path, *args, **kwargs):
        if str(path).endswith("rng.pt"):
            rng_saves.append(path)
            if len(rng_saves) == 2:
                raise OSError("disk full")
        return original_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_failing_the_second_time)
    with pytest.raises(OSError, match="disk full"):
        _run(tmp_path, steps=6, save_every=3, eval_every=0)  # step 3 is saved, step 6 fails half-way
    # no half checkpoint and no temporary folder: only step 3, complete
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000003"]
    assert len(list((tmp_path / "checkpoints" / "step-00000003").iterdir())) == 6
    # a temporary left by a killed process is cleaned up at the next start, and the resume works
    (tmp_path / "checkpoints" / ".step-00000004.tmp-abc").mkdir()
    monkeypatch.setattr(torch, "save", original_save)
    _, result = _run(tmp_path, steps=6, save_every=3, eval_every=0, resume=True)
    assert result.status == "completed" and len(result.losses) == 6
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000003", "step-00000006"]


def test_resume_refuses_where_auto_precision_resolves_differently(tmp_path, monkeypatch):
    # a checkpoint written where "auto" meant fp32, resumed where it means bf16 (another CPU)
    monkeypatch.setenv("PEFTKIT_AUTO_PRECISION", "fp32")
    _run(tmp_path, steps=4)
    monkeypatch.setenv("PEFTKIT_AUTO_PRECISION", "bf16")
    with pytest.raises(ConfigError, match="precision: the run used 'fp32', now 'bf16'"):
        _run(tmp_path, steps=4, resume=True)


def test_resume_refuses_without_a_checkpoint_and_with_changed_settings(tmp_path):
    with pytest.raises(RuntimeError, match="simulated crash"):
        _run(tmp_path, loss=CrashAt(3))  # before the first checkpoint
    with pytest.raises(ConfigError, match="no complete checkpoint"):
        _run(tmp_path, resume=True)
    with pytest.raises(ConfigError, match="needs the run_dir"):
        fit(tiny_bert(), EXAMPLES, collate, bert_loss, quiet(steps=1), resume=True)
    _run(tmp_path, steps=4)
    with pytest.raises(ConfigError) as info:
        _run(tmp_path, steps=4, lr=1e-3, seed=4, resume=True)
    assert "lr: the run used 0.005, now 0.001" in str(info.value) and "seed: the run used 3, now 4" in str(
        info.value
    )
    with pytest.raises(ConfigError, match="resume=True to continue"):
        _run(tmp_path, steps=4)  # a fresh run into a used run_dir
    with pytest.raises(ConfigError, match="lora_A"):  # a different adapter does not fit the checkpoint
        model = tiny_bert(lora=False)
        peftkit.inject(model, peftkit.make_config("lora", r=2, target_modules=["query", "value"]))
        fit(
            model,
            EXAMPLES,
            collate,
            bert_loss,
            quiet(**{**CONFIG, "steps": 4}),
            evaluate=make_evaluate(VALIDATION),
            run_dir=tmp_path,
            resume=True,
            log=no_log,
        )


def test_settings_that_do_not_shape_the_weights_may_change_on_resume(tmp_path, reference):
    with pytest.raises(RuntimeError):
        _run(tmp_path, loss=CrashAt(13))
    model, result = _run(tmp_path, resume=True, log_every=5, tensorboard=True, save_every=1)
    assert_bit_identical(trainable(model), reference[1])


def test_a_non_finite_loss_stops_with_a_clear_message_and_keeps_the_last_checkpoint(tmp_path):
    calls = []

    def nan_at_step_5(model, batch):
        calls.append(1)
        loss = bert_loss(model, batch)
        return loss * float("nan") if len(calls) == 9 else loss

    model, result = _run(tmp_path, loss=nan_at_step_5, save_every=2, precision="bf16", max_grad_norm=None)
    assert result.status == "diverged" and not result.ok and result.steps == 4
    message = result.stop_reason
    for needed in (
        "non-finite loss",
        "step 5 of 10",
        "weights after step 4",
        "train.lr",
        "train.precision: fp32",
        "train.max_grad_norm: 1.0",
        "step-00000004",
    ):
        assert needed in message, needed
    latest = checkpoint_dirs(tmp_path / "checkpoints")[-1]
    assert latest.name == "step-00000004"
    assert_bit_identical(
        load_file(str(latest / "model.safetensors")),
        {name: t for name, t in peftkit.train.checkpoint.trainable_state(model).items()},
    )
    assert not (tmp_path / "final").exists()
    assert all(p.grad is None for p in model.parameters())


def test_a_non_finite_gradient_with_a_finite_loss_is_caught_too(tmp_path):
    def nan_gradient(model, batch):
        # sqrt at 0: the value is 0, the gradient nan
        param = next(p for p in model.parameters() if p.requires_grad)
        return bert_loss(model, batch) + torch.sqrt(((param - param.detach()) ** 2).sum())

    before_model = tiny_bert()
    before = trainable(before_model)
    model, result = _run(tmp_path, loss=nan_gradient)
    assert result.status == "diverged" and "non-finite gradient norm" in result.stop_reason
    assert (
        "no checkpoint had been written" in result.stop_reason
        and "stronger gradient clipping" in result.stop_reason
    )
    assert_bit_identical(trainable(model), before)  # nothing was applied


def test_early_stopping_stops_saves_best_and_a_resume_stays_stopped(tmp_path):
    scripted = iter([0.5, 0.4, 0.45, 0.46, 0.3])

    def evaluate(model):
        return {"loss": next(scripted)}

    config = quiet(
        **{
            **CONFIG,
            "metric": "loss",
            "greater_is_better": False,
            "eval_every": 2,
            "early_stopping_patience": 2,
        }
    )
    result = fit(
        tiny_bert(), EXAMPLES, collate, bert_loss, config, evaluate=evaluate, run_dir=tmp_path, log=no_log
    )
    assert result.stopped_early and result.status == "early_stopped" and result.ok
    assert result.steps == 8 and result.best_step == 4 and result.best_metric == 0.4
    assert "did not improve in 2 evaluation(s)" in result.stop_reason
    assert json.loads((tmp_path / "best" / "training_info.json").read_text())["step"] == 4
    assert (tmp_path / "final").is_dir()
    again = fit(
        tiny_bert(),
        EXAMPLES,
        collate,
        bert_loss,
        config,
        evaluate=evaluate,
        run_dir=tmp_path,
        resume=True,
        log=no_log,
    )
    assert again.stopped_early and again.steps == 8 and again.history == result.history


class _BatchNormNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.hidden = nn.Linear(6, 16)
        self.norm = nn.BatchNorm1d(16)
        self.dropout = nn.Dropout(0.2)
        self.out = nn.Linear(16, 3)

    def forward(self, x):
        return self.out(self.dropout(torch.relu(self.norm(self.hidden(x)))))


def _full_run(run_dir, loss=None, resume=False):
    torch.manual_seed(0)
    model = _BatchNormNet()
    generator = torch.Generator().manual_seed(1)
    examples = [(x, int(x.sum() > 0) + int(x[0] > 1)) for x in torch.randn(50, 6, generator=generator)]

    def collate_pairs(batch):
        return torch.stack([x for x, _ in batch]), torch.tensor([y for _, y in batch])

    def default_loss(m, batch):
        return nn.functional.cross_entropy(m(batch[0]), batch[1])

    config = quiet(
        steps=12, batch_size=8, grad_accum=3, lr=1e-2, warmup_steps=2, save_every=4, seed=1, weight_decay=0.01
    )
    result = fit(
        model,
        examples,
        collate_pairs,
        loss or default_loss,
        config,
        run_dir=run_dir,
        resume=resume,
        log=no_log,
    )
    return model, result, default_loss


def test_full_fine_tuning_with_batchnorm_resumes_bit_identical(tmp_path):
    reference, _, default_loss = _full_run(tmp_path / "reference")
    calls = []

    def crash(m, batch):
        calls.append(1)
        if len(calls) == 20:  # step 7, second of three micro-batches
            raise RuntimeError("simulated crash")
        return default_loss(m, batch)

    with pytest.raises(RuntimeError):
        _full_run(tmp_path / "run", loss=crash)
    model, result, _ = _full_run(tmp_path / "run", resume=True)
    assert_bit_identical(model.state_dict(), reference.state_dict())  # running statistics included
    checkpoint = checkpoint_dirs(tmp_path / "run" / "checkpoints")[-1]
    assert not (checkpoint / "adapter").exists()
    assert {"norm.running_mean", "norm.num_batches_tracked", "hidden.weight"} <= set(
        load_file(str(checkpoint / "model.safetensors"))
    )
    fresh = _BatchNormNet()
    load_weights(fresh, tmp_path / "run" / "final")
    assert_bit_identical(fresh.state_dict(), model.state_dict())


def test_rng_state_round_trips_through_a_safe_load(tmp_path):
    random.seed(1)
    torch.manual_seed(1)
    np.random.seed(1)
    torch.save(rng_state(torch.device("cpu")), tmp_path / "rng.pt")
    expected = (random.random(), torch.rand(3), np.random.rand(2))
    random.seed(2)
    torch.manual_seed(2)
    np.random.seed(2)
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    got = (random.random(), torch.rand(3), np.random.rand(2))
    assert got[0] == expected[0] and torch.equal(got[1], expected[1]) and (got[2] == expected[2]).all()


@pytest.mark.slow
def test_resume_is_bit_identical_on_minilm_in_bf16(tmp_path):
    from test_fit import minilm_rotten_tomatoes

    config = quiet(
        steps=10, batch_size=8, grad_accum=2, lr=2e-3, warmup_steps=3, precision="bf16", save_every=3
    )

    def run(run_dir, resume=False, crash_at=None):
        model, train_set, collate_reviews, loss, _ = minilm_rotten_tomatoes()
        if crash_at is not None:
            loss = CrashAt(crash_at)
        result = fit(
            model, train_set, collate_reviews, loss, config, run_dir=run_dir, resume=resume, log=no_log
        )
        return trainable(model), result

    reference, ref_result = run(tmp_path / "reference")
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(tmp_path / "run", crash_at=15)  # step 8, second micro-batch; last checkpoint: step 6
    weights, result = run(tmp_path / "run", resume=True)
    assert_bit_identical(weights, reference)
    assert result.losses == ref_result.losses


def test_the_log_rewrite_on_resume_is_atomic(tmp_path, monkeypatch):
    """Resume drops the log lines after the checkpoint by writing a new file and renaming it over the
    old one: a crash in the middle of that write leaves the old log whole."""
    from peftkit.train import tracking

    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"event": "train", "step": s, "loss": 1.0 / s}) for s in range(1, 6)]
    path.write_text(
        "".join(f"{line}\n" for line in lines) + '{"event": "train", "st'
    )  # a line cut by a crash
    real_write = type(path).write_text

    def crash_mid_write(self, text, *args, **kwargs):
        real_write(self, text[: len(text) // 2], *args, **kwargs)
        raise OSError("simulated crash")

    monkeypatch.setattr(type(path), "write_text", crash_mid_write)
    with pytest.raises(OSError):
        tracking._truncate_after(path, 3)
    monkeypatch.undo()
    assert path.read_text().splitlines()[:5] == lines  # untouched
    tracking._truncate_after(path, 3)
    assert path.read_text().splitlines() == lines[:3]

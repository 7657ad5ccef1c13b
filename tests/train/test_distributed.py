"""Data-parallel training (issue 9): ``fit`` under torchrun with 2 CPU processes (gloo), and ``--nproc``.

The multi-process runs start ``tests/train/_dist_child.py`` through ``python -m torch.distributed.run
--standalone`` (the real launcher, a rendezvous at a free port) and compare what the ranks recorded
with each other and with a single process run here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _dist_child import CRASH_CONFIG, DDP_CONFIG, TRAIN, VALIDATION
from safetensors.torch import load_file

import peftkit
from peftkit.errors import ConfigError
from peftkit.run.config import dump_config
from peftkit.train import TrainConfig, fit
from peftkit.train.checkpoint import load_weights, read_checkpoint
from peftkit.train.distributed import World, shard_frozen, unused_adapter_parameters
from peftkit.train.fit import _check_world
from peftkit.train.order import DataPlan, shard
from peftkit.train.runtime import train_config_problems
from support.runs import make_config
from support.training import collate, make_evaluate, tiny_bert, trainable

CHILD = Path(__file__).with_name("_dist_child.py")
ROOT = Path(__file__).resolve().parents[2]


def torchrun(*args: str, expect_ok: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", *args]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    if expect_ok:
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert_no_abort(done)
    return done


def assert_no_abort(done: subprocess.CompletedProcess) -> None:
    """No rank aborted at exit: what a native thread (gloo's, of a process group never destroyed) still
    running when the interpreter exits does, now and then (the flake of issue 23)."""
    output = done.stdout + done.stderr
    assert "terminate called" not in output and "SIGABRT" not in output, output[-3000:]


def assert_clean_exits(out: Path, scenario: str) -> None:
    """Each rank of ``_dist_child.py SCENARIO`` left no process group and no thread behind at exit."""
    for rank in (0, 1):
        record = json.loads((out / f"{scenario}-rank{rank}-exit.json").read_text())
        assert record == {"group_alive": False, "threads": []}, (scenario, rank, record)


def load(path: Path) -> dict:
    return torch.load(path, weights_only=False)


@pytest.fixture(scope="module")
def main_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    torchrun(str(CHILD), "main", str(out))
    return out, load(out / "main-rank0.pt"), load(out / "main-rank1.pt")


def assert_equal_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []


# ------------------------------------------------------------------------------- without processes


def test_a_global_micro_batch_is_shared_out_evenly_and_completely():
    batch = list(range(7))
    shares = [shard(batch, r, 3) for r in range(3)]
    assert sum(shares, []) == batch and sorted(len(s) for s in shares) == [2, 2, 3]
    assert shard([5], 0, 2) == [] and shard([5], 1, 2) == [5]


def test_two_ranks_of_batch_b_see_the_examples_of_one_process_of_batch_2b():
    one = DataPlan.for_run(37, 6, 2, 3, None, 2)
    two = DataPlan.for_run(37, 3, 2, 3, None, 2, world_size=2)
    assert one.total_steps == two.total_steps
    for step in range(one.total_steps):
        assert [
            a + b for a, b in zip(two.rank_batches(step, 0), two.rank_batches(step, 1))
        ] == one.step_batches(step)
        assert one.position_after(step) == two.position_after(step)


def test_fewer_examples_than_processes_is_refused_with_the_fix():
    with pytest.raises(ConfigError, match="1 training example.s. for 2 processes.*fewer processes"):
        _check_world(World(0, 2), 1)
    _check_world(World(0, 2), 2)


def test_inactive_or_merged_adapters_with_trainable_parameters_are_found():
    model = tiny_bert(dropout=0.0)
    assert unused_adapter_parameters(model) == []
    peftkit.inject(model, peftkit.make_config("lora", r=2, target_modules=["key"]), "other")
    assert unused_adapter_parameters(model) == []  # "default" is now inactive, and frozen
    for name, p in model.named_parameters():
        if ".default." in name:
            p.requires_grad_(True)
    unused = unused_adapter_parameters(model)
    # LoRA A and B of query and value in 2 layers, and the classifier's trainable copy (weight, bias)
    assert len(unused) == 10 and all(".default." in name for name in unused)
    peftkit.set_active(model, "default")
    assert all(
        ".other." in name for name in unused_adapter_parameters(model)
    ) or not unused_adapter_parameters(model)


def test_the_distributed_strategy_is_checked_and_fsdp_refuses_full_fine_tuning():
    assert train_config_problems(TrainConfig(distributed="fsdp")) == []
    assert train_config_problems(TrainConfig(distributed="zero3")) == [
        "train.distributed: expected one of ddp, fsdp, got 'zero3'"
    ]
    with pytest.raises(ConfigError, match="full fine-tuning.*use train.distributed: ddp"):
        shard_frozen(torch.nn.Linear(2, 2), torch.device("cpu"), World(0, 2))


# ------------------------------------------------------------------------------------ 2 processes


@pytest.mark.slow
def test_adapter_weights_are_identical_on_both_ranks_before_every_step_and_at_the_end(main_run):
    _, rank0, rank1 = main_run
    before0, before1 = rank0["ddp"]["before_steps"], rank1["ddp"]["before_steps"]
    assert len(before0) == len(before1) == DDP_CONFIG["steps"]
    for a, b in zip(before0, before1):
        assert_equal_tensors(a, b)
    assert_equal_tensors(rank0["ddp"]["final"], rank1["ddp"]["final"])
    assert any(not torch.equal(before0[0][k], rank0["ddp"]["final"][k]) for k in before0[0])  # it did train
    assert rank0["ddp"]["losses"] == rank1["ddp"]["losses"]


@pytest.mark.slow
def test_two_processes_of_batch_b_train_like_one_process_of_batch_2b(main_run):
    """The run includes a micro-batch of one example, which leaves one rank without any (weight 0)."""
    _, rank0, _ = main_run
    model = tiny_bert(dropout=0.0)
    config = TrainConfig(**{**DDP_CONFIG, "batch_size": 2 * DDP_CONFIG["batch_size"], "tensorboard": False})
    single = fit(
        model,
        TRAIN,
        collate,
        lambda m, b: m(**b).loss,
        config,
        evaluate=make_evaluate(VALIDATION),
        log=lambda line: None,
    )
    final = rank0["ddp"]["final"]
    for name, value in trainable(model).items():
        torch.testing.assert_close(final[name], value, rtol=1e-5, atol=1e-6, msg=name)
    assert rank0["ddp"]["losses"] == pytest.approx(single.losses, rel=1e-5)
    assert [h["step"] for h in rank0["ddp"]["history"]] == [h["step"] for h in single.history] == [2, 4]
    assert [h["loss"] for h in rank0["ddp"]["history"]] == pytest.approx(
        [h["loss"] for h in single.history], rel=1e-5
    )


@pytest.mark.slow
def test_rank_0_alone_logs_evaluates_and_writes_and_the_adapter_has_no_ddp_prefix(main_run):
    out, rank0, rank1 = main_run
    assert rank1["ddp"]["lines"] == [] and rank0["ddp"]["lines"][0].startswith(
        "training 4 steps of 3 x 2 examples in each of 2 processes"
    )
    # rank 1 had no evaluate function and its own run_dir: it followed rank 0's evaluations and wrote nothing
    assert rank1["ddp"]["history"] == rank0["ddp"]["history"] and len(rank0["ddp"]["history"]) == 2
    assert not (out / "ddp-rank1-unused").exists()
    run_dir = out / "ddp"
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e["event"] == "train"] == [1, 2, 3, 4]
    assert any((run_dir / "tensorboard").iterdir())
    checkpoint = run_dir / "checkpoints" / "step-00000004"
    assert sorted(p.name for p in checkpoint.glob("rng*.pt")) == ["rng-rank0.pt", "rng-rank1.pt"]
    saved = load_file(str(run_dir / "final" / "adapter_model.safetensors"))
    assert saved and not any("module." in key for key in saved)
    assert not any(name.startswith("module.") for name in rank0["ddp"]["names"])
    reloaded = tiny_bert(dropout=0.0)
    load_weights(reloaded, run_dir / "final")
    assert_equal_tensors(trainable(reloaded), rank0["ddp"]["final"])


@pytest.mark.slow
def test_the_process_group_fit_started_stays_up_for_a_second_fit(main_run):
    out, rank0, rank1 = main_run
    assert rank0["ddp"]["group_after"] and rank1["ddp"]["group_after"] and rank0["unused"]["group_after"]
    assert_clean_exits(out, "main")  # the script destroyed it itself at the end: peftkit leaves that be


@pytest.mark.slow
def test_a_fit_that_fails_on_every_rank_leaves_no_process_group_or_thread_at_exit(tmp_path):
    """The group fit started stays up after the error (the script may go on), and ends with the process."""
    torchrun(str(CHILD), "error", str(tmp_path))
    for rank in (0, 1):
        assert load(tmp_path / f"error-rank{rank}.pt") == {
            "error": "the loss failed in step 3",
            "group_after": True,
        }
    assert_clean_exits(tmp_path, "error")


@pytest.mark.slow
def test_an_inactive_trainable_adapter_and_gradient_checkpointing_with_frozen_embeddings(main_run):
    _, rank0, rank1 = main_run
    assert "find_unused_parameters=True" in rank0["unused"]["lines"][0]
    assert rank0["unused"]["idle_unchanged"] and rank1["unused"]["idle_unchanged"]
    assert_equal_tensors(rank0["unused"]["final"], rank1["unused"]["final"])
    # non-reentrant checkpointing gives the gradients of a plain backward: the same weights as without it
    for name, value in rank0["ddp"]["final"].items():
        torch.testing.assert_close(rank0["unused"]["final"][name], value, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.slow
def test_a_checkpoint_of_2_processes_cannot_be_resumed_by_1(main_run, tmp_path):
    out, _, _ = main_run
    with pytest.raises(ConfigError, match="world_size: the run used 2, now 1"):
        fit(
            tiny_bert(dropout=0.0),
            TRAIN,
            collate,
            lambda m, b: m(**b).loss,
            TrainConfig(**DDP_CONFIG),
            evaluate=make_evaluate(VALIDATION),
            run_dir=out / "ddp",
            resume=True,
            log=lambda line: None,
        )
    with pytest.raises(ConfigError, match="has no rng.pt .*resume with the same number of processes"):
        read_checkpoint(out / "ddp" / "checkpoints" / "step-00000004", world_size=1)


@pytest.mark.slow
def test_a_rank_killed_mid_run_then_resumed_ends_with_the_uninterrupted_adapter(main_run):
    out, rank0, _ = main_run
    killed = torchrun(str(CHILD), "crash", str(out), expect_ok=False)
    assert killed.returncode != 0 and "SIGKILL" in killed.stdout + killed.stderr
    steps = sorted(p.name for p in (out / "crash" / "checkpoints").glob("step-*"))
    assert steps == ["step-00000003", "step-00000004"]  # killed in step 5: checkpoints of steps 3 and 4 kept
    torchrun(str(CHILD), "resume", str(out))
    assert_clean_exits(out, "resume")  # fit started the group and nothing destroyed it: peftkit does, at exit
    for rank in (0, 1):
        resumed = load(out / f"resume-rank{rank}.pt")
        assert resumed["status"] == "completed" and resumed["steps_run"] == CRASH_CONFIG["steps"] - 4
        assert_equal_tensors(resumed["final"], rank0["reference"])  # dropout on: every rank's RNG restored
    assert (
        load_file(str(out / "crash" / "final" / "adapter_model.safetensors")).keys()
        == load_file(str(out / "reference" / "final" / "adapter_model.safetensors")).keys()
    )


def train_with_nproc_2(config, tmp_path: Path) -> list[str]:
    """``peftkit train CONFIG --nproc 2``; its output lines."""
    path = tmp_path / "run.yaml"
    dump_config(config, path)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run(
        [sys.executable, "-m", "peftkit", "train", str(path), "--nproc", "2"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert_no_abort(done)
    return done.stdout.splitlines()


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_peftkit_train_nproc_2_trains_end_to_end(strategy, tiny_model_dir, reviews_csv, tmp_path):  # noqa: F811
    run_dir = tmp_path / "run"
    config = make_config(tiny_model_dir, reviews_csv, run_dir, train={"distributed": strategy})
    lines = train_with_nproc_2(config, tmp_path)
    assert [line for line in lines if line.startswith("done: ")] == [lines[-1]]  # rank 0 alone reports
    assert lines[-1].startswith(f"done: {run_dir} | test ")
    assert (
        sum(line.startswith("training 6 steps of 8 x 1 examples in each of 2 processes") for line in lines)
        == 1
    )
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["steps"] == 6 and metrics["status"] == "completed"
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    trainer = json.loads((run_dir / "checkpoints" / "step-00000006" / "trainer_state.json").read_text())
    assert trainer["resume_key"]["world_size"] == 2


@pytest.mark.slow
def test_nproc_2_with_automatic_selection_probes_once_and_starts_every_rank_alike(
    tiny_model_dir, reviews_csv, tmp_path
):  # noqa: F811
    run_dir = tmp_path / "run"
    config = make_config(
        tiny_model_dir,
        reviews_csv,
        run_dir,
        adapter={"method": "lora", "r": 4, "lora_alpha": 8, "target_modules": "auto"},
        select={"budget": 600, "init": "gradient"},
    )
    lines = train_with_nproc_2(config, tmp_path)
    assert sum(line.startswith("selecting LoRA targets and ranks") for line in lines) == 1  # rank 0 probes
    assert sum("starts along the gradient directions from the probe" in line for line in lines) == 1
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "completed" and 0 < metrics["selection"]["used"] <= 600
    assert (run_dir / "selection" / "init.safetensors").is_file()


@pytest.mark.slow
def test_fsdp_shards_the_frozen_base_and_saves_the_adapter_ddp_saves(main_run):
    out, rank0, rank1 = main_run
    fsdp0, fsdp1 = rank0["fsdp"], rank1["fsdp"]
    assert fsdp0["base_sharded"] and fsdp1["base_sharded"]  # each rank holds part of a frozen weight
    assert_equal_tensors(fsdp0["final"], fsdp1["final"])
    for name, value in rank0["ddp"]["final"].items():
        torch.testing.assert_close(fsdp0["final"][name], value, rtol=1e-5, atol=1e-6, msg=name)
    assert fsdp0["history"] == fsdp1["history"] and len(fsdp0["history"]) == 2
    saved = load_file(str(out / "fsdp" / "final" / "adapter_model.safetensors"))
    reference = load_file(str(out / "ddp" / "final" / "adapter_model.safetensors"))
    assert saved.keys() == reference.keys() and all(t.numel() > 0 for t in saved.values())
    for key, value in reference.items():
        torch.testing.assert_close(saved[key], value, rtol=1e-5, atol=1e-6, msg=key)

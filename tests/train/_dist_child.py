"""The worker side of ``tests/train/test_distributed.py``, started by ``torchrun --standalone --nproc-per-node 2``.

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/train/_dist_child.py SCENARIO OUT

Scenarios (each rank writes ``OUT/<scenario>-rank<r>.pt`` with what it saw, and, as the very last thing
it does before exiting, ``OUT/<scenario>-rank<r>-exit.json``: whether a process group or any thread
besides the main one was still alive then; either aborts a rank at exit now and then):

- ``main``: (1) ``fit`` on torchrun's environment alone (it starts the process group itself and leaves it up):
  tiny BERT + LoRA without dropout, 2 ranks x batch 3, accumulation 2, a micro-batch of one example
  (one rank has nothing: weight 0), evaluation every 2 steps; the trainable weights before every step
  and at the end are recorded, rank 1 is given its own run_dir (which it must leave untouched) and no
  evaluate function. (2) In that group: a second adapter that is inactive but
  trainable, with gradient checkpointing on a model whose embeddings are frozen. (3) The reference of
  the crash test: dropout on, a checkpoint every step. (4) ``train.distributed: fsdp``: the same run as
  (1) with the frozen base sharded by FSDP2.
  The script destroys the group itself at the end.
- ``crash``: the run of (3) in another directory; rank 1 SIGKILLs itself in step 5.
- ``resume``: that run continued with ``resume=True``. Nothing in the script destroys the group ``fit``
  started: peftkit must, at exit.
- ``error``: ``fit`` raises on every rank (the loss fails in step 3); the script catches the error and
  exits normally, again without destroying the group.
"""

from __future__ import annotations

import atexit
import json
import os
import signal
import sys
import threading
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for support
import peftkit  # noqa: E402
from peftkit.train import TrainConfig, fit  # noqa: E402
from support.training import collate, make_evaluate, make_examples, tiny_bert, trainable

torch.set_num_threads(1)

TRAIN, VALIDATION = make_examples(37, 1), make_examples(8, 5)
# 2 ranks x 3 = 6 examples a micro-batch: the 7th micro-batch of an epoch holds 37 - 36 = 1 example
DDP_CONFIG = dict(  # fp32 whatever the machine: the test compares one process with two, to float tolerance
    precision="fp32",
    steps=4,
    batch_size=3,
    grad_accum=2,
    lr=5e-3,
    warmup_steps=1,
    seed=3,
    eval_every=2,
    metric="accuracy",
    greater_is_better=True,
    tensorboard=True,
    progress=False,
    log_every=1,
    device="cpu",
)
CRASH_CONFIG = dict(
    steps=6,
    batch_size=3,
    grad_accum=1,
    lr=5e-3,
    seed=4,
    save_every=1,
    tensorboard=False,
    progress=False,
    log_every=1,
    device="cpu",
)
KILL_AT_STEP = 5


def recording_loss(record: list, every: int):
    """bert's loss, recording the trainable weights at the first of every ``every`` micro-batches (a step)."""
    calls = [0]

    def loss(model, batch):
        if calls[0] % every == 0:  # loss() gets the DistributedDataParallel wrapper: record the model inside
            record.append(trainable(model.module))
        calls[0] += 1
        return model(**batch).loss

    return loss


def main_scenario(out: Path, rank: int) -> dict:
    result = {}
    # (1) fit starts the group from the environment
    assert not dist.is_initialized()
    model = tiny_bert(dropout=0.0)
    before = []
    loss = recording_loss(before, DDP_CONFIG["grad_accum"])
    lines = []
    evaluate = make_evaluate(VALIDATION) if rank == 0 else None
    run_dir = out / "ddp" if rank == 0 else out / "ddp-rank1-unused"
    fitted = fit(
        model,
        TRAIN,
        collate,
        loss,
        TrainConfig(**DDP_CONFIG),
        evaluate=evaluate,
        run_dir=run_dir,
        log=lines.append,
    )
    result["ddp"] = {
        "before_steps": before,
        "final": trainable(model),
        "history": fitted.history,
        "losses": fitted.losses,
        "lines": lines,
        "group_after": dist.is_initialized(),
        "status": fitted.status,
        "names": sorted(n for n, _ in model.named_parameters()),
    }

    # (2) the group fit started stays up for more training: an inactive trainable adapter, checkpointing
    model = tiny_bert(dropout=0.0)
    peftkit.inject(model, peftkit.make_config("lora", r=2, target_modules=["key"]), "idle")
    peftkit.set_active(model, "default")
    idle = [p for n, p in model.named_parameters() if ".idle." in n]
    for p in idle:  # trainable but unreachable: what DistributedDataParallel chokes on without help
        p.requires_grad_(True)
    idle_before = [p.detach().clone() for p in idle]
    assert not model.bert.embeddings.word_embeddings.weight.requires_grad
    lines = []
    config = TrainConfig(**{**DDP_CONFIG, "eval_every": 0, "gradient_checkpointing": True})
    fit(model, TRAIN, collate, lambda m, b: m(**b).loss, config, adapter_name="default", log=lines.append)
    result["unused"] = {
        "final": {
            n: p.detach().clone()
            for n, p in model.named_parameters()
            if p.requires_grad and ".idle." not in n
        },
        "idle_unchanged": all(torch.equal(a, b) for a, b in zip(idle_before, idle)),
        "lines": lines,
        "group_after": dist.is_initialized(),
    }

    # (4) FSDP2: the frozen base sharded, the adapter whole; every rank evaluates
    from torch.distributed.tensor import DTensor

    model = tiny_bert(dropout=0.0)
    lines = []
    fitted = fit(
        model,
        TRAIN,
        collate,
        lambda m, b: m(**b).loss,
        TrainConfig(**DDP_CONFIG, distributed="fsdp"),
        evaluate=make_evaluate(VALIDATION),
        run_dir=out / "fsdp" if rank == 0 else None,
        log=lines.append,
    )
    weight = model.bert.encoder.layer[0].attention.self.query.base_layer.weight
    result["fsdp"] = {
        "final": trainable(model),
        "history": fitted.history,
        "losses": fitted.losses,
        "base_sharded": isinstance(weight, DTensor) and weight.to_local().numel() < weight.numel(),
        "lines": lines,
    }

    # (3) the uninterrupted reference of the crash test
    model = tiny_bert(dropout=0.1)
    fit(
        model,
        TRAIN,
        collate,
        lambda m, b: m(**b).loss,
        TrainConfig(**CRASH_CONFIG),
        run_dir=out / "reference",
        log=lambda line: None,
    )
    result["reference"] = trainable(model)
    dist.destroy_process_group()
    return result


def error_scenario(out: Path) -> dict:
    calls = {"n": 0}

    def loss(m, batch):
        calls["n"] += 1
        if calls["n"] == 3:
            raise ValueError("the loss failed in step 3")
        return m(**batch).loss

    try:
        fit(tiny_bert(dropout=0.1), TRAIN, collate, loss, TrainConfig(**CRASH_CONFIG), log=lambda line: None)
    except ValueError as exc:
        return {"error": str(exc), "group_after": dist.is_initialized()}
    return {"error": None}


def record_exit(path: Path) -> None:
    """Registered before anything starts a process group, so that it runs after every other exit hook."""

    def record() -> None:
        threads = [t.name for t in threading.enumerate() if t is not threading.main_thread()]
        path.write_text(json.dumps({"group_alive": dist.is_initialized(), "threads": threads}))

    atexit.register(record)


def crash_scenario(out: Path, rank: int, resume: bool) -> dict:
    model = tiny_bert(dropout=0.1)
    steps = {"n": 0}

    def loss(m, batch):
        steps["n"] += 1
        if not resume and rank == 1 and steps["n"] == KILL_AT_STEP:
            os.kill(os.getpid(), signal.SIGKILL)
        return m(**batch).loss

    fitted = fit(
        model,
        TRAIN,
        collate,
        loss,
        TrainConfig(**CRASH_CONFIG),
        run_dir=out / "crash",
        resume=resume,
        log=lambda line: None,
    )
    return {"final": trainable(model), "steps_run": steps["n"], "status": fitted.status}


def main() -> None:
    scenario, out = sys.argv[1], Path(sys.argv[2])
    rank = int(os.environ["RANK"])
    record_exit(out / f"{scenario}-rank{rank}-exit.json")
    if scenario == "main":
        result = main_scenario(out, rank)
    elif scenario == "error":
        result = error_scenario(out)
    else:
        result = crash_scenario(out, rank, resume=scenario == "resume")
    torch.save(result, out / f"{scenario}-rank{rank}.pt")


if __name__ == "__main__":
    main()

"""The process side of ``tests/train/test_crash_resume.py``: train a tiny BERT and SIGKILL it mid-save.

    python tests/train/_crash_child.py PLAN.json

``PLAN.json`` holds ``{"root": DIR, "points": [{"id": str, "kill_at": int, "mode": "before" | "torn"}]}``.
This process imports torch and peftkit once, then forks one child per run, so a kill point costs a
few tiny training steps instead of an interpreter start:

1. ``DIR/reference``: an uninterrupted run that records every file operation it makes
   (``DIR/reference/ops.jsonl``);
2. for each point, ``DIR/<id>``: a run killed with SIGKILL at its ``kill_at``-th operation, either just
   before the operation (``before``) or, for a write, after writing the file and cutting it to half
   its length (``torn``: the state a crash in the middle of the write leaves on disk); then a report
   of every checkpoint folder left (complete or not), then a resumed run (``resume=True``; a fresh one
   when no checkpoint survived, as a user would do).

Counted operations: ``safetensors`` and ``torch.save`` writes, ``Path.write_text``, ``os.replace``,
``os.fsync``, ``tempfile.mkdtemp``/``mkstemp``, ``shutil.rmtree``, ``os.unlink``, a metrics.jsonl
event, and each micro-batch's loss (a kill between file operations). Hooks are monkeypatches in the
child only; production code has no test hook. Results go to ``DIR/results.json``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import tempfile
import traceback
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
from transformers import BertConfig, BertForSequenceClassification  # noqa: E402

import peftkit  # noqa: E402
import peftkit.core.io  # noqa: E402
import peftkit.train.checkpoint  # noqa: E402
import peftkit.train.tracking  # noqa: E402
from peftkit.train import TrainConfig, fit, seed_everything  # noqa: E402
from support.training import make_examples

torch.set_num_threads(1)  # one thread: forking after torch is imported is safe without a thread pool

VOCAB = 50
# dropout on, accumulation over 37 examples (a smaller last batch), warm-up, evaluation every 3 steps
# (best/ written at steps 3 and 6), checkpoints at 2, 3, 4, 6 with the oldest deleted at 4 and 6, final/
CONFIG = dict(
    steps=6,
    batch_size=4,
    grad_accum=2,
    lr=5e-3,
    warmup_steps=2,
    save_every=2,
    eval_every=3,
    seed=3,
    metric="accuracy",
    greater_is_better=True,
    tensorboard=False,
    progress=False,
    log_every=1,
)
CHECKPOINT_FILES = {
    "model.safetensors",
    "adapter",
    "optimizer.pt",
    "scheduler.pt",
    "rng.pt",
    "trainer_state.json",
}


def tiny_bert() -> torch.nn.Module:
    seed_everything(0)
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=16,
        num_labels=2,
        hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.1,
    )
    model = BertForSequenceClassification(config)
    peftkit.inject(
        model,
        peftkit.make_config("lora", r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["query", "value"]),
    )
    return model


TRAIN, VALIDATION = make_examples(37, 1), make_examples(8, 5)


def collate(batch: list[dict]) -> dict[str, torch.Tensor]:
    return {
        "input_ids": torch.tensor([e["input_ids"] for e in batch]),
        "labels": torch.tensor([e["label"] for e in batch]),
    }


def evaluate(model: torch.nn.Module) -> dict[str, float]:
    batch = collate(VALIDATION)
    out = model(**batch)
    return {
        "loss": out.loss.item(),
        "accuracy": (out.logits.argmax(-1) == batch["labels"]).float().mean().item(),
    }


# -------------------------------------------------------------------------------- operation hooks


class Operations:
    """Counts file operations; records them, or kills this process at one of them."""

    def __init__(self, root: Path, kill_at: int | None, mode: str, record: Path | None) -> None:
        self.root, self.kill_at, self.mode, self.count = root, kill_at, mode, 0
        self.record = open(record, "w") if record is not None else None  # noqa: SIM115 (the process exits)

    def __call__(self, kind: str, target: object, run, written: Path | None = None):
        self.count += 1
        if self.record is not None:
            where = str(target)
            if isinstance(target, str | os.PathLike) and os.path.isabs(target):
                where = os.path.relpath(os.fspath(target), self.root)
            self.record.write(json.dumps({"op": self.count, "kind": kind, "path": where}) + "\n")
            self.record.flush()
        if self.count != self.kill_at:
            return run()
        if self.mode == "torn" and written is not None:
            run()
            os.truncate(written, os.path.getsize(written) // 2)
        os.kill(os.getpid(), signal.SIGKILL)
        raise AssertionError("unreachable: SIGKILL was sent")


def install(ops: Operations) -> None:
    """Route every counted operation through ``ops`` (in this process only)."""
    real = {
        "torch.save": torch.save,
        "ckpt.save_file": peftkit.train.checkpoint.save_file,
        "io.save_file": peftkit.core.io.save_file,
        "write_text": Path.write_text,
        "replace": os.replace,
        "fsync": os.fsync,
        "mkdtemp": tempfile.mkdtemp,
        "mkstemp": tempfile.mkstemp,
        "rmtree": shutil.rmtree,
        "unlink": os.unlink,
        "event": peftkit.train.tracking.Tracker.event,
    }

    def writer(name: str, path_arg: int):
        def wrapped(*args, **kwargs):
            path = args[path_arg]
            return ops("write", path, lambda: real[name](*args, **kwargs), written=Path(path))

        return wrapped

    torch.save = writer("torch.save", 1)
    peftkit.train.checkpoint.save_file = writer("ckpt.save_file", 1)
    peftkit.core.io.save_file = writer("io.save_file", 1)
    Path.write_text = lambda self, *a, **k: ops(
        "write", self, lambda: real["write_text"](self, *a, **k), written=self
    )
    os.replace = lambda src, dst, *a, **k: ops("rename", dst, lambda: real["replace"](src, dst, *a, **k))
    os.fsync = lambda fd: ops(
        "fsync",
        os.readlink(f"/proc/self/fd/{fd}") if os.path.exists("/proc/self/fd") else fd,
        lambda: real["fsync"](fd),
    )
    tempfile.mkdtemp = lambda *a, **k: ops("mkdir", k.get("dir", "?"), lambda: real["mkdtemp"](*a, **k))
    tempfile.mkstemp = lambda *a, **k: ops("create", k.get("dir", "?"), lambda: real["mkstemp"](*a, **k))
    shutil.rmtree = lambda path, *a, **k: ops("delete", path, lambda: real["rmtree"](path, *a, **k))
    os.unlink = lambda path, *a, **k: ops("delete", path, lambda: real["unlink"](path, *a, **k))
    peftkit.train.tracking.Tracker.event = lambda self, kind, step, values: ops(
        "log", f"metrics.jsonl:{kind}@{step}", lambda: real["event"](self, kind, step, values)
    )


# ------------------------------------------------------------------------------------------ runs


def train(run_dir: Path, resume: bool, ops: Operations | None, log_path: Path) -> None:
    """One ``fit`` call, in this (child) process."""
    calls = {"n": 0}

    def loss(model, batch):
        calls["n"] += 1
        if ops is None:
            return model(**batch).loss
        return ops("batch", f"micro-batch {calls['n']}", lambda: model(**batch).loss)

    if ops is not None:
        install(ops)
    with open(log_path, "a") as log:
        result = fit(
            tiny_bert(),
            TRAIN,
            collate,
            loss,
            TrainConfig(**CONFIG),
            evaluate=evaluate,
            run_dir=run_dir,
            resume=resume,
            log=lambda line: print(line, file=log, flush=True),
        )
        print(f"STATUS {result.status} {result.steps}", file=log, flush=True)


def in_child(job) -> dict:
    """Run ``job`` in a forked process; how it ended."""
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            job()
        except BaseException:  # report it to the parent, whatever it is
            traceback.print_exc()
            code = 3
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        return {"signal": os.WTERMSIG(status)}
    return {"exit": os.WEXITSTATUS(status)}


def checkpoint_report(run_dir: Path) -> dict:
    """Every ``step-*`` folder and whether each is complete (every file present and readable)."""
    from safetensors.torch import load_file

    report = {}
    root = run_dir / "checkpoints"
    for path in sorted(root.iterdir()) if root.is_dir() else []:
        if not path.name.startswith("step-"):
            report[path.name] = "temporary"
            continue
        try:
            assert {p.name for p in path.iterdir()} == CHECKPOINT_FILES
            load_file(str(path / "model.safetensors"))
            for name in ("optimizer.pt", "scheduler.pt", "rng.pt"):
                torch.load(path / name, weights_only=True)
            json.loads((path / "trainer_state.json").read_text())
            peftkit.core.io.read_adapter_config(path / "adapter")
            peftkit.core.io.read_adapter_tensors(path / "adapter")
            report[path.name] = "complete"
        except Exception as exc:  # noqa: BLE001 - any failure means torn
            report[path.name] = f"torn: {type(exc).__name__}: {exc}"[:200]
    return report


def main(plan_path: str) -> None:
    plan = json.loads(Path(plan_path).read_text())
    root = Path(plan["root"])
    results: dict = {}
    reference = root / "reference"
    reference.mkdir(parents=True, exist_ok=True)
    if not (reference / "ops.jsonl").is_file():
        ops = lambda: Operations(reference, None, "before", reference / "ops.jsonl")  # noqa: E731
        results["reference"] = in_child(lambda: train(reference / "run", False, ops(), reference / "log.txt"))
    for point in plan["points"]:
        results[point["id"]] = kill_and_resume(root / point["id"], point["kill_at"], point["mode"])
    (root / "results.json").write_text(json.dumps(results, indent=1))


def kill_and_resume(folder: Path, kill_at: int, mode: str) -> dict:
    """Kill a run at operation ``kill_at``, report its checkpoints, resume it; what happened."""
    run_dir, log = folder / "run", folder / "log.txt"
    run_dir.mkdir(parents=True)
    killed = in_child(lambda: train(run_dir, False, Operations(run_dir, kill_at, mode, None), log))
    report = checkpoint_report(run_dir)
    resume = any(state == "complete" for state in report.values())
    resumed = in_child(lambda: train(run_dir, resume, None, log))
    return {"killed": killed, "checkpoints": report, "resume": resume, "resumed": resumed}


if __name__ == "__main__":
    main(sys.argv[1])

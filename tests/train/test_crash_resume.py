"""Faults during training (issue 10): SIGKILL at every file operation of a checkpoint save and at other
points, a full disk or read-only directory while saving, and non-finite losses and gradients.

The kills run in ``tests/train/_crash_child.py`` (one interpreter, a fork per run; see its docstring). Each
kill point is an operation counted in an uninterrupted reference run, so the set follows the code: a
new file in a checkpoint adds points by itself. After every kill, each ``step-*`` folder left must be
complete, the resume must start from the newest one, and the run must end with files bit-identical to
the reference's.
"""

from __future__ import annotations

import errno
import importlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import peftkit
from peftkit.core import io as adapter_io
from peftkit.errors import SaveError
from peftkit.train import checkpoint as checkpoint_module
from peftkit.train.checkpoint import checkpoint_dirs
from support.training import (
    assert_bit_identical,
    bert_loss,
    collate,
    make_examples,
    no_log,
    quiet,
    tiny_bert,
    trainable,
)

fit_module = importlib.import_module("peftkit.train.fit")  # the module; peftkit.train.fit is the function
CHILD = Path(__file__).with_name("_crash_child.py")
SIGKILL = 9


# ------------------------------------------------------------------------------------ kill points


def _run_child(root: Path, points: list[dict]) -> dict:
    plan = root / f"plan-{len(points)}.json"
    plan.write_text(json.dumps({"root": str(root), "points": points}))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, str(CHILD), str(plan)], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads((root / "results.json").read_text())


def choose_points(ops: list[dict]) -> list[dict]:
    """Kill points from the reference run's operations.

    Every operation of the checkpoint save at step 4 (which also deletes the oldest checkpoint), each
    write there also torn; the writes (torn) and renames of ``best/`` and ``final/``; a kill inside a
    step's gradient accumulation and before a metrics event; a torn write of the first checkpoint.
    """

    def index(predicate) -> list[int]:
        return [op["op"] for op in ops if predicate(op)]

    after_step_4 = index(lambda op: op["path"] == "metrics.jsonl:train@4")[0]
    next_batch = index(lambda op: op["kind"] == "batch" and op["op"] > after_step_4)[0]
    save_4 = [op for op in ops if after_step_4 < op["op"] < next_batch]
    points = [(op["op"], "before") for op in save_4]
    points += [(op["op"], "torn") for op in save_4 if op["kind"] == "write"]
    for folder in ("best", "final"):
        mine = [op for op in ops if f".{folder}.tmp-" in op["path"] or op["path"] == f"run/{folder}"]
        points += [(op["op"], "torn") for op in mine if op["kind"] == "write"]
        points += [(op["op"], "before") for op in mine if op["kind"] == "rename"]
    points.append((index(lambda op: op["path"] == "micro-batch 3")[0], "before"))  # mid-accumulation, step 2
    points.append((index(lambda op: op["path"] == "metrics.jsonl:eval@6")[0], "before"))
    first_state = index(
        lambda op: op["path"].endswith("trainer_state.json") and ".step-00000002" in op["path"]
    )[0]
    points.append((first_state, "torn"))  # no checkpoint survives: the run starts afresh
    labels = {op["op"]: f"{op['kind']} {op['path']}" for op in ops}
    return [
        {"id": f"op{n:03d}-{mode}", "kill_at": n, "mode": mode, "label": labels[n]}
        for n, mode in sorted(set(points))
    ]


@pytest.fixture(scope="module")
def killed_runs(tmp_path_factory) -> tuple[Path, list[dict], dict]:
    root = tmp_path_factory.mktemp("crash")
    _run_child(root, [])
    ops = [json.loads(line) for line in (root / "reference" / "ops.jsonl").read_text().splitlines()]
    points = choose_points(ops)
    results = _run_child(root, points)
    return root, points, results


def same_file(a: Path, b: Path) -> bool:
    """Equal files; for safetensors, equal tensors (bit for bit, same dtypes) and equal metadata.

    safetensors writes its header's metadata map in hash order, which varies between saves of the
    same tensors, so two identical adapters need not be identical byte strings.
    """
    if a.suffix != ".safetensors":
        return a.read_bytes() == b.read_bytes()
    from safetensors import safe_open

    with safe_open(str(a), framework="pt") as x, safe_open(str(b), framework="pt") as y:
        if x.metadata() != y.metadata() or sorted(x.keys()) != sorted(y.keys()):
            return False
        return all(
            x.get_tensor(k).dtype == y.get_tensor(k).dtype and torch.equal(x.get_tensor(k), y.get_tensor(k))
            for k in x.keys()
        )


def _events(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [
        {k: v for k, v in json.loads(line).items() if k not in ("elapsed", "examples_per_s")}
        for line in lines
    ]


def _resumed_from(log: str) -> int:
    """The step the last run in a log started from (0: a fresh start)."""
    last = [line for line in log.splitlines() if line.startswith("training ")][-1]
    if "nothing to do: the checkpoint is of a finished run" in log:  # only a resume says this
        return int(last.split()[1])  # "training 6 steps ...": the finished run's last step
    return int(last.rsplit("from step ", 1)[1]) if "from step" in last else 0


@pytest.mark.slow
def test_enough_distinct_kill_points_cover_every_write_of_a_checkpoint_save(killed_runs):
    _, points, _ = killed_runs
    assert len({p["kill_at"] for p in points}) >= 20
    torn = " ".join(p["label"] for p in points if p["mode"] == "torn" and ".step-00000004.tmp-" in p["label"])
    for name in (
        "/model.safetensors",
        "/optimizer.pt",
        "/scheduler.pt",
        "/rng.pt",
        "/trainer_state.json",
        "/.adapter_model.safetensors.",
        "/.adapter_config.json.",
    ):
        assert name in torn, f"no torn write of {name} in the checkpoint save"


@pytest.mark.slow
def test_every_kill_leaves_only_complete_checkpoints_and_resume_takes_the_newest(killed_runs):
    root, points, results = killed_runs
    for point in points:
        result = results[point["id"]]
        where = f"{point['id']} ({point['label']})"
        assert result["killed"] == {"signal": SIGKILL}, where
        named = {name: state for name, state in result["checkpoints"].items() if name.startswith("step-")}
        torn = {name: state for name, state in named.items() if state != "complete"}
        assert not torn, f"{where}: torn checkpoint folders {torn}"
        assert result["resumed"] == {"exit": 0}, where
        log = (root / point["id"] / "log.txt").read_text()
        newest = max((int(name[len("step-") :]) for name in named), default=0)
        assert _resumed_from(log) == newest, (
            f"{where}: resumed from {_resumed_from(log)}, newest complete {newest}"
        )
        assert log.rstrip().endswith("STATUS completed 6"), where


@pytest.mark.slow
def test_every_killed_and_resumed_run_ends_bit_identical_to_the_uninterrupted_one(killed_runs):
    root, points, _ = killed_runs
    reference = root / "reference" / "run"
    compared = (
        "final/adapter_model.safetensors",
        "final/adapter_config.json",
        "final/training_info.json",
        "best/adapter_model.safetensors",
        "best/adapter_config.json",
        "best/training_info.json",
        "checkpoints/step-00000006/model.safetensors",
    )
    reference_state = json.loads((reference / "checkpoints/step-00000006/trainer_state.json").read_text())
    for point in points:
        run = root / point["id"] / "run"
        where = f"{point['id']} ({point['label']})"
        for name in compared:
            assert same_file(run / name, reference / name), f"{where}: {name} differs"
        state = json.loads((run / "checkpoints/step-00000006/trainer_state.json").read_text())
        for key in ("losses", "history", "best_metric", "best_step", "status"):
            assert state[key] == reference_state[key], f"{where}: {key}"
        assert _events(run) == _events(reference), f"{where}: metrics.jsonl"
        leftovers = [
            p.name
            for folder in (run, run / "checkpoints")
            for p in folder.iterdir()
            if p.name.startswith(".")
        ]
        assert not leftovers, f"{where}: temporaries left after the resume: {leftovers}"


# ------------------------------------------------------------------------- full disk, read-only

CONFIG = dict(steps=4, batch_size=4, grad_accum=1, lr=5e-3, save_every=2, seed=3)
EXAMPLES = make_examples(16)


def _fit(run_dir: Path, resume: bool = False, **overrides):
    model = tiny_bert()
    return model, fit_module.fit(
        model,
        EXAMPLES,
        collate,
        bert_loss,
        quiet(**{**CONFIG, **overrides}),
        run_dir=run_dir,
        resume=resume,
        log=no_log,
    )


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _folder_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _same_folder(a: Path, b: Path) -> bool:
    names = sorted(str(p.relative_to(a)) for p in a.rglob("*") if p.is_file())
    return names == sorted(str(p.relative_to(b)) for p in b.rglob("*") if p.is_file()) and all(
        same_file(a / name, b / name) for name in names
    )


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    model, result = _fit(run_dir)
    assert result.status == "completed"
    return run_dir, trainable(model)


@pytest.mark.parametrize(
    "where", ["model.safetensors", "optimizer.pt", "adapter weights", "trainer_state.json"]
)
def test_a_full_disk_during_a_checkpoint_save_names_the_path_and_keeps_the_previous_one(
    tmp_path, monkeypatch, uninterrupted, where
):
    targets = {
        "model.safetensors": (checkpoint_module, "save_file"),
        "optimizer.pt": (torch, "save"),
        "adapter weights": (adapter_io, "save_file"),
        "trainer_state.json": (Path, "write_text"),
    }
    owner, name = targets[where]
    real = getattr(owner, name)

    def full_at_step_4(*args, **kwargs):
        if where in str(args[0] if owner is Path else args[1]) or (
            where == "adapter weights" and ".step-00000004" in str(args[1])
        ):
            if ".step-00000004" in str(args[0] if owner is Path else args[1]):
                _enospc()
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, full_at_step_4)
    with pytest.raises(SaveError) as info:
        _fit(tmp_path)  # step 2 is saved, step 4 meets a full disk
    monkeypatch.undo()
    error = info.value
    assert isinstance(error, OSError) and error.errno == errno.ENOSPC
    message = str(error)
    assert str(tmp_path / "checkpoints" / "step-00000004") in message
    assert "disk (or your quota) is full" in message and "as they were" in message
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000002"]  # no temporary
    reference_dir, reference_weights = uninterrupted
    for part in ("model.safetensors", "adapter/adapter_model.safetensors", "adapter/adapter_config.json"):
        assert same_file(
            tmp_path / "checkpoints/step-00000002" / part, reference_dir / "checkpoints/step-00000002" / part
        )
    model, result = _fit(tmp_path, resume=True)  # space freed: the run goes on from step 2
    assert result.status == "completed" and result.steps == 4
    assert_bit_identical(trainable(model), reference_weights)


def test_an_unwritable_run_directory_is_a_clear_error(tmp_path, monkeypatch):
    def read_only(*args, **kwargs):
        raise PermissionError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(checkpoint_module.tempfile, "mkdtemp", read_only)
    with pytest.raises(SaveError, match=r"step-00000002.*read-only or not yours") as info:
        _fit(tmp_path, steps=2)
    assert info.value.errno == errno.EROFS


@pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root ignores directory permissions"
)
def test_a_really_read_only_directory(tmp_path):
    _fit(tmp_path / "run", steps=2)
    (tmp_path / "run" / "checkpoints").chmod(0o500)
    try:
        with pytest.raises(SaveError, match="read-only or not yours"):
            _fit(tmp_path / "run", resume=True)
        assert [d.name for d in checkpoint_dirs(tmp_path / "run" / "checkpoints")] == ["step-00000002"]
    finally:
        (tmp_path / "run" / "checkpoints").chmod(0o700)


def _adapter_model(seed: int) -> torch.nn.Module:
    model = tiny_bert(seed=seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param))
    return model


@pytest.mark.parametrize("failing", ["weights", "config", "rename", "mkstemp"])
def test_save_adapter_onto_an_existing_adapter_keeps_the_old_files_when_the_disk_is_full(
    tmp_path, monkeypatch, failing
):
    directory = tmp_path / "adapter"
    peftkit.save_adapter(_adapter_model(0), directory)
    old = _folder_bytes(directory)
    real_write_text, real_replace = Path.write_text, os.replace
    if failing == "weights":
        monkeypatch.setattr(adapter_io, "save_file", _enospc)
    elif failing == "config":
        monkeypatch.setattr(
            Path,
            "write_text",
            lambda self, *a, **k: (
                _enospc() if ".adapter_config" in self.name else real_write_text(self, *a, **k)
            ),
        )
    elif failing == "rename":
        monkeypatch.setattr(
            adapter_io.os,
            "replace",
            lambda src, dst: _enospc() if str(dst).endswith(".safetensors") else real_replace(src, dst),
        )
    else:
        monkeypatch.setattr(adapter_io.tempfile, "mkstemp", _enospc)
    with pytest.raises(SaveError) as info:
        peftkit.save_adapter(_adapter_model(1), directory)
    assert str(directory) in str(info.value) and "full" in str(info.value) and "unchanged" in str(info.value)
    monkeypatch.undo()
    assert _folder_bytes(directory) == old  # same files, same bytes, no temporaries
    loaded = peftkit.load_adapter(tiny_bert(seed=0, lora=False), directory)
    assert peftkit.adapter_state_dict(loaded).keys()


# ------------------------------------------------------------------------------ non-finite values


class PoisonedLoss:
    """bert_loss, except that the given (1-based) steps return NaN, or a finite loss with a NaN gradient."""

    def __init__(self, steps: set[int], kind: str = "loss", grad_accum: int = 1) -> None:
        self.steps, self.kind, self.grad_accum, self.calls = steps, kind, grad_accum, 0

    def __call__(self, model, batch):
        self.calls += 1
        value = bert_loss(model, batch)
        if (self.calls - 1) // self.grad_accum + 1 not in self.steps:
            return value
        if self.kind == "loss":
            return value * float("nan")
        param = next(p for p in model.parameters() if p.requires_grad)
        return value + torch.sqrt(((param - param.detach()) ** 2).sum())  # value unchanged, gradient NaN


@pytest.mark.parametrize("kind", ["loss", "gradient"])
def test_non_finite_stops_naming_the_step_and_the_last_good_checkpoint_stays(tmp_path, kind):
    model = tiny_bert()
    result = fit_module.fit(
        model, EXAMPLES, collate, PoisonedLoss({3}, kind), quiet(**CONFIG), run_dir=tmp_path, log=no_log
    )
    assert result.status == "diverged" and result.steps == 2
    what = "loss" if kind == "loss" else "gradient norm"
    assert f"non-finite {what}" in result.stop_reason and "at step 3 of 4" in result.stop_reason
    assert "step-00000002 is untouched" in result.stop_reason
    saved = load_file(str(tmp_path / "checkpoints" / "step-00000002" / "model.safetensors"))
    assert_bit_identical(saved, checkpoint_module.trainable_state(model))  # the weights after step 2
    assert [d.name for d in checkpoint_dirs(tmp_path / "checkpoints")] == ["step-00000002"]


def test_skip_drops_the_bad_steps_update_and_goes_on(tmp_path):
    lines: list[str] = []
    model = tiny_bert()
    config = quiet(**{**CONFIG, "steps": 6, "on_nonfinite": "skip", "grad_accum": 2})
    result = fit_module.fit(
        model,
        EXAMPLES,
        collate,
        PoisonedLoss({2, 5}, "loss", grad_accum=2),
        config,
        run_dir=tmp_path,
        log=lines.append,
    )
    assert result.status == "completed" and result.steps == 6 and result.skipped_steps == [2, 5]
    assert math.isnan(result.losses[1]) and math.isnan(result.losses[4])
    assert all(math.isfinite(v) for i, v in enumerate(result.losses) if i not in (1, 4))
    skipped = [line for line in lines if "skipped its optimizer step" in line]
    assert len(skipped) == 2 and skipped[0].startswith("step 2/6: non-finite loss (nan)")
    assert "1 skipped in all, 1 in a row" in skipped[0] and "2 skipped in all" in skipped[1]
    assert json.loads((tmp_path / "checkpoints/step-00000006/trainer_state.json").read_text())[
        "skipped_steps"
    ] == [2, 5]

    # a skipped step changes no weight: one good step then a skipped one equals the good step alone
    constant = {**CONFIG, "grad_accum": 2, "warmup_steps": 0, "schedule": "constant", "on_nonfinite": "skip"}
    before = tiny_bert()
    fit_module.fit(before, EXAMPLES, collate, bert_loss, quiet(**{**constant, "steps": 1}), log=no_log)
    after = tiny_bert()
    fit_module.fit(
        after,
        EXAMPLES,
        collate,
        PoisonedLoss({2}, "gradient", grad_accum=2),
        quiet(**{**constant, "steps": 2}),
        log=no_log,
    )
    assert_bit_identical(trainable(after), trainable(before))


def test_skip_resumes_bit_identical(tmp_path):
    config = {**CONFIG, "steps": 6, "on_nonfinite": "skip", "save_every": 1}
    poison = {2, 5}
    reference = tiny_bert()
    expected = fit_module.fit(
        reference,
        EXAMPLES,
        collate,
        PoisonedLoss(poison),
        quiet(**config),
        run_dir=tmp_path / "a",
        log=no_log,
    )

    class CrashAfter(PoisonedLoss):
        def __call__(self, model, batch):
            if self.calls == 5:  # inside step 6, after skipping step 5
                raise RuntimeError("simulated crash")
            return super().__call__(model, batch)

    with pytest.raises(RuntimeError):
        fit_module.fit(
            tiny_bert(),
            EXAMPLES,
            collate,
            CrashAfter(poison),
            quiet(**config),
            run_dir=tmp_path / "b",
            log=no_log,
        )
    model = tiny_bert()
    # the restarted loss function counts from 0; the steps it poisons are those after the checkpoint
    result = fit_module.fit(
        model,
        EXAMPLES,
        collate,
        PoisonedLoss({s - 5 for s in poison if s > 5}),
        quiet(**config),
        run_dir=tmp_path / "b",
        resume=True,
        log=no_log,
    )
    assert_bit_identical(trainable(model), trainable(reference))
    assert result.skipped_steps == expected.skipped_steps == [2, 5]


def test_skip_stops_after_too_many_bad_steps_in_a_row(tmp_path):
    limit = fit_module.MAX_SKIPS_IN_A_ROW
    bad = set(range(2, limit + 10))
    result = fit_module.fit(
        tiny_bert(),
        EXAMPLES,
        collate,
        PoisonedLoss(bad),
        quiet(**{**CONFIG, "steps": limit + 5, "on_nonfinite": "skip", "save_every": 1}),
        run_dir=tmp_path,
        log=no_log,
    )
    assert result.status == "diverged" and result.skipped_steps == list(range(2, limit + 2))
    assert f"after {limit} skipped steps in a row" in result.stop_reason
    assert f"at step {limit + 2} of {limit + 5}" in result.stop_reason
    assert checkpoint_dirs(tmp_path / "checkpoints")[-1].name == f"step-{limit + 1:08d}"


def test_on_nonfinite_is_checked():
    with pytest.raises(
        peftkit.errors.ConfigError, match="train.on_nonfinite: expected 'stop' or 'skip', got 'ignore'"
    ):
        fit_module.fit(
            tiny_bert(), EXAMPLES, collate, bert_loss, quiet(steps=1, on_nonfinite="ignore"), log=no_log
        )


def test_a_crash_while_final_is_written_is_repaired_by_the_resume(tmp_path):
    _fit(tmp_path)
    shutil.copytree(tmp_path / "final", tmp_path.parent / f"{tmp_path.name}-expected")
    shutil.rmtree(tmp_path / "final")  # as if killed before final/ was renamed into place
    (tmp_path / ".final.tmp-abc").mkdir()
    _, result = _fit(tmp_path, resume=True)
    assert result.status == "completed"
    assert _same_folder(tmp_path / "final", tmp_path.parent / f"{tmp_path.name}-expected")
    assert not (tmp_path / ".final.tmp-abc").exists()


# -- the command line: `peftkit train` killed, `peftkit train --resume` ------------------------------


@pytest.mark.slow
def test_peftkit_train_killed_then_resumed_from_the_command_line_ends_like_an_uninterrupted_run(
    tiny_model_dir, reviews_csv, tmp_path
):  # noqa: F811
    """SIGKILL the CLI process once it has written a checkpoint, then `--resume`: same adapter as a run
    that was never interrupted (both in subprocesses with one thread, so the arithmetic is the same)."""
    import time

    from peftkit.run.config import dump_config
    from support.runs import make_config

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}

    def command(name: str, *extra: str) -> list[str]:
        config = make_config(
            tiny_model_dir,
            reviews_csv,
            tmp_path / name,
            train={"steps": 400, "save_every": 10, "eval_every": 100, "log_every": 50},
        )
        dump_config(config, tmp_path / f"{name}.yaml")
        return [sys.executable, "-m", "peftkit", "train", str(tmp_path / f"{name}.yaml"), *extra]

    subprocess.run(command("whole"), check=True, env=env, capture_output=True, timeout=300)
    process = subprocess.Popen(
        command("killed"), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    checkpoints = tmp_path / "killed" / "checkpoints"
    deadline = time.monotonic() + 240
    while not any(checkpoints.glob("step-*")) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (tmp_path / "killed" / "adapter").exists()
    done = subprocess.run(command("killed", "--resume"), env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert re.search(r", from step [1-9]\d*\n", done.stdout), done.stdout  # it continued, not started over
    whole = load_file(tmp_path / "whole" / "adapter" / "adapter_model.safetensors")
    resumed = load_file(tmp_path / "killed" / "adapter" / "adapter_model.safetensors")
    assert whole.keys() == resumed.keys()
    for key in whole:
        assert torch.equal(whole[key], resumed[key]), key

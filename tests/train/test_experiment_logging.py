"""``train.report_to``: metrics.jsonl, TensorBoard, wandb (offline) and MLflow (a file store) get the same
numbers; wandb and MLflow also get the config and the parameter counts, and continue their run on resume."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest

import peftkit
from peftkit.errors import ConfigError
from peftkit.run.config import parse_config
from peftkit.train import TrainConfig, fit, train_config_problems
from peftkit.train.experiment_logging import RUN_IDS_NAME, flat_params, mlflow_tracking_uri, reported_to
from support.training import bert_loss, collate, make_evaluate, make_examples, no_log, quiet, tiny_bert

TIMINGS = ("elapsed", "examples_per_s")  # differ between the first try of a step and its redo on resume


def events(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def expected_points(run_dir: Path) -> dict[str, dict[int, float]]:
    """metrics.jsonl as the loggers name it: ``{"train/loss": {step: value}, "eval/accuracy": ...}``."""
    points: dict[str, dict[int, float]] = {}
    for event in events(run_dir):
        for key, value in event.items():
            if key not in ("event", "step"):
                points.setdefault(f"{event['event']}/{key}", {})[event["step"]] = value
    return points


def tiny_fit(
    run_dir: Path, *, resume: bool = False, fail_at_call: int | None = None, run_config=None, **fields
):
    """Six steps of a tiny LoRA BERT, logging every step and evaluating every third."""
    calls = {"n": 0}

    def loss(model, batch):
        calls["n"] += 1
        if calls["n"] == fail_at_call:
            raise RuntimeError("simulated crash")
        return bert_loss(model, batch)

    config = quiet(steps=6, batch_size=8, log_every=1, eval_every=3, save_every=2, **fields)
    return fit(
        tiny_bert(),
        make_examples(),
        collate,
        loss,
        config,
        evaluate=make_evaluate(make_examples(8, seed=3)),
        run_dir=run_dir,
        resume=resume,
        log=no_log,
        run_config=run_config,
    )


# ------------------------------------------------------------------------------------------ choice


def test_report_to_null_keeps_the_tensorboard_switch():
    assert reported_to(TrainConfig()) == ["jsonl", "tensorboard"]
    assert reported_to(TrainConfig(tensorboard=False)) == ["jsonl"]
    assert reported_to(TrainConfig(report_to=["wandb", "mlflow", "wandb"])) == ["wandb", "mlflow"]
    assert reported_to(TrainConfig(report_to=[])) == []


def test_jsonl_only_writes_no_tensorboard_events(tmp_path):
    for run_dir, config in [
        (tmp_path / "listed", quiet(steps=2, batch_size=8, report_to=["jsonl"], tensorboard=True)),
        (tmp_path / "switched-off", quiet(steps=2, batch_size=8, tensorboard=False)),
    ]:
        fit(tiny_bert(), make_examples(), collate, bert_loss, config, run_dir=run_dir, log=no_log)
        assert (run_dir / "metrics.jsonl").is_file()
        assert not (run_dir / "tensorboard").exists()
        assert not (run_dir / RUN_IDS_NAME).exists()


def test_unknown_names_are_config_problems_listing_the_known_ones():
    with pytest.raises(
        ConfigError, match=r"train.report_to: unknown 'neptune'; known: tensorboard, wandb, mlflow, jsonl"
    ):
        fit(
            tiny_bert(),
            make_examples(),
            collate,
            bert_loss,
            quiet(steps=1, report_to=["neptune"]),
            log=no_log,
        )
    assert train_config_problems(TrainConfig(tensorboard=False, report_to=["tensorboard"])) == [
        "train.report_to lists tensorboard but train.tensorboard is false: drop one of the two "
        "(when report_to is set, it alone decides)"
    ]
    assert train_config_problems(TrainConfig(report_to="wandb"))[0].startswith(
        "train.report_to: expected a list"
    )
    # a run config takes the list as it is (fit checks the names) and refuses anything but a list
    minimal = {
        "task": "text-classification",
        "model": {"name_or_path": "minilm"},
        "data": {"name": "rotten_tomatoes"},
    }
    assert parse_config({**minimal, "train": {"report_to": ["wandb", "mlflow"]}}).train.report_to == [
        "wandb",
        "mlflow",
    ]
    with pytest.raises(ConfigError, match="train.report_to: expected a list of strings or null"):
        parse_config({**minimal, "train": {"report_to": "wandb"}})


@pytest.mark.parametrize("library", ["wandb", "mlflow"])
def test_a_missing_library_names_its_pip_install_and_leaves_no_run_behind(library, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, library, None)  # `import <library>` now raises ImportError
    with pytest.raises(
        ConfigError, match=rf"`pip install {library}`, or remove {library} from train.report_to"
    ):
        fit(
            tiny_bert(),
            make_examples(),
            collate,
            bert_loss,
            quiet(steps=1, report_to=[library]),
            run_dir=tmp_path,
            log=no_log,
        )
    assert not (tmp_path / "metrics.jsonl").exists()  # a corrected rerun is not mistaken for a resume


def test_import_peftkit_loads_neither_wandb_nor_mlflow():
    code = (
        "import sys, peftkit, peftkit.train.fit, peftkit.run.runner; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'wandb', 'mlflow'}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ------------------------------------------------------------------------------------------ wandb


def wandb_records(path: Path):
    """The records of a ``.wandb`` file (LevelDB-style log: 32 KiB blocks of checksummed chunks)."""
    from wandb.proto import wandb_internal_pb2

    data, block, position, pending = path.read_bytes(), 32768, 7, b""
    assert data[:4] == b":W&B"
    while position + 7 <= len(data):
        left = block - position % block
        if left < 7:  # a block's tail too short for a chunk header is padding
            position += left
            continue
        _checksum, length, kind = struct.unpack("<IHB", data[position : position + 7])
        pending += data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def wandb_run(path: Path) -> tuple[str, str, str, dict, dict[str, dict[int, float]]]:
    """(id, name, project, config, history as {metric: {step: value}}) of an offline run."""
    run_id = name = project = ""
    config: dict = {}
    history: dict[str, dict[int, float]] = {}
    for record in wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run_id, name, project = record.run.run_id, record.run.display_name, record.run.project
            config.update({item.key: json.loads(item.value_json) for item in record.run.config.update})
        elif kind == "config":
            config.update({item.key: json.loads(item.value_json) for item in record.config.update})
        elif kind == "history":
            for item in record.history.item:
                key = item.key or "/".join(item.nested_key)
                if not key.startswith("_"):
                    history.setdefault(key, {})[record.history.step.num] = json.loads(item.value_json)
    return run_id, name, project, config, history


def test_wandb_offline_run_holds_the_metrics_config_and_counts(tmp_path, monkeypatch):
    for name, value in {
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "WANDB_CONFIG_DIR": str(tmp_path / "cfg"),
        "WANDB_CACHE_DIR": str(tmp_path / "cache"),
        "WANDB_DATA_DIR": str(tmp_path / "data"),
    }.items():
        monkeypatch.setenv(name, value)
    for name in ("WANDB_DIR", "WANDB_PROJECT", "WANDB_RUN_ID", "WANDB_RESUME"):
        monkeypatch.delenv(name, raising=False)
    run_dir = tmp_path / "my-run"
    run_config = {
        "task": "text-classification",
        "adapter": {"method": "lora", "r": 4},
        "train": dataclasses.asdict(TrainConfig(steps=6)),
    }
    with pytest.raises(
        RuntimeError, match="simulated crash"
    ):  # during step 6: steps 1-5 logged, checkpoint at 4
        tiny_fit(run_dir, fail_at_call=6, report_to=["wandb"], run_config=run_config)
    result = tiny_fit(run_dir, resume=True, report_to=["wandb"], run_config=run_config)
    assert result.ok and not (run_dir / "tensorboard").exists()

    first, second = sorted(
        (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    )  # offline: one file per start
    stored = json.loads((run_dir / RUN_IDS_NAME).read_text())["wandb"]
    run_id, name, project, config, history = wandb_run(first)
    assert (run_id, name, project) == (stored["id"], "my-run", "peftkit")
    assert config["task"] == "text-classification" and config["adapter"] == {"method": "lora", "r": 4}
    assert config["train"]["steps"] == 6
    model = tiny_bert()
    summary = peftkit.trainable_summary(model, show=False)
    assert (config["trainable_params"], config["total_params"]) == (summary.trainable, summary.total)
    assert history["train/loss"].keys() == {1, 2, 3, 4, 5}
    resumed_id, _, _, _, resumed = wandb_run(second)
    assert resumed_id == run_id  # the same run, continued (wandb sync merges an offline resume)
    assert resumed["train/loss"].keys() == {5, 6}  # offline wandb cannot see what the first start logged
    expected = expected_points(run_dir)
    for metric, points in expected.items():
        got = {**history.get(metric, {}), **resumed.get(metric, {})}
        assert got.keys() == points.keys(), metric
        if metric.split("/")[1] not in TIMINGS:
            assert got == pytest.approx(points, rel=1e-12, abs=0), metric


# ------------------------------------------------------------------------------------------ MLflow


def test_mlflow_run_in_the_run_directory_holds_the_metrics_params_and_counts(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 refuses file stores without it
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(name, raising=False)
    run_dir = tmp_path / "my-run"
    with pytest.raises(RuntimeError, match="simulated crash"):
        tiny_fit(run_dir, fail_at_call=6, report_to=["mlflow", "jsonl"])
    client = MlflowClient(tracking_uri=mlflow_tracking_uri(run_dir))
    run_id = json.loads((run_dir / RUN_IDS_NAME).read_text())["mlflow"]["run_id"]
    crashed = client.get_run(run_id)
    assert (crashed.info.status, crashed.data.tags["peftkit.status"]) == ("FAILED", "failed")

    assert tiny_fit(run_dir, resume=True, report_to=["mlflow", "jsonl"]).ok
    assert (run_dir / "mlruns").is_dir() and not (run_dir / "tensorboard").exists()
    run = client.get_run(run_id)
    assert (run.info.status, run.data.tags["peftkit.status"], run.info.run_name) == (
        "FINISHED",
        "completed",
        "my-run",
    )
    assert client.get_experiment(run.info.experiment_id).name == "peftkit"
    assert len(client.search_runs([run.info.experiment_id])) == 1  # the resume continued the run
    expected = expected_points(run_dir)
    assert set(run.data.metrics) == set(expected)
    for metric, points in expected.items():
        history = client.get_metric_history(run_id, metric)
        assert sorted(m.step for m in history) == sorted(points), metric  # each step once, the redone one too
        if metric.split("/")[1] not in TIMINGS:
            assert {m.step: m.value for m in history} == points, metric
    params = run.data.params
    assert (
        params["train.lr"] == "0.0002"
        and params["train.steps"] == "6"
        and params["train.report_to"] == '["mlflow", "jsonl"]'
    )
    summary = peftkit.trainable_summary(tiny_bert(), show=False)
    assert (params["trainable_params"], params["total_params"]) == (
        str(summary.trainable),
        str(summary.total),
    )


@pytest.mark.skipif(
    importlib.util.find_spec("sqlalchemy") is not None, reason="the full mlflow opens SQLite stores"
)
def test_mlflow_skinny_without_a_store_says_what_to_set(tmp_path, monkeypatch):
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_ALLOW_FILE_STORE"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(
        ConfigError,
        match=r"cannot open the store sqlite:///.*Set MLFLOW_TRACKING_URI.*"
        r"MLFLOW_ALLOW_FILE_STORE=true.*`pip install mlflow`",
    ):
        fit(
            tiny_bert(),
            make_examples(),
            collate,
            bert_loss,
            quiet(steps=1, report_to=["mlflow"]),
            run_dir=tmp_path,
            log=no_log,
        )
    assert not (tmp_path / "metrics.jsonl").exists()


def test_mlflow_store_and_params_rules(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking.example:5000")
    assert mlflow_tracking_uri(tmp_path) == "http://tracking.example:5000"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    assert mlflow_tracking_uri(tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "True")
    assert mlflow_tracking_uri(tmp_path) == (tmp_path.resolve() / "mlruns").as_uri()
    flat = flat_params(
        {
            "train": {"lr": 2e-4, "steps": None, "report_to": ["mlflow"]},
            "adapter": {"rank_pattern": {".*query": 8}, "target_modules": "all-linear"},
            "data": {"split": {"validation": 0.1}},
            "note": "x" * 7000,
        }
    )
    assert flat == {
        "train.lr": "0.0002",
        "train.steps": "null",
        "train.report_to": '["mlflow"]',
        "adapter.rank_pattern": '{".*query": 8}',
        "adapter.target_modules": "all-linear",
        "data.split.validation": "0.1",
        "note": "x" * 6000,
    }


def test_peftkit_train_logs_the_whole_run_config(tmp_path, monkeypatch, tiny_model_dir, reviews_csv):  # noqa: F811
    from mlflow.tracking import MlflowClient

    from peftkit.run import runner
    from support.runs import make_config

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(name, raising=False)
    run_dir = tmp_path / "run"
    config = make_config(tiny_model_dir, reviews_csv, run_dir, train={"steps": 2, "report_to": ["mlflow"]})
    assert runner.train_run(config, log=lambda line: None).ok
    client = MlflowClient(tracking_uri=mlflow_tracking_uri(run_dir))
    run_id = json.loads((run_dir / RUN_IDS_NAME).read_text())["mlflow"]["run_id"]
    params = client.get_run(run_id).data.params
    # sections beyond train: what `peftkit train` hands to fit
    assert params["task"] == "text-classification" and params["adapter.method"] == "lora"
    assert params["data.columns.text"] == "review" and params["model.name_or_path"] == str(tiny_model_dir)

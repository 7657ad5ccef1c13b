"""LoRA's data-aware inits (EVA, CorDA) through run configs: the run's own training batches feed them, the
saved adapter loads without the data, and the config mistakes are refused with the fix."""

from __future__ import annotations

import json

import pytest

from peftkit.errors import ConfigError
from peftkit.run import runner
from peftkit.run.config import parse_config
from support.generation import llama_with_pairs
from support.runs import make_config

QUIET = {"log": lambda line: None}
EVA = {
    "method": "lora",
    "r": 2,
    "lora_alpha": 4,
    "target_modules": ["query", "key", "value"],
    "init_lora_weights": "eva",
    "eva_config": {"rho": 2, "tau": 0.9},
}


def test_text_classification_run_starts_from_eva(tiny_model_dir, reviews_csv, tmp_path):  # noqa: F811
    config = make_config(
        tiny_model_dir, reviews_csv, tmp_path / "run", adapter=EVA, select={"probe_batches": 2}
    )
    lines: list[str] = []
    result = runner.train_run(config, log=lines.append)
    assert result.ok and any(
        "eva: reading the target layers' inputs on 2 training batches" in x for x in lines
    )
    facts = result.metrics["data_init"]
    assert facts["init"] == "eva" and facts["batches"] == 2 and facts["forward_passes"] >= 2
    saved = json.loads((result.run_dir / "adapter" / "adapter_config.json").read_text())
    assert saved["init_lora_weights"] == "eva" and saved["eva_config"]["tau"] == 0.9
    ranks = [
        saved["rank_pattern"].get(name.replace(".", r"\."), saved["r"]) for name in saved["target_modules"]
    ]
    assert sum(ranks) <= 2 * 6 and max(ranks) <= 4  # the budget of r=2 on 6 modules, at most r * rho each
    assert runner.load_run(result.run_dir).model is not None  # loads without the data


@pytest.mark.parametrize("mode", ["ipm", "kpm"])
def test_causal_lm_run_starts_from_corda_and_saves_it_portable(tmp_path, mode):
    model_dir, pairs = llama_with_pairs(tmp_path)
    config = parse_config(
        {
            "task": "causal-lm",
            "model": {"name_or_path": str(model_dir)},
            "data": {"files": str(pairs), "max_length": 32, "split": {"validation": 0.2, "test": 0.2}},
            "adapter": {
                "method": "lora",
                "r": 2,
                "lora_alpha": 4,
                "target_modules": ["q_proj", "v_proj"],
                "init_lora_weights": "corda",
                "corda_config": {"corda_method": mode},
            },
            "select": {"probe_batches": 2},
            "train": {
                "steps": 2,
                "batch_size": 4,
                "lr": 5e-3,
                "eval_every": 2,
                "metric": "loss",
                "progress": False,
                "tensorboard": False,
                "device": "cpu",
            },
            "eval": {"batch_size": 4, "max_new_tokens": 4, "before_training": True},
            "output_dir": str(tmp_path / "run"),
        }
    )
    result = runner.train_run(config, **QUIET)
    assert result.ok and result.metrics["data_init"] == {"init": "corda", "corda_method": mode, "batches": 2}
    saved = json.loads((result.run_dir / "adapter" / "adapter_config.json").read_text())
    assert saved["init_lora_weights"] is True and saved["r"] == 4  # portable: rank 2r on the original base
    loaded = runner.load_run(result.run_dir)
    again = loaded.task.evaluate(loaded.model, loaded.task.load_data()["test"], 4)
    assert again["loss"] == pytest.approx(result.metrics["test"]["loss"], rel=1e-4)


@pytest.mark.parametrize(
    ("adapter", "select", "message"),
    [
        (
            {"method": "adalora", "init_lora_weights": "eva", "target_modules": ["query"]},
            {},
            r"adapter.init_lora_weights: 'eva' starts lora from the run's training data; method 'adalora' has no "
            r"such init: set adapter.method: lora",
        ),
        (
            {"method": "ia3", "init_lora_weights": "corda"},
            {},
            r"method 'ia3' has no such init: set adapter.method: lora",
        ),
        (
            {**EVA, "target_modules": "auto"},
            {"budget": 100},
            r"`target_modules: auto` chooses targets, ranks and A",
        ),
        ({**EVA, "eva_config": {"rho": 0}}, {}, r"adapter.eva_config.rho: must be a number >= 1"),
        (
            {**EVA, "init_lora_weights": "corda", "corda_config": {"corda_method": "both"}},
            {},
            r"corda_method: 'ipm' .* or 'kpm'",
        ),
        (
            {**EVA},
            {"init_from": "x.safetensors"},
            r"select.init_from: the saved gradient directions would overwrite",
        ),
    ],
)
def test_bad_data_init_configs_are_refused_with_the_fix(
    tiny_model_dir, reviews_csv, tmp_path, adapter, select, message
):  # noqa: F811
    with pytest.raises(ConfigError, match=message):
        make_config(tiny_model_dir, reviews_csv, tmp_path / "run", adapter=adapter, select=select)


def test_an_empty_train_split_is_refused(tiny_model_dir, reviews_csv, tmp_path):  # noqa: F811
    config = make_config(tiny_model_dir, reviews_csv, tmp_path / "run", adapter=EVA)
    task = runner.build_task(config)
    task.load_data = lambda: {"train": []}
    with pytest.raises(
        ConfigError, match=r"train split is empty; init_lora_weights='eva' needs training examples"
    ):
        runner.adapt(task.load_model(), config, task=task)

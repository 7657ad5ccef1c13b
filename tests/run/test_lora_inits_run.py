"""LoftQ and LoRA-GA from a run config: `adapter: {method: lora, init_lora_weights: ...}` trains, exports an
adapter that `load_run` rebuilds into the trained model, and a missing piece is a config error."""

from __future__ import annotations

import json

import pytest

from peftkit.errors import ConfigError
from peftkit.run import runner
from support.runs import make_config

pytest.importorskip("bitsandbytes")


def _run(tiny_model_dir, reviews_csv, out, **adapter):
    config = make_config(
        tiny_model_dir,
        reviews_csv,
        out,
        adapter={"method": "lora", "r": 4, "lora_alpha": 4, "target_modules": ["query", "value"], **adapter},
        train={"steps": 3, "eval_every": 0},
    )
    return config, runner.train_run(config, log=lambda line: None)


def test_lora_ga_run_exports_a_portable_adapter_that_load_run_rebuilds(tiny_model_dir, reviews_csv, tmp_path):
    _, result = _run(tiny_model_dir, reviews_csv, tmp_path / "ga", init_lora_weights="lora_ga")
    assert result.ok
    saved = json.loads((tmp_path / "ga" / "adapter" / "adapter_config.json").read_text())
    assert saved["init_lora_weights"] is True and saved["r"] == 8  # rank 2r on the original base
    assert runner.eval_run(tmp_path / "ga")["accuracy"] == result.metrics["test"]["accuracy"]


def test_loftq_run_reloads_onto_the_original_base(tiny_model_dir, reviews_csv, tmp_path):
    fields = {"init_lora_weights": "loftq", "loftq_config": {"loftq_bits": 8, "loftq_iter": 2}}
    _, result = _run(tiny_model_dir, reviews_csv, tmp_path / "loftq", **fields)
    assert result.ok
    saved = json.loads((tmp_path / "loftq" / "adapter" / "adapter_config.json").read_text())
    assert saved["init_lora_weights"] == "loftq"
    assert runner.eval_run(tmp_path / "loftq")["loss"] == pytest.approx(
        result.metrics["test"]["loss"], abs=1e-5
    )


def test_lora_ga_without_data_names_the_fix(tiny_model_dir, reviews_csv, tmp_path):
    config = make_config(
        tiny_model_dir,
        reviews_csv,
        tmp_path / "x",
        adapter={"method": "lora", "target_modules": ["query"], "init_lora_weights": "lora_ga"},
    )
    with pytest.raises(ConfigError, match="train_step"):
        runner.adapt(runner.build_task(config).load_model(), config)

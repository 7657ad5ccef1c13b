"""``peftkit combine`` and ``peftkit convert`` on saved runs and adapter directories: no training config,
the base found from the run or the adapter, the output a plain LoRA with its report, and the usage
errors (exit 2) and refusals (exit 1)."""

from __future__ import annotations

import json

import pytest
import torch

import peftkit
from peftkit.cli import main
from peftkit.run import runner
from peftkit.run.config import load_config
from support.runs import make_config

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")


@pytest.fixture(scope="module")
def runs(tiny_model_dir, reviews_csv, tmp_path_factory):
    """Three 2-step runs on the tiny BERT: LoRA, LoHa, and full fine-tuning."""
    root = tmp_path_factory.mktemp("runs")
    adapters = {
        "lora": {"method": "lora", "r": 4, "lora_alpha": 8, "target_modules": ["query", "value"]},
        "loha": {"method": "loha", "r": 2, "target_modules": ["query", "key"]},
        "full": {"method": "full"},
    }
    for name, adapter in adapters.items():
        config = make_config(tiny_model_dir, reviews_csv, root / name, adapter=adapter, train={"steps": 2})
        assert runner.train_run(config, log=lambda line: None).ok
    return root


IDS = torch.tensor([[2, 5, 9, 14, 3]])


def _logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def _base(run_dir):
    return runner.build_task(load_config(run_dir / "config.yaml")).load_model().eval()


def test_combine_writes_the_combination_of_two_runs(runs, tmp_path, capsys):
    out = tmp_path / "ab"
    assert (
        main(["combine", str(runs / "lora"), str(runs / "loha"), "--weights", "1", "-0.5", "--out", str(out)])
        == 0
    )
    printed = capsys.readouterr().out
    assert "combine lora, loha: 6 modules" in printed and "saved" in printed
    assert {p.name for p in out.iterdir()} == {
        "adapter_config.json",
        "adapter_model.safetensors",
        "combine_report.json",
    }
    report = json.loads((out / "combine_report.json").read_text())
    assert report["weights"] == [1.0, -0.5] and report["options"]["method"] == "linear"

    expected = _base(runs / "lora")  # the same base, built from the run's own config
    peftkit.load_adapter(expected, runs / "lora" / "adapter", "lora")
    peftkit.load_adapter(expected, runs / "loha" / "adapter", "loha")
    peftkit.combine(expected, ["lora", "loha"], [1, -0.5])
    written = peftkit.load_adapter(_base(runs / "lora"), out)
    torch.testing.assert_close(_logits(written), _logits(expected), rtol=0, atol=1e-5)


def test_combine_takes_comma_separated_weights_and_the_pruning_options(runs, tmp_path):
    args = ["combine", str(runs / "lora"), str(runs / "loha" / "adapter"), "--weights=1,-1"]
    assert (
        main(
            [*args, "--method", "dare_ties", "--density", "0.5", "--seed", "3", "--out", str(tmp_path / "d")]
        )
        == 0
    )
    report = json.loads((tmp_path / "d" / "combine_report.json").read_text())
    assert report["options"] == {"method": "dare_ties", "density": 0.5, "seed": 3, "sign": "total"}


def test_combine_usage_errors_exit_with_2(runs, tmp_path, capsys):
    sources = [str(runs / "lora"), str(runs / "loha")]
    assert main(["combine", *sources, "--weights", "1", "--out", str(tmp_path / "x")]) == 2
    assert "1 weight(s) for 2 adapter(s)" in capsys.readouterr().err
    assert (
        main(["combine", *sources, "--weights", "1", "1", "--method", "ties", "--out", str(tmp_path / "x")])
        == 2
    )
    assert "ties needs the share of entries to keep" in capsys.readouterr().err
    assert main(["combine", *sources, "--weights", "1", "x", "--out", str(tmp_path / "x")]) == 2
    assert main(["combine", *sources, "--weights", "1", "1"]) == 2  # --out is required
    typo = str(runs / "lroa")
    assert main(["combine", typo, sources[1], "--weights", "1", "1", "--out", str(tmp_path / "x")]) == 2
    assert f"{typo!r} does not exist" in capsys.readouterr().err
    assert main(["convert", typo, "--to", "lora", "--out", str(tmp_path / "x")]) == 2
    assert f"{typo!r} does not exist" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_combine_refuses_a_full_output_directory_and_a_non_adapter(runs, tmp_path, capsys):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    args = ["combine", str(runs / "lora"), str(runs / "loha"), "--weights", "1", "1"]
    assert main([*args, "--out", str(tmp_path / "taken")]) == 1
    assert "already exists and is not empty" in capsys.readouterr().err
    assert (tmp_path / "taken" / "keep.txt").read_text() == "mine"
    assert main(["combine", str(tmp_path), "--weights", "1", "--out", str(tmp_path / "y")]) == 1
    assert "neither a run directory" in capsys.readouterr().err
    assert main(["combine", str(runs / "full"), "--weights", "1", "--out", str(tmp_path / "y")]) == 2
    assert "full fine-tuning run" in capsys.readouterr().err


def test_convert_writes_a_lora_and_prints_each_module(runs, tmp_path, capsys):
    out = tmp_path / "as-lora"
    assert (
        main(["convert", str(runs / "loha" / "adapter"), "--to", "lora", "--rank", "1", "--out", str(out)])
        == 0
    )
    printed = capsys.readouterr().out
    assert "convert source: 4 modules, ranks 1-1" in printed
    assert peftkit.read_adapter_config(out).peft_type == "LORA"
    report = json.loads((out / "combine_report.json").read_text())
    assert all(m["rank"] == 1 and 0 < m["relative_error"] < 1 for m in report["modules"].values())
    assert (
        main(["convert", str(runs / "loha"), "--to", "lora", "--rank", "1", "--energy", "0.9", "--out", "z"])
        == 2
    )


def test_convert_extracts_a_lora_from_a_full_fine_tuning_run(runs, tmp_path, capsys):
    out = tmp_path / "extracted"
    assert main(["convert", str(runs / "full"), "--to", "lora", "--rank", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "extract" in printed and "changed but not carried by a LoRA" in printed
    report = json.loads((out / "combine_report.json").read_text())
    assert report["heads"] == {"classifier": "copied"} and report["modules"]
    assert "bert.embeddings.word_embeddings.weight" in report["not_carried"]


def test_convert_of_a_model_directory_needs_its_base(runs, tiny_model_dir, tmp_path, capsys):
    tuned = runner.load_run(runs / "full").model
    tuned.save_pretrained(tmp_path / "tuned")
    assert (
        main(
            ["convert", str(tmp_path / "tuned"), "--to", "lora", "--rank", "2", "--out", str(tmp_path / "a")]
        )
        == 2
    )
    assert "pass --base MODEL" in capsys.readouterr().err
    args = [
        "convert",
        str(tmp_path / "tuned"),
        "--to",
        "lora",
        "--base",
        str(tiny_model_dir),
        "--targets",
        "query",
    ]
    assert main([*args, "--energy", "0.99", "--out", str(tmp_path / "b")]) == 0
    report = json.loads((tmp_path / "b" / "combine_report.json").read_text())
    assert sorted(report["modules"]) == [f"bert.encoder.layer.{i}.attention.self.query" for i in (0, 1)]

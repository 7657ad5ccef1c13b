"""`peftkit serve` on the command line: what it refuses before opening a port (exit 2, nothing served),
and a clean shutdown on SIGTERM that lets a request in flight finish."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys

import httpx
import pytest

from peftkit.cli import main
from support.serving import base_and_adapters

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve-cli")
    model_dir, adapters = base_and_adapters(tmp, ["one", "two"])
    return tmp, model_dir, adapters


def test_a_missing_base_is_a_usage_error(tmp_path, capsys):
    assert main(["serve", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["serve", "smolm2-135m-instruct"]) == 2  # a typo: refused at once, not after hub retries
    assert "did you mean 'smollm2-135m-instruct'" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        (["--adapter", "one=/no/such/dir"], "--adapter one=/no/such/dir: cannot load adapter 'one'"),
        (["--adapter", "=x"], "expected NAME=DIR"),
        (["--max-adapters", "0"], "--max-adapters: expected at least 1"),
        (["--adapters-dir", "/no/such/dir"], "--adapters-dir: '/no/such/dir' is not a directory"),
        (["--device", "cuda:99"], "--device cuda:99: no such device here"),
    ],
)
def test_bad_options_stop_it_before_it_serves(world, capsys, extra, says):
    _, model_dir, _ = world
    assert main(["serve", str(model_dir), "--port", "0", *extra]) == 2
    assert says in capsys.readouterr().err


def test_a_refused_adapter_stops_it_naming_the_adapter(world, capsys):
    tmp, model_dir, adapters = world
    broken = tmp / "broken"
    shutil.copytree(adapters / "one", broken, dirs_exist_ok=True)
    weights = broken / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    assert (
        main(
            [
                "serve",
                str(model_dir),
                "--port",
                "0",
                "--adapter",
                f"good={adapters / 'two'}",
                "--adapter",
                f"bad={broken}",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert f"--adapter bad={broken}: adapter 'bad' was refused" in err and "good" not in err.replace(
        str(adapters / "two"), ""
    )


@pytest.mark.slow
def test_sigterm_lets_the_request_in_flight_finish(world):
    _, model_dir, adapters = world
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "peftkit",
            "serve",
            str(model_dir),
            "--name",
            "tiny",
            "--port",
            "0",
            "--adapters-dir",
            str(adapters),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    try:
        url = None
        for line in process.stdout:
            if "peftkit serve:" in line and " on http://" in line:
                url = line.split(" on ")[1].split()[0]
                break
        assert url, "the server did not say where it listens"
        body = {"model": "one", "prompt": "say cat", "max_tokens": 120, "temperature": 0}
        whole = httpx.post(f"{url}/v1/completions", json=body, timeout=60).json()["choices"][0]
        chunks = []
        with httpx.stream("POST", f"{url}/v1/completions", json=dict(body, stream=True), timeout=60) as reply:
            lines = reply.iter_lines()
            for line in lines:
                if line.startswith("data: {"):
                    chunks.append(json.loads(line[6:]))
                    break
            process.send_signal(signal.SIGTERM)  # while the answer is still being written
            for line in lines:
                if line.startswith("data: {"):
                    chunks.append(json.loads(line[6:]))
                elif line == "data: [DONE]":
                    chunks.append("DONE")
        assert chunks[-1] == "DONE" and not any("error" in c for c in chunks[:-1])
        assert "".join(c["choices"][0]["text"] for c in chunks[:-1]) == whole["text"]
        assert chunks[-2]["choices"][0]["finish_reason"] == whole["finish_reason"]
        assert process.wait(timeout=60) == 0
        assert "peftkit serve: stopped" in process.stdout.read()
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{url}/health")
    finally:
        if process.poll() is None:
            process.kill()

"""The one owner of the process group (``peftkit.train.distributed.process_group``): it starts the group
from torchrun's environment and ends it on every way out, SIGTERM included.

A group still running when a process exits aborts it now and then ("terminate called without an active
exception": gloo's threads outlive the interpreter); ``tests/test_distributed.py`` checks every rank of
real runs. Here one process plays a torchrun job of one rank (a real gloo group), in a subprocess, so
that a SIGTERM cannot reach pytest itself.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest

from peftkit.train.distributed import World, ensure_process_group, process_group

PRELUDE = """
import atexit, json, os, signal, sys, threading
import torch.distributed as dist
from peftkit.train import distributed

distributed.launched_by_torchrun = lambda: True  # a job of one rank: torchrun's check wants two
seen = {}
# registered first, so it runs after peftkit's own exit hook: what is left when the process ends
atexit.register(lambda: print(json.dumps({**seen, "alive_at_exit": dist.is_initialized(),
    "threads": [t.name for t in threading.enumerate() if t is not threading.main_thread()]})))
"""


def one_rank_job(body: str) -> tuple[int, dict]:
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(sys.path),
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
    }
    script = PRELUDE + textwrap.dedent(body)
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert "terminate called" not in done.stderr, done.stderr
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    assert lines, done.stdout + done.stderr
    return done.returncode, json.loads(lines[-1])


def test_outside_torchrun_nothing_is_started():
    with process_group("cpu") as world:
        assert world == World()
    assert ensure_process_group("cpu") == World()


def test_the_owner_ends_the_group_when_its_block_ends_and_on_sigterm():
    code, seen = one_rank_job(
        """
        with distributed.process_group("cpu"):
            seen["inside"] = dist.is_initialized()
        seen["after"] = dist.is_initialized()
        try:
            with distributed.process_group("cpu"):
                os.kill(os.getpid(), signal.SIGTERM)  # what torchrun sends a rank when another one failed
                signal.pause()
        except SystemExit as exc:
            seen["exit"] = exc.code
        seen["after_sigterm"] = dist.is_initialized()
        seen["handler_restored"] = signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
        """
    )
    assert code == 0
    assert seen == {
        "inside": True,
        "after": False,
        "exit": 143,
        "after_sigterm": False,
        "handler_restored": True,
        "alive_at_exit": False,
        "threads": [],
    }


def test_an_inner_block_uses_the_running_group_and_ends_nothing():
    code, seen = one_rank_job(
        """
        with distributed.process_group("cpu"):
            with distributed.process_group("cpu"):
                pass
            seen["after_inner"] = dist.is_initialized()
            seen["ensure"] = distributed.ensure_process_group("cpu").size
        """
    )
    assert code == 0 and seen["after_inner"] and seen["ensure"] == 1 and not seen["alive_at_exit"]


@pytest.mark.parametrize("how", ["return", "error", "sigterm", "destroyed by the script"])
def test_a_group_fit_starts_for_the_process_ends_at_exit_whatever_ends_the_process(how):
    """What ``fit`` does in a script that torchrun launched and that owns no group."""
    endings = {
        "return": "",
        "error": "raise ValueError('the script failed')",
        "sigterm": "os.kill(os.getpid(), signal.SIGTERM); signal.pause()",
        "destroyed by the script": "dist.destroy_process_group()",
    }
    code, seen = one_rank_job(
        f"""
        distributed.ensure_process_group("cpu")
        seen["started"] = dist.is_initialized()
        {endings[how]}
        """
    )
    assert seen == {"started": True, "alive_at_exit": False, "threads": []}
    assert code == {"error": 1, "sigterm": 143}.get(how, 0)

"""docs/development.md tells the versions the suite is run with; they must be the ones locked."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _locked() -> dict[str, str]:
    lines = (ROOT / "constraints.txt").read_text().splitlines()
    pins = (line.split("==", 1) for line in lines if "==" in line and not line.startswith("#"))
    return {name.lower().replace("_", "-"): version for name, version in pins}


def test_tested_versions_are_the_locked_ones():
    doc = (ROOT / "docs" / "development.md").read_text()
    table = doc.split("<!-- tested-versions:start -->", 1)[1].split("<!-- tested-versions:end -->", 1)[0]
    listed = dict(re.findall(r"^\| `([\w-]+)` \| (\S+)", table, re.M))
    torch = re.search(r"^TORCH := torch==(\S+)$", (ROOT / "Makefile").read_text(), re.M).group(1)
    assert listed.pop("torch") == torch
    locked = _locked()
    wrong = {
        name: (version, locked.get(name)) for name, version in listed.items() if locked.get(name) != version
    }
    assert not wrong, f"docs/development.md lists (doc, constraints.txt): {wrong}"


def test_pre_commit_runs_the_locked_ruff():
    config = (ROOT / ".pre-commit-config.yaml").read_text()
    rev = re.search(r"ruff-pre-commit\n\s+rev: v(\S+)", config).group(1)
    assert rev == _locked()["ruff"], "set the ruff-pre-commit rev to the ruff in constraints.txt"


def test_the_reference_library_is_pinned_to_the_locked_version():
    pin = re.search(r'^\s+"peft==([^"]+)",', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    assert pin == _locked()["peft"], "pyproject.toml's dev extra and constraints.txt disagree on peft"

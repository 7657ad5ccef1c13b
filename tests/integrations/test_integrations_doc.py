"""The Python examples of docs/integrations.md run as written and print what the page shows."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[2] / "docs" / "integrations.md"


def section(title: str) -> str:
    """The text under ``## title``, up to the next level-2 heading."""
    text = DOC.read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:] if end < 0 else text[start:end]


def fenced(text: str) -> list[tuple[str, str]]:
    """The fenced blocks of ``text`` as (language, content)."""
    blocks, language, lines = [], None, []
    for line in text.splitlines():
        if line.startswith("```"):
            if language is None:
                language, lines = line[3:].strip(), []
            else:
                blocks.append((language, "\n".join(lines) + "\n"))
                language = None
        elif language is not None:
            lines.append(line)
    return blocks


def run_section(
    title: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> tuple[str, list[str]]:
    """Run every python block of the section in one namespace; return (printed output, the page's outputs)."""
    blocks = fenced(section(title))
    code = [content for language, content in blocks if language == "python"]
    assert code, f"no python example under {title!r}"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for block in code:
        exec(compile(block, str(DOC), "exec"), namespace)
    return capsys.readouterr().out, [content for language, content in blocks if not language]


@pytest.mark.slow
def test_save_pretrained_examples(tmp_path, monkeypatch, capsys):
    out, shown = run_section("save_pretrained", tmp_path, monkeypatch, capsys)
    for name in ("transformers", "peftkit", "reference"):
        difference = float(re.search(rf"^{name}\s+max \|difference\| (\S+)$", out, re.M).group(1))
        assert difference < 1e-5, out
    assert "BertModel.save_pretrained refused" in out and "['config.json', 'model.safetensors']" in out
    assert any("BertModel.save_pretrained refused" in block for block in shown)
    assert sorted(p.name for p in (tmp_path / "minilm-lora").iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]


@pytest.mark.slow
def test_transformers_trainer_examples(tmp_path, monkeypatch, capsys):
    out, shown = run_section("transformers Trainer", tmp_path, monkeypatch, capsys)
    assert out.strip().splitlines()[-1] == "12"
    files = sorted(p.name for p in (tmp_path / "minilm-run" / "checkpoint-4").iterdir())
    listing = next(block for block in shown if block.startswith("minilm-run/checkpoint-4:"))
    assert files == sorted(listing.split()[1:])
    assert (tmp_path / "minilm-final" / "adapter_model.safetensors").exists()

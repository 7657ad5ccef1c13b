"""Would vLLM serve this adapter? ``peftkit export --check vllm ADAPTER_DIR`` (docs/vllm.md).

vLLM loads a LoRA adapter from the same two files peftkit and the reference library write
(``adapter_config.json`` + ``adapter_model.safetensors``) and refuses, at load time, anything its
kernels cannot run. This module applies the same rules to a directory without vLLM or a GPU, and says
for each problem what to change, so a refusal is found before a deployment rather than in a server log.

The rules are facts read from vLLM's own source (main branch, late 2026; docs/vllm.md lists each with
its file): the config goes through ``vllm/lora/peft_helper.py`` (``PEFTHelper``: the fields it needs,
``_validate_features``, ``validate_legal``), the tensor names through ``vllm/lora/utils.py``
(``parse_fine_tuned_lora_name``) and ``vllm/lora/lora_model.py`` (``from_local_checkpoint``: every
adapted module's last name part must be a module the engine's model offers for LoRA), and the rank
through ``vllm/config/lora.py`` (``--max-lora-rank`` takes one of a fixed set of values, default 16).

The config is read as JSON rather than through :func:`peftkit.core.io.read_adapter_config`: vLLM reads the
raw JSON (whatever the method), and a config peftkit would refuse must still get a report. The tensors
are read from the safetensors header only (names and shapes), never their data.
"""

from __future__ import annotations

import json
import os
import re
import shlex
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..core.io import CONFIG_NAME, MAX_CONFIG_BYTES, WEIGHTS_NAME
from ..errors import AdapterFileError
from ..run.runner import ADAPTER_DIR, FULL_MODEL_DIR, weights_dir
from ..run.runner import CONFIG_NAME as RUN_CONFIG_NAME
from . import vllm_rules as rules
from .vllm_rules import DEFAULT_MAX_LORA_RANK, MAX_LORA_RANKS, Finding

__all__ = ["DEFAULT_MAX_LORA_RANK", "MAX_LORA_RANKS", "Finding", "VllmReport", "check_vllm"]


@dataclass
class VllmReport:
    """The result of :func:`check_vllm`: findings, and how to serve the adapter when none is an error."""

    source: Path  # what was given: an adapter directory or a run directory
    directory: Path  # the adapter directory checked
    peft_type: str
    base_model: str | None
    rank: int | None  # the largest rank of any module (config and tensors)
    modules: list[str]  # the last name parts of the adapted modules, e.g. ["q_proj", "v_proj"]
    findings: list[Finding] = field(default_factory=list)
    name: str = "adapter"

    @property
    def accepted(self) -> bool:
        """Whether vLLM would load the adapter and serve what it was trained to do."""
        return not any(f.level == "error" for f in self.findings)

    @property
    def max_lora_rank(self) -> int | None:
        """The ``--max-lora-rank`` value to serve it with: the smallest allowed one holding its rank."""
        if self.rank is None:
            return None
        return next((r for r in MAX_LORA_RANKS if r >= self.rank), None)

    def command(self) -> str | None:
        """The ``vllm serve`` command line that serves the adapter as ``self.name``; None if refused."""
        if not self.accepted or self.max_lora_rank is None:
            return None
        base = shlex.quote(self.base_model) if self.base_model else "BASE_MODEL"
        module = shlex.quote(f"{self.name}={self.directory}")
        return f"vllm serve {base} --enable-lora --lora-modules {module} --max-lora-rank {self.max_lora_rank}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": str(self.source),
            "directory": str(self.directory),
            "accepted": self.accepted,
            "peft_type": self.peft_type,
            "base_model": self.base_model,
            "rank": self.rank,
            "max_lora_rank": self.max_lora_rank,
            "modules": self.modules,
            "name": self.name,
            "command": self.command(),
            "findings": [asdict(f) for f in self.findings],
        }

    def __str__(self) -> str:
        rank = f" r={self.rank}" if self.rank is not None else ""
        modules = f", modules {', '.join(self.modules)}" if self.modules else ""
        lines = [f"vLLM check of {self.directory} ({self.peft_type}{rank}{modules})"]
        for finding in sorted(self.findings, key=lambda f: ("error", "warning", "note").index(f.level)):
            lines.append(f"  {finding.level:<8}{finding.check}: {finding.problem}")
            if finding.fix:
                lines.append(f"  {'':<8}fix: {finding.fix}")
        errors = sum(f.level == "error" for f in self.findings)
        warnings = sum(f.level == "warning" for f in self.findings)
        if not self.accepted:
            lines.append(f"vLLM would refuse this adapter: {errors} error(s), {warnings} warning(s).")
            return "\n".join(lines)
        lines.append(f"vLLM would accept this adapter ({warnings} warning(s)). Serve it with:")
        lines.append(f"  {self.command()}")
        lines.append(
            f'and ask for it by name: "model": "{self.name}" in /v1/completions or /v1/chat/completions '
            "(the base model's name gets the base alone). See docs/vllm.md."
        )
        return "\n".join(lines)


# -- finding the adapter ---------------------------------------------------------------------------


def adapter_directory(path: str | os.PathLike) -> Path:
    """The adapter directory of ``path``: itself, or the adapter of a ``peftkit train`` run directory.

    Raises:
        FileNotFoundError: ``path`` does not exist, or holds no adapter (the message says what to give).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"{str(path)!r} does not exist (relative paths start from {str(Path.cwd())!r}); give an adapter "
            f"directory ({CONFIG_NAME} + {WEIGHTS_NAME}, written by save_adapter or save_pretrained) or the "
            "output_dir of `peftkit train`"
        )
    if (path / CONFIG_NAME).is_file():
        return path
    if (path / RUN_CONFIG_NAME).is_file():
        if (path / FULL_MODEL_DIR).is_dir() and not (path / ADAPTER_DIR).is_dir():
            raise FileNotFoundError(
                f"{str(path)!r} is a full fine-tuning run: it has no adapter. vLLM serves its model directly "
                f"(`vllm serve {path / FULL_MODEL_DIR}`), or extract a LoRA from it with `peftkit convert {path} "
                "--to lora --rank R --out DIR` and check that"
            )
        return weights_dir(path, full=False)
    raise FileNotFoundError(
        f"{str(path)!r} holds no adapter: no {CONFIG_NAME} (an adapter directory) and no {RUN_CONFIG_NAME} "
        "(a run directory); give the directory save_adapter / save_pretrained wrote, or the output_dir of "
        "`peftkit train`"
    )


def _read_config(directory: Path) -> dict[str, Any]:
    path = directory / CONFIG_NAME
    if not path.is_file() or path.stat().st_size > MAX_CONFIG_BYTES:
        raise AdapterFileError(f"{path} is not a regular file of at most {MAX_CONFIG_BYTES:,} bytes")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise AdapterFileError(
            f"{path} is not valid JSON ({exc}); the file is corrupt or was cut short"
        ) from None
    if not isinstance(data, dict):
        raise AdapterFileError(f"{path} must hold a JSON object of config keys")
    return data


# -- the check ---------------------------------------------------------------------------------------


def check_vllm(path: str | os.PathLike, name: str | None = None) -> VllmReport:
    """Check whether vLLM would serve the adapter in ``path`` (an adapter or ``peftkit train`` run directory).

    Args:
        path: The adapter directory, or a run directory (its ``adapter/``, else its best checkpoint).
        name: The name to serve it under (``--lora-modules NAME=DIR``); default: the directory's name.

    Raises:
        FileNotFoundError: ``path`` does not exist or holds no adapter.
        AdapterFileError: the config is not JSON, or the safetensors file is corrupt.
    """
    source = Path(path)
    directory = adapter_directory(source).resolve()
    config = _read_config(directory)
    peft_type = str(config.get("peft_type") or "LORA")  # vLLM never reads it: LoRA is all it assumes
    default_name = source.resolve().name if directory != source.resolve() else directory.name
    report = VllmReport(
        source=source,
        directory=directory,
        peft_type=peft_type,
        base_model=config.get("base_model_name_or_path") or None,
        rank=None,
        modules=[],
        name=_served_name(name or default_name),
    )
    run_dir = source if directory != source.resolve() else None
    merge = rules.merge_hint(run_dir)
    given = run_dir or directory  # what peftkit convert is given: a run brings its own base model
    if peft_type.upper() != "LORA":
        report.findings.append(rules.method_finding(peft_type, given, merge))
        return report  # vLLM fails on the first tensor name; the LoRA rules below do not apply
    if not config.get("peft_type"):
        report.findings.append(
            Finding(
                "warning",
                "config",
                "adapter_config.json has no peft_type: vLLM does not read it, but the reference library and "
                "peftkit cannot load the adapter",
                'add "peft_type": "LORA" to adapter_config.json',
            )
        )
    report.findings += rules.config_findings(config, given, merge) + rules.unsupported_findings(config, merge)
    shapes = rules.tensor_shapes(directory, report)
    module_ranks: dict[str, int] = {}
    if shapes is not None:
        findings, module_ranks = rules.tensor_findings(config, shapes, report, merge)
        report.findings += findings
    report.findings += rules.rank_findings(config, report, module_ranks, given)
    if report.base_model is None:
        report.findings.append(
            Finding(
                "warning",
                "base",
                "adapter_config.json names no base_model_name_or_path, so the vllm serve command says BASE_MODEL",
                "serve it on the model it was trained on (vLLM cannot tell a wrong base from a right one)",
            )
        )
    return report


def _served_name(text: str) -> str:
    # --lora-modules NAME=PATH splits at "=": keep the name to characters every shell and URL leaves alone
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.")
    return cleaned or "adapter"

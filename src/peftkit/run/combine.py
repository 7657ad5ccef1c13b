"""Saved adapters combined or converted to plain LoRA on disk: what ``peftkit combine`` and ``peftkit
convert`` run. No training config is needed: the base model comes from a run directory's own config, or
from the adapter's ``base_model_name_or_path`` (or ``--base``) and its ``task_type``.

Each writes the new adapter in the interchange format to a new directory, with ``combine_report.json``
beside it (what it was made from, each module's rank and approximation error); the reference library
ignores that file.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from .. import api
from ..core.io import CONFIG_NAME as ADAPTER_CONFIG
from ..core.io import read_adapter_config, read_adapter_tensors
from ..errors import ConfigError
from ..models import bundled_model_path, bundled_name, quiet_transformers
from ..train.checkpoint import load_weights
from .config import load_config
from .runner import CONFIG_NAME, FULL_MODEL_DIR, build_task, is_full_fine_tuning, weights_dir

REPORT_NAME = "combine_report.json"
# transformers Auto class per reference task_type, for adapters saved without a run config
_AUTO_CLASSES = {
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
}


@dataclass
class Source:
    """An adapter on disk: its directory, and the run config it was trained with (None: a bare adapter)."""

    adapter_dir: Path
    run_config: Any = None


def find_source(path: str | os.PathLike) -> Source:
    """A run directory (``peftkit train``'s output_dir) or an adapter directory (adapter_config.json).

    Raises:
        FileNotFoundError: neither.
    """
    path = Path(path)
    if (path / CONFIG_NAME).is_file():
        config = load_config(path / CONFIG_NAME)
        if is_full_fine_tuning(config):
            raise ConfigError(
                [
                    f"{str(path)!r} is a full fine-tuning run: it has no adapter. Extract one from it with "
                    f"`peftkit convert {path} --to lora --rank R --out DIR`"
                ],
                what="source",
            )
        return Source(weights_dir(path, full=False), config)
    if (path / ADAPTER_CONFIG).is_file():
        return Source(path)
    raise FileNotFoundError(
        f"{str(path)!r} is neither a run directory (config.yaml) nor an adapter directory ({ADAPTER_CONFIG}); "
        "give the output_dir of `peftkit train`, or a directory written by save_adapter / save_pretrained"
    )


def load_base(source: Source, base: str | None = None) -> nn.Module:
    """The base model ``source`` was trained on, without adapters, in eval mode.

    A run's own config builds it (its fresh head seeded as in training); a bare adapter names it in
    ``base_model_name_or_path`` (``base`` overrides), and its ``task_type`` picks the transformers class
    (a sequence-classification head gets as many classes as the saved head has rows).

    Raises:
        ConfigError: a bare adapter names no base model and ``base`` is not given.
    """
    if source.run_config is not None and base is None:
        return build_task(source.run_config).load_model().eval()
    config = read_adapter_config(source.adapter_dir)
    name = base or config.base_model_name_or_path
    if not name:
        raise ConfigError(
            [
                f"{str(source.adapter_dir)!r} does not name its base model (base_model_name_or_path); pass --base MODEL"
            ],
            what="source",
        )
    path = bundled_model_path(bundled_name(name) or "") or name
    import transformers

    auto = getattr(transformers, _AUTO_CLASSES.get(config.task_type or "", "AutoModel"))
    kwargs = {}
    if config.task_type == "SEQ_CLS":
        kwargs["num_labels"] = _head_rows(
            source.adapter_dir, config.modules_to_save or ["classifier", "score"]
        )
    with quiet_transformers():
        return auto.from_pretrained(path, **kwargs).eval()


def _head_rows(adapter_dir: Path, heads: Sequence[str]) -> int:
    tensors, _ = read_adapter_tensors(adapter_dir)
    for key, tensor in tensors.items():
        if any(key.endswith(f"{head}.weight") for head in heads) and tensor.dim() == 2:
            return int(tensor.shape[0])
    return 2  # transformers' default; the adapter saved no head


def _names(sources: Sequence[Source]) -> list[str]:
    """Adapter names from the directory names (unique, without the dots adapter names cannot hold)."""
    names: list[str] = []
    for source in sources:
        stem = source.adapter_dir.parent.name if source.run_config is not None else source.adapter_dir.name
        stem = re.sub(r"[^\w-]", "_", stem) or "adapter"
        name, n = stem, 1
        while name in names:
            n += 1
            name = f"{stem}_{n}"
        names.append(name)
    return names


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(
            f"{str(out)!r} already exists and is not empty; give a new directory for the adapter (nothing "
            "was written)"
        )


def _write(model: nn.Module, name: str, out: Path) -> Any:
    api.save_adapter(model, out, name)
    report = api.combine_report(model, name)
    (out / REPORT_NAME).write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    return report


def combine_dirs(
    paths: Sequence[str | os.PathLike],
    weights: Sequence[float],
    out: str | os.PathLike,
    *,
    base: str | None = None,
    name: str = "combined",
    **options: Any,
) -> Any:
    """Load every adapter in ``paths`` onto one base, :func:`peftkit.combine` them with ``options``, and
    save the result to ``out`` (which must not hold anything yet). Returns the combine report.

    Raises:
        FileExistsError: ``out`` is not empty.
        AdapterMismatchError: an adapter was saved from another base model than the first one.
    """
    out = Path(out)
    _check_out(out)
    sources = [find_source(p) for p in paths]
    model = load_base(sources[0], base)
    names = _names(sources)
    for source, adapter in zip(sources, names):
        api.load_adapter(model, source.adapter_dir, adapter)
    api.combine(model, names, list(weights), name=name, **options)
    return _write(model, name, out)


def convert_dir(
    path: str | os.PathLike,
    out: str | os.PathLike,
    *,
    base: str | None = None,
    rank: int | None = None,
    energy: float | None = None,
    target_modules: list[str] | str | None = None,
) -> Any:
    """Write a plain LoRA approximating the adapter at ``path`` to ``out``; or, when ``path`` is a full
    fine-tuning run or a fine-tuned model directory, the LoRA extracted from its difference to the base
    (``base``; a run's own config gives it). Returns the report."""
    out = Path(out)
    _check_out(out)
    path = Path(path)
    finetuned = _finetuned(path, base)
    if finetuned is not None:
        model, tuned = finetuned
        api.extract_lora(
            model, tuned, name="extracted", rank=rank, energy=energy, target_modules=target_modules
        )
        return _write(model, "extracted", out)
    if target_modules is not None:
        raise ConfigError(["--targets: only for extraction from a fine-tuned model"], what="convert")
    source = find_source(path)
    model = load_base(source, base)
    api.load_adapter(model, source.adapter_dir, "source")
    api.convert_to_lora(model, "source", name="lora", rank=rank, energy=energy)
    return _write(model, "lora", out)


def _finetuned(path: Path, base: str | None) -> tuple[nn.Module, nn.Module] | None:
    """(base, fine-tuned) when ``path`` is a full fine-tuning run or a transformers model directory."""
    if (path / CONFIG_NAME).is_file():
        config = load_config(path / CONFIG_NAME)
        if not is_full_fine_tuning(config):
            return None
        task = build_task(config)
        tuned = load_weights(task.load_model(), path / FULL_MODEL_DIR).eval()
        return task.load_model().eval(), tuned
    if (path / ADAPTER_CONFIG).is_file() or not (path / "config.json").is_file():
        return None
    if not base:
        raise ConfigError(
            [f"{str(path)!r} is a model directory: pass --base MODEL, the model it was fine-tuned from"],
            what="convert",
        )
    import transformers

    with quiet_transformers():
        probe = transformers.AutoConfig.from_pretrained(path)
        architecture = (probe.architectures or ["AutoModel"])[0]
        cls = getattr(transformers, architecture, None) or transformers.AutoModel
        tuned = cls.from_pretrained(path).eval()
        kwargs = {"num_labels": probe.num_labels} if "ForSequenceClassification" in architecture else {}
        model = cls.from_pretrained(bundled_model_path(bundled_name(base) or "") or base, **kwargs).eval()
    return model, tuned


__all__ = ["REPORT_NAME", "combine_dirs", "convert_dir", "find_source", "load_base"]

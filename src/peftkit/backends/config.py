"""The quantization rules of a run config (``model.quantize``, ``model.double_quant``): which
quantizations exist, and which adapter methods can train on a quantized base.

A method says so itself (``AdapterConfig.quantizable``, set in its file); this module never names one.
"""

from __future__ import annotations

import importlib.util

from ..core import registry
from ..core.registry import FULL_FINE_TUNING

# bitsandbytes 4-bit (NF4, FP4) and 8-bit (LLM.int8()) bases
QUANT_TYPES = ("nf4", "fp4", "int8")


def quantize_problems(quantize: str | None, method: str) -> list[str]:
    """What stops a run from training adapter ``method`` (a name, or ``full``) on a base quantized as
    ``quantize``: full fine-tuning, a method without layers for packed weights, or no bitsandbytes.

    An unknown method is not a problem here (the adapter section reports it, with the close names).
    """
    if quantize not in QUANT_TYPES:
        return []
    names = registry.methods_with("quantizable")
    able = " or ".join(names) if len(names) < 3 else f"{', '.join(names[:-1])} or {names[-1]}"
    problems = []
    if method.lower() == FULL_FINE_TUNING:
        problems.append(
            "model.quantize: full fine-tuning cannot train quantized weights; use an adapter "
            f"(method: {able}) or set model.quantize: null"
        )
    else:
        try:
            config_cls = registry.find_method(method).config_cls
        except KeyError:
            config_cls = None
        if config_cls is not None and not config_cls.quantizable:
            problems.append(
                f"model.quantize: method {method} cannot train on a quantized base (it has no layers that "
                f"read packed weights); use method: {able}, or set model.quantize: null"
            )
    if importlib.util.find_spec("bitsandbytes") is None:
        problems.append(
            f"model.quantize: {quantize} needs bitsandbytes; install it with `pip install bitsandbytes`"
        )
    return problems

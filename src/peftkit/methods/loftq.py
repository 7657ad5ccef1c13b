"""LoftQ (Li et al. 2023, arXiv:2310.08659): LoRA started so that the quantized base plus the adapter are
close to the full-precision weight (``init_lora_weights="loftq"``; the layer side is in ``lora.py``).

From ``s B A = 0``, ``loftq_iter`` times (the paper's Algorithm 1): ``Q = dequant(quant(W - s B A))``, then
``s B A`` = the rank-r SVD fit of ``W - Q``. The base weight becomes Q. The quantizer is the one a backend
registered (``core.registry.quantizer``: bitsandbytes' NF4 or LLM.int8() round trip), so this file
imports no quantization library. ``loftq_config`` has the reference library's keys.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..core import registry
from ..errors import UnsupportedLayerError

KEYS = ("loftq_bits", "loftq_iter")
INSTALL = "init_lora_weights='loftq' quantizes with bitsandbytes, which is not installed; `pip install bitsandbytes`"


def problems(init: Any, options: Any) -> list[str]:
    """What is wrong with ``loftq_config`` ``options`` for ``init_lora_weights=init``."""
    if init != "loftq":
        used = (
            f"loftq_config: used only with init_lora_weights='loftq' (got {init!r}); drop it or set that init"
        )
        return [used] if options else []
    if not isinstance(options, dict) or not options:
        return [
            "loftq_config: init_lora_weights='loftq' needs it, e.g. {'loftq_bits': 4, 'loftq_iter': 1} "
            "(the reference library's keys)"
        ]
    out = [
        f"loftq_config: unknown key {k!r}; its keys are {', '.join(KEYS)}" for k in options if k not in KEYS
    ]
    bits, iters = options.get("loftq_bits", 4), options.get("loftq_iter", 1)
    if bits not in (4, 8) or isinstance(bits, bool):
        out.append(f"loftq_config.loftq_bits: 4 (NF4) or 8 (LLM.int8()), got {bits!r}")
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        out.append(f"loftq_config.loftq_iter: a whole number >= 1, got {iters!r}")
    elif registry.quantizer(bits if bits in (4, 8) else 4) is None:
        out.append(f"{INSTALL} (or choose another init)")
    return out


def options(config: dict[str, Any]) -> dict[str, int]:
    """The plain values a layer receives (the reference's defaults for keys left out)."""
    return {"loftq_bits": int(config.get("loftq_bits", 4)), "loftq_iter": int(config.get("loftq_iter", 1))}


def check_layer(base_layer: nn.Module, bits: int) -> None:
    """Refuse, with the fix, a layer LoftQ cannot quantize as a quantized base would hold it."""
    if type(base_layer) is not nn.Linear:
        raise UnsupportedLayerError(
            f"init_lora_weights='loftq' quantizes nn.Linear weights (what bitsandbytes stores in 4/8 bits); "
            f"got {type(base_layer).__name__}. Leave it out (exclude_modules) or use another init."
        )
    if bits == 4 and base_layer.in_features % 64:
        raise UnsupportedLayerError(
            f"init_lora_weights='loftq' with 4 bits needs in_features divisible by 64 (bitsandbytes' block, and "
            f"peftkit.quantize leaves other layers dense); got {base_layer.in_features}. Leave this layer out "
            "(exclude_modules) or use loftq_bits: 8."
        )
    if registry.quantizer(bits) is None:
        raise UnsupportedLayerError(INSTALL)


@torch.no_grad()
def factors(
    weight: torch.Tensor, r: int, s: float, loftq_bits: int, loftq_iter: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(A, B, Q) for an ``out x in`` weight: rank ``r``, scaling ``s``.

    The reference library sets A = R, B = L for the SVD fit L R whatever the scaling, so its adapter adds
    s L R, exact only at lora_alpha = r. Here L R is split as sqrt(S/s) on each side (PiSSA's split): the
    same factors at s = 1, and s B A = L R at any alpha.
    """
    quantize = registry.quantizer(loftq_bits)
    weight = weight.float()
    low_rank = torch.zeros_like(weight)
    for _ in range(loftq_iter):
        quantized = quantize(weight - low_rank)
        u, sv, vh = torch.linalg.svd(weight - quantized, full_matrices=False)
        root = torch.sqrt(sv[:r] / s)
        left, right = u[:, :r] * root, root[:, None] * vh[:r]
        low_rank = s * left @ right
    return right, left, quantized

"""How a linear LoRA adapter starts: which ``init_lora_weights`` exist, and setting A and B for each.

Apart from ``lora.py`` because two adapters share it: ``LoraLinear`` and the quantized linear adapters of
``backends/`` (which cannot call the linear adapter's constructor, their weight having no usable shape).
The larger inits' own math lives in their modules (``loftq``, ``lora_ga``; EVA's and CorDA's starting
factors come from ``lora_eva`` / ``lora_corda`` through ``start``); this is the one dispatch over them,
so that the list of inits ``LoraConfig`` accepts and what each does to the base weight stay side by side.
"""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..errors import ConfigError
from . import loftq, lora_ga

if TYPE_CHECKING:  # a type only: lora.py imports this module, so a run-time import would be circular
    from .lora import LoraAdapter

INITS = (True, False, "gaussian", "pissa", "olora", "loftq", "lora_ga", "eva", "corda")
DATA_INITS = ("eva", "corda")  # started from activations: peftkit.inject_eva / inject_corda
PISSA_NITER = re.compile(r"pissa_niter_(\d+)$")


def rewrites_base(init: Any) -> bool:
    """Whether the init moves part of W into the adapter or changes W (the base keeps the residual)."""
    return init in ("olora", "corda", "loftq", "lora_ga") or (
        isinstance(init, str) and init.startswith("pissa")
    )


def initialise_linear(
    adapter: LoraAdapter, a: torch.Tensor, b: torch.Tensor, rows: torch.Tensor, start: Any = None
) -> None:
    """Set A and B of a linear LoRA as its ``init`` says; SVD/QR inits also remember A0, B0: the base keeps
    W - s B0 A0. ``rows`` is the base weight as ``out x in`` (unused by the random inits, so a quantized
    layer passes an empty tensor). Quantized layers (backends/) initialise with it too. ``start``: what a
    data-aware init computed for this layer: LoRA-GA the weight's gradient (``out x in``), EVA A's rows,
    CorDA ``(A0, B0)`` (``methods/lora_data.py``)."""
    init, r, s = adapter.init, adapter.r, adapter.scaling
    if init in DATA_INITS and start is None:
        name = f"peftkit.inject_{init}(model, config, batches)"
        raise ConfigError(
            [
                f"init_lora_weights={init!r} starts from the layers' inputs on a few batches of data: inject with "
                f"{name} (a run config feeds it the run's training data)"
                + (
                    "; a saved CorDA adapter loads without data when saved with portable=True"
                    if init == "corda"
                    else ""
                )
            ],
            what="LoRA init",
        )
    with torch.no_grad():
        if init is True:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            nn.init.zeros_(b)
            return
        if init == "gaussian":
            nn.init.normal_(a, std=1 / r)
            nn.init.zeros_(b)
            return
        if init is False:
            return
        if init == "loftq":  # the base becomes Q at attach (a plain attribute: not kept after that)
            new_a, new_b, adapter.__dict__["_loftq_base"] = loftq.factors(rows, r, s, **adapter.init_options)
            a.copy_(new_a), b.copy_(new_b)
            return
        if init == "eva":  # A on the inputs' top directions; B zero, nothing subtracted from the base
            if tuple(start.shape) != tuple(a.shape):
                raise ConfigError([f"EVA directions are {tuple(start.shape)}, LoRA A is {tuple(a.shape)}"])
            a.copy_(start.to(a.dtype)), nn.init.zeros_(b)
            return
        # the inits below choose A0, B0 and leave the base W - s B0 A0 (after the chain)
        if init == "lora_ga":
            new_a, new_b = lora_ga.factors(start, rows, r, s, adapter.init_options)
            a.copy_(new_a), b.copy_(new_b)
        elif init == "corda":  # methods/lora_corda.py: from the SVD of W C
            a.copy_(start[0].to(a.dtype)), b.copy_(start[1].to(b.dtype))
        elif init == "olora":
            # OLoRA (Büyükakyüz 2024): orthonormal B from the QR factors of W, A the matching rows of R.
            q, rr = torch.linalg.qr(rows.float())
            b.copy_(q[:, :r]), a.copy_(rr[:r])
        else:
            # PiSSA (Meng et al. 2024): W = U S V^T; B = U_r sqrt(S_r / s), A = sqrt(S_r / s) V_r^T so
            # that s B A is the principal rank-r part of W. "pissa_niter_K" uses a randomised SVD.
            match = PISSA_NITER.match(init)
            if match:
                u, sv, v = torch.svd_lowrank(rows.float(), q=r, niter=int(match.group(1)))
                vh = v.T
            else:
                u, sv, vh = torch.linalg.svd(rows.float(), full_matrices=False)
            root = torch.sqrt(sv[:r] / s)
            b.copy_(u[:, :r] * root), a.copy_(root[:, None] * vh[:r])
        # Kept (not saved) to restore the base on unload and for portable saves.
        adapter.register_buffer("init_A", a.detach().float().clone(), persistent=False)
        adapter.register_buffer("init_B", b.detach().float().clone(), persistent=False)


__all__ = ["DATA_INITS", "INITS", "PISSA_NITER", "initialise_linear", "rewrites_base"]

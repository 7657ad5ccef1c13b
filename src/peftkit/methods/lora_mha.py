"""LoRA on torch's ``nn.MultiheadAttention`` (plain PyTorch transformers, CLIP-style models).

The module holds its query, key and value projections packed in one parameter, ``in_proj_weight``
(3E x E), and reads its output projection's ``out_proj.weight`` (E x E) without calling ``out_proj``: there
is no linear layer to wrap, and a wrapper on ``out_proj`` would be bypassed. As in the reference library
(its ``lora.MultiheadAttention``), the module itself is the target, and the adapter is a rank-r delta on
each of the two weights: ``in_proj_weight + s * B A`` with A (r x E), B (3E x r), and
``out_proj.weight + 2 s * B' A'`` with A' (r x E), B' (E x r) (the 2: below). The core runs the module once with both sums
(``core.layer.ParameterAdapter``) and a merge writes them in, so merged and unmerged outputs agree.

Saved under the reference's names, so files interchange both ways: ``<mha>.lora_A.weight``,
``<mha>.lora_B.weight`` (the packed projection) and ``<mha>.base_layer.out_proj.lora_A.weight``,
``<mha>.base_layer.out_proj.lora_B.weight``.

The output projection's delta counts twice: ``out_proj.weight + 2 s B' A'``. That is what every released
version of the reference computes (up to 0.21.2, measured): its merge writes ``W + s B' A'`` into out_proj
and then merges out_proj's own LoRA layer on top, in its forward as in ``merge_adapter``; a fix is
proposed upstream (huggingface/peft PR #3774, open). An adapter's tensors only mean the same model in
both libraries with the same rule, so peftkit follows it: a rank-r LoRA on out_proj with twice the
scale, which trains as well as any other scale. Should the reference change, ``OUT_PROJ_SCALE`` and a
``peft_version`` check on loading (as OFT's config has) are where peftkit follows.

Limits, all the reference's: query, key and value of one width (``kdim == vdim == embed_dim``, so the
projection is packed); no DoRA and no SVD inits (no single weight matrix); ``lora_dropout`` cannot apply,
since the delta is added to the weights rather than computed from an input (the reference ignores it
silently; peftkit says so once).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from ..core.layer import ParameterAdapter
from ..errors import UnsupportedLayerError
from .lora_parameters import LoraParameter

IN_PROJ, OUT_PROJ = "in_proj_weight", "out_proj.weight"
# the reference applies out_proj's delta twice (module docstring); its files mean that
OUT_PROJ_SCALE = 2


class LoraMultiheadAttention(ParameterAdapter):
    """LoRA on the packed query/key/value projection and the output projection of one attention module."""

    per_parameter = False  # the module was the target: reports list it once
    unroutable = (
        "nn.MultiheadAttention returns a tuple and may hold the batch in its second dimension "
        "(batch_first=False), so its rows cannot be split per example (the reference library refuses "
        "mixed batches there too)"
    )

    def __init__(
        self,
        base_layer: nn.MultiheadAttention,
        r: int,
        alpha: float,
        dropout: float,
        use_rslora: bool,
        use_dora: bool,
        init: Any,
        lora_bias: bool = False,
        init_options: dict[str, int] | None = None,  # LoftQ's; string inits are refused here
    ) -> None:
        if lora_bias:
            raise UnsupportedLayerError(
                "lora_bias is not available on nn.MultiheadAttention: its LoRA is added to the packed weights, "
                "whose biases the attention reads itself. Set lora_bias=False, or leave the attention module "
                "out (exclude_modules)."
            )
        if use_dora:
            raise UnsupportedLayerError(
                "DoRA is not available for nn.MultiheadAttention (nor in the reference library): its packed "
                "projection has no single weight norm to learn. Set use_dora=False, or leave the attention "
                "module out (exclude_modules)."
            )
        if isinstance(init, str) and init != "gaussian":
            raise UnsupportedLayerError(
                f"init_lora_weights={init!r} needs one weight matrix to decompose; LoRA on "
                "nn.MultiheadAttention supports True/'default', 'gaussian' or False. Change the init, or leave "
                "the attention module out (exclude_modules)."
            )
        if dropout:
            warnings.warn(
                f"lora_dropout={dropout} does not apply to nn.MultiheadAttention: its LoRA is added to the "
                "packed weights, not computed from an input (the reference library ignores it there too); "
                "the other adapted layers keep it",
                stacklevel=4,
            )
        super().__init__([IN_PROJ, OUT_PROJ])
        self.in_proj = LoraParameter(base_layer, IN_PROJ, r, alpha, use_rslora, init)
        self.out_proj = LoraParameter(base_layer.out_proj, "weight", r, alpha, use_rslora, init)
        self.out_proj.scaling *= OUT_PROJ_SCALE

    def _pair(self, name: str) -> LoraParameter:
        return self.in_proj if name == IN_PROJ else self.out_proj

    def parameter_delta(self, name: str) -> torch.Tensor:
        return self._pair(name).delta()

    def parameter_sizes(self) -> dict[str, int]:
        return {n: sum(p.numel() for p in self._pair(n).parameters()) for n in self.merge_into}

    def describe(self, name: str) -> str:
        return f"LoRA r={self._pair(name).r}" + (f" at {OUT_PROJ_SCALE}x scale" if name == OUT_PROJ else "")

    def interchange_state(self, portable: bool = False) -> dict[str, torch.Tensor]:
        # the reference wraps out_proj in a LoRA linear inside its wrapper's base_layer
        state = dict(self.in_proj.state_dict())
        state.update({f"base_layer.out_proj.{k}": t for k, t in self.out_proj.state_dict().items()})
        return state

    def param_roles(self) -> dict[str, list[nn.Parameter]]:
        """Which parameters are the A and B sides (for LoRA+ learning rates)."""
        pairs = (self.in_proj, self.out_proj)
        return {"A": [p.lora_A.weight for p in pairs], "B": [p.lora_B.weight for p in pairs]}


def check_attention(module: nn.MultiheadAttention) -> str | None:
    """LoRA takes an attention module whose projection is packed and whose out_proj is a linear layer."""
    if not module._qkv_same_embed_dim:
        return (
            f"kdim={module.kdim} / vdim={module.vdim} differ from embed_dim={module.embed_dim}, so query, key "
            "and value have separate weights; LoRA adapts the packed in_proj_weight only (as the reference does)"
        )
    if not isinstance(module.out_proj, nn.Linear):
        return f"its out_proj is a {type(module.out_proj).__name__}, not a linear layer"
    if not module.in_proj_weight.is_floating_point():
        return f"its in_proj_weight is stored as {module.in_proj_weight.dtype}; LoRA needs a floating-point weight"
    return None


__all__ = ["LoraMultiheadAttention", "check_attention"]

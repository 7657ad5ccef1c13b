"""C3A: circular convolution adaptation (Chen et al. 2024, arXiv:2407.19342).

A frozen weight W (out x in) gets an update made of b x b **circulant blocks**: the input is cut into
in / b chunks of size b, and output chunk m is

    y_m = (1 / in) * sum_n  k_mn (*) x_n        (*) circular correlation of size b: (k (*) x)[t] = sum_l k[l] x[(t + l) mod b]

with one trainable kernel k_mn (b numbers) per block, so a layer trains (out / b) * (in / b) * b = in * out / b
numbers and its update can reach full rank, unlike LoRA's. Written as a matrix, block (m, n) of delta W is
``C[t, j] = k_mn[(j - t) mod b]``. Unmerged, the update runs through FFTs in O(b log b) per block row
instead of O(b^2): ``y_m = irfft(sum_n rfft(x_n) * conj(rfft(k_mn)))``.

The paper writes the block as a circular *convolution*; the reference library computes the correlation
above (the convolution with the kernel reversed, the same family of updates) and scales by 1 / in. peftkit
computes the same function, so saved kernels mean the same in both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from ..core import checks
from ..core.config import AdapterConfig
from ..core.inject import trained_biases
from ..core.layer import AdapterModule
from ..core.layer import adapter_dtype as _adapter_dtype
from ..core.registry import register_layer, register_method
from ..core.targeting import Target, pattern_value
from ..errors import UnsupportedLayerError
from .fourierft import no_rank_patterns, positive_int_pattern
from .lora import LoraConfig

PEFT_TYPE = "C3A"
_INITS = (True, False, "gaussian", "kaiming_uniform", "xavier_uniform")


@register_method(PEFT_TYPE)
@dataclass
class C3AConfig(AdapterConfig):
    """C3A: block-circular updates with one trainable kernel of size ``block_size`` per block.

    Attributes:
        block_size: b, the size of the circulant blocks; must divide each target's input and output
            size (the greatest common divisor of all of them always works). A layer trains
            in * out / b numbers: larger b, fewer parameters.
        bias: Which base biases to train and save too: "none", "all", or "c3a_only" (biases of adapted
            layers). Trained biases are part of the base, so ``disable()`` cannot switch them off.
        block_size_pattern: Per-module ``block_size``, keyed by a module name or a regex matched against
            the end of the full name (as ``rank_pattern`` is for LoRA).
        init_weights: ``"xavier_uniform"`` (default; ``False`` means the same): kernels
            U(-a, a), a = sqrt(6 / (in + out)); ``"kaiming_uniform"``: U(-1/sqrt(in), 1/sqrt(in));
            ``"gaussian"``: N(0, 1); ``True``: zero (the adapted model starts at the base). Only ``True``
            starts at the base.
    """

    pick_when = "you want a high-rank delta for very few parameters (block-circulant, computed by FFT) on linear layers whose sizes the block size divides"

    # kernels scaled by 1 / in: higher learning rates than LoRA's matrices
    lr_candidates: ClassVar[tuple[float, ...]] = (1e-3, 3e-3, 1e-2)
    # the reference C3AConfig has no rank / alpha patterns (block_size_pattern instead) nor exclude_modules
    fields_not_in_format: ClassVar[tuple[str, ...]] = ("rank_pattern", "alpha_pattern", "exclude_modules")
    display_name: ClassVar[str] = "C3A"

    block_size: int = 256
    bias: str = "none"
    block_size_pattern: dict[str, int] = field(default_factory=dict)
    init_weights: bool | str = "xavier_uniform"

    # The reference's defaults per architecture are its LoRA ones, except GPT-2 (and GPT-BigCode), where it
    # names the MLP's output projection: a Conv1D, which C3A does not adapt (in either library).
    default_targets: ClassVar[dict[str, list[str]]] = {
        **LoraConfig.default_targets,
        "gpt2": ["mlp.c_proj"],
        "gpt_bigcode": ["mlp.c_proj"],
    }
    target_roles: ClassVar[tuple[str, ...]] = LoraConfig.target_roles
    own_default_types: ClassVar[tuple[str, ...]] = LoraConfig.own_default_types

    def problems(self) -> list[str]:
        out = super().problems()
        out += checks.positive_ints(self, "block_size")
        out += checks.bias_mode(self, "c3a_only")
        init = self.init_weights
        if not any(init is i or (isinstance(i, str) and init == i) for i in _INITS):
            out.append(f"init_weights: must be one of {', '.join(map(repr, _INITS))}; got {init!r}")
        out += positive_int_pattern("block_size_pattern", self.block_size_pattern, "block_size")
        return out + no_rank_patterns(self, "C3A", "block_size_pattern")

    def size_label(self) -> str:
        return f"C3A b={self.block_size}"

    def layer_values(self, target: Target) -> dict[str, Any]:
        b = pattern_value(self.block_size_pattern, target.name)
        return {"block_size": int(b or self.block_size), "init": self.init_weights}

    def extra_trainable(self, model: nn.Module, adapted: list[str]) -> list[str]:
        return trained_biases(model, adapted, self.bias)


def circulant_blocks(kernel: torch.Tensor) -> torch.Tensor:
    """The (out x in) matrix of kernels (out/b, in/b, b): block (m, n) is ``C[t, j] = k_mn[(j - t) mod b]``."""
    m, n, b = kernel.shape
    steps = torch.arange(b, device=kernel.device)
    index = (steps[None, :] - steps[:, None]) % b  # [t, j] -> (j - t) mod b
    return kernel[:, :, index].permute(0, 2, 1, 3).reshape(m * b, n * b)


def block_correlation(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """``circulant_blocks(kernel) @ x`` over the last dimension of x, through real FFTs."""
    m, n, b = kernel.shape
    chunks = torch.fft.rfft(x.reshape(*x.shape[:-1], n, b))  # (..., n, b//2+1)
    spectra = torch.fft.rfft(kernel).conj()  # correlation: the kernel's spectrum conjugated
    mixed = torch.einsum("...nf,mnf->...mf", chunks, spectra)
    return torch.fft.irfft(mixed, n=b).reshape(*x.shape[:-1], m * b)


class C3ALinear(AdapterModule):
    """C3A on ``nn.Linear`` (the reference's only layer kind). Interchange tensor: ``c3a_kernel``
    (out / b, in / b, b)."""

    def __init__(self, base_layer: nn.Linear, block_size: int, init: bool | str) -> None:
        super().__init__()
        weight = base_layer.weight
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        b = block_size
        if self.in_features % b or self.out_features % b:
            raise UnsupportedLayerError(
                f"block_size={b} does not divide this layer's sizes (in {self.in_features}, out "
                f"{self.out_features}); use a common divisor, e.g. "
                f"{math.gcd(self.in_features, self.out_features)}, or give this module its own through "
                "block_size_pattern"
            )
        shape = (self.out_features // b, self.in_features // b, b)
        kernel = torch.zeros(shape, device=weight.device, dtype=_adapter_dtype(weight))
        if init == "gaussian":
            nn.init.normal_(kernel)
        elif init is False or init == "xavier_uniform":
            bound = math.sqrt(3.0) * math.sqrt(2.0 / (self.in_features + self.out_features))
            nn.init.uniform_(kernel, -bound, bound)
        elif init == "kaiming_uniform":
            bound = 1.0 / math.sqrt(self.in_features)
            nn.init.uniform_(kernel, -bound, bound)
        self.c3a_kernel = nn.Parameter(kernel)

    def _work_dtype(self) -> torch.dtype:
        # FFTs in float32 (float64 for a float64 adapter): half precision has no general FFT on every device
        return torch.float64 if self.c3a_kernel.dtype == torch.float64 else torch.float32

    def delta_output(self, x: torch.Tensor, base_out: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        work = self._work_dtype()
        y = block_correlation(x.to(work), self.c3a_kernel.to(work)) / self.in_features
        return y.to(base_out.dtype)

    def delta_weight(self, weight: torch.Tensor) -> torch.Tensor:
        kernel = self.c3a_kernel.to(device=weight.device, dtype=self._work_dtype())
        return (circulant_blocks(kernel) / self.in_features).to(weight.dtype)


register_layer(PEFT_TYPE, "Linear", (nn.Linear,), C3ALinear)


__all__ = ["C3AConfig", "C3ALinear", "block_correlation", "circulant_blocks"]

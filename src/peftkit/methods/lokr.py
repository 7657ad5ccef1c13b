"""LoKr: a Kronecker-product update (LyCORIS, Yeh et al. 2023, arXiv:2309.14859; FedPara arXiv:2108.06098).

A frozen weight W (out x in) with ``out = a * b`` and ``in = c * d`` gets the update

    delta W = s * kron(W1, W2)        W1: a x c,  W2: b x d,  s = alpha / r

The split of each dimension comes from :func:`factorization`: two factors near the square root, the
smaller one for W1, or, with a ``decompose_factor`` that divides the dimension, that factor for W1.
Either factor may itself be a rank-r product, ``W1 = W1a @ W1b`` or ``W2 = W2a @ W2b``, when that
saves parameters: W2 is decomposed when ``r < max(b, d) / 2``, W1 only with ``decompose_both`` and
``r < max(a, c) / 2`` (the reference library's rule). A Kronecker product has rank
rank(W1) * rank(W2), so a few thousand parameters can give a full-rank update.

W1 starts at zero (``init_weights=True``) or W2 does (``"lycoris"``, the LyCORIS repository's choice),
so a fresh adapter leaves the model unchanged.

Convolutions: W1 is always a channel matrix (a x c); W2 carries the kernel, as a full
(b, d, *kernel) tensor, as ``W2a @ W2b`` with W2b (r, d * kernel), or with ``use_effective_conv2d`` as a
(r, r, *kernel) Tucker core ``lokr_t2`` contracted with (r, b) and (r, d) mode matrices.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..core import checks
from ..core.config import AdapterConfig
from ..core.registry import register_layer, register_method
from ..core.targeting import Target
from .loha import LycorisAdapter, kernel_core_shape, lycoris_problems, tucker
from .lora import LoraConfig

PEFT_TYPE = "LOKR"


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """Split ``dimension`` into ``(m, n)`` with ``m * n == dimension``, as the reference library does.

    A positive ``factor`` that divides ``dimension`` gives ``(factor, dimension // factor)`` as is.
    Otherwise the divisors of ``dimension`` are walked upwards while the smaller side stays below the
    larger and the divisor does not exceed ``factor`` (no limit for -1), so -1 lands on the pair
    nearest the square root; the result is ordered ``m <= n``.

    Examples: 256 -> (16, 16); 384 -> (16, 24); 127 -> (1, 127); 128 with factor 4 -> (4, 32).
    """
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    limit = dimension if factor == -1 else factor
    m, n = 1, dimension
    candidate = 1
    while m < n:
        candidate += 1
        while dimension % candidate:
            candidate += 1
        if candidate > limit:
            break
        m, n = candidate, dimension // candidate
    return min(m, n), max(m, n)


@register_method(PEFT_TYPE)
@dataclass
class LoKrConfig(AdapterConfig):
    """LoKr: ``delta W = (alpha / r) * kron(W1, W2)``, each factor optionally a rank-r product.

    Attributes:
        r: Rank of the decomposed factors (per-module overrides via ``rank_pattern``); it also decides
            which factors are decomposed (see the module docstring).
        alpha: Scale numerator; the update is multiplied by ``alpha / r`` (``alpha_pattern`` overrides),
            also when neither factor is decomposed.
        rank_dropout: While training, the probability of zeroing each output row of the delta weight.
        module_dropout: While training, the probability of skipping the adapter for a whole batch.
        use_effective_conv2d: For Conv1d/Conv2d kernels larger than 1 with a decomposed W2, build W2 from
            a (r, r, *kernel) Tucker core and two mode matrices.
        decompose_both: Also decompose W1 into ``W1a @ W1b`` when ``r < max(a, c) / 2``.
        decompose_factor: -1 splits each dimension near its square root; a positive value makes one of
            the two factors as close to it as possible (exactly it when it divides the dimension).
        rank_dropout_scale: Rescale the kept rows by the inverse of the kept fraction under rank dropout.
        init_weights: ``True``: W1 (or W1a) zero, the rest Kaiming-uniform; ``"lycoris"``: W2 (or W2b)
            zero, the rest Kaiming-uniform; ``False``: all random (for tests).
    """

    pick_when = "you want the smallest parameter count for a large delta (a Kronecker product), e.g. diffusion models and convolutions"

    r: int = 8
    alpha: float = 8
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    use_effective_conv2d: bool = False
    decompose_both: bool = False
    decompose_factor: int = -1
    rank_dropout_scale: bool = False
    init_weights: bool | str = True

    # The reference library's LoKr defaults are a copy of its LoRA ones (attention query and value),
    # and so are the roles found by structure on other architectures.
    default_targets: ClassVar[dict[str, list[str]]] = dict(LoraConfig.default_targets)
    target_roles: ClassVar[tuple[str, ...]] = LoraConfig.target_roles
    own_default_types: ClassVar[tuple[str, ...]] = LoraConfig.own_default_types

    def problems(self) -> list[str]:
        out = super().problems() + lycoris_problems(self, inits=(True, False, "lycoris"))
        out += checks.booleans(self, "decompose_both", "rank_dropout_scale")
        factor = self.decompose_factor
        if isinstance(factor, bool) or not isinstance(factor, int) or not (factor == -1 or factor > 0):
            out.append(
                f"decompose_factor: must be -1 (split near the square root) or a positive integer, got {factor!r}"
            )
        return out

    def layer_values(self, target: Target) -> dict[str, Any]:
        return {
            "r": int(target.rank or self.r),
            "alpha": float(target.alpha or self.alpha),
            "rank_dropout": float(self.rank_dropout),
            "module_dropout": float(self.module_dropout),
            "rank_dropout_scale": bool(self.rank_dropout_scale),
            "effective_conv": bool(self.use_effective_conv2d),
            "decompose_both": bool(self.decompose_both),
            "decompose_factor": int(self.decompose_factor),
            "init": self.init_weights,
        }


class LoKrAdapter(LycorisAdapter):
    """LoKr on ``nn.Linear``, ``nn.Conv1d`` and ``nn.Conv2d``.

    Tensors (the interchange names): ``lokr_w1`` (a, c) or ``lokr_w1_a`` (a, r) and ``lokr_w1_b`` (r, c);
    ``lokr_w2`` (b, d, *kernel) or ``lokr_w2_a`` (b, r) and ``lokr_w2_b`` (r, d * kernel), or in the
    effective-conv form ``lokr_t2`` (r, r, *kernel) with ``lokr_w2_a`` (r, b) and ``lokr_w2_b`` (r, d).
    """

    def __init__(
        self,
        base_layer: nn.Module,
        *,
        rank_dropout_scale: bool,
        effective_conv: bool,
        decompose_both: bool,
        decompose_factor: int,
        init: bool | str,
        **values: Any,
    ) -> None:
        super().__init__(base_layer, **values)
        self.rank_dropout_scale = rank_dropout_scale
        out, fan_in, *kernel = self.weight_shape
        r = self.r
        a, b = factorization(out, decompose_factor)
        c, d = factorization(fan_in, decompose_factor)
        self.factors = (a, b, c, d)
        # the first parameter registered feeds every entry of the delta (W1 side)
        if decompose_both and r < max(a, c) / 2:
            self.lokr_w1_a, self.lokr_w1_b = self.new_param(a, r), self.new_param(r, c)
        else:
            self.lokr_w1 = self.new_param(a, c)
        self.tucker = False
        if r >= max(b, d) / 2:  # a rank-r product would not be smaller than the full factor
            self.lokr_w2 = self.new_param(b, d, *kernel)
        elif self.is_conv and effective_conv and math.prod(kernel) > 1:
            self.tucker = True
            self.lokr_w2_a, self.lokr_w2_b = self.new_param(r, b), self.new_param(r, d)
            self.lokr_t2 = self.new_param(*kernel_core_shape(tuple(kernel), r))
        else:
            self.lokr_w2_a, self.lokr_w2_b = self.new_param(b, r), self.new_param(r, d * math.prod(kernel))
        self._initialise(init)

    def _initialise(self, init: bool | str) -> None:
        names = dict(self.named_parameters())
        # a zero W1 (or W1a) for True, a zero W2 (or W2b) for "lycoris"; everything else Kaiming-uniform
        zero = {True: ("lokr_w1", "lokr_w1_a"), "lycoris": ("lokr_w2", "lokr_w2_b")}.get(init, ())
        with torch.no_grad():
            for name, param in names.items():
                if name in zero:
                    nn.init.zeros_(param)
                else:
                    nn.init.kaiming_uniform_(param, a=math.sqrt(5))

    def make_delta(self) -> torch.Tensor:
        w1 = self.lokr_w1 if hasattr(self, "lokr_w1") else self.lokr_w1_a @ self.lokr_w1_b
        if hasattr(self, "lokr_w2"):
            w2 = self.lokr_w2
        elif self.tucker:
            w2 = tucker(self.lokr_t2, self.lokr_w2_a, self.lokr_w2_b)
        else:
            w2 = self.lokr_w2_a @ self.lokr_w2_b
        if w2.dim() == 4:  # a 2-D kernel: W1 is a channel matrix with a 1x1 "kernel"
            w1 = w1[:, :, None, None]
        return (kron(w1, w2) * self.scaling).reshape(self.weight_shape)


def kron(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The Kronecker product with ``torch.kron``'s rules, by broadcasting.

    ``out[i0*m0 + j0, i1*m1 + j1, ...] = x[i0, i1, ...] * y[j0, j1, ...]``; the operand with fewer axes
    gets leading unit axes. So for a Conv1d with a full (b, d, k) W2 and an (a, c) W1 the result is
    (b, a*d, c*k), and its reshape to (out, in, k) is kron(W2, W1) on the channel axes (the factors
    swap roles); the reference library computes the same, so saved adapters agree. (``torch.kron``
    itself fails on some stride patterns, e.g. a Conv1d Tucker W2 of shape (b, d, k, 1), with torch 2.13.)
    """
    dims = max(x.dim(), y.dim())
    xs = (1,) * (dims - x.dim()) + tuple(x.shape)
    ys = (1,) * (dims - y.dim()) + tuple(y.shape)
    x = x.reshape([n for size in xs for n in (size, 1)])
    y = y.reshape([n for size in ys for n in (1, size)])
    return (x * y).reshape([a * b for a, b in zip(xs, ys)])


register_layer(PEFT_TYPE, "Linear", (nn.Linear,), LoKrAdapter)
register_layer(PEFT_TYPE, "Conv1d", (nn.Conv1d,), LoKrAdapter)
register_layer(PEFT_TYPE, "Conv2d", (nn.Conv2d,), LoKrAdapter)


__all__ = ["LoKrConfig", "LoKrAdapter", "factorization", "kron"]

"""LoRA-FA: LoRA with a frozen A and a projected update of B (Zhang et al. 2023, arXiv:2308.03303).

LoRA-FA is plain LoRA (``methods/lora.py``: the same adapters, the same files) trained differently: A
keeps its random initial value, and only B trains. That halves the adapter's optimizer state and, as A
never changes, the layer only has to keep the r-dimensional ``A x`` for the backward pass instead of x.

B's gradient is projected before the optimizer sees it. With A frozen, the update ``s * B A`` can only move
inside the row space of A; the full fine-tuning gradient g_W of the weight is best approximated there
(least squares, ``min || s * g_B' A - g_W ||``) by

    g_B' = (1 / s^2) * g_B (A A^T)^(-1)        s = lora_alpha / r (or / sqrt(r) with rsLoRA), per layer

since ``g_B = s * g_W A^T``. (A A^T is r x r; a pseudo-inverse of ``A A^T + 1e-8 I`` keeps it defined.) The
projected gradient then drives an AdamW step. This is what the reference library's
``peft.optimizers.create_lorafa_optimizer`` does: its AdamW is the transformers ("adamw-hf") variant, eps
1e-6, bias correction, and weight decay applied after the step as ``p -= lr * weight_decay * p``;
every other trainable parameter (saved module copies, biases) takes that same AdamW step with its plain
gradient. :func:`lora_fa_optimizer` builds it on an adapted model; :class:`LoraFAOptimizer` is the
optimizer. The reference computes the projection under bfloat16 autocast (also on a CPU); peftkit
computes it in float32, so the two agree to bfloat16 rounding of that product, and to float32 rounding
when the reference's autocast is off (tests/methods/test_lora_fa.py checks both).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..core.inject import adapter_layers, state_of
from ..core.registry import register_optimizer
from ..errors import ConfigError
from .lora import LoraAdapter

# Added to A A^T before its pseudo-inverse, as in the reference (a rank-deficient A stays usable).
_RIDGE = 1e-8


@dataclass
class FrozenA:
    """The fixed side of one LoRA adapter: its A as (r x fan_in) and its scaling s."""

    a: torch.Tensor
    scaling: float


def _lora_adapters(model: nn.Module) -> list[LoraAdapter]:
    return [
        adapter
        for _, layer in adapter_layers(model)
        for adapter in layer.adapters.values()
        if isinstance(adapter, LoraAdapter)
    ]


def lora_fa_optimizer(
    model: nn.Module,
    lr: float,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-6,
) -> LoraFAOptimizer:
    """Freeze every LoRA A of ``model`` and return the LoRA-FA optimizer over its trainable parameters.

    The counterpart of the reference's ``create_lorafa_optimizer(model, r, lora_alpha, lr, weight_decay)``;
    the scaling of each layer is read from its adapter (``rank_pattern`` / ``alpha_pattern`` / rsLoRA
    included), so it takes no ``r`` or ``lora_alpha``. Saving writes plain LoRA files.

    Args:
        model: A model with LoRA adapters (``peftkit.inject`` with a ``LoraConfig``).
        lr: Learning rate.
        weight_decay: Decoupled weight decay, applied to every trained parameter after its step.
        betas: Adam's moment coefficients.
        eps: Added to the square root of the second moment (1e-6, the reference's default).

    Raises:
        ConfigError: the model has no trainable LoRA adapter, or one uses DoRA (its magnitude changes the
            gradient the projection assumes).
    """
    state_of(model)
    adapters = [a for a in _lora_adapters(model) if a.factor_params()[0].requires_grad]
    problems = []
    if not adapters:
        problems.append(
            "LoRA-FA trains the B matrices of LoRA adapters, and the model has no trainable one: inject a "
            "LoraConfig (and make it active) first"
        )
    if any(a.use_dora for a in adapters):
        problems.append(
            "LoRA-FA's projection assumes the update s * B A, which DoRA rescales per output channel (the "
            "reference's optimizer does not take DoRA either): use plain LoRA (use_dora=False)"
        )
    zero = [
        name
        for name, layer in adapter_layers(model)
        for a in layer.adapters.values()
        if a in adapters and not a.factor_params()[1].detach().any()
    ]
    if zero:
        problems.append(
            f"the LoRA A of {', '.join(zero)} is all zero (LoRA's init for embeddings), and LoRA-FA freezes A: "
            "B would never get a gradient. Leave these modules out of target_modules, or train them with AdamW"
        )
    if problems:
        raise ConfigError(problems, what="LoRA-FA optimizer")
    frozen: dict[nn.Parameter, FrozenA] = {}
    for adapter in _lora_adapters(model):  # every LoRA A is frozen, as the reference freezes them all
        b, a = adapter.factor_params()
        a.requires_grad_(False)
        if b.requires_grad:
            frozen[b] = FrozenA(a, adapter.scaling)
    params = [p for p in model.parameters() if p.requires_grad]
    return LoraFAOptimizer(params, frozen, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)


class LoraFAOptimizer(torch.optim.Optimizer):
    """AdamW (the transformers variant) whose LoRA B parameters get LoRA-FA's projected gradient.

    Args:
        params: The parameters (or groups) to train.
        frozen: For each LoRA B among them, its adapter's frozen A and scaling; others train as AdamW.
        lr, betas, eps, weight_decay: As AdamW; weight decay is decoupled and applied after the step.
        correct_bias: Adam's bias correction of the moments.
    """

    def __init__(
        self,
        params: Iterable[Any],
        frozen: dict[nn.Parameter, FrozenA],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        correct_bias: bool = True,
    ) -> None:
        problems = []
        if not lr >= 0:
            problems.append(f"lr: must be >= 0, got {lr!r}")
        if not all(0 <= b < 1 for b in betas):
            problems.append(f"betas: each must be in [0, 1), got {betas!r}")
        if not eps >= 0:
            problems.append(f"eps: must be >= 0, got {eps!r}")
        if not weight_decay >= 0:
            problems.append(f"weight_decay: must be >= 0, got {weight_decay!r}")
        if problems:
            raise ConfigError(problems, what="LoRA-FA optimizer")
        defaults = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "correct_bias": correct_bias,
        }
        super().__init__(params, defaults)
        # keyed by id: a parameter's hash is its id anyway, and the mapping must not keep the graph alive
        self._frozen = {id(p): f for p, f in frozen.items()}

    @staticmethod
    def projected(grad_b: torch.Tensor, frozen: FrozenA) -> torch.Tensor:
        """B's gradient projected as LoRA-FA prescribes: ``(1 / s^2) * g_B (A A^T + 1e-8 I)^+``."""
        work = torch.float64 if grad_b.dtype == torch.float64 else torch.float32
        a = frozen.a.detach().reshape(frozen.a.shape[0], -1).to(work)
        gram = a @ a.T
        inverse = torch.linalg.pinv(gram + _RIDGE * torch.eye(gram.shape[0], device=gram.device, dtype=work))
        g = grad_b.reshape(grad_b.shape[0], -1).to(work)  # a conv's B (out, r, 1, ...) as out x r
        return ((1 / frozen.scaling**2) * (g @ inverse)).reshape(grad_b.shape).to(grad_b.dtype)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                frozen = self._frozen.get(id(p))
                grad = p.grad if frozen is None else self.projected(p.grad, frozen)
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
                denom = exp_avg_sq.sqrt().add_(group["eps"])
                step_size = group["lr"]
                if group["correct_bias"]:
                    t = state["step"]
                    step_size = step_size * math.sqrt(1.0 - beta2**t) / (1.0 - beta1**t)
                p.addcdiv_(exp_avg, denom, value=-step_size)
                if group["weight_decay"] > 0.0:  # decoupled, after the step (the transformers AdamW)
                    p.add_(p, alpha=-group["lr"] * group["weight_decay"])
        return loss


def _build(model: nn.Module, lr: float, weight_decay: float = 0.0) -> LoraFAOptimizer:
    return lora_fa_optimizer(model, lr=lr, weight_decay=weight_decay)


# ``train.optimizer: lora_fa`` in a run config (``peftkit.train.make_optimizer``)
register_optimizer("lora_fa", _build)


__all__ = ["FrozenA", "LoraFAOptimizer", "lora_fa_optimizer"]

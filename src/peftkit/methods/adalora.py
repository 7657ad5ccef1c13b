"""AdaLoRA: adaptive budget allocation for low-rank adapters (Zhang et al. 2023, arXiv:2303.10512).

Each adapted weight W (out x in) gets an update in SVD form (paper section 3.1)::

    h = W x + s * P diag(Λ) Q x        Q: r x in ("lora_A"),  Λ: r x 1 ("lora_E"),  P: out x r ("lora_B")

with ``s = lora_alpha / init_r`` (the reference library divides by the initial rank plus 1e-5 and keeps
that divisor when ranks shrink, so pruning never rescales the surviving triplets). Λ starts at zero, so
the adapted model starts equal to the base; P and Q start as N(0, 0.02).

During training :class:`AdaLoraController` (a plain object the training loop calls, no trainer subclass)
prunes the total rank from ``init_r`` per module towards ``target_r`` per module on average:

* importance of every entry (section 3.2): the sensitivity ``I = |w * dL/dw|`` smoothed by an EMA
  (``beta1``), times its uncertainty, an EMA (``beta2``) of ``|I - EMA(I)|``;
* importance of triplet i of a module: ``S(Λ_i) + mean_j S(Q_ij) + mean_k S(P_ki)``;
* a cubic budget (section 3.3): ``init_r * n`` for ``step <= tinit``, then
  ``target + (init - target) * (1 - (step - tinit) / (total_step - tfinal - tinit))**3`` (floored),
  applied every ``deltaT`` steps by zeroing the Λ entries of the least important triplets model-wide;
  at ``step == total_step - tfinal`` the final mask (exactly the target budget) is fixed and written to
  the config's ``rank_pattern`` (a list of kept flags per module, keyed ``"<module>.lora_E"``); later
  steps only re-apply it;
* the orthogonality regulariser pushing P and Q towards orthonormal columns/rows.

Saving writes the reference library's format: tensors trimmed to the kept triplets plus ``rank_pattern``;
loading builds each module at its kept rank, so a pruned adapter reloads with its exact ranks and outputs.
The update is additive, so AdaLoRA merges like LoRA.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from ..core.config import ANY, AdapterConfig
from ..core.inject import adapter_layers, require_adapter
from ..core.layer import AdapterModule, adapter_dtype
from ..core.registry import register_layer, register_method
from ..core.targeting import HFConv1D, Target
from ..errors import AdapterNameError, ConfigError
from .lora import LoraConfig

PEFT_TYPE = "ADALORA"
_MASK_SUFFIX = ".lora_E"  # rank_pattern keys are "<module name>.lora_E", as the reference writes them
_EPS = 1e-5  # added to the rank divisor, as the reference library does


def pattern_key(module_name: str) -> str:
    """The ``rank_pattern`` key of an adapted module."""
    return module_name + _MASK_SUFFIX


@register_method(PEFT_TYPE)
@dataclass
class AdaLoraConfig(AdapterConfig):
    """AdaLoRA: SVD-form adapters whose total rank is pruned during training.

    Attributes:
        init_r: Rank every module starts with.
        target_r: Average rank per module once pruning ends (total budget ``target_r * modules``).
        tinit: Warm-up steps before pruning starts (the budget stays at ``init_r`` per module).
        tfinal: Steps at the end that train the final ranks without pruning.
        deltaT: Apply the current budget every ``deltaT`` steps.
        beta1: EMA factor of the sensitivity ``|w * grad|``.
        beta2: EMA factor of the uncertainty ``|sensitivity - its EMA|``.
        orth_reg_weight: Weight of the orthogonality penalty
            (:meth:`AdaLoraController.orthogonal_penalty`).
        total_step: Number of training steps; needed by the budget schedule (the controller refuses
            to run without it) and by the reference library, which refuses configs without it.
        rank_pattern: Kept triplets per module, ``{"<module>.lora_E": [True, False, ...]}`` (``init_r``
            flags each); written by the controller. Modules listed are built at their kept rank.
        lora_alpha: Scale numerator; the update is multiplied by ``lora_alpha / init_r``.
        lora_dropout: Dropout on the adapter's input during training.
        fan_in_fan_out: Recorded for the interchange format (True for GPT-2's transposed ``Conv1D``).
        init_lora_weights: ``True``: Λ zero, P and Q ~ N(0, 0.02); ``False``: all three N(0, 1), so
            the adapter changes the output from the start (for tests).
    """

    pick_when = "you want LoRA at a fixed total rank budget and accept a rank schedule while training: the controller moves rank to the modules that need it"

    init_r: int = 12
    target_r: int = 8
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1  # noqa: N815 - the reference library's field name
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    total_step: int | None = None
    rank_pattern: dict[str, list[bool]] = field(default_factory=dict)
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    init_lora_weights: bool = True

    # The reference library's AdaLoRA defaults per architecture; other architectures get attention query
    # and value (LoRA's roles), found by structure (core/anatomy.py).
    default_targets: ClassVar[dict[str, list[str]]] = {
        "bert": ["query", "value"],
        "roberta": ["query", "key", "value", "dense"],
        "deberta-v2": ["query_proj", "key_proj", "value_proj", "dense"],
        "gpt2": ["c_attn"],
        "llama": ["q_proj", "v_proj"],
        "mistral": ["q_proj", "v_proj"],
        "qwen2": ["q_proj", "v_proj"],
        "opt": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
        "bart": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
        "t5": ["q", "k", "v", "o", "wi", "wo"],
        "mt5": ["q", "k", "v", "o", "wi_0", "wi_1", "wo"],
        "gpt_neox": ["query_key_value"],
    }
    target_roles: ClassVar[tuple[str, ...]] = ("query", "value")
    own_default_types: ClassVar[tuple[str, ...]] = ("mistral",)
    # AdaLoraConfig extends LoraConfig in the reference library, so its files carry every LoRA key.
    # AdaLoRA ignores r (init_r is the rank) and use_rslora (its scale is always alpha / init_r).
    reference_inert: ClassVar[dict[str, Any]] = {
        **LoraConfig.reference_inert,
        "loftq_config": {},  # LoRA fields (LoftQ, LoRA-GA, EVA, CorDA), not implemented for AdaLoRA
        "lora_ga_config": None,
        "eva_config": None,
        "corda_config": None,
        "lora_bias": False,  # a LoRA field, not implemented for AdaLoRA
        "target_parameters": None,
        "trainable_token_indices": None,  # a LoRA field peftkit's AdaLoRA does not take
        "r": ANY,
        "use_rslora": ANY,
        "bias": "none",
        "use_dora": False,
    }

    @classmethod
    def normalise_reference(cls, data: dict[str, Any]) -> dict[str, Any]:
        data = dict(data)
        if data.get("rank_pattern") is None:  # the reference writes null for "not pruned yet"
            data["rank_pattern"] = {}
        # The reference's AdaLoRA layers use one init for every truthy init_lora_weights value.
        init = data.get("init_lora_weights", True)
        if not isinstance(init, bool):
            data["init_lora_weights"] = bool(init)
        return data

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        data["rank_pattern"] = dict(self.rank_pattern) or None
        return data

    def training_hook(self, model: nn.Module, adapter_name: str, total_steps: int) -> AdaLoraController:
        """The rank allocator, driven by ``peftkit.train.fit``; an unset ``total_step`` becomes the
        run's number of optimizer steps (recorded in the adapter's config)."""
        if self.total_step is None:
            state = require_adapter(model, adapter_name)
            state.configs[adapter_name] = state.configs[adapter_name].replace(total_step=total_steps)
        return AdaLoraController(model, adapter_name)

    def problems(self) -> list[str]:
        # The base class checks rank_pattern as LoRA's {regex: rank}; AdaLoRA's holds kept flags per
        # module instead, checked below.
        pattern, self.rank_pattern = self.rank_pattern, {}
        try:
            out = super().problems()
        finally:
            self.rank_pattern = pattern
        out += self._schedule_problems()
        if not _is_number(self.lora_alpha) or self.lora_alpha <= 0:
            out.append(f"lora_alpha: must be a positive number, got {self.lora_alpha!r}")
        if not _is_number(self.lora_dropout) or not 0 <= self.lora_dropout < 1:
            out.append(f"lora_dropout: must be in [0, 1), got {self.lora_dropout!r}")
        if not isinstance(self.init_lora_weights, bool):
            out.append(f"init_lora_weights: must be True or False, got {self.init_lora_weights!r}")
        if self.alpha_pattern:
            out.append(
                f"alpha_pattern: AdaLoRA uses one lora_alpha for every module (as the reference library), "
                f"got {self.alpha_pattern!r}; remove it"
            )
        out += self._rank_pattern_problems()
        return out

    def _schedule_problems(self) -> list[str]:
        out = []
        if not _is_int(self.init_r) or self.init_r <= 0:
            out.append(f"init_r: must be a positive integer, got {self.init_r!r}")
        if not _is_int(self.target_r) or self.target_r < 0:
            out.append(f"target_r: must be a non-negative integer, got {self.target_r!r}")
        for name in ("tinit", "tfinal"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 0:
                out.append(f"{name}: must be a non-negative integer, got {getattr(self, name)!r}")
        if not _is_int(self.deltaT) or self.deltaT <= 0:
            out.append(f"deltaT: must be a positive integer, got {self.deltaT!r}")
        for name in ("beta1", "beta2"):
            if not _is_number(getattr(self, name)) or not 0 < getattr(self, name) < 1:
                out.append(f"{name}: must be in (0, 1), got {getattr(self, name)!r}")
        if not _is_number(self.orth_reg_weight) or self.orth_reg_weight < 0:
            out.append(f"orth_reg_weight: must be >= 0, got {self.orth_reg_weight!r}")
        if self.total_step is not None:
            if not _is_int(self.total_step) or self.total_step <= 0:
                out.append(f"total_step: must be a positive integer (or None), got {self.total_step!r}")
            elif _is_int(self.tinit) and _is_int(self.tfinal) and self.tinit >= self.total_step - self.tfinal:
                out.append(
                    f"tinit={self.tinit}, tfinal={self.tfinal}, total_step={self.total_step} leave no steps "
                    "to prune in (tinit >= total_step - tfinal); decrease tinit/tfinal or increase total_step"
                )
        return out

    def _rank_pattern_problems(self) -> list[str]:
        if not isinstance(self.rank_pattern, dict):
            got = type(self.rank_pattern).__name__
            return [f"rank_pattern: expected a dict of '<module>.lora_E' -> kept flags, got {got}"]
        out = []
        for key, flags in self.rank_pattern.items():
            if not isinstance(key, str) or not key.endswith(_MASK_SUFFIX):
                out.append(
                    f"rank_pattern: key {key!r} must be '<module name>{_MASK_SUFFIX}' (the reference's form)"
                )
            if not isinstance(flags, list) or not all(isinstance(f, bool) for f in flags):
                out.append(f"rank_pattern[{key!r}]: expected a list of True/False kept flags, got {flags!r}")
            elif _is_int(self.init_r) and len(flags) != self.init_r:
                out.append(f"rank_pattern[{key!r}]: has {len(flags)} flags but init_r is {self.init_r}")
        return out

    def layer_values(self, target: Target) -> dict[str, Any]:
        flags = self.rank_pattern.get(pattern_key(target.name))
        return {
            "rank": self.init_r if flags is None else sum(flags),
            "init_r": int(self.init_r),
            "alpha": float(self.lora_alpha),
            "dropout": float(self.lora_dropout),
            "init": bool(self.init_lora_weights),
        }

    def after_resolve(self, plan: Any) -> AdaLoraConfig:
        names = {pattern_key(t.name) for t in plan.targets}
        unknown = sorted(set(self.rank_pattern) - names)
        if unknown:
            raise ConfigError(
                [
                    f"rank_pattern: {k!r} names no adapted module (adapted: {sorted(names)[:4]}...)"
                    for k in unknown
                ],
                what="AdaLoraConfig for this model",
            )
        # Readers of the interchange format expect fan_in_fan_out=True for GPT-2's transposed Conv1D.
        if not self.fan_in_fan_out and HFConv1D and any(isinstance(t.module, HFConv1D) for t in plan.targets):
            return self.replace(fan_in_fan_out=True)
        return self


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# -- the adapter ------------------------------------------------------------------------------------


class SVDAdapter(AdapterModule):
    """P diag(Λ) Q on one layer; subclasses say how the layer's weight is laid out.

    Parameters (their names are the interchange suffixes): ``lora_A`` = Q (rank x fan-in),
    ``lora_E`` = Λ (rank x 1), ``lora_B`` = P (out x rank). ``kept`` marks the triplets the
    controller's latest mask kept; saving trims the tensors to them.
    """

    def __init__(
        self, base_layer: nn.Module, rank: int, init_r: int, alpha: float, dropout: float, init: bool
    ) -> None:
        super().__init__()
        weight = base_layer.weight
        out_f, in_f = self.shape_of(base_layer)
        # Half-precision bases get float32 adapters (as LoRA): their updates would not survive bf16 rounding.
        kw = {
            "device": weight.device,
            "dtype": adapter_dtype(weight),
        }
        self.lora_A = nn.Parameter(torch.randn(rank, in_f, **kw))
        self.lora_E = nn.Parameter(torch.randn(rank, 1, **kw))
        self.lora_B = nn.Parameter(torch.randn(out_f, rank, **kw))
        if init:  # the reference's init: Λ = 0 so the adapter starts inert, P and Q small
            with torch.no_grad():
                nn.init.zeros_(self.lora_E)
                nn.init.normal_(self.lora_A, std=0.02)
                nn.init.normal_(self.lora_B, std=0.02)
        self.register_buffer(
            "kept", torch.ones(rank, dtype=torch.bool, device=weight.device), persistent=False
        )
        self.init_r = init_r
        self.scaling = alpha
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @property
    def rank(self) -> int:
        return self.lora_E.shape[0]

    # kind-specific
    def shape_of(self, base_layer: nn.Module) -> tuple[int, int]:
        raise NotImplementedError

    def to_layout(self, rows: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """An (out x fan-in) matrix in the base weight's own layout."""
        raise NotImplementedError

    def _scaled(self, t: torch.Tensor) -> torch.Tensor:
        # the reference's order: multiply by alpha, divide by (init_r + eps)
        return t * self.scaling / (self.init_r + _EPS)

    def product(self) -> torch.Tensor:
        """s * P diag(Λ) Q, shape (out, fan-in)."""
        return self._scaled(self.lora_B @ (self.lora_A * self.lora_E))

    def delta_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return self.to_layout(self.product().to(weight.dtype), weight)

    def interchange_state(self, portable: bool = False) -> dict[str, torch.Tensor]:
        state = dict(self.state_dict())
        if bool(self.kept.all()):
            return state
        # Masked triplets have Λ = 0: dropping them changes nothing, and the reference reads this form.
        # (These are copies: load into a freshly built adapter, as load_adapter does, not into this one.)
        keep = self.kept
        return {
            "lora_A": state["lora_A"][keep],
            "lora_E": state["lora_E"][keep],
            "lora_B": state["lora_B"][:, keep],
        }

    def apply_mask(self, keep: torch.Tensor) -> None:
        """Zero Λ of the triplets not in ``keep`` and remember the mask for saving."""
        with torch.no_grad():
            keep = keep.to(self.kept.device)
            self.lora_E.masked_fill_(~keep.view(-1, 1), 0.0)
            self.kept.copy_(keep)

    def orthogonality(self) -> list[torch.Tensor]:
        """``||Q Q^T - I||_F`` and ``||P^T P - I||_F`` (paper eq. 4, as the reference computes it)."""
        out = []
        for gram in (self.lora_A @ self.lora_A.T, self.lora_B.T @ self.lora_B):
            eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
            out.append(torch.linalg.matrix_norm(gram - eye, "fro"))
        return out


class SVDLinear(SVDAdapter):
    """On ``nn.Linear`` and on transformers' GPT-2 ``Conv1D`` (weight stored as in x out)."""

    def shape_of(self, base_layer: nn.Module) -> tuple[int, int]:
        self.transposed = not isinstance(base_layer, nn.Linear)
        out_f, in_f = base_layer.weight.shape
        return (in_f, out_f) if self.transposed else (out_f, in_f)

    def to_layout(self, rows: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return rows.T if self.transposed else rows

    def delta_output(self, x: torch.Tensor, base_out: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        xd = self.dropout(x.to(self.lora_A.dtype))
        return self._scaled(xd @ (self.lora_A * self.lora_E).T @ self.lora_B.T).to(base_out.dtype)


class SVDConv(SVDAdapter):
    """On ``nn.Conv1d/2d/3d``: Q spans the flattened kernel (in_channels * kernel elements), and the
    update is applied as a convolution with the base's stride, padding and dilation."""

    def shape_of(self, base_layer: nn.Module) -> tuple[int, int]:
        weight = base_layer.weight
        return weight.shape[0], math.prod(weight.shape[1:])

    def to_layout(self, rows: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return rows.reshape(like.shape)

    def delta_output(self, x: torch.Tensor, base_out: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        xd = self.dropout(x.to(self.lora_A.dtype))
        kernel = self.product().reshape(base_layer.weight.shape)
        return base_layer._conv_forward(xd, kernel, None).to(base_out.dtype)


def _conv_check(module: nn.Module) -> str | None:
    if module.groups != 1:
        return f"groups={module.groups} (grouped or depthwise convolution) is not supported by AdaLoRA"
    return None


register_layer(PEFT_TYPE, "Linear", (nn.Linear,), SVDLinear)
if HFConv1D:
    register_layer(PEFT_TYPE, "Conv1D (GPT-2)", (HFConv1D,), SVDLinear)
register_layer(PEFT_TYPE, "Conv", (nn.Conv1d, nn.Conv2d, nn.Conv3d), SVDConv, check=_conv_check)


# -- the training-loop hook -------------------------------------------------------------------------


class AdaLoraController:
    """Rank allocation for one AdaLoRA adapter, called from any training loop.

    Per training step, in this order::

        loss = model(**batch).loss + controller.orthogonal_penalty()
        loss.backward()
        optimizer.step()
        controller.step(global_step)   # after optimizer.step(), before optimizer.zero_grad()
        optimizer.zero_grad()

    ``step`` reads the gradients (so they must still be there) and zeroes pruned Λ entries after the
    optimizer has moved them (so the masked model is what the next forward pass and a save see).
    ``global_step`` is the step's number on the same scale as the config's ``tinit``, ``tfinal`` and
    ``total_step`` (e.g. 1, 2, ..., total_step); the final ranks are fixed at
    ``total_step - tfinal`` (or the first call past it) and stored in the adapter's config.

    Args:
        model: A model holding AdaLoRA adapter ``adapter_name`` (trainable, with ``total_step`` set).
        adapter_name: Which adapter to allocate.
    """

    def __init__(self, model: nn.Module, adapter_name: str = "default") -> None:
        state = require_adapter(model, adapter_name)
        config = state.configs[adapter_name]
        if not isinstance(config, AdaLoraConfig):
            raise AdapterNameError(
                f"adapter {adapter_name!r} is a {config.peft_type} adapter; AdaLoraController needs one made "
                "from AdaLoraConfig"
            )
        if config.total_step is None:
            problem = (
                "total_step: None; the budget schedule runs from init_r to target_r over total_step "
                "steps, so set AdaLoraConfig(total_step=<number of training steps>)"
            )
            raise ConfigError([problem], what="AdaLoraConfig")
        if config.target_r > config.init_r:
            problem = f"target_r={config.target_r} > init_r={config.init_r}: pruning only removes rank"
            raise ConfigError([problem + "; lower target_r"], what="AdaLoraConfig")
        if config.inference_mode:
            raise AdapterNameError(
                f"adapter {adapter_name!r} is frozen (inference_mode); load it with is_trainable=True to "
                "train it"
            )
        self.model, self.adapter_name, self._state = model, adapter_name, state
        self.modules: dict[str, SVDAdapter] = {
            name: layer.adapters[adapter_name]
            for name, layer in adapter_layers(model)
            if adapter_name in layer.adapters
        }
        self.init_budget = sum(m.rank for m in self.modules.values())
        self.target_budget = config.target_r * len(self.modules)
        self.finished = False
        # modules reloaded at a pruned rank: their current triplets are the kept slots of this pattern
        self._loaded_pattern = dict(config.rank_pattern)
        self._scores: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def config(self) -> AdaLoraConfig:
        return self._state.configs[self.adapter_name]

    def budget(self, step: int) -> tuple[int, bool]:
        """The total rank allowed at ``step``, and whether a mask is applied at that step."""
        c = self.config
        if step <= c.tinit:
            return self.init_budget, False
        if step > c.total_step - c.tfinal:
            return self.target_budget, True
        remaining = 1 - (step - c.tinit) / (c.total_step - c.tfinal - c.tinit)
        budget = int((self.init_budget - self.target_budget) * remaining**3 + self.target_budget)
        return budget, step % c.deltaT == 0

    # -- the training-hook protocol (AdapterConfig.training_hook), as peftkit.train.fit calls it --

    def loss_penalty(self) -> torch.Tensor:
        return self.orthogonal_penalty()

    def after_optimizer_step(self, step: int) -> None:
        self.step(step)

    def orthogonal_penalty(self) -> torch.Tensor:
        """``orth_reg_weight`` times the mean over every P and Q of ``||P^T P - I||_F`` / ``||Q Q^T - I||_F``.

        The paper (eq. 4) writes squared norms summed; the reference library takes the plain Frobenius
        norm averaged over the matrices, which peftkit follows so that training matches it.
        """
        weight = self.config.orth_reg_weight
        terms = [t for m in self.modules.values() for t in m.orthogonality()] if weight else []
        if not terms:
            param = next(iter(self.modules.values())).lora_A
            return torch.zeros((), dtype=param.dtype, device=param.device)
        return weight * (sum(terms) / len(terms))

    def step(self, global_step: int) -> int:
        """Update importances and apply the budget for ``global_step``; returns the budget."""
        end = self.config.total_step - self.config.tfinal
        if global_step < end:
            self._update_importance()
            budget, apply = self.budget(global_step)
            if apply:
                self._apply(self._mask_to_budget(budget))
            return budget
        if not self.finished:  # the final allocation, at exactly the target budget
            self._apply(self._mask_to_budget(self.target_budget))
            self._scores.clear()
            self.finished = True
        else:  # Λ of pruned triplets got gradient updates again: keep them at zero
            for module in self.modules.values():
                module.apply_mask(module.kept)
        return self.target_budget

    def ranks(self) -> dict[str, int]:
        """Kept triplets per module (module name -> rank) after the latest mask."""
        return {name: int(m.kept.sum()) for name, m in self.modules.items()}

    def _update_importance(self) -> None:
        c = self.config
        with torch.no_grad():
            for name, module in self.modules.items():
                for pname, param in (("A", module.lora_A), ("E", module.lora_E), ("B", module.lora_B)):
                    if param.grad is None:
                        raise RuntimeError(
                            f"{name}.lora_{pname} has no gradient: call controller.step() after "
                            "loss.backward() and optimizer.step(), before optimizer.zero_grad()"
                        )
                    sensitivity = (param * param.grad).abs()
                    zeros = (torch.zeros_like(param), torch.zeros_like(param))
                    avg, unc = self._scores.get((name, pname), zeros)
                    avg = c.beta1 * avg + (1 - c.beta1) * sensitivity
                    unc = c.beta2 * unc + (1 - c.beta2) * (sensitivity - avg).abs()
                    self._scores[(name, pname)] = (avg, unc)

    def _triplet_scores(self, name: str) -> torch.Tensor:
        score = {p: avg * unc for p in "AEB" for avg, unc in [self._scores[(name, p)]]}
        return score["E"].view(-1) + (score["A"].mean(dim=1) + score["B"].mean(dim=0))

    def _mask_to_budget(self, budget: int) -> dict[str, torch.Tensor]:
        """Keep mask per module: every triplet scoring above the (init_budget - budget)-th smallest."""
        if not self._scores:
            raise RuntimeError(
                "no importance scores yet: the final allocation needs at least one controller.step() before "
                "total_step - tfinal"
            )
        scores = {name: self._triplet_scores(name) for name in self.modules}
        cut = self.init_budget - budget
        if cut <= 0:  # nothing to prune (e.g. target_r == init_r)
            return {name: torch.ones_like(s, dtype=torch.bool) for name, s in scores.items()}
        flat = torch.cat([s.detach().to("cpu") for s in scores.values()])
        threshold = torch.kthvalue(flat, cut).values.item()
        return {name: s > threshold for name, s in scores.items()}

    def _apply(self, keep: dict[str, torch.Tensor]) -> None:
        pattern = dict(self.config.rank_pattern)
        for name, module in self.modules.items():
            module.apply_mask(keep[name])
            flags = keep[name].tolist()
            earlier = self._loaded_pattern.get(pattern_key(name))
            if earlier is not None:  # a reloaded, already trimmed module: map back onto its init_r slots
                kept_iter = iter(flags)
                flags = [bool(next(kept_iter)) if was else False for was in earlier]
            pattern[pattern_key(name)] = flags
        self._state.configs[self.adapter_name] = self.config.replace(rank_pattern=pattern)


__all__ = ["AdaLoraConfig", "AdaLoraController", "SVDLinear", "SVDConv"]

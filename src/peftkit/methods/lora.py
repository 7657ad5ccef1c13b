"""LoRA (Hu et al. 2021, arXiv:2106.09685) with rsLoRA scaling, DoRA, PiSSA / OLoRA / EVA / CorDA inits
and LoRA+.

A frozen weight W gets a trainable low-rank update: ``h = W x + s * B A x`` with A (r x in),
B (out x r) and ``s = alpha / r`` (rsLoRA, Kalajdzievski 2023: ``alpha / sqrt(r)``, which keeps the
update's scale stable as r grows). B starts at zero, so the adapted model starts equal to the base.

One adapter class per base layer kind; they share everything but how the kind stores its weight,
which each expresses as a 2-D "row view" (one row per output channel) used by merge and DoRA. The
shared ``LoraAdapter`` and the linear one are here; embeddings and convolutions in ``lora_layers.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..core.config import ANY, AdapterConfig
from ..core.inject import adapter_layers, state_of, trained_biases
from ..core.layer import AdapterModule
from ..core.layer import adapter_dtype as _adapter_dtype
from ..core.registry import register_layer, register_method, register_parameter
from ..core.targeting import HFConv1D, Target
from ..errors import ConfigError, UnsupportedLayerError
from . import (
    dora,
    loftq,
    lora_corda,
    lora_data,
    lora_eva,
    lora_ga,
    lora_init,
    lora_kernels,
    lora_parameters,
    trainable_tokens,
)
from .lora_mha import LoraMultiheadAttention
from .lora_parameters import LoraParameters, check_parameter

PEFT_TYPE = "LORA"


@register_method(PEFT_TYPE)
@dataclass
class LoraConfig(AdapterConfig):
    """LoRA and its variants.

    Attributes:
        r: Rank of the update (per-module overrides via ``rank_pattern``).
        lora_alpha: Scale numerator; the update is multiplied by ``lora_alpha / r``.
        lora_dropout: Dropout on the adapter's input during training.
        bias: Which base biases to train and save with the adapter: "none", "all", or "lora_only"
            (biases of adapted layers). Trained biases cannot be switched off by ``disable()``.
        fan_in_fan_out: Recorded for the interchange format; peftkit reads the layout from the layer
            type itself (GPT-2's ``Conv1D`` stores its weight transposed).
        use_rslora: Scale by ``lora_alpha / sqrt(r)`` instead of ``lora_alpha / r``.
        use_dora: DoRA: also learn a per-output-channel magnitude (see ``methods/dora.py``).
        init_lora_weights: ``True`` / ``"default"`` (A Kaiming-uniform, B zero), ``"gaussian"``
            (A ~ N(0, 1/r)), ``"pissa"`` / ``"pissa_niter_K"`` (A, B from the top-r singular vectors;
            the base weight keeps the residual), ``"olora"`` (A, B from a QR decomposition, residual
            kept likewise), ``"loftq"`` (LoftQ, Li et al. 2023: the base weight becomes its 4- or 8-bit
            quantization Q and s B A the best rank-r fit of what Q lost, alternating ``loftq_iter``
            times; needs bitsandbytes), ``"lora_ga"`` (LoRA-GA, Wang et al. 2024: A and B from the SVD of
            the weight's gradient on a few batches, ``methods/lora_ga.py``; the base keeps
            ``W - s B A``), ``"eva"`` (A on the top directions of each layer's inputs, ranks
            redistributed by explained variance, B zero: ``peftkit.inject_eva``, ``methods/lora_eva.py``),
            ``"corda"`` (A, B from the SVD of W times the inputs' covariance, residual kept:
            ``peftkit.inject_corda``, ``methods/lora_corda.py``), or ``False`` (random A and B: the
            adapter changes the output from the start; for tests).
        loftq_config: LoftQ's options, the reference library's keys: ``{"loftq_bits": 4 or 8,
            "loftq_iter": N >= 1}``; only with ``init_lora_weights="loftq"``.
        lora_ga_config: LoRA-GA's options, the reference library's ``LoraGAConfig`` keys: ``direction``
            ("ArB2r", "A2rBr", "ArBr", "random"), ``scale`` ("stable", "weight_svd", "gd_scale", "unit"),
            ``stable_gamma``; None: their defaults (ArB2r, stable, 16). Only with ``init_lora_weights="lora_ga"``.
        eva_config: EVA's options as a dict (``rho``, ``tau``, ``use_label_mask``, ``label_mask_value``,
            ``whiten``, ``adjust_scaling_factors``; the reference library's ``EvaConfig``).
        corda_config: CorDA's options as a dict (``corda_method``: "ipm" or "kpm", ...; the reference
            library's ``CordaConfig``).
        lora_bias: Give B a bias ``b`` (the reference library's ``lora_bias``): the layer's output gains
            ``s * b``, and a merge adds it to the base bias. It lets an adapter carry a change of the
            bias, as ``peftkit.combine`` and ``convert_to_lora`` write when a source changed one. Not on
            embeddings, nor with DoRA, PiSSA or OLoRA (as in the reference).
        target_parameters: ``nn.Parameter`` tensors to adapt directly, by full name or ``.``-suffix, for
            weights no linear layer holds: the stacked experts of a mixture-of-experts model
            (``["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]``, a low-rank delta per expert) or a
            router's weight (``"mlp.gate.weight"``). The reference library's field, with its tensor layout
            (``methods/lora_parameters.py``, docs/moe.md); works beside ``target_modules`` (``[]`` for
            none). ``exclude_modules`` / ``layers_to_transform`` do not filter it, as in the reference.
            ``target_modules="all-linear"`` adds the stacked experts and routers a MoE model has.
        trainable_token_indices: Also train these tokens' embedding rows (and nothing else of the
            embedding), e.g. tokens just added to the tokenizer: a list of token ids for the input
            embedding, or a dict layer name -> token ids (``{"embed_tokens": [...], "lm_head": [...]}`` for a
            model whose output head is not tied to the embedding). A tied output head follows the embedding.
            The reference library's field and tensors (``methods/trainable_tokens.py``, docs/tokens.md).
    """

    pick_when = "the default: well studied, merges exactly, serves in vLLM, and has the most variants (rsLoRA, DoRA, PiSSA and OLoRA inits, LoRA+, LoRA-FA)"

    lr_candidates: ClassVar[tuple[float, ...]] = (
        5e-4,
        2e-3,
        5e-3,
    )  # LoRA paper and the reference library's examples: 2e-4 to 5e-3

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    bias: str = "none"
    fan_in_fan_out: bool = False
    use_rslora: bool = False
    use_dora: bool = False
    init_lora_weights: bool | str = True
    lora_bias: bool = False
    target_parameters: list[str] | None = None
    trainable_token_indices: list[int] | dict[str, list[int]] | None = None
    loftq_config: dict[str, int] = field(default_factory=dict)
    lora_ga_config: dict[str, Any] | None = None
    eva_config: dict[str, Any] | None = None
    corda_config: dict[str, Any] | None = None

    # target_modules=None: the reference library's defaults per architecture (attention query and value
    # projections; for Phi also the MLP's fc1 and fc2), so a default adapter is the reference's own.
    # The reference's other entries (bloom, gemma, mixtral ...) name the same modules the structure does
    # (tests/core/test_anatomy.py checks both). Any other architecture: the same roles, found by
    # structure (core/anatomy.py; a fused query-key-value projection where that is what exists).
    default_targets: ClassVar[dict[str, list[str]]] = {
        "bert": ["query", "value"],
        "roberta": ["query", "value"],
        "xlm-roberta": ["query", "value"],
        "deberta-v2": ["query_proj", "value_proj"],
        "distilbert": ["q_lin", "v_lin"],
        "gpt2": ["c_attn"],
        "llama": ["q_proj", "v_proj"],
        "mistral": ["q_proj", "v_proj"],
        "qwen2": ["q_proj", "v_proj"],
        "opt": ["q_proj", "v_proj"],
        "bart": ["q_proj", "v_proj"],
        "t5": ["q", "v"],
        "mt5": ["q", "v"],
        "gpt_neox": ["query_key_value"],
        "phi": ["q_proj", "v_proj", "fc1", "fc2"],
    }
    target_roles: ClassVar[tuple[str, ...]] = ("query", "value")
    own_default_types: ClassVar[tuple[str, ...]] = ("distilbert",)
    quantizable: ClassVar[bool] = True  # capabilities (core/config.py): LoraQuantLinear in backends/,
    selectable: ClassVar[bool] = True  # and peftkit.select allocates LoRA ranks
    display_name: ClassVar[str] = "LoRA"
    trains_tokens: ClassVar[bool] = True  # trainable_token_indices
    data_inits: ClassVar[tuple[str, ...]] = lora_init.DATA_INITS  # inits a run feeds its training data to
    reference_inert: ClassVar[dict[str, Any]] = {
        "alora_invocation_tokens": None,
        "arrow_config": None,
        "ensure_weight_tying": False,
        "kasa_config": None,
        "layer_replication": None,
        "megatron_config": None,
        "megatron_core": "megatron.core",
        "monteclora_config": None,
        "qalora_group_size": ANY,
        "use_bdlora": None,
        "use_qalora": False,
        "velora_config": None,
    }

    def __post_init__(self) -> None:
        if self.init_lora_weights == "default":
            self.init_lora_weights = True
        if isinstance(self.target_parameters, (tuple, set)):
            self.target_parameters = sorted(self.target_parameters)
        if self.target_parameters == []:  # the reference writes [] for "none"
            self.target_parameters = None
        super().__post_init__()

    @classmethod
    def normalise_reference(cls, data: dict[str, Any]) -> dict[str, Any]:
        # Reference inits that only choose the starting A and B (and leave the base weight alone) do
        # not matter once an adapter is saved: its tensors are the trained ones.
        # EVA's saved config keeps "eva" (and its ranks in rank_pattern); loading needs no data.
        if data.get("init_lora_weights") in ("orthogonal", "eva", "mica"):
            data = {**data, "init_lora_weights": True, "eva_config": None}
        # The reference keeps lora_ga_config when it converts a LoRA-GA adapter to plain LoRA (init True).
        if data.get("init_lora_weights") != "lora_ga" and data.get("lora_ga_config") is not None:
            data = {**data, "lora_ga_config": None}
        return data

    def problems(self) -> list[str]:
        out = super().problems()
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            out.append(f"r: must be a positive integer, got {self.r!r}")
        if (
            isinstance(self.lora_alpha, bool)
            or not isinstance(self.lora_alpha, (int, float))
            or self.lora_alpha <= 0
        ):
            out.append(f"lora_alpha: must be a positive number, got {self.lora_alpha!r}")
        if not isinstance(self.lora_dropout, (int, float)) or not 0 <= self.lora_dropout < 1:
            out.append(f"lora_dropout: must be in [0, 1), got {self.lora_dropout!r}")
        if self.bias not in ("none", "all", "lora_only"):
            out.append(f"bias: must be 'none', 'all' or 'lora_only', got {self.bias!r}")
        init = self.init_lora_weights
        if init not in lora_init.INITS and not (isinstance(init, str) and lora_init.PISSA_NITER.match(init)):
            out.append(
                f"init_lora_weights: must be one of default/True, False, 'gaussian', 'pissa', "
                f"'pissa_niter_K', 'olora', 'loftq', 'lora_ga', 'eva', 'corda'; got {init!r}"
            )
        out += lora_eva.eva_problems(self.eva_config) + lora_corda.corda_problems(self.corda_config)
        if init in lora_init.DATA_INITS and self.target_parameters:
            out.append(
                f"init_lora_weights={init!r} starts from linear layers' inputs; target_parameters has none: "
                "drop target_parameters or use another init"
            )
        out += loftq.problems(init, self.loftq_config)
        if self.lora_ga_config is not None and init != "lora_ga":
            out.append(
                f"lora_ga_config: used only with init_lora_weights='lora_ga' (got {init!r}); drop it or set that init"
            )
        out += lora_ga.options_problems(self.lora_ga_config)
        if any(isinstance(v, float) and not float(v).is_integer() for v in self.rank_pattern.values()):
            out.append(f"rank_pattern: ranks must be whole numbers, got {self.rank_pattern!r}")
        if not isinstance(self.lora_bias, bool):
            out.append(f"lora_bias: must be True or False, got {self.lora_bias!r}")
        elif self.lora_bias and (self.use_dora or init not in (True, False)):
            out.append(
                "lora_bias: works with plain LoRA and init_lora_weights True or False only (as in the reference "
                f"library), got use_dora={self.use_dora!r}, init_lora_weights={init!r}; drop one of them"
            )
        if self.lora_bias and self.target_parameters:
            out.append(
                "lora_bias: the reference library refuses it on target_parameters (a stacked weight has no bias "
                "for B's bias to merge into); drop one of them"
            )
        tokens = self.trainable_token_indices
        if isinstance(tokens, dict):
            for layer, indices in tokens.items():
                out += trainable_tokens.index_problems(f"trainable_token_indices[{layer!r}]", indices)
        elif tokens is not None:
            out += trainable_tokens.index_problems("trainable_token_indices", tokens)
        return out + lora_parameters.config_problems(self.target_parameters, self.lora_dropout, self.use_dora)

    def needs_data(self) -> bool:
        return self.init_lora_weights in lora_init.DATA_INITS

    def saves_portable(self) -> bool:
        return self.init_lora_weights == "corda"

    def inject_from_data(
        self, model: nn.Module, batches: list[Any], forward: Any, adapter_name: str = "default"
    ) -> dict[str, Any]:
        if self.init_lora_weights == "eva":
            plan = lora_eva.inject_eva(model, self, batches, adapter_name, forward)
            kept = [r for r in plan.ranks.values() if r]
            return {
                "init": "eva",
                "batches": len(batches),
                "forward_passes": plan.steps,
                "converged": plan.converged,
                "modules": len(kept),
                "ranks": f"{min(kept)}-{max(kept)}",
            }
        lora_corda.inject_corda(model, self, batches, adapter_name, forward)
        return {
            "init": "corda",
            "corda_method": lora_corda.corda_options(self).corda_method,
            "batches": len(batches),
        }

    def parameter_targets(self) -> list[str] | None:
        return self.target_parameters

    def layer_values(self, target: Target) -> dict[str, Any]:
        common = {
            "dropout": float(self.lora_dropout),
            "use_rslora": bool(self.use_rslora),
            "use_dora": bool(self.use_dora),
            "init": self.init_lora_weights,
        }
        if self.init_lora_weights == "loftq":
            common["init_options"] = loftq.options(self.loftq_config)
        elif self.init_lora_weights == "lora_ga":
            common["init_options"] = {**lora_ga.DEFAULTS, **(self.lora_ga_config or {})}
        if target.parameters:  # lora_bias is refused with parameter targets (problems)
            return lora_parameters.layer_values(target, self.r, self.lora_alpha, common)
        return {
            "r": int(target.rank or self.r),
            "alpha": float(target.alpha or self.lora_alpha),
            "lora_bias": bool(self.lora_bias),
            **common,
        }

    def with_trained_tokens(self, indices: list[int], layers: list[str]) -> LoraConfig:
        given = self.trainable_token_indices
        rows = dict(given) if isinstance(given, dict) else ({layers[0]: list(given)} if given else {})
        for layer in layers:
            rows[layer] = list(dict.fromkeys([*rows.get(layer, []), *indices]))
        # a list is the reference's spelling of "the input embedding"
        return self.replace(trainable_token_indices=rows[layers[0]] if list(rows) == layers[:1] else rows)

    def extra_targets(self, model: nn.Module, plan: Any) -> list[Target]:
        if self.trainable_token_indices is None:
            return []
        return trainable_tokens.token_targets(model, self.trainable_token_indices, plan)

    def after_resolve(self, plan: Any) -> LoraConfig:
        config = self
        # Readers of the interchange format expect fan_in_fan_out=True for GPT-2's transposed Conv1D
        # weights (the reference library warns and corrects it otherwise).
        conv1d = HFConv1D and any(isinstance(t.module, HFConv1D) and not t.parameters for t in plan.targets)
        if not self.fan_in_fan_out and conv1d:
            config = config.replace(fan_in_fan_out=True)
        if plan.all_linear is not None:
            config = lora_parameters.record_all_linear(config, plan)
        return config

    def matching_tensors(self, tensors: dict[str, Any]) -> LoraConfig:
        # LoRA-GA's gradients are gone by then: the base must be the offset one it left (or the adapter was
        # saved portable, init True), as in the reference. LoftQ is re-run, as the reference does: it is
        # deterministic, so the original base gets the training's Q again, and a base already holding Q
        # keeps it (quantizing a quantized weight changes nothing); the saved factors then replace its own.
        if self.init_lora_weights == "lora_ga":
            return self.replace(init_lora_weights=True, lora_ga_config=None)
        return self

    def needs_init_data(self) -> bool:
        return self.init_lora_weights == "lora_ga"

    def init_from_data(self, model: nn.Module, train_step: Any) -> None:
        if self.needs_init_data():
            lora_ga.estimate_gradients(model, self, train_step)

    def export_portable(self) -> bool:
        return self.init_lora_weights == "lora_ga"

    def portable(self) -> LoraConfig:
        if self.init_lora_weights == "loftq":
            raise ConfigError(
                [
                    "portable=True: a LoftQ adapter completes its quantized base Q, which differs from the "
                    "original weights by more than any low-rank adapter can hold; save it with portable=False "
                    "and ship the base as LoftQ left it (model.save_pretrained after inject)"
                ],
                what="LoRA save",
            )
        if not lora_init.rewrites_base(self.init_lora_weights):  # EVA and gaussian only choose the starting A
            return self
        # Twice the rank at the same scaling: alpha/r (or alpha/sqrt(r) under rsLoRA) is unchanged.
        grow = math.sqrt(2) if self.use_rslora else 2
        return self.replace(
            init_lora_weights=True,
            r=2 * self.r,
            lora_alpha=self.lora_alpha * grow,
            rank_pattern={k: 2 * v for k, v in self.rank_pattern.items()},
            alpha_pattern={k: v * grow for k, v in self.alpha_pattern.items()},
        )

    def extra_trainable(self, model: nn.Module, adapted: list[str]) -> list[str]:
        return trained_biases(model, adapted, self.bias)

    def param_groups(
        self, model: nn.Module, lr: float, lr_ratio: float, weight_decay: float = 0.0
    ) -> list[dict[str, Any]] | None:
        # LoRA+ needs B matrices to speed up: without a trainable one (the LoRA adapters are frozen,
        # or inactive) the groups would be plain AdamW under another name
        groups = lora_plus_param_groups(model, lr, lr_ratio=lr_ratio, weight_decay=weight_decay)
        return groups if any(g["name"] == "lora_plus_B" for g in groups) else None


# -- the adapter, shared by every layer kind --------------------------------------------------------


class LoraAdapter(AdapterModule):
    """Shared LoRA logic; a subclass supplies the kind-specific pieces marked below."""

    supports_svd_init = False

    def __init__(
        self,
        r: int,
        alpha: float,
        dropout: float,
        use_rslora: bool,
        use_dora: bool,
        init: Any,
        lora_bias: bool = False,
        init_options: dict[str, int] | None = None,
    ) -> None:
        super().__init__()
        self.r = r
        self.init_options = dict(init_options or {})
        self.lora_bias = lora_bias
        self.scaling = alpha / (math.sqrt(r) if use_rslora else r)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.use_dora = use_dora
        self.additive = not use_dora
        self.init = init
        self.rewrites_base = lora_init.rewrites_base(init)
        if isinstance(init, str) and init != "gaussian" and not self.supports_svd_init:
            raise UnsupportedLayerError(
                f"init_lora_weights={init!r} needs a linear weight matrix; {type(self).__name__} layers "
                "support only True/'default', 'gaussian' or False. Exclude these modules or change the init."
            )

    # kind-specific: the unscaled low-rank path, and the base weight's row view
    def lora_path(self, x: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        raise NotImplementedError

    def factor_params(self) -> tuple[nn.Parameter, nn.Parameter]:
        """(B, A): the parameters whose product, each flattened to a matrix, is the unscaled row view."""
        roles = self.param_roles()
        return roles["B"][0], roles["A"][0]

    def lora_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """B as (out x r) and A as (r x fan_in): a conv's B (out, r, 1, ...) and A (r, in, *kernel) flattened."""
        b, a = self.factor_params()
        return b.reshape(b.shape[0], -1), a.reshape(a.shape[0], -1)

    def lora_rows(self) -> torch.Tensor:
        b, a = self.lora_factors()
        return b @ a

    def delta_factors(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self.use_dora:  # the delta depends on the weight through DoRA's norm
            return None
        b, a = self.lora_factors()
        return self.scaling * b, a

    def set_delta(self, left: torch.Tensor, right: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        """Hold the delta ``left @ right`` (a channel matrix, ``core.deltas.as_matrix``; left is out x r)
        and the bias change ``bias`` exactly: ``B = left / s``, ``A = right``, ``b = bias / s``."""
        b, a = self.factor_params()
        with torch.no_grad():
            b.copy_((left / self.scaling).reshape(b.shape))
            a.copy_(right.reshape(a.shape))
            if bias is not None:
                self.lora_B.bias.copy_((bias / self.scaling).reshape(self.lora_B.bias.shape))

    def _new_bias(self, base_layer: nn.Module, b: nn.Module) -> None:
        """lora_bias: B's bias starts at zero (with the default init); merging needs a base bias to add to."""
        if not self.lora_bias:
            return
        if self.init is not False:
            nn.init.zeros_(b.bias)
        if getattr(base_layer, "bias", None) is None:
            self.mergeable = False  # forward works; a merge would have no bias to take s * b
        else:
            self.merge_into = ("weight", "bias")

    def rows(self, weight: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def unrows(self, rows: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def base_without_bias(self, x: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        raise NotImplementedError

    channel_dim = -1  # where the output channels are in the layer's output

    def _param_dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def _new_magnitude(self, shape: tuple[int, ...], like: torch.Tensor) -> None:
        if self.use_dora:
            self.lora_magnitude_vector = nn.Parameter(
                torch.ones(shape, dtype=_adapter_dtype(like), device=like.device)
            )

    def attach(self, base_layer: nn.Module) -> None:
        weight = base_layer.weight
        quantized = self.__dict__.pop("_loftq_base", None)
        if quantized is not None:  # LoftQ: the base becomes its quantization, which the adapter completes
            with torch.no_grad():
                weight.data.copy_(self.unrows(quantized, weight).to(weight.dtype))
        if self._rewrites_base():  # PiSSA / OLoRA: the base keeps the residual
            with torch.no_grad():
                residual = self.rows(weight.float()) - self.scaling * self._init_rows()
                weight.data.copy_(self.unrows(residual, weight).to(weight.dtype))
        if self.use_dora:
            with torch.no_grad():
                rows = self.rows(weight.detach().to(self._param_dtype()))
                norm = dora.row_norm(rows + self.scaling * self.lora_rows())
                self.lora_magnitude_vector.data.copy_(norm.reshape(self.lora_magnitude_vector.shape))

    def _rewrites_base(self) -> bool:
        return getattr(self, "init_A", None) is not None

    def _init_rows(self) -> torch.Tensor:
        return self.init_B @ self.init_A

    def interchange_state(self, portable: bool = False) -> dict[str, torch.Tensor]:
        state = super().interchange_state()
        if portable and self._rewrites_base():
            # s*B*A on the residual W - s*B0*A0 equals s*[B, B0] @ [A; -A0] on the original W: a plain
            # LoRA of rank 2r with the same scaling (LoraConfig.portable doubles r and alpha).
            a, b = state.pop("lora_A.weight"), state.pop("lora_B.weight")
            state["lora_A.weight"] = torch.cat([a, -self.init_A.to(a.dtype)], dim=0)
            state["lora_B.weight"] = torch.cat([b, self.init_B.to(b.dtype)], dim=1)
        return state

    def detach_from(self, base_layer: nn.Module) -> None:
        # LoftQ's base keeps its quantization: the original weights are not held (that would double the
        # model's memory), and the quantized base is what LoftQ's adapter was made for.
        if self._rewrites_base():
            weight = base_layer.weight
            with torch.no_grad():
                restored = self.rows(weight.float()) + self.scaling * self._init_rows()
                weight.data.copy_(self.unrows(restored, weight).to(weight.dtype))

    def delta_output(self, x: torch.Tensor, base_out: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        dtype = self._param_dtype()
        xd = self.dropout(x.to(dtype) if x.is_floating_point() else x)
        lora = self.lora_path(xd, base_layer)
        if not self.use_dora:
            return (lora * self.scaling).to(base_out.dtype)
        weight = base_layer.weight.to(dtype)
        scale = dora.output_scale(
            self.lora_magnitude_vector, self.rows(weight), self.scaling * self.lora_rows()
        )
        shape = [1] * base_out.dim()
        shape[self.channel_dim] = -1
        scale = scale.view(shape)
        if isinstance(self.dropout, nn.Identity) or not self.training:
            bias = getattr(base_layer, "bias", None)
            base_term = base_out.to(dtype) if bias is None else (base_out - bias.view(shape)).to(dtype)
        else:  # the base term must see the same dropped-out input as the low-rank path
            base_term = self.base_without_bias(xd, base_layer)
        return ((scale - 1) * base_term + scale * lora * self.scaling).to(base_out.dtype)

    def delta_weight(self, weight: torch.Tensor) -> torch.Tensor:
        if self.use_dora:
            return self.merged_weight(weight) - weight
        return self.unrows(self.scaling * self.lora_rows().to(weight.dtype), weight)

    def merged_tensors(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {"weight": self.merged_weight(tensors["weight"])}
        if "bias" in tensors:
            out["bias"] = tensors["bias"] + self.scaling * self.lora_B.bias.to(tensors["bias"].dtype)
        return out

    def unmerged_tensors(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {"weight": self.unmerged_weight(tensors["weight"])}
        if "bias" in tensors:
            out["bias"] = tensors["bias"] - self.scaling * self.lora_B.bias.to(tensors["bias"].dtype)
        return out

    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        if not self.use_dora:
            return super().merged_weight(weight)
        lora_rows = self.scaling * self.lora_rows().to(weight.dtype)
        merged, self._merge_norm = dora.merged_rows(
            self.lora_magnitude_vector.to(weight.dtype), self.rows(weight), lora_rows
        )
        return self.unrows(merged, weight)

    def unmerged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        if not self.use_dora:
            return super().unmerged_weight(weight)
        lora_rows = self.scaling * self.lora_rows().to(weight.dtype)
        rows = dora.unmerged_rows(
            self.lora_magnitude_vector.to(weight.dtype), self.rows(weight), lora_rows, self._merge_norm
        )
        return self.unrows(rows, weight)

    def param_roles(self) -> dict[str, list[nn.Parameter]]:
        """Which parameters are the A and B sides (for LoRA+ learning rates)."""
        raise NotImplementedError


class LoraLinear(LoraAdapter):
    """LoRA on ``nn.Linear`` and on transformers' GPT-2 ``Conv1D`` (weight stored as in x out)."""

    supports_svd_init = True

    def __init__(self, base_layer: nn.Module, **values: Any) -> None:
        super().__init__(**values)
        weight = base_layer.weight
        self.transposed = not isinstance(base_layer, nn.Linear)
        out_f, in_f = (weight.shape[1], weight.shape[0]) if self.transposed else weight.shape
        kw = {"bias": False, "device": weight.device, "dtype": _adapter_dtype(weight)}
        self.lora_A = nn.Linear(in_f, self.r, **kw)
        self.lora_B = nn.Linear(self.r, out_f, **{**kw, "bias": self.lora_bias})
        self._new_magnitude((out_f,), weight)
        if self.init == "loftq":
            loftq.check_layer(base_layer, self.init_options["loftq_bits"])
        if self.rewrites_base and self.r > min(out_f, in_f):
            raise UnsupportedLayerError(
                f"init_lora_weights={self.init!r} needs r <= min(out, in) = {min(out_f, in_f)} for a "
                f"{out_f}x{in_f} weight, got r={self.r}; lower r (or its rank_pattern entry)"
            )
        grad = self.rows(lora_ga.take_gradient(base_layer)) if self.init == "lora_ga" else None
        start = lora_data.supplied(base_layer) if self.init in lora_init.DATA_INITS else grad
        lora_init.initialise_linear(
            self, self.lora_A.weight, self.lora_B.weight, self.rows(weight.detach()), start
        )
        self._new_bias(base_layer, self.lora_B)

    def lora_path(self, x, base_layer):
        return self.lora_B(self.lora_A(x))

    def fused_output(self, x, base_layer):
        # LoRA (and DoRA without dropout or autocast) on a dense frozen weight: one fused function
        # (lora_kernels) instead of the base call plus delta_output; the rest takes the general path.
        a, b = self.lora_A.weight, self.lora_B.weight
        p = self.dropout.p if isinstance(self.dropout, nn.Dropout) and self.dropout.training else 0.0
        if (
            self.lora_bias
            or not lora_kernels.fusable(base_layer, x, a, b)
            or (self.use_dora and (p > 0 or torch.is_autocast_enabled(x.device.type)))
        ):
            lora_kernels.calls["general"] += 1
            return None
        if not self.use_dora:
            return lora_kernels.lora_linear(base_layer, x, a, b, self.scaling, p)
        with torch.no_grad():  # the norm is detached (DoRA section 4.3): no graph for it
            norm = dora.row_norm(self.rows(base_layer.weight) + self.scaling * self.lora_rows())
        return lora_kernels.dora_linear(base_layer, x, a, b, self.scaling, self.lora_magnitude_vector, norm)

    @classmethod
    def routed_output(cls, adapters, slots, x, base_layer, cache):
        # Plain LoRA adapters of any ranks: one batched product for the whole mixed batch (the general
        # fallback would run the layer once per group of rows). DoRA rescales per adapter: fallback.
        if any(a.use_dora or a.lora_bias for a in adapters) or x.dim() < 2:
            return None
        return lora_kernels.routed_lora(
            [(a.lora_A.weight, a.lora_B.weight, a.scaling) for a in adapters], slots, x, base_layer(x), cache
        )

    def rows(self, weight):
        return weight.T if self.transposed else weight

    def unrows(self, rows, like):
        return rows.T if self.transposed else rows

    def base_without_bias(self, x, base_layer):
        return F.linear(x, self.rows(base_layer.weight.to(x.dtype)))

    def param_roles(self):
        return {"A": [self.lora_A.weight], "B": [self.lora_B.weight]}


register_layer(PEFT_TYPE, "Linear", (nn.Linear,), LoraLinear)
if HFConv1D:
    register_layer(PEFT_TYPE, "Conv1D (GPT-2)", (HFConv1D,), LoraLinear)
# Embedding, Conv and MultiheadAttention rows follow, in that order, from lora_layers.py.
register_parameter(
    PEFT_TYPE, "Parameter (2-D weight or 3-D expert stack)", LoraParameters, check=check_parameter
)


def lora_plus_param_groups(
    model: nn.Module,
    lr: float,
    lr_ratio: float = 16.0,
    lr_embedding: float = 1e-6,
    weight_decay: float = 0.0,
) -> list[dict[str, Any]]:
    """Optimizer parameter groups for LoRA+ (Hayou et al. 2024, arXiv:2402.12354).

    LoRA+ trains B with a learning rate ``lr_ratio`` times A's (the paper suggests 2**4); embedding
    adapters get ``lr_embedding`` (the reference library's default 1e-6). Everything else trainable
    (DoRA magnitudes, modules_to_save copies, biases) uses ``lr``. Only trainable parameters are
    included, so pass the result straight to e.g. ``torch.optim.AdamW``.
    """
    state_of(model)
    groups: dict[str, list[nn.Parameter]] = {"A": [], "B": [], "embedding": [], "other": []}
    claimed: set[int] = set()
    for _, layer in adapter_layers(model):
        for adapter in layer.adapters.values():
            if not isinstance(adapter, (LoraAdapter, LoraParameters, LoraMultiheadAttention)):
                continue
            roles = adapter.param_roles()
            embedding = roles.pop("embedding", False)
            for role, params in roles.items():
                for p in params:
                    if p.requires_grad:
                        groups["embedding" if embedding else role].append(p)
                        claimed.add(id(p))
    groups["other"] = [p for p in model.parameters() if p.requires_grad and id(p) not in claimed]
    rates = {"A": lr, "B": lr * lr_ratio, "embedding": lr_embedding, "other": lr}
    return [
        {"params": params, "lr": rates[role], "weight_decay": weight_decay, "name": f"lora_plus_{role}"}
        for role, params in groups.items()
        if params
    ]


__all__ = ["LoraConfig", "LoraAdapter", "LoraLinear", "lora_plus_param_groups"]

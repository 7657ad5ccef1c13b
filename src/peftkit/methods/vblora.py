"""VB-LoRA: LoRA factors assembled from a shared vector bank (Li, Han and Ji, NeurIPS 2024, arXiv:2405.15179).

Every LoRA factor of every adapted layer is cut into sub-vectors of length ``vector_length`` (b), and each
sub-vector is a mixture of ``topk`` (k) vectors picked from one bank ``V`` (``num_vectors`` x b) shared by the
whole model (paper, section 3):

    v = Σ_{j in topk(s)} softmax(topk(s))_j V_j          s: that sub-vector's logits over the bank (trained)

    A: r x in,  rows made of in/b sub-vectors;   B: out x r,  columns made of out/b sub-vectors
    delta h = B A x                                (no scaling: the bank's values set the size)

Trained are the bank (in a :class:`~peftkit.core.layer.ModelPart`, shared like VeRA's matrices but
trainable) and, per layer, the logits ``vblora_logits_A`` (r, in/b, num_vectors) and ``vblora_logits_B``
(out/b, r, num_vectors). Only the top-k logits of each sub-vector matter, so a finished adapter can be
saved as their indices and softmax weights (``save_only_topk_weights``): far smaller, but inference only.

Interchange facts of the reference library (peft 0.21.2) that this file matches: the bank is saved as
``base_model.vblora_vector_bank``; the top-k form saves ``<module>.vblora_logits_A_topk_indices`` (the
smallest integer dtype holding ``num_vectors``) and ``..._topk_weights`` (the first k - 1 softmax weights;
the last is one minus their sum) and is read back as logits that are ``-inf`` off the top k; a model
holding such logits refuses to train. The reference redraws the bank once per adapted layer while it
builds them (the last draw is kept); peftkit draws it once, so the same seed gives different initial
values in the two libraries (files, which hold the bank, are unaffected).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..core import checks
from ..core.config import AdapterConfig, no_patterns_problems, with_layout_of
from ..core.inject import trained_biases
from ..core.layer import AdapterModule, ModelPart
from ..core.layer import adapter_dtype as _adapter_dtype
from ..core.registry import register_layer, register_method
from ..core.targeting import HFConv1D, Target
from ..errors import AdapterFileError, UnsupportedLayerError
from .vera import in_out

PEFT_TYPE = "VBLORA"
KEY_BANK = "base_model.vblora_vector_bank"
LOGITS = ("vblora_logits_A", "vblora_logits_B")


@register_method(PEFT_TYPE)
@dataclass
class VBLoRAConfig(AdapterConfig):
    """VB-LoRA: LoRA factors whose sub-vectors are top-k mixtures of one shared, trained vector bank.

    Attributes:
        r: Rank of the assembled factors A (r x in) and B (out x r).
        num_vectors: Vectors in the bank. Larger models want more (the paper: 90 for RoBERTa-large,
            2048 for Llama 2 13B).
        vector_length: Length of the bank's vectors; it must divide the input and output size of every
            adapted layer.
        topk: Bank vectors mixed into each sub-vector; the paper finds k = 2 best.
        save_only_topk_weights: Save each sub-vector's top-k indices and weights instead of its logits over
            the whole bank: a much smaller file for inference and merging; a model loaded from one refuses
            to train (its other logits are gone).
        vblora_dropout: Dropout on the adapter's input during training.
        fan_in_fan_out: Recorded for the interchange format; the layout is read from the layer type
            (GPT-2's ``Conv1D`` stores its weight transposed) and recorded when saving.
        bias: Which base biases to train and save too: "none", "all", or "vblora_only" (biases of adapted
            layers). Trained biases are part of the base, so ``disable()`` cannot switch them off.
        init_vector_bank_bound: The bank starts uniform in ±this bound; keep it small and nonzero (a zero
            bank has zero gradients for the logits).
        init_logits_std: The logits start normal with this standard deviation.
    """

    pick_when = "storage matters most: every layer's low-rank factors are mixtures of one shared bank of vectors, so files are tiny"
    lr_candidates: ClassVar[tuple[float, ...]] = (
        1e-3,
        3e-3,
        1e-2,
    )  # its paper trains the logits at 1e-2 and the bank at 1e-3

    # the reference VBLoRAConfig has no per-module rank or alpha patterns
    fields_not_in_format: ClassVar[tuple[str, ...]] = ("rank_pattern", "alpha_pattern")

    r: int = 4
    num_vectors: int = 256
    vector_length: int = 256
    topk: int = 2
    save_only_topk_weights: bool = False
    vblora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"
    init_vector_bank_bound: float = 0.02
    init_logits_std: float = 0.1

    # The reference library's own VB-LoRA table (more modules than its LoRA table for the encoder-decoders
    # and OPT); any other architecture: LoRA's roles, found by structure.
    default_targets: ClassVar[dict[str, list[str]]] = {
        "t5": ["q", "k", "v", "o", "wi", "wo"],
        "mt5": ["q", "k", "v", "o", "wi_0", "wi_1", "wo"],
        "bart": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
        "gpt2": ["c_attn"],
        "bloom": ["query_key_value"],
        "opt": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
        "gptj": ["q_proj", "v_proj"],
        "gpt_neox": ["query_key_value"],
        "gpt_neo": ["q_proj", "v_proj"],
        "llama": ["q_proj", "v_proj"],
        "llama4": ["q_proj", "v_proj"],
        "bert": ["query", "value"],
        "roberta": ["query", "value"],
        "deberta-v2": ["query_proj", "key_proj", "value_proj", "dense"],
        "gpt_bigcode": ["c_attn"],
        "deberta": ["in_proj"],
        "gemma": ["q_proj", "v_proj"],
        "gemma2": ["q_proj", "v_proj"],
        "gemma3_text": ["q_proj", "v_proj"],
        "qwen2": ["q_proj", "v_proj"],
        "qwen3": ["q_proj", "v_proj"],
        "nemotron_h": ["q_proj", "k_proj", "v_proj", "o_proj"],
    }
    target_roles: ClassVar[tuple[str, ...]] = ("query", "value")
    display_name: ClassVar[str] = "VB-LoRA"

    def problems(self) -> list[str]:
        out = super().problems()
        out += checks.positive_ints(self, "r", "num_vectors", "vector_length", "topk")
        k, n = self.topk, self.num_vectors
        if isinstance(k, int) and isinstance(n, int) and 0 < n < k:
            out.append(f"topk: cannot pick {k} of num_vectors={n} bank vectors; use topk <= num_vectors")
        out += checks.booleans(self, "save_only_topk_weights", "fan_in_fan_out")
        out += checks.dropout(self, "vblora_dropout")
        for name in ("init_vector_bank_bound", "init_logits_std"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
                out.append(f"{name}: must be a finite number >= 0, got {value!r}")
        out += checks.bias_mode(self, "vblora_only")
        out += no_patterns_problems(self, "VB-LoRA", "the reference format has none", "remove {name}")
        return out

    def layer_values(self, target: Target) -> dict[str, Any]:
        return {
            "r": int(self.r),
            "topk": int(self.topk),
            "dropout": float(self.vblora_dropout),
            "logits_std": float(self.init_logits_std),
            "topk_only": bool(self.save_only_topk_weights),
        }

    def after_resolve(self, plan: Any) -> VBLoRAConfig:
        return with_layout_of(self, plan, HFConv1D)

    def build_part(self, model: nn.Module, plan: Any) -> VectorBank:
        weights = [t.module.weight for t in plan.targets]
        return VectorBank(self.num_vectors, self.vector_length, self.init_vector_bank_bound, weights[0])

    def extra_trainable(self, model: nn.Module, adapted: list[str]) -> list[str]:
        return trained_biases(model, adapted, self.bias)


# -- the shared bank ---------------------------------------------------------------------------------


class VectorBank(ModelPart):
    """The model-level part of one VB-LoRA adapter: its vector bank, a trainable parameter every layer
    reads at each forward and merge (never keeping its own reference, so ``.to()`` and loads are seen)."""

    # The part itself changes nothing; its layers' deltas are plain weight deltas.
    mergeable = True

    def __init__(self, num_vectors: int, vector_length: int, bound: float, like: torch.Tensor) -> None:
        super().__init__()
        bank = torch.empty(num_vectors, vector_length, device=like.device, dtype=_adapter_dtype(like))
        self.vblora_vector_bank = nn.Parameter(nn.init.uniform_(bank, -bound, bound))
        # the layers built on this bank (plain references, not submodules): a load of the top-k form
        # hands them their indices and weights back as logits
        self.layers: list[VBLoRALinear] = []

    def interchange_state(self, portable: bool = False) -> dict[str, torch.Tensor]:
        return {KEY_BANK: self.vblora_vector_bank}

    def loaded(self, tensors: dict[str, torch.Tensor]) -> None:
        if any(key.endswith("_topk_indices") for key in tensors):
            for layer in self.layers:
                layer.logits_from_topk()


def _indices_dtype(num_vectors: int) -> torch.dtype:
    # the reference's choice: the smallest integer type that holds every index
    for dtype, limit in ((torch.uint8, 2**8), (torch.int16, 2**15), (torch.int32, 2**31)):
        if num_vectors < limit:
            return dtype
    return torch.int64


# -- the per-layer adapter ---------------------------------------------------------------------------


class VBLoRALinear(AdapterModule):
    """VB-LoRA on ``nn.Linear`` and on transformers' GPT-2 ``Conv1D`` (weight stored as in x out).

    Interchange tensors: ``vblora_logits_A`` (r, in/b, num_vectors) and ``vblora_logits_B``
    (out/b, r, num_vectors), or with ``topk_only`` their ``_topk_indices`` / ``_topk_weights``.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        r: int,
        topk: int,
        dropout: float,
        logits_std: float,
        topk_only: bool,
        part: VectorBank,
    ) -> None:
        super().__init__()
        weight = base_layer.weight
        self.transposed = not isinstance(base_layer, nn.Linear)
        self.in_features, self.out_features = in_out(base_layer)
        num_vectors, length = part.vblora_vector_bank.shape
        wrong = [
            f"{n} {s}" for n, s in (("input", self.in_features), ("output", self.out_features)) if s % length
        ]
        if wrong:
            raise UnsupportedLayerError(
                f"VB-LoRA cuts the factors into vectors of vector_length={length}, which does not divide the "
                f"layer's {' and '.join(wrong)} size; pick a vector_length dividing every adapted layer's sizes "
                "(e.g. a divisor of the hidden size), or leave this layer out"
            )
        object.__setattr__(self, "_part", part)  # a plain attribute: the bank is registered once on the model
        part.layers.append(self)
        self.topk, self.topk_only = topk, topk_only
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        kw = {"device": weight.device, "dtype": _adapter_dtype(weight)}
        shapes = {
            "vblora_logits_A": (r, self.in_features // length, num_vectors),
            "vblora_logits_B": (self.out_features // length, r, num_vectors),
        }
        for name, shape in shapes.items():
            setattr(self, name, nn.Parameter(torch.randn(shape, **kw) * logits_std))
            # slots for the top-k form (not persistent: not adapter tensors of their own)
            index_dtype = _indices_dtype(num_vectors)
            self.register_buffer(
                f"_{name}_topk_indices", torch.zeros(*shape[:2], topk, dtype=index_dtype), persistent=False
            )
            self.register_buffer(
                f"_{name}_topk_weights", torch.zeros(*shape[:2], topk - 1, **kw), persistent=False
            )

    # -- the top-k form ----------------------------------------------------------------------------

    def interchange_state(self, portable: bool = False) -> dict[str, torch.Tensor]:
        if not self.topk_only:
            return dict(self.state_dict())
        state = {}
        with torch.no_grad():
            for name in LOGITS:
                values, indices = getattr(self, name).topk(self.topk, dim=-1)
                slot_indices = getattr(self, f"_{name}_topk_indices")
                slot_weights = getattr(self, f"_{name}_topk_weights")
                slot_indices.copy_(indices)
                slot_weights.copy_(torch.softmax(values, dim=-1)[..., :-1])
                state[f"{name}_topk_indices"], state[f"{name}_topk_weights"] = slot_indices, slot_weights
        return state

    def logits_from_topk(self) -> None:
        """Take the top-k slots (just loaded) as the logits: log-weights there, -inf everywhere else."""
        with torch.no_grad():
            for name in LOGITS:
                logits = getattr(self, name)
                weights = getattr(self, f"_{name}_topk_weights").to(logits.dtype)
                weights = torch.cat([weights, 1 - weights.sum(-1, keepdim=True)], dim=-1)
                indices = getattr(self, f"_{name}_topk_indices").long()
                logits.fill_(-math.inf).scatter_(-1, indices, weights.log())

    # -- the update --------------------------------------------------------------------------------

    def _mixed(self, logits: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
        """Each sub-vector: the softmax over its top-k logits times those bank vectors, summed (... x b)."""
        values, indices = logits.topk(self.topk, dim=-1)
        return (torch.softmax(values, dim=-1).unsqueeze(-1) * bank[indices]).sum(-2)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The assembled A (r x in) and B (out x r)."""
        logits_a, logits_b = self.vblora_logits_A, self.vblora_logits_B
        # training (a trainable adapter in train mode) would go on from logits that are -inf off the top k
        if self.training and logits_a.requires_grad and torch.isinf(logits_a[0, 0]).any():
            raise AdapterFileError(
                "this VB-LoRA adapter was loaded from a save_only_topk_weights file, which keeps only each "
                "sub-vector's top-k logits: it serves inference and merging, not training. Train from a file "
                "saved with save_only_topk_weights=False (loaded with is_trainable=False, or in eval mode, it runs)"
            )
        bank = self._part.vblora_vector_bank.to(device=logits_a.device, dtype=logits_a.dtype)
        a = self._mixed(logits_a, bank).reshape(logits_a.shape[0], -1)  # (r, in/b, b) -> r x in
        # (out/b, r, b) -> (out/b, b, r) -> out x r: each column of B is r's sub-vectors stacked
        b = self._mixed(logits_b, bank).transpose(1, 2).reshape(-1, logits_b.shape[1])
        return a, b

    def delta_output(self, x: torch.Tensor, base_out: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        a, b = self.factors()
        xd = self.dropout(x.to(a.dtype))
        return F.linear(F.linear(xd, a), b).to(base_out.dtype)

    def delta_weight(self, weight: torch.Tensor) -> torch.Tensor:
        a, b = self.factors()
        delta = (b @ a).to(weight.dtype)  # out x in
        return delta.T if self.transposed else delta

    def delta_factors(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = self.factors()
        return b.to(weight.dtype), a.to(weight.dtype)


register_layer(PEFT_TYPE, "Linear", (nn.Linear,), VBLoRALinear)
if HFConv1D:
    register_layer(PEFT_TYPE, "Conv1D (GPT-2)", (HFConv1D,), VBLoRALinear)


__all__ = ["VBLoRAConfig", "VBLoRALinear", "VectorBank"]

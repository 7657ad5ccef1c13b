"""OFT: orthogonal finetuning (Qiu et al. 2023, arXiv:2306.07280), in its OFTv2 form (arXiv:2506.19847).

Instead of adding a delta, OFT turns the frozen weight by a learned orthogonal matrix, which keeps the
angles between neurons (the paper's "hyperspherical energy") unchanged. The matrix ``R`` is
block-diagonal: the ``f`` input features a layer mixes are cut into ``r`` blocks of ``b`` features
(``r * b = f``), and block ``i`` is the Cayley transform of a skew-symmetric ``b x b`` matrix ``Q_i``.
Only the strictly upper triangle of each ``Q_i`` is stored: ``oft_R.weight`` has shape
``(r, b(b-1)/2)`` (one row when ``block_share``), in ``torch.triu_indices`` (row-major) order.

Two Cayley forms, as in the reference library (peft 0.21.2), so that a saved ``Q`` means the same there:

* exact (``use_cayley_neumann=False``): ``R_i = (I - Q_i)(I + Q_i)^-1``, through a linear solve;
* Cayley-Neumann (the default, OFTv2): ``R_i ~ (I + Q_i)(I + Q_i + ... + Q_i^(m-1))``
  ``= I + 2Q + ... + 2Q^(m-1) + Q^m``, the Neumann series of ``(I + Q)(I - Q)^-1`` cut after ``m``
  terms, ``m = max(3, num_cayley_neumann_terms - 1)`` (2 terms: ``I + 2Q``; 1 term: ``I``).

The two are each other's transpose for the same ``Q`` (``(I - Q)(I + Q)^-1`` is the inverse of
``(I + Q)(I - Q)^-1``), so an adapter must be used with the setting it was trained with. The Neumann form
is only approximately orthogonal; unmerging therefore inverts ``R`` rather than transposing it.

Which side ``R`` acts on (row vectors, ``v R`` with ``R`` block-diagonal):

* ``nn.Linear`` / GPT-2 ``Conv1D``: the input, ``y = W (x R)^T + b`` (OFTv2's input-centric form: cost
  ``b`` per feature instead of a weight product); merged weight ``W R^T``.
* ``nn.Conv1d/2d/3d``: each receptive field, flattened as ``(in_channels, *kernel)``, which is the filter
  turned: merged kernel ``W_flat R^T``. The unmerged forward convolves with that kernel (see
  :class:`OFTConv` for why not the reference's unfold/fold path).
* ``nn.Embedding``: the looked-up vectors, ``E[ids] R``; merged table ``E R``.

``Q = 0`` gives ``R = I``: a fresh adapter leaves the model unchanged. COFT (``coft=True``, the paper's
constrained variant) keeps each ``Q_i`` inside a Frobenius ball of radius ``eps / sqrt(#stored blocks)``
by projecting the stored parameter in place whenever the rotation is computed, as the reference does.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..core import checks
from ..core.config import AdapterConfig, no_patterns_problems
from ..core.inject import trained_biases
from ..core.layer import AdapterModule
from ..core.layer import adapter_dtype as _adapter_dtype
from ..core.registry import register_layer, register_method
from ..core.targeting import HFConv1D, Target
from ..errors import ConfigError, UnsupportedLayerError
from .lora import LoraConfig

PEFT_TYPE = "OFT"
# The reference changed the Cayley-Neumann series in 0.18.0; files written by older versions used
# another one. peftkit writes this version so that readers know which series its adapters use.
_NEUMANN_FORMAT_VERSION = "0.18.0"


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", str(text).partition("@")[0])[:3])


def _flag(value: Any) -> bool:
    return isinstance(value, bool)


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@register_method(PEFT_TYPE)
@dataclass
class OFTConfig(AdapterConfig):
    """Orthogonal finetuning: a learned block-diagonal rotation of each targeted layer's inputs.

    Attributes:
        r: Number of blocks per layer; ``r * oft_block_size`` = the features the layer rotates (a Linear's
            ``in_features``, a conv's ``in_channels * kernel volume``, an embedding's dimension). Set exactly
            one of ``r`` and ``oft_block_size``; the other must be 0.
        oft_block_size: Size ``b`` of each block (the reference default, 32); must divide every targeted
            layer's rotated features. Trainable values per block: ``b(b-1)/2``.
        module_dropout: While training, this fraction of a layer's blocks is set to the identity (OFT's
            multiplicative dropout). peft 0.21.2 builds but never applies it; peftkit applies it.
        fan_in_fan_out: Recorded for the interchange format; peftkit reads the layout from the layer type.
        bias: Base biases to train and save as well: "none", "all" or "oft_only" (adapted layers').
        init_weights: ``True``: Q = 0, so R = I and the model starts at the base. ``False``: Q ~ N(0, 0.1²)
            (the adapter changes the output at once; for tests).
        coft: Constrained OFT: keep each Q_i within Frobenius norm ``eps / sqrt(#stored blocks)``.
        eps: COFT's radius (ignored unless ``coft``).
        block_share: One Q shared by every block of a layer (stored as a single row).
        use_cayley_neumann: Approximate the Cayley transform by a truncated Neumann series (no matrix
            inverse; OFTv2) instead of solving exactly. See the module docstring for both forms.
        num_cayley_neumann_terms: Terms of that series (at least 2).
    """

    pick_when = "you want to keep the pretrained neurons' relations (an orthogonal rotation per block), e.g. controllable generation, with stable training"

    fields_not_in_format: ClassVar[tuple[str, ...]] = (
        "rank_pattern",
        "alpha_pattern",
    )  # not in the reference

    r: int = 0
    oft_block_size: int = 32
    module_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"
    init_weights: bool = True
    coft: bool = False
    eps: float = 6e-5
    block_share: bool = False
    use_cayley_neumann: bool = True
    num_cayley_neumann_terms: int = 5

    # The reference library uses LoRA's defaults per architecture for OFT too; other architectures get
    # LoRA's roles (attention query and value), found by structure.
    default_targets: ClassVar[dict[str, list[str]]] = LoraConfig.default_targets
    target_roles: ClassVar[tuple[str, ...]] = LoraConfig.target_roles
    own_default_types: ClassVar[tuple[str, ...]] = LoraConfig.own_default_types

    def problems(self) -> list[str]:
        out = super().problems()
        r, size = self.r, self.oft_block_size
        if not (_count(r) and r >= 0):
            out.append(f"r: must be a non-negative integer (0 = derive it from oft_block_size), got {r!r}")
        if not (_count(size) and size >= 0):
            out.append(f"oft_block_size: must be a non-negative integer (0 = derive it from r), got {size!r}")
        if _count(r) and _count(size) and (r == 0) == (size == 0):
            out.append(
                f"set exactly one of r (number of blocks) and oft_block_size (block size), the other to 0, since "
                f"r x oft_block_size = the layer's input features; got r={r}, oft_block_size={size}"
                + (
                    " (oft_block_size defaults to 32: pass oft_block_size=0 with r)"
                    if r and size == 32
                    else ""
                )
            )
        if _count(size) and size == 1:
            out.append("oft_block_size: 1 gives 1x1 blocks, which cannot rotate anything; use 2 or more")
        out += checks.dropout(self, "module_dropout")
        out += checks.bias_mode(self, "oft_only")
        if isinstance(self.eps, bool) or not isinstance(self.eps, (int, float)) or not self.eps > 0:
            out.append(f"eps: COFT's radius must be a positive number, got {self.eps!r}")
        terms = self.num_cayley_neumann_terms
        if not (_count(terms) and terms >= 2):
            out.append(
                f"num_cayley_neumann_terms: must be an integer >= 2 (with 1 the rotation stays the identity), "
                f"got {terms!r}"
            )
        for name in ("fan_in_fan_out", "init_weights", "coft", "block_share", "use_cayley_neumann"):
            if not _flag(getattr(self, name)):
                out.append(f"{name}: must be True or False, got {getattr(self, name)!r}")
        out += no_patterns_problems(
            self,
            "OFT",
            "the reference format has no such field",
            "use one oft_block_size for all targets, or inject separate adapters",
        )
        return out

    @classmethod
    def normalise_reference(cls, data: dict[str, Any]) -> dict[str, Any]:
        # Refuse reference files whose tensors mean something else than peftkit would compute.
        problems = []
        if "oft_block_size" not in data:
            problems.append(
                "the file predates peft 0.14 (no oft_block_size): its OFT weights use an older, incompatible "
                "parameterisation; retrain the adapter"
            )
        version = data.get("peft_version")
        if (
            data.get("use_cayley_neumann", False)
            and version
            and _version(version) < _version(_NEUMANN_FORMAT_VERSION)
        ):
            problems.append(
                f"written by peft {version}, whose Cayley-Neumann series differs from the one since "
                f"{_NEUMANN_FORMAT_VERSION}; retrain the adapter with a current version"
            )
        if problems:
            raise ConfigError(problems, what="OFT adapter config")
        return data

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        # The reference reads a missing peft_version as "older than the current Cayley-Neumann series".
        data["peft_version"] = _NEUMANN_FORMAT_VERSION
        return dict(sorted(data.items()))

    def layer_values(self, target: Target) -> dict[str, Any]:
        return {
            "r": int(self.r),
            "block_size": int(self.oft_block_size),
            "dropout": float(self.module_dropout),
            "coft": bool(self.coft),
            "eps": float(self.eps),
            "block_share": bool(self.block_share),
            "neumann": bool(self.use_cayley_neumann),
            "terms": int(self.num_cayley_neumann_terms),
            "init": bool(self.init_weights),
        }

    def after_resolve(self, plan: Any) -> OFTConfig:
        if not self.fan_in_fan_out and HFConv1D and any(isinstance(t.module, HFConv1D) for t in plan.targets):
            return self.replace(fan_in_fan_out=True)
        return self

    def extra_trainable(self, model: nn.Module, adapted: list[str]) -> list[str]:
        return trained_biases(model, adapted, self.bias)


# -- the rotation ---------------------------------------------------------------------------------


def _cayley_neumann(q: torch.Tensor, terms: int) -> torch.Tensor:
    """``(I + Q)(I + Q + ... + Q^(m-1))`` for a batch of skew matrices, summed in the reference's order
    (so that float rounding matches it): ``I + 2Q + 2Q^2 + ... + 2Q^(m-1) + Q^m``."""
    eye = torch.eye(q.shape[-1], device=q.device, dtype=q.dtype).expand_as(q)
    if terms < 2:
        return eye.clone()
    rot = torch.add(eye, q, alpha=2.0)
    if terms == 2:
        return rot
    power = torch.bmm(q, q)
    rot = torch.add(rot, power, alpha=2.0)
    for _ in range(3, terms - 1):
        power = torch.bmm(power, q)
        rot = torch.add(rot, power, alpha=2.0)
    return rot + torch.bmm(power, q)


def _turn(v: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """``v @ blockdiag(blocks)`` for row vectors ``v`` (..., n*b) and ``blocks`` (n, b, b)."""
    n, b, _ = blocks.shape
    split = v.reshape(*v.shape[:-1], n, b)
    return torch.einsum("...rk,rkc->...rc", split, blocks).reshape(v.shape)


class OFTRotation(nn.Module):
    """The stored skew-symmetric blocks and the rotation they define.

    Held by an adapter as ``oft_R`` (``oft_embedding_R`` on embeddings), so its ``weight`` is saved
    under the reference library's key, e.g. ``...query.oft_R.weight``.
    """

    def __init__(
        self,
        rows: int,
        block_size: int,
        coft: bool,
        eps: float,
        neumann: bool,
        terms: int,
        init: bool,
        like: torch.Tensor,
    ) -> None:
        super().__init__()
        kw = {"device": like.device, "dtype": like.dtype}
        self.weight = nn.Parameter(torch.zeros(rows, block_size * (block_size - 1) // 2, **kw))
        if not init:
            nn.init.normal_(self.weight, mean=0.0, std=0.1)
        self.block_size, self.coft, self.eps, self.neumann, self.terms = block_size, coft, eps, neumann, terms
        self.register_buffer(
            "upper", torch.triu_indices(block_size, block_size, 1, device=like.device), persistent=False
        )

    def skew(self, vec: torch.Tensor) -> torch.Tensor:
        """(rows, b(b-1)/2) upper-triangle entries -> (rows, b, b) skew-symmetric matrices Q."""
        b = self.block_size
        q = vec.new_zeros(vec.shape[0], b, b)
        q[:, self.upper[0], self.upper[1]] = vec
        return q - q.transpose(-2, -1)

    @torch.no_grad()
    def project_(self) -> None:
        """COFT: pull each Q_i back onto the ball ||Q_i||_F <= eps / sqrt(rows) (in place, no gradient)."""
        q = self.skew(self.weight)
        radius = self.eps / torch.sqrt(torch.tensor(float(q.shape[0]), device=q.device))
        norm = torch.linalg.vector_norm(q, dim=(1, 2), keepdim=True)
        inside = norm <= radius
        projected = torch.where(inside, q, radius * (q / torch.where(inside, torch.ones_like(norm), norm)))
        self.weight.copy_(projected[:, self.upper[0], self.upper[1]])

    def blocks(self) -> torch.Tensor:
        """(rows, b, b): the orthogonal blocks R_i."""
        if self.coft:
            self.project_()
        q = self.skew(self.weight)
        if self.neumann:
            return _cayley_neumann(q, self.terms)
        eye = torch.eye(q.shape[-1], device=q.device, dtype=q.dtype).expand_as(q)
        return torch.linalg.solve(eye + q, eye - q, left=False)  # (I - Q)(I + Q)^-1


# -- adapters, one per layer kind -----------------------------------------------------------------


def _split(features: int, r: int, block_size: int) -> tuple[int, int]:
    """(number of blocks, block size) for ``features`` rotated features; refuses sizes that do not divide."""
    given, name = (block_size, "oft_block_size") if r == 0 else (r, "r")
    if given > features or features % given:
        divisors = [d for d in range(1, features + 1) if features % d == 0]
        near = sorted(sorted(divisors, key=lambda d: (abs(d - given), d))[:2])
        raise UnsupportedLayerError(
            f"{name}={given} must divide the {features} input features this layer rotates "
            f"(r x oft_block_size = {features}); the nearest values that do are {near}. Change {name} or "
            "exclude this module (the reference library silently rounds to a divisor instead)"
        )
    count, size = (features // given, given) if r == 0 else (given, features // given)
    if size < 2:
        raise UnsupportedLayerError(
            f"r={r} splits the {features} input features into blocks of 1, which cannot rotate; use a smaller r"
        )
    return count, size


class OFTAdapter(AdapterModule):
    """Shared OFT logic; a subclass says how its layer kind lays out the weight it turns."""

    # R^T-merged (Linear, conv: W R^T) or R-merged (embedding tables: E R).
    transpose_merge: bool = True
    key: str = "oft_R"
    # The merged weight depends on the weight it is merged into (W R^T): the core refuses to merge it
    # beside other adapters on the same layer, where merged and unmerged outputs would differ.
    additive = False

    def __init__(
        self,
        features: int,
        like: torch.Tensor,
        r: int,
        block_size: int,
        dropout: float,
        coft: bool,
        eps: float,
        block_share: bool,
        neumann: bool,
        terms: int,
        init: bool,
    ) -> None:
        super().__init__()
        self.num_blocks, self.block_size = _split(features, r, block_size)
        self.dropout = dropout
        template = torch.empty(0, device=like.device, dtype=_adapter_dtype(like))
        rows = 1 if block_share else self.num_blocks
        self.add_module(
            self.key, OFTRotation(rows, self.block_size, coft, eps, neumann, terms, init, template)
        )

    @property
    def rotation_module(self) -> OFTRotation:
        return self._modules[self.key]

    def _dtype(self) -> torch.dtype:
        return self.rotation_module.weight.dtype

    def rotation(self, train: bool = False) -> torch.Tensor:
        """(num_blocks, b, b); with ``train`` and module_dropout, a random fraction of blocks is I."""
        blocks = self.rotation_module.blocks()
        stored = blocks.shape[0]
        if train and self.dropout > 0 and stored > 1:  # shared blocks are never dropped (as the reference)
            dropped = torch.zeros(stored, device=blocks.device, dtype=blocks.dtype)
            dropped[torch.randperm(stored, device=blocks.device)[: int(self.dropout * stored)]] = 1
            eye = torch.eye(self.block_size, device=blocks.device, dtype=blocks.dtype)
            mask = dropped.view(-1, 1, 1)
            blocks = (1 - mask) * blocks + mask * eye
        return blocks.expand(self.num_blocks, -1, -1) if stored == 1 else blocks

    # kind-specific: the weight as rows of rotated features, and back
    def rows(self, weight: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def unrows(self, rows: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _merge_with(self, weight: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
        blocks = blocks.to(weight.dtype)
        return self.unrows(_turn(self.rows(weight), blocks.mT if self.transpose_merge else blocks), weight)

    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return self._merge_with(weight, self.rotation())

    def unmerged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        # The inverse, not the transpose: the Cayley-Neumann R is orthogonal only approximately.
        return self._merge_with(weight, torch.linalg.inv(self.rotation().to(weight.dtype)))

    def delta_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return self.merged_weight(weight) - weight


class OFTLinear(OFTAdapter):
    """OFT on ``nn.Linear`` and transformers' GPT-2 ``Conv1D`` (weight stored in x out): the input turns."""

    def __init__(self, base_layer: nn.Module, **values: Any) -> None:
        weight = base_layer.weight
        transposed = not isinstance(base_layer, nn.Linear)
        super().__init__(weight.shape[0] if transposed else weight.shape[1], weight, **values)
        self.transposed = transposed

    transforms = "input"  # the base layer runs once, on x R, as in the reference

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        return _turn(x.to(self._dtype()), self.rotation(self.training)).to(x.dtype)

    def rows(self, weight):
        return weight.T if self.transposed else weight

    def unrows(self, rows, like):
        return rows.T if self.transposed else rows


class OFTConv(OFTAdapter):
    """OFT on ``nn.Conv1d/2d/3d``: each receptive field (``in_channels x kernel`` values) is rotated,
    which is the same as convolving with the turned kernel ``W_flat R^T``; that is what runs here.

    The reference library's unmerged Conv2d path instead rotates stride-1 unpadded patches and sums them
    back with ``fold``, which is not a rotation for kernels larger than 1x1 (a fresh adapter already
    changes the output there); its merged weight is the one computed here, and for 1x1 kernels both agree.
    """

    def __init__(self, base_layer: nn.modules.conv._ConvNd, **values: Any) -> None:
        weight = base_layer.weight
        super().__init__(weight[0].numel(), weight, **values)

    def delta_output(self, x: torch.Tensor, base_out: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        weight = base_layer.weight
        turned = self._merge_with(weight.to(self._dtype()), self.rotation(self.training)).to(weight.dtype)
        return base_layer._conv_forward(x, turned, base_layer.bias) - base_out

    def rows(self, weight):
        return weight.reshape(weight.shape[0], -1)  # (out, in_channels * kernel volume)

    def unrows(self, rows, like):
        return rows.reshape(like.shape)


class OFTEmbedding(OFTAdapter):
    """OFT on ``nn.Embedding``: the looked-up vectors turn, ``E[ids] R``; saved as ``oft_embedding_R``."""

    transpose_merge = False
    key = "oft_embedding_R"

    def __init__(self, base_layer: nn.Embedding, **values: Any) -> None:
        super().__init__(base_layer.embedding_dim, base_layer.weight, **values)

    def delta_output(self, x: torch.Tensor, base_out: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        turned = _turn(base_out.to(self._dtype()), self.rotation(self.training)).to(base_out.dtype)
        return turned - base_out

    def rows(self, weight):
        return weight

    def unrows(self, rows, like):
        return rows


def _conv_check(module: nn.Module) -> str | None:
    if module.groups != 1:
        return f"groups={module.groups} (grouped or depthwise convolution) is not supported by OFT"
    return None


register_layer(PEFT_TYPE, "Linear", (nn.Linear,), OFTLinear)
if HFConv1D:
    register_layer(PEFT_TYPE, "Conv1D (GPT-2)", (HFConv1D,), OFTLinear)
register_layer(PEFT_TYPE, "Embedding", (nn.Embedding,), OFTEmbedding)
register_layer(PEFT_TYPE, "Conv", (nn.Conv1d, nn.Conv2d, nn.Conv3d), OFTConv, check=_conv_check)


__all__ = ["OFTConfig", "OFTRotation", "OFTLinear", "OFTConv", "OFTEmbedding"]

"""Adapters seen as weight deltas, and the algebra that combines and approximates them.

Every adapter that can be merged changes each of its layers' weights by a fixed amount relative to the
base (and sometimes the bias). Written as a *channel matrix* (one row per output channel, see
:func:`as_matrix`) that change can be summed with other adapters', pruned, and approximated by two thin
factors through a truncated SVD: what ``peftkit.combine`` and ``peftkit.convert_to_lora`` do. Nothing
here names a method: an adapter gives its delta through ``delta_factors()`` (exact factors, e.g. LoRA's
``s * B`` and ``A``) or ``delta_weight()`` (dense), and which method receives the result is the caller's
business. All arithmetic runs in float64, so the only error in an "exact" result is the final rounding.

Combination rules (``combine_deltas``), for deltas ``D_i`` with weights ``w_i`` on one module:

- ``linear`` / ``cat``: ``sum w_i D_i`` exactly, as the concatenation ``[w_1 L_1, ...] @ [R_1; ...]`` of
  the factors (rank ``sum k_i``); ``linear`` may then be truncated to a rank or an energy share.
- ``svd``: the same sum truncated by SVD, by default to the largest input rank.
- ``ties`` (Yadav et al. 2023, arXiv:2306.01708): trim each ``D_i`` to its ``density`` largest-magnitude
  entries, elect each entry's sign from the weighted trimmed deltas, average the weighted entries that
  agree with it (zeros do not vote); then SVD.
- ``dare_linear`` / ``dare_ties`` (Yu et al. 2023, arXiv:2311.03099): drop each entry with probability
  ``1 - density`` and rescale the rest by ``1 / density`` (masks from a seeded generator), then the
  weighted sum, or TIES's election and disjoint mean; then SVD.
- ``magnitude_prune``: trim each ``D_i`` as TIES does, then the weighted sum; then SVD.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import AdapterNameError, ConfigError, NotCombinableError
from .anatomy import HFConv1D
from .inject import adapter_layers, model_parts, require_adapter, saved_modules
from .layer import AdapterLayer

METHODS = ("linear", "cat", "svd", "ties", "dare_linear", "dare_ties", "magnitude_prune")
# methods whose result is a dense matrix, factored afterwards by a truncated SVD
DENSE_METHODS = ("svd", "ties", "dare_linear", "dare_ties", "magnitude_prune")
DTYPE = torch.float64


# -- the channel-matrix view of a layer's weight ----------------------------------------------------


def as_matrix(base_layer: nn.Module, tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` (a weight, or a weight delta, in ``base_layer``'s own layout) as an (out x fan_in) matrix.

    Rows are output channels: a Linear weight as it is, GPT-2's Conv1D (stored in x out) and an embedding
    table (vocab x dim, whose output channels are the embedding dimensions) transposed, a convolution
    kernel flattened to (out, in * kernel volume)."""
    if isinstance(base_layer, nn.Embedding) or (HFConv1D and isinstance(base_layer, HFConv1D)):
        return tensor.T
    return tensor.reshape(tensor.shape[0], -1) if tensor.dim() > 2 else tensor


def from_matrix(base_layer: nn.Module, matrix: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`as_matrix`: ``matrix`` in the layout of ``like`` (the base layer's weight)."""
    if isinstance(base_layer, nn.Embedding) or (HFConv1D and isinstance(base_layer, HFConv1D)):
        return matrix.T
    return matrix.reshape(like.shape)


@dataclass
class Delta:
    """One adapter's change to one layer: the weight as a channel matrix, either exact factors
    ``left @ right`` or ``dense``, and the change of the bias (None when it has none)."""

    left: torch.Tensor | None = None
    right: torch.Tensor | None = None
    dense: torch.Tensor | None = None
    bias: torch.Tensor | None = None

    def matrix(self) -> torch.Tensor:
        return self.dense if self.dense is not None else self.left @ self.right

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact factors: the given ones, or a dense delta's SVD at its numerical rank."""
        if self.dense is None:
            return self.left, self.right
        u, s, vh = torch.linalg.svd(self.dense, full_matrices=False)
        keep = max(1, numerical_rank(s, self.dense.shape))
        return u[:, :keep] * s[:keep], vh[:keep]

    @property
    def rank(self) -> int:
        """The rank this delta needs to be exact (its factors' inner size, or a dense delta's numerical rank)."""
        if self.dense is None:
            return self.left.shape[1]
        return numerical_rank(torch.linalg.svdvals(self.dense), self.dense.shape)


def numerical_rank(singular: torch.Tensor, shape: Sequence[int]) -> int:
    """Singular values above float32 rounding of the largest one: adapters compute in float32, so
    anything below that is noise rather than part of the delta."""
    if singular.numel() == 0 or singular[0] == 0:
        return 0
    tolerance = singular[0] * max(shape) * torch.finfo(torch.float32).eps
    return int((singular > tolerance).sum())


# -- reading deltas off a model ---------------------------------------------------------------------


def check_unmerged(model: nn.Module) -> None:
    """Deltas are taken against the live base weights: refuse while any adapter is merged into them."""
    merged = sorted({n for _, layer in adapter_layers(model) for n in layer.merged})
    if merged:
        raise AdapterNameError(
            f"adapter(s) {merged} are merged into the base weights, so the weights are not the base any more; "
            "call peftkit.unmerge(model) first"
        )


def adapter_deltas(model: nn.Module, adapter_name: str, *, additive_only: bool) -> dict[str, Delta]:
    """Module name -> the delta adapter ``adapter_name`` makes there, relative to the current base.

    With ``additive_only`` an adapter whose delta depends on the weight it is applied to (DoRA, IA3, OFT)
    is refused: summing such deltas with others would not give what the adapters do together.

    Raises:
        NotCombinableError: the adapter changes no weights (soft prompts, non-linear bottleneck adapters),
            rewrote the base weight at init (PiSSA/OLoRA), trains base parameters shared with every other
            adapter (``bias="all"``), or is not additive under ``additive_only``.
    """
    state = require_adapter(model, adapter_name)
    check_unmerged(model)
    part = model_parts(model).get(adapter_name)
    if part is not None and not part.mergeable:
        raise NotCombinableError(
            f"adapter {adapter_name!r} ({type(part).__name__}) changes the model's inputs or attention, not its "
            "weights, so it has no weight delta to combine or convert; keep it as an adapter of its own"
        )
    if state.extra_trainable.get(adapter_name):
        raise NotCombinableError(
            f"adapter {adapter_name!r} trains base parameters ({len(state.extra_trainable[adapter_name])}, e.g. "
            "biases under bias='all'), whose one set of values every adapter on the model shares, so its own "
            "change of them is not known; retrain it with bias='none'"
        )
    deltas = {}
    for name, layer in adapter_layers(model):
        if adapter_name in layer.adapters:
            deltas[name] = layer_delta(layer, adapter_name, additive_only=additive_only)
    return deltas


def layer_delta(layer: AdapterLayer, adapter_name: str, *, additive_only: bool) -> Delta:
    """The :class:`Delta` of one adapter on one layer (see :func:`adapter_deltas`)."""
    adapter = layer.adapters[adapter_name]
    where = f"adapter {adapter_name!r} on {layer.module_name!r} ({type(adapter).__name__})"
    if not adapter.mergeable:
        raise NotCombinableError(
            f"{where} is not a fixed change of the layer's weights (e.g. a bottleneck adapter with a non-linear "
            "activation), so it cannot be combined or written as a LoRA; keep it as an adapter of its own"
        )
    if adapter.rewrites_base:
        raise NotCombinableError(
            f"{where} rewrote the base weight at init (PiSSA/OLoRA/LoRA-GA; LoftQ); save it with portable=True "
            "and load that plain LoRA onto the original base, then combine or convert the loaded one (a LoftQ "
            "adapter belongs to its quantized base and has no portable form)"
        )
    if additive_only and not adapter.additive:
        raise NotCombinableError(
            f"{where} rescales or turns the weight it is applied to (DoRA, IA3, OFT), so its delta summed with "
            "others' is not what the adapters do together; write it as a plain LoRA of its delta first "
            "(peftkit.convert_to_lora), then combine that one"
        )
    if "weight" not in adapter.merge_into:
        raise NotCombinableError(
            f"{where} changes only {list(adapter.merge_into)}, not the weight: there is nothing for a LoRA to hold"
        )
    base = {k: v.to(DTYPE) for k, v in layer._read_tensors([adapter_name]).items()}
    weight = base["weight"]
    with torch.no_grad():
        factors = adapter.delta_factors(weight)
        if factors is not None:
            delta = Delta(left=factors[0].detach().to(DTYPE), right=factors[1].detach().to(DTYPE))
        else:
            delta = Delta(dense=as_matrix(layer.base_layer, adapter.delta_weight(weight).to(DTYPE)))
        if "bias" in adapter.merge_into:
            # a copy: merging records state on some adapters (IA3 keeps the vector it merged)
            merged = copy.deepcopy(adapter).merged_tensors({k: base[k] for k in adapter.merge_into})
            change = (merged["bias"] - base["bias"]).reshape(-1)
            delta.bias = change if bool(change.any()) else None  # e.g. IA3 on a layer whose bias is zero
    return delta


def head_deltas(model: nn.Module, adapter_name: str) -> dict[str, dict[str, torch.Tensor]]:
    """Module -> tensor -> change of the adapter's ``modules_to_save`` copy from the model's own module."""
    out = {}
    for name, wrapper in saved_modules(model):
        if adapter_name in wrapper.copies:
            original = wrapper.base_layer.state_dict()
            out[name] = {
                k: v.detach().to(DTYPE) - original[k].detach().to(DTYPE)
                for k, v in wrapper.copies[adapter_name].state_dict().items()
                if v.is_floating_point()
            }
    return out


# -- combining --------------------------------------------------------------------------------------


@dataclass
class Options:
    """The settings of one combination (see ``peftkit.combine``)."""

    method: str = "linear"
    rank: int | None = None
    energy: float | None = None
    density: float | None = None
    seed: int = 0
    sign: str = "total"

    def problems(self) -> list[str]:
        out = []
        if isinstance(self.method, str) and self.method.endswith("_svd") and self.method[:-4] in METHODS:
            out.append(
                f"method: {self.method!r} is the reference library's name; peftkit's {self.method[:-4]!r} already "
                f"works on the deltas and ends in a truncated SVD: use method={self.method[:-4]!r}"
            )
        elif self.method not in METHODS:
            out.append(f"method: must be one of {', '.join(METHODS)}; got {self.method!r}")
        out += truncation_problems(self.rank, self.energy)
        if self.method == "cat" and (self.rank is not None or self.energy is not None):
            out.append(
                "rank/energy: 'cat' keeps every factor (rank = sum of the ranks); use 'linear' to truncate"
            )
        pruning = self.method in ("ties", "dare_linear", "dare_ties", "magnitude_prune")
        if pruning:
            d = self.density
            if d is None or isinstance(d, bool) or not isinstance(d, (int, float)) or not 0 < d <= 1:
                out.append(f"density: {self.method} needs the share of entries to keep, in (0, 1]; got {d!r}")
        elif self.density is not None and self.method in METHODS:
            out.append(f"density: only ties, dare_* and magnitude_prune prune; {self.method} does not")
        if self.sign not in ("total", "frequency"):
            out.append(
                f"sign: must be 'total' (by summed value) or 'frequency' (by count); got {self.sign!r}"
            )
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            out.append(f"seed: must be an integer, got {self.seed!r}")
        return out


def truncation_problems(rank: int | None, energy: float | None) -> list[str]:
    out = []
    if rank is not None and energy is not None:
        out.append("rank/energy: give one of them (a fixed rank, or the share of the delta's energy to keep)")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0):
        out.append(f"rank: must be a positive integer, got {rank!r}")
    if energy is not None and (
        isinstance(energy, bool) or not isinstance(energy, (int, float)) or not 0 < energy <= 1
    ):
        out.append(
            f"energy: must be a share of the squared singular values in (0, 1], e.g. 0.99; got {energy!r}"
        )
    return out


@dataclass
class Approximation:
    """How one module's result was written: its rank, and how far it is from the exact delta.

    ``error`` is the Frobenius norm of (exact - written), ``relative_error`` that over the exact delta's
    norm (0 when the delta is zero); ``exact_rank`` the rank the exact delta needs."""

    rank: int
    exact_rank: int
    error: float = 0.0
    relative_error: float = 0.0
    discarded: list[float] = field(default_factory=list)  # the singular values dropped, largest first

    def to_dict(self) -> dict[str, float | int]:
        return {
            "rank": self.rank,
            "exact_rank": self.exact_rank,
            "error": self.error,
            "relative_error": self.relative_error,
        }


def truncate(
    left: torch.Tensor, right: torch.Tensor, rank: int | None = None, energy: float | None = None
) -> tuple[torch.Tensor, torch.Tensor, Approximation]:
    """The best approximation of ``left @ right`` at ``rank`` (or the smallest rank keeping ``energy`` of the
    squared singular values; neither: every singular value above rounding), as new thin factors.

    Works on the factors (QR of each, SVD of the small core), never on the full product, so a sum of many
    adapters costs little. The error is exactly the norm of the discarded singular values (Eckart-Young)."""
    q_left, r_left = torch.linalg.qr(left)
    q_right, r_right = torch.linalg.qr(right.T)
    u, s, vh = torch.linalg.svd(r_left @ r_right.T)
    exact = numerical_rank(s, (left.shape[0], right.shape[1]))
    if rank is not None:
        keep = min(rank, exact)
    elif energy is not None:
        shares = torch.cumsum(s**2, 0) / (s**2).sum().clamp_min(torch.finfo(DTYPE).tiny)
        keep = min(int((shares < energy - 1e-12).sum()) + 1, exact)
    else:
        keep = exact
    keep = max(keep, 1)  # a LoRA needs rank >= 1; a zero delta keeps one zero direction
    root = s[:keep].sqrt()
    new_left = q_left @ (u[:, :keep] * root)
    new_right = (root[:, None] * vh[:keep]) @ q_right.T
    dropped = s[keep:]
    total = float(torch.linalg.vector_norm(s))
    error = float(torch.linalg.vector_norm(dropped))
    report = Approximation(
        keep, exact, error, error / total if total > 0 else 0.0, [float(v) for v in dropped]
    )
    return new_left, new_right, report


def combine_deltas(
    deltas: Sequence[Delta | None], weights: Sequence[float], options: Options, module: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, Approximation]:
    """The combination of one module's deltas (None: that adapter leaves the module alone) as factors
    ``(left, right)``, the combined bias change (or None), and how the factors approximate the result."""
    present = [(d, w, i) for i, (d, w) in enumerate(zip(deltas, weights)) if d is not None]
    bias = _combine_bias(present, options, module)
    if options.method in ("linear", "cat"):
        pairs = [(w * left, right) for d, w, _ in present for left, right in [d.factors()]]
        left = torch.cat([p[0] for p in pairs], dim=1)
        right = torch.cat([p[1] for p in pairs], dim=0)
        if options.method == "cat" or (options.rank is None and options.energy is None):
            return left, right, bias, Approximation(left.shape[1], left.shape[1])
        left, right, report = truncate(left, right, options.rank, options.energy)
        return left, right, bias, report
    dense = combine_dense(
        [d.matrix() for d, _, _ in present],
        [w for _, w, _ in present],
        options,
        module,
        [i for *_, i in present],
    )
    rank = (
        options.rank
        if options.rank is not None or options.energy is not None
        else max(d.rank for d, _, _ in present)
    )
    left, right, report = factor_dense(dense, rank, options.energy)
    return left, right, bias, report


def factor_dense(
    dense: torch.Tensor, rank: int | None, energy: float | None
) -> tuple[torch.Tensor, torch.Tensor, Approximation]:
    """:func:`truncate` for a dense (out x fan_in) matrix."""
    u, s, vh = torch.linalg.svd(dense, full_matrices=False)
    return truncate(u * s, vh, rank, energy)


def _combine_bias(
    present: list[tuple[Delta, float, int]], options: Options, module: str
) -> torch.Tensor | None:
    biased = [(d.bias, w, i) for d, w, i in present if d.bias is not None]
    if not biased:
        return None
    if options.method in ("linear", "cat", "svd"):
        return sum(w * b for b, w, _ in biased)
    return combine_dense(
        [b for b, _, _ in biased],
        [w for _, w, _ in biased],
        options,
        f"{module}.bias",
        [i for *_, i in biased],
    )


def combine_dense(
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    options: Options,
    key: str,
    indices: Sequence[int] | None = None,
) -> torch.Tensor:
    """The elementwise part of a combination on dense tensors of one shape (a delta, a bias, a head).

    ``key`` and ``indices`` (which adapter each tensor comes from) seed DARE's masks, so the same call
    gives the same masks whatever else is combined, on every machine."""
    indices = list(range(len(tensors))) if indices is None else list(indices)
    method = options.method
    if method in ("ties", "magnitude_prune"):
        tensors = [trim(t, options.density) for t in tensors]
    elif method in ("dare_linear", "dare_ties"):
        tensors = [
            dare_drop(t, options.density, seed_for(options.seed, key, i)) for t, i in zip(tensors, indices)
        ]
    weighted = torch.stack([w * t for t, w in zip(tensors, weights)])
    if method in ("ties", "dare_ties"):
        return disjoint_mean(weighted, options.sign)
    return weighted.sum(0)


def trim(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``density`` share (rounded down, as the reference library does) of largest-magnitude entries."""
    k = int(density * tensor.numel())
    if k >= tensor.numel():
        return tensor
    flat = tensor.reshape(-1)
    kept = torch.zeros_like(flat)
    if k > 0:
        top = torch.topk(flat.abs(), k).indices
        kept[top] = flat[top]
    return kept.reshape(tensor.shape)


def dare_drop(tensor: torch.Tensor, density: float, seed: int) -> torch.Tensor:
    """DARE: keep each entry with probability ``density`` (mask from ``seed``), rescaled by ``1 / density``."""
    if density >= 1:
        return tensor
    generator = torch.Generator(device="cpu").manual_seed(seed)
    keep = torch.rand(tensor.shape, generator=generator, dtype=DTYPE) < density
    return tensor * keep.to(tensor.device, tensor.dtype) / density


def disjoint_mean(weighted: torch.Tensor, sign: str = "total") -> torch.Tensor:
    """TIES's election and disjoint merge over stacked weighted tensors: each entry takes the sign of the
    summed values (``"total"``) or of the majority of nonzero values (``"frequency"``), +1 on a tie, and the
    mean of the entries that carry it."""
    votes = weighted.sum(0) if sign == "total" else torch.sign(weighted).sum(0)
    elected = torch.where(votes >= 0, 1.0, -1.0).to(weighted.dtype)
    agree = torch.sign(weighted) == elected
    return (weighted * agree).sum(0) / agree.sum(0).clamp_min(1)


def seed_for(seed: int, key: str, index: int) -> int:
    """A 63-bit seed for one tensor of one adapter, the same in every process (unlike ``hash``)."""
    digest = hashlib.sha256(f"{seed}/{key}/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def relative_change(new: torch.Tensor, old: torch.Tensor) -> float:
    """||new - old|| / ||old|| (or ||new - old|| when old is zero), in float64."""
    diff = float(torch.linalg.vector_norm((new.to(DTYPE) - old.to(DTYPE)).reshape(-1)))
    norm = float(torch.linalg.vector_norm(old.to(DTYPE).reshape(-1)))
    return diff / norm if norm > 0 else diff


def check_options(options: Options) -> None:
    problems = options.problems()
    if problems:
        raise ConfigError(problems, what="combination")


__all__ = [
    "METHODS",
    "Approximation",
    "Delta",
    "Options",
    "adapter_deltas",
    "as_matrix",
    "combine_deltas",
    "combine_dense",
    "from_matrix",
    "factor_dense",
    "head_deltas",
    "truncate",
]

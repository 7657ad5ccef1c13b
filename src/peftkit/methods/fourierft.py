"""FourierFT: a weight update learned as a few Fourier coefficients (Gao et al. 2024, arXiv:2405.03003).

A frozen weight W (out x in) gets an update that lives in the frequency domain: n entries of an
out x in spectrum F are trainable, all others are zero, and

    delta W = alpha * Re(IDFT2(F))        IDFT2 the 2-D inverse DFT, with its 1 / (out * in)

so a layer trains ``n_frequency`` numbers whatever its size (LoRA's r * (in + out)), and the update is a
sum of n dense 2-D cosine/sine waves rather than a low-rank matrix. Which n entries train is fixed at
random, from ``random_loc_seed``: the first n positions of a random permutation of the out * in flat
positions (row = position // in, column = position % in), drawn exactly as the reference library draws
them, so only the coefficients are saved and the positions are rebuilt on load.

``alpha`` is the config's ``scaling``; the paper uses 100 to 150 for RoBERTa and 300 for LLaMA and ViT.
The spectrum starts N(0, 1) by default (the paper's and the reference's choice): a fresh adapter already
changes the output. ``init_weights=True`` starts it at zero.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..core import checks
from ..core.config import AdapterConfig, with_layout_of
from ..core.inject import adapter_layers, trained_biases
from ..core.layer import AdapterModule
from ..core.layer import adapter_dtype as _adapter_dtype
from ..core.registry import register_layer, register_method
from ..core.targeting import HFConv1D, Target, pattern_value
from ..errors import UnsupportedLayerError
from .lora import LoraConfig

PEFT_TYPE = "FOURIERFT"
# Above this ||delta W|| / ||W|| at the first step, inject warns (FreshAdapterWarning). The methods
# experiment (docs/fourierft.md) lost 9 points at 60-128% on MiniLM and about 2 at 6-51%; the paper's own
# RoBERTa-base setting (n 1000, scaling 150, 768 x 768) starts near 11-14%.
START_CHANGE_LIMIT = 0.25


def positive_int_pattern(name: str, pattern: Any, what: str) -> list[str]:
    """Problems of a ``{module name or regex: positive int}`` option (``n_frequency_pattern``, C3A's
    ``block_size_pattern``), matched as ``rank_pattern`` is (``core.targeting.pattern_value``)."""
    if not isinstance(pattern, dict):
        return [f"{name}: expected a dict of module name -> {what}, got {type(pattern).__name__}"]
    return [
        f"{name}[{key!r}]: must be a positive integer ({what}), got {value!r}"
        for key, value in pattern.items()
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0
    ]


def no_rank_patterns(config: AdapterConfig, method: str, instead: str) -> list[str]:
    """rank_pattern / alpha_pattern set on a method that has neither (its own pattern is ``instead``)."""
    return [
        f"{name}: {method} has no rank or alpha; use {instead} for per-module sizes"
        for name in ("rank_pattern", "alpha_pattern")
        if getattr(config, name)
    ]


@register_method(PEFT_TYPE)
@dataclass
class FourierFTConfig(AdapterConfig):
    """FourierFT: n trainable spectral coefficients per layer, at random fixed positions.

    Attributes:
        n_frequency: Trainable coefficients per layer (at most out * in). The paper matches LoRA r=8 on
            RoBERTa-large with 1000, LoRA r=16 on ViT-large with 3000.
        scaling: alpha, the factor on the inverse DFT (100-150 for RoBERTa, 300 for LLaMA / ViT in the paper).
        random_loc_seed: Seed of the coefficient positions; every layer of one shape gets the same positions.
        fan_in_fan_out: Recorded for the interchange format; peftkit reads the layout from the layer type
            (GPT-2's ``Conv1D`` stores its weight as in x out) and records it when saving.
        bias: Which base biases to train and save too: "none", "all", or "fourier_only" (biases of
            adapted layers). Trained biases are part of the base, so ``disable()`` cannot switch them off.
        n_frequency_pattern: Per-module ``n_frequency``, keyed by a module name or a regex matched against
            the end of the full name (as ``rank_pattern`` is for LoRA).
        init_weights: ``False`` (default): spectrum ~ N(0, 1), the adapter changes the output at once.
            ``True``: spectrum zero, the adapted model starts at the base.
    """

    pick_when = "you need the fewest trainable parameters on linear layers: a fixed number of spectral coefficients per layer, whatever its width"

    # a few spectral coefficients per layer: higher learning rates than LoRA's matrices. The methods
    # experiment (docs/methods.md) chose 1e-2 from the random start and 3e-2 from the zero one.
    lr_candidates: ClassVar[tuple[float, ...]] = (3e-3, 1e-2, 3e-2)
    # the reference FourierFTConfig has no rank or alpha patterns (n_frequency_pattern instead)
    fields_not_in_format: ClassVar[tuple[str, ...]] = ("rank_pattern", "alpha_pattern")
    display_name: ClassVar[str] = "FourierFT"

    n_frequency: int = 1000
    scaling: float = 150.0
    random_loc_seed: int = 777
    fan_in_fan_out: bool = False
    bias: str = "none"
    n_frequency_pattern: dict[str, int] = field(default_factory=dict)
    init_weights: bool = False

    # The reference's defaults per architecture are its LoRA ones, except GPT-2 (and GPT-BigCode), where it
    # adapts the MLP's output projection.
    default_targets: ClassVar[dict[str, list[str]]] = {
        **LoraConfig.default_targets,
        "gpt2": ["mlp.c_proj"],
        "gpt_bigcode": ["mlp.c_proj"],
    }
    target_roles: ClassVar[tuple[str, ...]] = LoraConfig.target_roles
    own_default_types: ClassVar[tuple[str, ...]] = LoraConfig.own_default_types

    def problems(self) -> list[str]:
        out = super().problems()
        out += checks.positive_ints(self, "n_frequency")
        out += checks.finite(self, "scaling", "the paper uses 100 to 300")
        out += checks.seeds(self, "random_loc_seed")
        out += checks.booleans(self, "fan_in_fan_out", "init_weights")
        out += checks.bias_mode(self, "fourier_only")
        out += positive_int_pattern("n_frequency_pattern", self.n_frequency_pattern, "n_frequency")
        return out + no_rank_patterns(self, "FourierFT", "n_frequency_pattern")

    def size_label(self) -> str:
        return f"FourierFT n={self.n_frequency}"

    def layer_values(self, target: Target) -> dict[str, Any]:
        n = pattern_value(self.n_frequency_pattern, target.name)
        return {
            "n_frequency": int(n or self.n_frequency),
            "scaling": float(self.scaling),
            "seed": int(self.random_loc_seed),
            "init_weights": bool(self.init_weights),
        }

    def after_resolve(self, plan: Any) -> FourierFTConfig:
        return with_layout_of(self, plan, HFConv1D)

    def fresh_start_warnings(self, model: nn.Module, adapter_name: str) -> list[str]:
        if self.init_weights:
            return []
        changes = sorted(
            (
                (adapter.start_change(layer.base_layer), name)
                for name, layer in adapter_layers(model)
                if adapter_name in layer.adapters
                and isinstance(adapter := layer.adapters[adapter_name], FourierFTLinear)
                and not adapter.fourierft_spectrum.is_meta  # a model priced on the meta device has no values
            ),
            reverse=True,
        )
        large = [change for change in changes if change[0] > START_CHANGE_LIMIT]
        if not large:
            return []
        worst, name = large[0]
        return [
            f"FourierFT's random start (init_weights=False, the reference library's default) moves {len(large)} "
            f"of {len(changes)} adapted weights by more than {START_CHANGE_LIMIT:.0%} of their norm before the "
            f"first step, {name} by {worst:.0%} (scaling={self.scaling:g}, n_frequency={self.n_frequency}): "
            "the change grows with scaling * sqrt(n_frequency) and shrinks with the layer's size, so narrow "
            "models suffer. On the bundled MiniLM it cost 9 points of accuracy (docs/fourierft.md). Set "
            "init_weights=True to start from the base model, or lower scaling; a trained adapter loads "
            "either way."
        ]

    def extra_trainable(self, model: nn.Module, adapted: list[str]) -> list[str]:
        return trained_biases(model, adapted, self.bias)


def spectral_positions(out_features: int, in_features: int, n: int, seed: int) -> torch.Tensor:
    """The flat positions (row * in + column) of the n trained coefficients: the first n of a random
    permutation of all out * in positions, from a CPU generator seeded by ``seed`` (the reference's draw)."""
    return _positions(out_features, in_features, n, seed).clone()


@functools.lru_cache(maxsize=64)
def _positions(out_features: int, in_features: int, n: int, seed: int) -> torch.Tensor:
    # A transformer repeats a few layer shapes many times, and the permutation of out * in positions (45M
    # for a 4096 x 11008 MLP) is what inject spends its time on: draw each shape once.
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randperm(out_features * in_features, generator=generator)[:n]


class FourierFTLinear(AdapterModule):
    """FourierFT on ``nn.Linear`` and transformers' GPT-2 ``Conv1D`` (weight stored in x out).

    Interchange tensor: ``fourierft_spectrum`` (n_frequency,). The positions are a non-persistent buffer:
    moved with the module, never saved (they follow from ``random_loc_seed``).
    """

    def __init__(
        self, base_layer: nn.Module, n_frequency: int, scaling: float, seed: int, init_weights: bool
    ) -> None:
        super().__init__()
        weight = base_layer.weight
        self.transposed = not isinstance(base_layer, nn.Linear)
        rows, cols = weight.shape
        self.in_features, self.out_features = (rows, cols) if self.transposed else (cols, rows)
        size = self.in_features * self.out_features
        if n_frequency > size:
            raise UnsupportedLayerError(
                f"n_frequency={n_frequency} is more than the {self.out_features} x {self.in_features} = {size} "
                "spectral entries of this layer; lower n_frequency, or give this module its own through "
                "n_frequency_pattern"
            )
        self.scaling = scaling
        kw = {"device": weight.device, "dtype": _adapter_dtype(weight)}
        positions = spectral_positions(self.out_features, self.in_features, n_frequency, seed)
        self.register_buffer("positions", positions.to(weight.device), persistent=False)
        spectrum = torch.zeros(n_frequency, **kw) if init_weights else torch.randn(n_frequency, **kw)
        self.fourierft_spectrum = nn.Parameter(spectrum)

    def dense_delta(self, dtype: torch.dtype) -> torch.Tensor:
        """delta W as out x in, whatever the base layout. FFTs run in float32 (float64 for a float64
        adapter): half precision has no general FFT on every device."""
        spectrum = self.fourierft_spectrum
        work = torch.float64 if spectrum.dtype == torch.float64 else torch.float32
        dense = torch.zeros(self.out_features * self.in_features, device=spectrum.device, dtype=work)
        dense = dense.index_put((self.positions,), spectrum.to(work))
        wave = torch.fft.ifft2(dense.view(self.out_features, self.in_features)).real
        return (wave * self.scaling).to(dtype)

    def start_change(self, base_layer: nn.Module) -> float:
        """||delta W|| / ||W|| (Frobenius) of the adapter as it stands, from Parseval's theorem rather than
        an inverse DFT of every layer: ``ifft2`` divides by out * in, so the full complex wave has squared
        norm ||F||^2 / (out * in), and its real part about half of that (exactly half but for the few
        positions whose mirror position is also drawn)."""
        size = self.out_features * self.in_features
        spectrum = self.fourierft_spectrum.detach().double()
        delta = abs(self.scaling) * spectrum.norm().item() / math.sqrt(2 * size)
        weight = base_layer.weight.detach().double().norm().item()
        return delta / weight if weight > 0 else math.inf

    def delta_output(self, x: torch.Tensor, base_out: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        delta = self.dense_delta(self.fourierft_spectrum.dtype)
        return F.linear(x.to(delta.dtype), delta).to(base_out.dtype)

    def delta_weight(self, weight: torch.Tensor) -> torch.Tensor:
        delta = self.dense_delta(weight.dtype).to(weight.device)
        return delta.T if self.transposed else delta


register_layer(PEFT_TYPE, "Linear", (nn.Linear,), FourierFTLinear)
if HFConv1D:
    register_layer(PEFT_TYPE, "Conv1D (GPT-2)", (HFConv1D,), FourierFTLinear)


__all__ = ["FourierFTConfig", "FourierFTLinear", "spectral_positions"]

"""WaveFT: a weight update learned as a few wavelet coefficients (Bilican et al. 2025, "Exploring Sparsity for
Parameter Efficient Fine Tuning Using Wavelets", arXiv:2505.12532).

A frozen weight W (out x in) gets an update whose one-level 2-D discrete wavelet transform is sparse: n entries
of a coefficient matrix C train, all others are zero, and

    delta W = scaling * IDWT2(C)

where C is split into quadrants, the approximation (top left) and the horizontal, vertical and diagonal
details (top right, bottom left, bottom right), and IDWT2 is the one-level inverse transform with an
orthogonal wavelet (Haar, ``db1``, by default). A coefficient moves a small local patch of W (2 x 2 for Haar,
L x L for a filter of L taps) instead of the whole matrix as a Fourier coefficient does. With
``use_idwt=False`` the coefficients are the update itself: a sparse delta W at the same positions.

Which n entries train is fixed at random from ``random_loc_seed``, the draw FourierFT makes (the first n of
a random permutation of the out * in flat positions, row = position // in, column = position % in), so only
the coefficients are saved. A filter longer than Haar's 2 taps loses L - 2 rows and columns at the borders of
the reconstruction, so C is padded by that (rounded up to even), the positions shifted to its centre, and the
middle out x in of the reconstruction kept: the reference's layout, followed exactly.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..core import checks
from ..core.config import AdapterConfig
from ..core.inject import trained_biases
from ..core.layer import AdapterModule
from ..core.layer import adapter_dtype as _adapter_dtype
from ..core.registry import register_layer, register_method
from ..core.targeting import HFConv1D, Target, pattern_value
from ..errors import UnsupportedLayerError
from .fourierft import FourierFTConfig, no_rank_patterns, positive_int_pattern, spectral_positions

PEFT_TYPE = "WAVEFT"


@functools.lru_cache(maxsize=1)
def wavelet_filters() -> dict[str, tuple[float, ...]]:
    """Reconstruction low-pass filter of every supported wavelet (``wavelet_filters.json``, PyWavelets' values)."""
    data = json.loads((Path(__file__).with_name("wavelet_filters.json")).read_text())
    return {name: tuple(taps) for name, taps in data["rec_lo"].items()}


# The reference's config also accepts db11-db38, sym11-sym20 and coif5-coif17, but has no filters for them
# (db11-...: its layer fails to build) or a wrong one (coif5: 48 taps for a 30-tap wavelet, its forward fails),
# so no adapter of those families exists to interchange; peftkit refuses them in the config.
WAVELET_FAMILIES = tuple(wavelet_filters())


@register_method(PEFT_TYPE)
@dataclass
class WaveFTConfig(AdapterConfig):
    """WaveFT: n trainable wavelet coefficients per layer, at random fixed positions.

    Attributes:
        n_frequency: Trainable coefficients per layer (at most out * in).
        scaling: The factor on the reconstructed update, as LoRA's alpha; the reference's default, 25, is the
            paper's for SDXL personalisation.
        wavelet_family: The orthogonal wavelet: ``db1`` (Haar) to ``db10``, ``sym2`` to ``sym10``, ``coif1`` to
            ``coif4``. Longer filters spread each coefficient over a bigger patch and cost more per step.
        use_idwt: ``True``: delta W is the inverse wavelet transform of the coefficients. ``False``: the
            coefficients are delta W's entries (a sparse update; faster, worse in the paper).
        random_loc_seed: Seed of the coefficient positions; every layer of one shape gets the same positions.
        fan_in_fan_out: Recorded for the interchange format; peftkit reads the layout from the layer type
            (GPT-2's ``Conv1D``) and records it when saving.
        bias: Which base biases to train and save too: "none", "all", or "waveft_only" (biases of adapted
            layers). Trained biases are part of the base, so ``disable()`` cannot switch them off.
        n_frequency_pattern: Per-module ``n_frequency``, keyed by a module name or a regex matched against
            the end of the full name.
        proportional_parameters: Share ``n_frequency * (number of adapted layers)`` between the layers in
            proportion to their sizes (out * in), at least 1 each, instead of ``n_frequency`` each; overrides
            ``n_frequency_pattern``. For reproducing the paper's ablation.
        init_weights: ``True`` (default): coefficients zero, the model starts at the base. ``False``:
            N(0, 0.01^2).
    """

    pick_when = "you want FourierFT's tiny budgets with updates localised in the weight: a few wavelet coefficients per layer"

    # Each coefficient moves a small patch of the weight at full strength (scaling 25), where FourierFT's
    # spreads over all of it: the methods experiment chose 1e-3, and 1e-2 and above fell to the majority class.
    lr_candidates: ClassVar[tuple[float, ...]] = (3e-4, 1e-3, 3e-3)
    # the reference WaveFTConfig has no rank or alpha patterns (n_frequency_pattern instead)
    fields_not_in_format: ClassVar[tuple[str, ...]] = ("rank_pattern", "alpha_pattern")
    display_name: ClassVar[str] = "WaveFT"

    n_frequency: int = 2592
    scaling: float = 25.0
    wavelet_family: str = "db1"
    use_idwt: bool = True
    random_loc_seed: int = 777
    fan_in_fan_out: bool = False
    bias: str = "none"
    n_frequency_pattern: dict[str, int] = field(default_factory=dict)
    proportional_parameters: bool = False
    init_weights: bool = True

    # The reference's table names what its LoRA table names where both have the model type, except GPT-2
    # and GPT-BigCode, where it adapts the MLP's output projection (as FourierFT's).
    default_targets: ClassVar[dict[str, list[str]]] = FourierFTConfig.default_targets
    target_roles: ClassVar[tuple[str, ...]] = FourierFTConfig.target_roles
    own_default_types: ClassVar[tuple[str, ...]] = FourierFTConfig.own_default_types

    def problems(self) -> list[str]:
        out = super().problems()
        out += checks.positive_ints(self, "n_frequency")
        out += checks.finite(self, "scaling", "the reference's default is 25")
        if self.wavelet_family not in WAVELET_FAMILIES:
            out.append(
                f"wavelet_family: {self.wavelet_family!r} is not one of db1-db10, sym2-sym10, coif1-coif4 "
                "(the wavelets the reference library can build)"
            )
        out += checks.seeds(self, "random_loc_seed")
        out += checks.booleans(self, "use_idwt", "fan_in_fan_out", "proportional_parameters", "init_weights")
        out += checks.bias_mode(self, "waveft_only")
        out += positive_int_pattern("n_frequency_pattern", self.n_frequency_pattern, "n_frequency")
        return out + no_rank_patterns(self, "WaveFT", "n_frequency_pattern")

    def size_label(self) -> str:
        return f"WaveFT n={self.n_frequency}"

    def layer_values(self, target: Target) -> dict[str, Any]:
        n = getattr(self, "_proportional", {}).get(target.name)
        if n is None:
            n = pattern_value(self.n_frequency_pattern, target.name) or self.n_frequency
        return {
            "n_frequency": int(n),
            "scaling": float(self.scaling),
            "wavelet_family": self.wavelet_family,
            "use_idwt": bool(self.use_idwt),
            "seed": int(self.random_loc_seed),
            "init_weights": bool(self.init_weights),
        }

    def after_resolve(self, plan: Any) -> WaveFTConfig:
        # The reference sets fan_in_fan_out exactly when the targets are GPT-2 Conv1D layers (it warns and
        # flips it otherwise), so record it that way.
        conv1d = bool(HFConv1D) and any(isinstance(t.module, HFConv1D) for t in plan.targets)
        config = self.replace(fan_in_fan_out=conv1d)
        # A budget shared by every target: computed here from this injection's targets, never saved (the
        # reference recomputes it from the same targets on load) and carried by ``replace``.
        shares = proportional_sizes(plan.targets, self.n_frequency) if self.proportional_parameters else {}
        object.__setattr__(config, "_proportional", shares)
        return config

    def replace(self, **changes: Any) -> WaveFTConfig:
        new = super().replace(**changes)
        object.__setattr__(new, "_proportional", getattr(self, "_proportional", {}))
        return new

    def extra_trainable(self, model: nn.Module, adapted: list[str]) -> list[str]:
        return trained_biases(model, adapted, self.bias)


def proportional_sizes(targets: list[Target], n_frequency: int) -> dict[str, int]:
    """n per target when ``n_frequency * len(targets)`` coefficients are shared in proportion to out * in:
    ``max(1, round(share))``, rounded as the reference rounds (Python's round, half to even)."""
    sizes = {t.name: t.module.weight.numel() for t in targets}
    total, budget = sum(sizes.values()), n_frequency * len(sizes)
    return {name: max(1, round(size / total * budget)) for name, size in sizes.items()}


def idwt2_one_level(coefficients: torch.Tensor, family: str) -> torch.Tensor:
    """One-level 2-D inverse DWT of an even-sized H x W coefficient matrix laid out as
    [[approximation, horizontal], [vertical, diagonal]], as a transposed convolution with the four
    separable reconstruction filters (stride 2); returns the (H - L + 2) x (W - L + 2) interior, L the taps."""
    lo = torch.tensor(wavelet_filters()[family], dtype=coefficients.dtype, device=coefficients.device)
    taps = lo.numel()
    # the quadrature mirror of the low-pass: hi[k] = (-1)^k lo[L - 1 - k]
    hi = lo.flip(0) * torch.tensor([(-1.0) ** k for k in range(taps)], dtype=lo.dtype, device=lo.device)
    kernels = torch.stack([lo.outer(lo), hi.outer(lo), lo.outer(hi), hi.outer(hi)]).unsqueeze(1)
    rows, cols = coefficients.shape
    bands = (
        coefficients.view(2, rows // 2, 2, cols // 2).permute(0, 2, 1, 3).reshape(1, 4, rows // 2, cols // 2)
    )
    full = F.conv_transpose2d(bands, kernels, stride=2)[0, 0]
    cut = taps - 2  # the border where the filters overhang
    return full[cut : full.shape[0] - cut, cut : full.shape[1] - cut]


class WaveFTLinear(AdapterModule):
    """WaveFT on ``nn.Linear`` and transformers' GPT-2 ``Conv1D`` (weight stored in x out).

    Interchange tensor: ``waveft_spectrum`` (n_frequency,). The positions are a non-persistent buffer: moved
    with the module, never saved (they follow from ``random_loc_seed``).
    """

    def __init__(
        self,
        base_layer: nn.Module,
        n_frequency: int,
        scaling: float,
        wavelet_family: str,
        use_idwt: bool,
        seed: int,
        init_weights: bool,
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
                "coefficients of this layer; lower n_frequency, or give this module its own through "
                "n_frequency_pattern"
            )
        self.scaling, self.wavelet_family, self.use_idwt = scaling, wavelet_family, use_idwt
        positions = spectral_positions(self.out_features, self.in_features, n_frequency, seed)
        self.register_buffer("positions", positions.to(weight.device), persistent=False)
        kw = {"device": weight.device, "dtype": _adapter_dtype(weight)}
        spectrum = torch.zeros(n_frequency, **kw) if init_weights else torch.randn(n_frequency, **kw) * 0.01
        self.waveft_spectrum = nn.Parameter(spectrum)

    def dense_delta(self) -> torch.Tensor:
        """delta W as out x in, in the spectrum's dtype, whatever the base layout."""
        spectrum = self.waveft_spectrum
        out_f, in_f = self.out_features, self.in_features
        rows, cols = self.positions // in_f, self.positions % in_f
        if not self.use_idwt:
            dense = torch.zeros(out_f, in_f, device=spectrum.device, dtype=spectrum.dtype)
            return dense.index_put((rows, cols), spectrum) * self.scaling
        pad = len(wavelet_filters()[self.wavelet_family]) - 2
        height, width = out_f + pad + (out_f + pad) % 2, in_f + pad + (in_f + pad) % 2
        top, left = (height - out_f) // 2, (width - in_f) // 2
        dense = torch.zeros(height, width, device=spectrum.device, dtype=spectrum.dtype)
        dense = dense.index_put((rows + top, cols + left), spectrum)
        return idwt2_one_level(dense, self.wavelet_family)[:out_f, :in_f] * self.scaling

    def delta_output(self, x: torch.Tensor, base_out: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        delta = self.dense_delta()
        return F.linear(x.to(delta.dtype), delta).to(base_out.dtype)

    def delta_weight(self, weight: torch.Tensor) -> torch.Tensor:
        delta = self.dense_delta().to(device=weight.device, dtype=weight.dtype)
        return delta.T if self.transposed else delta


register_layer(PEFT_TYPE, "Linear", (nn.Linear,), WaveFTLinear)
if HFConv1D:
    register_layer(PEFT_TYPE, "Conv1D (GPT-2)", (HFConv1D,), WaveFTLinear)


__all__ = ["WaveFTConfig", "WaveFTLinear", "idwt2_one_level", "proportional_sizes", "wavelet_filters"]

"""CorDA: context-oriented decomposition adaptation (Yang et al. 2024, arXiv:2406.05223).

PiSSA splits W by its own singular values; CorDA splits it by what W does *on the task's inputs*. With C
the (uncentred) covariance of a layer's inputs over a few batches, it takes the SVD of ``W C``:

    W C = U S Vᵀ,   so   W = U S (Vᵀ C⁻¹)   exactly (C damped until it inverts well)

and the adapter takes r of these components, ``B = U_r sqrt(S_r / s)``, ``A = sqrt(S_r / s) Vᵀ_r C⁻¹``,
while the base keeps ``W - s B A``: the model starts where it was (up to float rounding), as with PiSSA.

- **IPM** (instruction-previewed, ``corda_method: ipm``): the r *largest* components, the directions
  that carry most of the task's signal; trains fastest and best on the task.
- **KPM** (knowledge-preserved, ``corda_method: kpm``): the r *smallest*, so the base keeps what the
  data (e.g. question-answering samples of the knowledge to keep) exercises most and training changes
  what matters least to it; less forgetting.

C follows the reference library: per forward call the layer's input rows (padding left out) divided by
their largest value, ``Xᵀ X`` summed, divided by the number of calls. Adapters rewrite the base weight,
so as for PiSSA a saved adapter re-creating the model needs the same data; ``save_adapter(...,
portable=True)`` writes the equivalent plain rank-2r LoRA on the original weights instead.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..core.inject import inject
from ..core.targeting import resolve
from ..errors import ConfigError
from . import lora_data

METHODS = ("ipm", "kpm")


@dataclass
class CordaConfig:
    """CorDA's options, the reference library's ``CordaConfig`` fields (``LoraConfig.corda_config``).

    Attributes:
        corda_method: "ipm" (largest components) or "kpm" (smallest).
        cache_file, covariance_file: The reference's caches of its decomposition and covariances; peftkit
            computes both each time and keeps the names only for the reference.
        verbose, prune_temporary_fields: The reference's; no effect in peftkit.
        use_float16_for_covariance: Accumulate the covariance in float16 (the reference's memory saver;
            peftkit always accumulates in float32 and keeps the field for the format).
    """

    cache_file: str | None = None
    covariance_file: str | None = None
    corda_method: str = "ipm"
    verbose: bool = False
    use_float16_for_covariance: bool = False
    prune_temporary_fields: bool = True


def corda_problems(value: Any) -> list[str]:
    """Problems of ``LoraConfig.corda_config`` (a dict of :class:`CordaConfig` fields, or None)."""
    if value is None:
        return []
    if not isinstance(value, Mapping):
        return [f"corda_config: expected a mapping of CorDA options (corda_method, ...), got {value!r}"]
    names = [f.name for f in dataclasses.fields(CordaConfig)]
    out = [
        f"corda_config.{k}: unknown option; expected one of {', '.join(names)}"
        for k in value
        if k not in names
    ]
    method = value.get("corda_method", "ipm")
    if method not in METHODS:
        out.append(
            f"corda_config.corda_method: 'ipm' (instruction-previewed: the largest components) or 'kpm' "
            f"(knowledge-preserved: the smallest), got {method!r}"
        )
    return out


def corda_options(config: Any) -> CordaConfig:
    names = {f.name for f in dataclasses.fields(CordaConfig)}
    return CordaConfig(**{k: v for k, v in (config.corda_config or {}).items() if k in names})


def covariances(
    model: nn.Module,
    modules: Mapping[str, nn.Module],
    batches: Iterable[Any],
    forward: lora_data.Forward = lora_data.call_model,
) -> dict[str, torch.Tensor]:
    """Each module's input covariance ``mean over calls of Xᵀ X / max(X)²`` (float32, in x in)."""
    sums: dict[str, torch.Tensor] = {}
    calls = dict.fromkeys(modules, 0)
    for batch in batches:
        mask = lora_data.token_mask(batch)

        def take(name: str, x: torch.Tensor, mask: torch.Tensor | None = mask) -> None:
            rows = lora_data.rows_of(x, mask)
            rows = rows / rows.max().abs()  # the reference's normalisation: its largest value, not |x|'s
            if not torch.isfinite(rows).all():
                raise ConfigError(
                    [f"CorDA: {name}'s inputs hold inf or NaN (or are all zero)"], what="CorDA init"
                )
            sums[name] = sums.get(name, 0) + rows.T @ rows
            calls[name] += 1

        lora_data.run_hooked(model, modules, batch, forward, take)
    missing = sorted(n for n, c in calls.items() if not c)
    if missing:
        raise ConfigError(
            [f"CorDA: no batch reached {', '.join(missing)}; the batches must run through every target"],
            what="CorDA init",
        )
    return {n: sums[n] / calls[n] for n in modules}


def corda_factors(
    rows: torch.Tensor, covariance: torch.Tensor, r: int, method: str, scaling: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A0, B0)`` for a weight ``rows`` (out x in) and its input covariance: the r largest ("ipm") or
    smallest ("kpm") components of ``W C``, with ``s B0 A0`` that part of W."""
    w, cov = rows.float(), covariance.float()
    eye = torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
    damp, mean_diag = 0.01, cov.diagonal().mean()
    while True:  # as the reference: damp the diagonal until the inverse is accurate (error < 0.05)
        fixed = cov + eye * mean_diag * damp
        inverse = torch.linalg.inv(fixed)
        if torch.dist(fixed @ inverse, eye) < 0.05:
            break
        damp *= 2
    u, s, vh = torch.linalg.svd(w @ fixed, full_matrices=False)
    v_t = vh @ inverse  # W = U S (Vᵀ C⁻¹)
    keep = slice(0, r) if method == "ipm" else slice(s.shape[0] - r, s.shape[0])
    root = torch.sqrt(s[keep] / scaling)
    return root[:, None] * v_t[keep], u[:, keep] * root


def inject_corda(
    model: nn.Module,
    config: Any,
    batches: Iterable[Any],
    adapter_name: str = "default",
    forward: lora_data.Forward = lora_data.call_model,
) -> nn.Module:
    """Inject ``config`` (``init_lora_weights="corda"``) into ``model``, each adapter started from CorDA's
    components of its layer on ``batches``; the base weights keep the residual.

    Raises:
        ConfigError: no batches, ``init_lora_weights`` is not "corda", or a bad ``corda_config``.
        UnsupportedLayerError: a target is not a linear layer, or r exceeds its smaller side.
    """
    if config.init_lora_weights != "corda":
        raise ConfigError([f"init_lora_weights: CorDA needs 'corda', got {config.init_lora_weights!r}"])
    batches = list(batches)
    if not batches:
        raise ConfigError(
            [
                "init_lora_weights='corda' starts from the layers' input covariance on a few batches; none were given"
            ],
            what="CorDA init",
        )
    method = corda_options(config).corda_method
    targets = lora_data.linear_targets(resolve(model, config).targets, "corda")
    covs = covariances(model, {t.name: t.module for t in targets}, batches, forward)
    starts = {}
    for t in targets:
        values = config.layer_values(t)
        r = values["r"]
        scaling = values["alpha"] / (r**0.5 if values["use_rslora"] else r)
        rows = t.module.weight.detach()
        rows = rows if isinstance(t.module, nn.Linear) else rows.T  # GPT-2's Conv1D: in x out
        if r > min(rows.shape):
            break  # LoraLinear refuses it with the fix, before the model changes
        starts[t.module] = corda_factors(rows, covs[t.name], r, method, scaling)
    with lora_data.starting_from(starts):
        return inject(model, config, adapter_name)


__all__ = ["CordaConfig", "corda_factors", "covariances", "inject_corda"]

"""EVA: explained variance adaptation (Paischer et al. 2024, arXiv:2410.07170).

LoRA's A reads the layer's input ``x``; EVA starts it on the directions along which the inputs on a few
batches of the task's own data vary most: the top right singular vectors of the (centred) activation
matrix ``X`` (tokens x in), found by an incremental SVD over the batches until the leading directions stop
moving (cosine similarity ``>= tau`` between two consecutive updates). B starts at zero, so the model
starts exactly at the base and the base weights are untouched.

Ranks are then redistributed: every (layer, component) pair is ranked by its explained-variance ratio
(its share of that layer's input variance), and the ``sum(r)`` best pairs are kept, with at most
``round(r * rho)`` per layer (``rho = 1``: no redistribution). A layer can end with rank 0 and is left out.
With ``adjust_scaling_factors`` every layer's alpha is multiplied by ``new_rank / r``, so ``alpha / r``
stays the configured one.

The redistributed ranks are written as ``rank_pattern`` / ``alpha_pattern`` with the targets as exact
names, as the reference library's ``initialize_lora_eva_weights`` leaves its config; the saved adapter is
ordinary LoRA tensors, and loads anywhere without the data.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..core.inject import inject
from ..core.targeting import resolve
from ..errors import ConfigError
from . import lora_data


@dataclass
class EvaConfig:
    """EVA's options, the reference library's ``EvaConfig`` fields (``LoraConfig.eva_config`` as a dict).

    Attributes:
        rho: A layer may get up to ``round(r * rho)`` ranks (>= 1; 1 keeps every layer at r).
        tau: The incremental SVD stops for a layer when each kept direction's cosine similarity with its
            previous estimate is at least ``tau`` (in [0, 1]).
        use_label_mask: Leave out positions whose label is ``label_mask_value`` (a language model's prompt
            and padding), where the labels are laid out per token.
        label_mask_value: The label of positions to leave out.
        whiten: Divide each direction by the square root of its singular value.
        adjust_scaling_factors: Multiply a layer's alpha by ``new_rank / r`` (keeps ``alpha / r``).
    """

    rho: float = 2.0
    tau: float = 0.99
    use_label_mask: bool = True
    label_mask_value: int = -100
    whiten: bool = False
    adjust_scaling_factors: bool = True


def eva_problems(value: Any) -> list[str]:
    """Problems of ``LoraConfig.eva_config`` (a dict of :class:`EvaConfig` fields, or None)."""
    if value is None:
        return []
    if not isinstance(value, Mapping):
        return [f"eva_config: expected a mapping of EVA options (rho, tau, ...), got {value!r}"]
    names = [f.name for f in dataclasses.fields(EvaConfig)]
    out = [
        f"eva_config.{k}: unknown option; expected one of {', '.join(names)}" for k in value if k not in names
    ]
    rho, tau = value.get("rho", 2.0), value.get("tau", 0.99)
    if isinstance(rho, bool) or not isinstance(rho, (int, float)) or rho < 1:
        out.append(f"eva_config.rho: must be a number >= 1 (1: no redistribution), got {rho!r}")
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not 0 <= tau <= 1:
        out.append(f"eva_config.tau: must be in [0, 1], got {tau!r}")
    return out


def eva_options(config: Any) -> EvaConfig:
    given = config.eva_config or {}
    return EvaConfig(
        **{k: v for k, v in given.items() if k in {f.name for f in dataclasses.fields(EvaConfig)}}
    )


class IncrementalSVD:
    """The top ``k`` right singular vectors of a growing, mean-centred matrix, one block of rows at a time.

    Each update takes the SVD (through the Gram matrix) of the previous estimate's ``S Vᵀ`` stacked on the new centred rows and a
    row for the shift of the mean (Ross et al. 2008, the update scikit-learn's IncrementalPCA uses): exact
    for the kept subspace whenever the data's rank is at most k, close otherwise. The total variance of
    every column is kept alongside (Chan's pairwise update), for the explained-variance ratios.
    """

    def __init__(self, k: int) -> None:
        self.k = k
        self.seen = 0
        self.mean: torch.Tensor | None = None
        self.components: torch.Tensor | None = None  # k x features, unit rows
        self.singular_values: torch.Tensor | None = None
        self.total_m2 = 0.0  # sum over columns of squared deviations from the mean
        self.updates = 0

    def update(self, x: torch.Tensor) -> None:
        x = x.double()
        n, mean = x.shape[0], x.mean(0)
        centred = x - mean
        m2 = float((centred * centred).sum())
        if self.mean is None:
            stacked, self.mean, self.total_m2 = centred, mean, m2
        else:
            total = self.seen + n
            shift = mean - self.mean
            stacked = torch.cat(
                [
                    self.singular_values[:, None] * self.components,
                    centred,
                    math.sqrt(self.seen * n / total) * shift[None],
                ]
            )
            self.total_m2 += m2 + float(shift @ shift) * self.seen * n / total
            self.mean = self.mean + shift * n / total
        self.seen += n
        # the right singular vectors and values of `stacked` from its features x features Gram matrix (in
        # float64): a third of the SVD's time for a batch of a thousand tokens
        values, vectors = torch.linalg.eigh(stacked.T @ stacked)
        s = values.flip(0).clamp_min(0).sqrt()
        vh = vectors.flip(1).T[: self.k]
        # a fixed sign per direction (largest entry positive), so consecutive estimates compare
        signs = torch.sign(vh.gather(1, vh.abs().argmax(1, keepdim=True)))
        self.components, self.singular_values = vh * signs, s[: self.k]
        self.updates += 1

    @property
    def ratios(self) -> torch.Tensor:
        """Each kept direction's share of the total variance."""
        return self.singular_values**2 / max(self.total_m2, 1e-30)


@dataclass
class EvaPlan:
    """EVA's result for one model, config and data: per module (full name) its new rank, alpha and A rows."""

    ranks: dict[str, int]
    alphas: dict[str, float]
    directions: dict[str, torch.Tensor]  # module -> rank x in, the starting A
    ratios: dict[str, list[float]]  # module -> explained-variance ratios of its candidate directions
    steps: int  # forward passes run
    converged: bool


def eva_plan(
    model: nn.Module,
    config: Any,
    batches: Sequence[Any],
    forward: lora_data.Forward = lora_data.call_model,
    max_steps: int = 100,
) -> EvaPlan:
    """Run EVA's incremental SVD on ``config``'s target layers over ``batches`` (cycled until the kept
    directions converge, at most ``max_steps`` forward passes) and redistribute the ranks.

    Raises:
        ConfigError: no batches, or ``init_lora_weights`` is not "eva".
        UnsupportedLayerError: a target is not a linear layer.
    """
    if config.init_lora_weights != "eva":
        raise ConfigError([f"init_lora_weights: EVA needs 'eva', got {config.init_lora_weights!r}"])
    batches = list(batches)
    if not batches:
        raise ConfigError(
            ["init_lora_weights='eva' starts A from the layers' inputs on a few batches; none were given"],
            what="EVA init",
        )
    options = eva_options(config)
    targets = lora_data.linear_targets(resolve(model, config).targets, "eva")
    modules = {t.name: t.module for t in targets}
    rank0 = {t.name: int(t.rank or config.r) for t in targets}
    alpha0 = {t.name: float(t.alpha or config.lora_alpha) for t in targets}
    width = {
        n: (
            m.weight.shape[0]
            if lora_data.HFConv1D and isinstance(m, lora_data.HFConv1D)
            else m.weight.shape[1]
        )
        for n, m in modules.items()
    }
    most = {n: min(round(rank0[n] * options.rho), width[n]) for n in modules}
    svds = {n: IncrementalSVD(most[n]) for n in modules}
    similar = {n: torch.zeros(most[n], dtype=torch.bool) for n in modules}
    ranks = dict(rank0)
    done: set[str] = set()
    steps = 0
    for batch in itertools.cycle(batches):
        if steps >= max_steps or len(done) == len(modules):
            break
        mask = lora_data.token_mask(batch, options.use_label_mask, options.label_mask_value)

        def take(name: str, x: torch.Tensor, mask: torch.Tensor | None = mask) -> None:
            rows = lora_data.rows_of(x, mask)
            if rows.shape[0] < most[name]:  # too few rows to estimate the directions: skip this batch
                return
            svd, before = svds[name], svds[name].components
            svd.update(rows)
            if before is not None:
                similar[name] = (svd.components * before).sum(1).abs() >= options.tau

        live = {n: m for n, m in modules.items() if n not in done}
        lora_data.run_hooked(model, live, batch, forward, take)
        steps += 1
        if all(s.updates for s in svds.values()):
            ranks = _redistribute(svds, rank0, most)
            done = {n for n in modules if svds[n].updates > 1 and bool(similar[n][: ranks[n]].all())}
    if not all(s.updates for s in svds.values()):
        short = sorted(n for n, s in svds.items() if not s.updates)
        raise ConfigError(
            [f"EVA: no batch had enough token rows for {', '.join(short)}; give larger batches"],
            what="EVA init",
        )
    unconverged = sorted(n for n in modules if n not in done and ranks[n])
    if unconverged:
        warnings.warn(
            f"EVA: the directions of {len(unconverged)} layers had not converged to tau={options.tau} after "
            f"{steps} forward passes ({', '.join(unconverged[:3])}...); their latest estimates are used. "
            "More distinct batches, or a lower eva_config.tau, lets them settle.",
            stacklevel=2,
        )
    directions, alphas = {}, {}
    for name, rank in ranks.items():
        svd = svds[name]
        rows = svd.components[:rank]
        if options.whiten:
            rows = rows / svd.singular_values[:rank].sqrt()[:, None]
        directions[name] = rows.float()
        scale = rank / rank0[name] if options.adjust_scaling_factors else 1.0
        alphas[name] = alpha0[name] * scale
    return EvaPlan(
        ranks=ranks,
        alphas=alphas,
        directions=directions,
        ratios={n: [float(v) for v in s.ratios] for n, s in svds.items()},
        steps=steps,
        converged=not unconverged,
    )


def _redistribute(
    svds: Mapping[str, IncrementalSVD], rank0: Mapping[str, int], most: Mapping[str, int]
) -> dict[str, int]:
    """The ``sum(rank0)`` (layer, direction) pairs of largest explained-variance ratio, at most ``most``
    per layer, counted per layer (ties: model order, then direction order)."""
    pairs = [(float(v), n) for n, s in svds.items() for v in s.ratios[: most[n]]]
    order = sorted(range(len(pairs)), key=lambda i: -pairs[i][0])  # stable: ties keep model order
    ranks = dict.fromkeys(svds, 0)
    for i in order[: sum(rank0.values())]:
        ranks[pairs[i][1]] += 1
    return ranks


def eva_config(config: Any, plan: EvaPlan) -> Any:
    """``config`` with EVA's ranks: the layers that kept a rank as exact names, the other ranks and alphas
    in ``rank_pattern`` / ``alpha_pattern`` (escaped full names: the format reads them as regexes)."""
    kept = [n for n, r in plan.ranks.items() if r]
    if not kept:
        raise ConfigError(["EVA gave every layer rank 0; raise r"], what="EVA init")

    def tidy(value: float) -> float | int:
        return int(value) if float(value).is_integer() else round(value, 6)

    return config.replace(
        target_modules=kept,
        rank_pattern={re.escape(n): plan.ranks[n] for n in kept if plan.ranks[n] != config.r},
        alpha_pattern={
            re.escape(n): tidy(plan.alphas[n]) for n in kept if plan.alphas[n] != config.lora_alpha
        },
        eva_config=dataclasses.asdict(eva_options(config)),
    )


def inject_eva(
    model: nn.Module,
    config: Any,
    batches: Iterable[Any],
    adapter_name: str = "default",
    forward: lora_data.Forward = lora_data.call_model,
    max_steps: int = 100,
) -> EvaPlan:
    """Inject ``config`` (``init_lora_weights="eva"``) into ``model`` with EVA's ranks and A started on the
    top directions of each target's inputs over ``batches`` (B zero); returns the plan it followed.

    ``forward(model, batch)`` runs one batch (default ``model(**batch)``); the base model is probed before
    anything is injected, so the model is unchanged on error.
    """
    plan = eva_plan(model, config, list(batches), forward, max_steps)
    final = eva_config(config, plan)
    starts = {t.module: plan.directions[t.name] for t in resolve(model, final).targets}
    with lora_data.starting_from(starts):
        inject(model, final, adapter_name)
    return plan


__all__ = ["EvaConfig", "EvaPlan", "IncrementalSVD", "eva_config", "eva_plan", "inject_eva"]

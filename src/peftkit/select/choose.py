"""Automatic selection end to end: candidates -> probe scores -> allocation -> a LoRA adapter section.

:func:`select` works on any model given a few batches and a loss; ``run.py`` does it for a run config
(``adapter.target_modules: auto`` with ``select.budget``, or ``peftkit select``).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .allocate import Allocation, allocate, random_allocation
from .candidates import Candidates, find_candidates
from .scores import SCORES, Scores, probe

RULES = (*SCORES, "random")
INITS = ("gradient", "random")
AUTO = "auto"
_COUNT = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKmM]?)\s*$")
_SHARE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*%\s*$")


@dataclass
class Selection:
    """What was chosen and why: the adapter section to train, the allocation, the candidates, the scores
    (``None`` for the random control) and the budget in parameters; ``init`` maps each chosen module to
    the input directions its LoRA A starts from (``init.apply``; empty: LoRA's own random init)."""

    adapter: dict[str, Any]
    allocation: Allocation
    candidates: Candidates
    scores: Scores | None
    rule: str
    init: dict[str, Any] = field(default_factory=dict)

    @property
    def budget(self) -> int:
        return self.allocation.budget


def parse_budget(spec: Any, total_params: int) -> int:
    """A budget in trainable parameters from ``"0.5%"`` (of the base model's parameters), ``82944``,
    ``"83k"`` or ``"1.2M"``.

    Raises:
        ValueError: anything else, with the accepted forms.
    """
    if isinstance(spec, int) and not isinstance(spec, bool) and spec > 0:
        return spec
    if isinstance(spec, str):
        share = _SHARE.match(spec)
        if share and 0 < float(share.group(1)) <= 100:
            return max(1, int(total_params * float(share.group(1)) / 100))
        count = _COUNT.match(spec)
        if count and float(count.group(1)) > 0:
            scale = {"": 1, "k": 1_000, "m": 1_000_000}[count.group(2).lower()]
            return int(float(count.group(1)) * scale)
    raise ValueError(
        f"budget {spec!r} is not understood: give a share of the base model's parameters such as '0.5%', "
        "or a count of trainable parameters such as 82944, '83k' or '1.2M'"
    )


def select(
    model: nn.Module,
    batches: Sequence[Any],
    loss: Callable[[nn.Module, Any], Any],
    budget: Any,
    *,
    rule: str = "gradient",
    adapter: Mapping[str, Any] | None = None,
    min_rank: int = 1,
    max_rank: int = 64,
    whole_params: bool = False,
    embeddings: bool = False,
    always_trained: list[str] | None = None,
    seed: int = 0,
    init: str = "gradient",
) -> Selection:
    """Choose LoRA targets, per-module ranks and whole parameters for ``model`` under ``budget``.

    Args:
        model: The base model, without adapters.
        batches: A few training batches for the probe (what ``loss`` takes).
        loss: ``loss(model, batch)`` -> scalar tensor.
        budget: Trainable parameters to spend (see :func:`parse_budget`), not counting modules the run
            trains anyway (a fresh classification head).
        rule: One of :data:`RULES`: a score from ``scores.py``, or ``random`` (a control).
        adapter: The LoRA fields to start from (``r`` is the random control's rank; ``lora_alpha / r``
            is the scaling every chosen module keeps; ``use_dora``, ``lora_dropout`` ... carry over).
        min_rank, max_rank: Bounds on each chosen module's rank.
        whole_params: Also consider normalisation layers, biases and small heads (off by default: under
            AdamW at LoRA learning rates they bought little per parameter in the experiment, docs/select.md).
        embeddings: Also consider LoRA on embedding tables (off by default, likewise: LoRA's embedding init
            lets them move every token's input at once).
        always_trained: Modules trained in full regardless (default: the model's fresh sequence heads).
        seed: The random control's seed.
        init: ``gradient``: each chosen module's LoRA A starts along the probed gradient's best input
            directions (``Selection.init``, applied with :func:`peftkit.select.init.apply`); only the
            ``gradient`` and ``adam`` rules have them. ``random``: LoRA's own init.

    Raises:
        ValueError: an unknown rule or init, a budget that is not understood, or one too small for any candidate.
    """
    if rule not in RULES:
        raise ValueError(f"unknown selection score {rule!r}; choose one of {', '.join(RULES)}")
    if init not in INITS:
        raise ValueError(f"unknown selection init {init!r}; choose one of {', '.join(INITS)}")
    base = {"method": "lora", **dict(adapter or {})}
    if not 1 <= min_rank <= max_rank:
        raise ValueError(f"need 1 <= min_rank <= max_rank, got min_rank={min_rank}, max_rank={max_rank}")
    candidates = find_candidates(model, always_trained, whole_params and rule != "random", embeddings)
    count = parse_budget(budget, candidates.total_params)
    dora = bool(base.get("use_dora"))
    scores = None
    if rule == "random":
        allocation = random_allocation(
            candidates.low_rank, count, int(base.get("r", 8)), seed, per_module=dora
        )
    else:
        scores = probe(model, candidates, batches, loss, rule, max_rank)
        allocation = allocate(
            candidates.low_rank,
            scores.rank_gains,
            candidates.whole,
            scores.param_gains,
            count,
            min_rank=min_rank,
            max_rank=max_rank,
            per_module=dora,
        )
    if not allocation.ranks:
        cheapest = min(candidates.low_rank, key=lambda c: c.cost_per_rank, default=None)
        need = (
            f"; the cheapest rank-{min_rank} adapter ({cheapest.name}) costs "
            f"{min_rank * cheapest.cost_per_rank:,}"
            if cheapest
            else ""
        )
        raise ValueError(
            f"the budget of {count:,} parameters bought no LoRA adapter{need}. Raise the budget"
            + (" or lower select.min_rank" if min_rank > 1 else "")
            + (
                "; if the probe saw no gradient at all, check that the loss depends on the model"
                if scores
                else ""
            )
        )
    directions = scores.directions if scores is not None and init == "gradient" else {}
    starts = {name: directions[name][:rank] for name, rank in allocation.ranks.items() if name in directions}
    return Selection(
        adapter_section(base, allocation, candidates), allocation, candidates, scores, rule, starts
    )


def adapter_section(
    base: Mapping[str, Any], allocation: Allocation, candidates: Candidates
) -> dict[str, Any]:
    """The concrete LoRA adapter section for ``allocation``: exact module names as targets, the most common
    rank as ``r`` and the others in ``rank_pattern``, and per-module alphas that keep the scaling of
    ``base`` (``lora_alpha / r``, or ``/ sqrt(r)`` with rsLoRA) whatever the rank."""
    r0 = int(base.get("r", 8))
    alpha0 = float(base.get("lora_alpha", 8))
    rslora = bool(base.get("use_rslora"))
    scale = alpha0 / (math.sqrt(r0) if rslora else r0)

    def alpha(r: int) -> float:
        value = scale * (math.sqrt(r) if rslora else r)
        return int(value) if float(value).is_integer() else round(value, 6)

    order = {c.name: i for i, c in enumerate(candidates.low_rank)}
    ranks = dict(sorted(allocation.ranks.items(), key=lambda kv: order.get(kv[0], len(order))))  # model order
    common = Counter(ranks.values()).most_common(1)[0][0]
    # full names, escaped: the interchange format reads pattern keys as regexes matched at a name's end
    rank_pattern = {re.escape(n): r for n, r in ranks.items() if r != common}
    alpha_pattern = {re.escape(n): alpha(r) for n, r in ranks.items() if r != common}
    whole = {w.name: w for w in candidates.whole}
    saved = list(candidates.always_trained) + [n for n in allocation.whole if whole[n].option == "module"]
    section = {k: v for k, v in base.items() if k not in ("target_modules", "rank_pattern", "alpha_pattern")}
    section.update(
        r=common,
        lora_alpha=alpha(common),
        target_modules=list(ranks),
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
    )
    if saved:
        section["modules_to_save"] = saved
    if any(whole[n].option == "bias" for n in allocation.whole):
        section["bias"] = "all"
    return section


# -- run configs -----------------------------------------------------------------------------------


def is_auto(adapter: Mapping[str, Any]) -> bool:
    return isinstance(adapter, Mapping) and adapter.get("target_modules") == AUTO

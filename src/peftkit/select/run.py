"""Selection as part of a run: ``peftkit select`` and ``adapter.target_modules: auto`` in ``peftkit train``.

:func:`select_for_run` probes the run's own model on batches of its training split, with its own loss,
and allocates the budget of ``select.budget`` (``choose.py``). :func:`choose_for_run` is what a training
run does with it: rank 0 chooses (or, on resume, reuses the choice it kept), every rank gets the result,
and the choice with its explanation stays in the run directory. :func:`start_from_directions` then
points the chosen modules' LoRA A along the probe's gradient directions (``init.py``).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from torch import nn

from ..core import registry
from ..errors import ConfigError
from ..train.distributed import World, on_main
from . import init, report
from .choose import Selection, select

Log = Callable[[str], None]


def require_selectable(adapter: Mapping[str, Any]) -> None:
    """Refuse a run config whose method the selection cannot allocate for.

    Raises:
        ConfigError: ``adapter.method`` is not a method that declares itself selectable (LoRA).
    """
    method = str(adapter.get("method", registry.DEFAULT_METHOD)).lower()
    try:
        config_cls = registry.find_method(method).config_cls
    except KeyError:
        config_cls = None  # "full", or a typo the config check reports
    if config_cls is None or not config_cls.selectable:  # the method's declared capability
        raise ConfigError(
            [
                f"adapter.method: selection allocates LoRA targets and ranks, got {method!r}; set "
                "adapter.method=lora (its other fields, e.g. r and lora_alpha, are kept)"
            ],
            what="run config",
        )


def probe_batches(config: Any, task: Any, who: str) -> list[Any]:
    """``select.probe_batches`` batches of ``select.probe_batch_size`` (or ``train.batch_size``) training
    examples, drawn seeded (``select.seed``, or ``train.seed``): what the selection probe and the inits that
    start from data (EVA, CorDA) read.

    Raises:
        ConfigError: the train split is empty (``who`` names what needed it).
    """
    sel = config.select
    train = task.load_data().get("train") or []
    if not train:
        raise ConfigError(
            [f"data: the train split is empty; {who} needs training examples"], what="run config"
        )
    size = sel.probe_batch_size or config.train.batch_size
    seed = config.train.seed if sel.seed is None else sel.seed
    order = list(range(len(train)))
    random.Random(seed).shuffle(order)
    # distinct examples while the split lasts, then around again (a split smaller than the probe)
    needed = [order[k % len(order)] for k in range(size * sel.probe_batches)]
    return [task.collate([train[j] for j in needed[i : i + size]]) for i in range(0, len(needed), size)]


def inject_from_data(
    model: nn.Module, adapter: Any, config: Any, task: Any, name: str, log: Log
) -> dict[str, Any]:
    """Inject an adapter whose init starts from activations (LoRA's EVA, CorDA) on the probe batches of the
    run's training split, run through the task's own loss; the facts for ``metrics.json``."""
    init = getattr(adapter, "init_lora_weights", "data")
    batches = probe_batches(config, task, f"init_lora_weights={init!r}")
    log(
        f"{init}: reading the target layers' inputs on {len(batches)} training batches (select.probe_batches)"
    )
    facts = adapter.inject_from_data(model, batches, lambda m, b: task.loss(m, b), name)
    log(f"{init}: " + ", ".join(f"{k} {v}" for k, v in facts.items() if k != "init"))
    return facts


def select_for_run(config: Any, task: Any, model: nn.Module, log: Log = print) -> Selection:
    """Selection for a run config with ``select.budget`` set: probe batches drawn (seeded) from the task's
    train split, the run's own loss, and the config's adapter fields as the starting point."""
    sel = config.select
    if sel.budget is None:
        raise ConfigError(
            [
                "select.budget: automatic selection needs a budget, e.g. select.budget=0.5% or "
                "select.budget=82944"
            ],
            what="run config",
        )
    batches = probe_batches(config, task, "the selection probe")
    size = sel.probe_batch_size or config.train.batch_size
    seed = config.train.seed if sel.seed is None else sel.seed
    base = {k: v for k, v in config.adapter.items() if k != "target_modules"}
    saved = base.pop("modules_to_save", None)
    always = None if saved is None else list(saved)
    log(
        f"selecting LoRA targets and ranks ({sel.score} score, budget {sel.budget}) from "
        f"{len(batches)} probe batches of {size}"
    )
    selection = select(
        model,
        batches,
        task.loss,
        sel.budget,
        rule=sel.score,
        adapter=base,
        min_rank=sel.min_rank,
        max_rank=sel.max_rank,
        whole_params=sel.whole_params,
        embeddings=sel.embeddings,
        always_trained=always,
        seed=seed,
        init=sel.init,
    )
    a = selection.allocation
    cost = selection.scores.cost if selection.scores else None
    log(
        f"selected {len(a.ranks)} LoRA modules (ranks {min(a.ranks.values())}-{max(a.ranks.values())}) and "
        f"{len(a.whole)} whole-parameter groups: {a.used:,} of {a.budget:,} parameters"
        + (f"; probe {cost.forward_backward_passes} passes, {cost.seconds:.1f} s" if cost else "")
    )
    if sel.init == "gradient" and not selection.init:
        log(
            f"select.init=gradient: the {sel.score} rule gives no gradient directions, so LoRA's own init is used"
        )
    return selection


def choose_for_run(
    config: Any, task: Any, model: nn.Module, folder: Path, resume: bool, log: Log, world: World
) -> dict[str, Any]:
    """``adapter.target_modules: auto`` in a training run: the chosen adapter section and its facts.

    Rank 0 probes and keeps the choice and its explanation in ``folder``; a resumed run reuses what it
    kept rather than probing again. Every rank gets the same answer.

    Returns:
        ``{"adapter": <the concrete adapter section>, "rule", "budget", "used", "modules", "probe",
        "init": <gradient directions, possibly empty>}``.
    """
    return on_main(
        lambda: _choose(config, task, model, folder, resume, log), world, "selecting the adapter's targets"
    )


def _choose(config: Any, task: Any, model: nn.Module, folder: Path, resume: bool, log: Log) -> dict[str, Any]:
    kept = folder / report.RECORD
    if resume and kept.is_file():
        record = json.loads(kept.read_text(encoding="utf-8"))
        saved = folder / init.INIT_FILE
        directions = init.load(saved) if saved.is_file() else {}
        log(f"reusing the selection in {kept}")
    else:
        selection = select_for_run(config, task, model, log)
        report.write(selection, folder)
        record, directions = report.record(selection), selection.init
        log(f"the choice and why: {folder / report.TABLE}")
    return {
        "adapter": record["adapter"],
        "rule": record["rule"],
        "budget": record["budget"],
        "used": record["used"],
        "modules": sum(1 for row in record["low_rank"] if row["rank"]),
        "probe": record["probe"],
        "init": directions,
    }


def start_from_directions(
    model: nn.Module, chosen: Mapping[str, Any] | None, init_from: str | None, adapter_name: str, log: Log
) -> None:
    """Point the chosen modules' LoRA A along the probe's gradient directions (``init.py``): from this
    run's own choice (:func:`choose_for_run`), or from ``init_from`` (what ``peftkit select`` wrote)."""
    if chosen is not None:
        directions, source = chosen.get("init") or {}, "the probe"
    elif init_from:
        directions, source = init.load(init_from), init_from
    else:
        return
    if directions:
        count = init.apply(model, directions, adapter_name)
        log(f"LoRA A of {count} modules starts along the gradient directions from {source}")

"""Behaviour probes: what a model does on held-out inputs, so that a comparison can say how far
fine-tuning moved it beyond the task ("forgetting").

A task offers ``behaviour_probe(model, n, batch_size) -> BehaviourProbe``; two kinds exist:

- ``lm_loss`` (decoders): the mean next-token negative log-likelihood on held-out general text. The
  change tuned - base, in nats per token, is how much worse the model got at plain language modelling.
- ``features`` (encoders, vision backbones): one pooled representation per held-out input. The
  change is ``1 - neighbour retention``: for every input, the share of its ``k`` nearest neighbours
  (cosine similarity) under the base model's representations that are still among its ``k`` nearest
  under the tuned model's, averaged. A sentence-embedding model is used through exactly this
  neighbourhood structure (retrieval, clustering, deduplication), so 0 means that use is intact and
  1 means it is gone; it needs no labels, which is why it works on any held-out text or image.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

NEIGHBOURS = 10


@dataclass
class BehaviourProbe:
    """A model's behaviour on held-out inputs.

    Attributes:
        kind: "lm_loss" or "features".
        source: What the inputs were (shown in reports).
        value: ``lm_loss``: mean negative log-likelihood per token.
        features: ``features``: float32 ``[inputs, width]`` pooled representations.
    """

    kind: str
    source: str
    value: float | None = None
    features: torch.Tensor | None = None


def mean_pooled(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mask-weighted mean over positions of ``hidden [B, T, D]`` (the sentence-transformers pooling).

    When the model put extra positions in front (a soft prompt that is not trimmed), the last ``T``
    positions are the input's own.
    """
    hidden = hidden[:, -mask.shape[1] :]
    weights = mask.to(hidden.device, torch.float32).unsqueeze(-1)
    return ((hidden.float() * weights).sum(1) / weights.sum(1).clamp(min=1)).cpu()


def neighbours_for(n: int, k: int = NEIGHBOURS) -> int:
    """The neighbourhood size used with ``n`` probe inputs: ``k``, but at most half the others, so that a
    neighbourhood is a real choice (with ``k = n - 1`` every input would be every other's neighbour).

    Raises:
        ValueError: fewer than 3 inputs.
    """
    if n < 3:
        raise ValueError(f"neighbour retention needs at least 3 probe inputs, got {n}")
    return max(1, min(k, (n - 1) // 2))


def neighbour_retention(base: torch.Tensor, tuned: torch.Tensor, k: int = NEIGHBOURS) -> float:
    """Mean share of each input's ``k`` nearest neighbours (cosine) under ``base`` kept under ``tuned``."""
    if base.shape[0] != tuned.shape[0]:
        raise ValueError(f"the probes cover different inputs: {base.shape[0]} vs {tuned.shape[0]} rows")
    k = neighbours_for(base.shape[0], k)

    def neighbours(features: torch.Tensor) -> torch.Tensor:
        unit = torch.nn.functional.normalize(features.double(), dim=1)
        similarity = unit @ unit.T
        similarity.fill_diagonal_(-float("inf"))  # an input is not its own neighbour
        return similarity.topk(k, dim=1).indices

    before, after = neighbours(base), neighbours(tuned)
    kept = [len(set(b.tolist()) & set(a.tolist())) / k for b, a in zip(before, after)]
    return sum(kept) / len(kept)


def behaviour_change(base: BehaviourProbe, tuned: BehaviourProbe) -> dict[str, Any]:
    """How far ``tuned`` moved from ``base``: ``{"forgetting", "measure", "base", "tuned", "source"}``.

    ``forgetting`` is larger when more moved: the rise of the LM loss in nats per token for
    ``lm_loss`` probes, ``1 - neighbour retention`` for ``features`` probes.
    """
    if base.kind != tuned.kind:
        raise ValueError(f"cannot compare a {base.kind!r} probe with a {tuned.kind!r} probe")
    if base.kind == "lm_loss":
        return {
            "forgetting": tuned.value - base.value,
            "measure": "LM loss change (nats/token)",
            "base": base.value,
            "tuned": tuned.value,
            "source": base.source,
        }
    retention = neighbour_retention(base.features, tuned.features)
    k = neighbours_for(base.features.shape[0])
    return {
        "forgetting": 1.0 - retention,
        "measure": f"1 - {k}-NN retention",
        "base": 1.0,
        "tuned": retention,
        "source": base.source,
    }


def head_input_features(heads: list[nn.Module], run: Any) -> torch.Tensor:
    """The input the first of ``heads`` to be called receives while ``run()`` calls the model: the
    representation a classifier head reads (a vision backbone's pooled features). Several candidates
    cover a head that an adapter wraps or copies (``modules_to_save``)."""
    captured: list[torch.Tensor] = []

    def keep(_module: nn.Module, args: tuple) -> None:
        if not captured:
            captured.append(args[0].detach().float().flatten(1).cpu())

    handles = [head.register_forward_pre_hook(keep) for head in heads]
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    if not captured:
        raise RuntimeError("the model's forward never called its classifier head")
    return captured[0]

"""Importance scores from a short probe of the frozen model on a few training batches.

The probe runs ``len(batches)`` forward and backward passes of the task's loss (model in eval mode, so
dropout does not add noise; nothing is updated) and keeps, per candidate module, only small running
statistics. Gradients are folded into those statistics as soon as each one is accumulated, so at most
one parameter's gradient is held at a time beyond what autograd itself needs.

Every score is in one currency: squared gradient (or activation) energy, split per rank for low-rank
candidates, so modules of different shapes, ranks and whole parameters compete on one scale.

- ``gradient`` (default): the first-order loss decrease a rank-k update can buy. For the mean gradient
  G of a weight over the probe batches, the best update of Frobenius norm e in a rank-k subspace lowers
  the loss by about ``e * sqrt(s1^2 + ... + sk^2)`` (s = singular values of G), so rank k adds ``sk^2``;
  a whole parameter adds ``||g||^2`` (what all its ranks would). This is the signal LoRA-GA
  (Wang et al. 2024, arXiv:2407.05000) initialises LoRA from, used here to *place* the ranks; AdaLoRA's
  importance (Zhang et al. 2023, arXiv:2303.10512) is the elementwise ``|w * g|`` relative of it.
- ``adam``: the same mean gradient G, valued under the optimiser peftkit trains with. AdamW moves every
  trained entry by about the learning rate whatever its gradient's size (a sign-like step; Kunstner et
  al. 2023, arXiv:2304.13960), so the first-order gain of a step is an L1 norm, not a squared L2 one.
  A rank whose input side lies along G's singular direction v_k lowers the loss by about
  ``lr * s * |a| * ||G v_k||_1 = lr * s * |a| * sk * ||u_k||_1`` (s = alpha/r, |a| = the norm of a row
  of A at init, about 1/sqrt(3) for LoRA's Kaiming init; both constants are shared by every module, so
  they drop out), and a whole parameter by ``lr * ||g||_1``. Gains grow with ``sk`` rather than ``sk^2``,
  so a module with a few dominant directions no longer takes ranks that the next-best modules would
  use better: the budget spreads further.
- ``fisher``: the empirical Fisher information projected to rank k: the eigenvalues of the per-batch
  gradients' second moment ``mean_b G_b G_b^T``; a whole parameter adds its mean ``||g_b||^2``, the
  diagonal Fisher mass used by EWC (Kirkpatrick et al. 2017, arXiv:1612.00796) and by FISH masks
  (Sung et al. 2021, arXiv:2111.09839). It counts gradient noise as well as signal, so it favours
  modules whose gradient is large on every batch even when batches disagree.
- ``activation``: label-free: the energy of the module's output (without bias) per principal direction,
  the eigenvalues of ``mean_t y_t y_t^T`` over the probe's tokens (or pixels), i.e. how much signal the
  module carries and in how many directions, in the spirit of Wanda's ``|w| * ||x||`` (Sun et al. 2023,
  arXiv:2306.11695). A whole parameter adds its own ``||p||^2``. It needs no backward pass, but it does
  not see the task, and modules with large outputs win whatever the labels.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .candidates import Candidates

SCORES = ("gradient", "adam", "fisher", "activation")
Loss = Callable[[nn.Module, Any], torch.Tensor]


@dataclass
class ProbeCost:
    batches: int
    forward_backward_passes: int
    seconds: float
    stats_bytes: int  # memory held by the statistics


@dataclass
class Scores:
    """``rank_gains[module][k]``: gain of rank k+1 (non-increasing); ``param_gains[param]``: gain of
    training the parameter in full; ``directions[module]``: for the mean-gradient rules, the unit
    input-side directions whose gains ``rank_gains`` lists, in the same order (``k x inputs``: the rows a
    LoRA A of rank k would start from, see ``init.py``); ``cost``: what the probe took."""

    rule: str
    rank_gains: dict[str, list[float]] = field(default_factory=dict)
    param_gains: dict[str, float] = field(default_factory=dict)
    directions: dict[str, torch.Tensor] = field(default_factory=dict)
    cost: ProbeCost | None = None


def probe(
    model: nn.Module,
    candidates: Candidates,
    batches: Sequence[Any],
    loss: Loss,
    rule: str = "gradient",
    max_rank: int = 64,
) -> Scores:
    """Score every candidate on ``batches`` with ``rule`` (one of :data:`SCORES`).

    The model's parameters' ``requires_grad`` flags and its train/eval mode are restored afterwards.

    Raises:
        ValueError: unknown ``rule``, or no batches.
    """
    if rule not in SCORES:
        raise ValueError(f"unknown score {rule!r}; choose one of {', '.join(SCORES)}")
    if not batches:
        raise ValueError("the probe needs at least one batch of training data")
    started = time.perf_counter()
    modules = dict(model.named_modules())
    params = dict(model.named_parameters())
    flags = {n: p.requires_grad for n, p in params.items()}
    stats = _Stats(rule)
    hooks = []
    weight_of = {c.name: modules[c.name].weight for c in candidates.low_rank}
    whole_names = sorted({n for w in candidates.whole for n in w.params})
    try:
        for p in params.values():
            p.requires_grad_(False)
        if rule == "activation":
            for c in candidates.low_rank:
                hooks.append(modules[c.name].register_forward_hook(stats.activation_hook(c.name)))
        else:
            for name, weight in weight_of.items():
                weight.requires_grad_(True)
                hooks.append(weight.register_post_accumulate_grad_hook(stats.gradient_hook(name)))
            for name in whole_names:
                if not params[name].requires_grad:
                    params[name].requires_grad_(True)
                    hooks.append(params[name].register_post_accumulate_grad_hook(stats.gradient_hook(name)))
        was_training = model.training
        model.eval()
        try:
            for batch in batches:
                if rule == "activation":
                    with torch.no_grad():
                        loss(model, batch)
                else:
                    loss(model, batch).backward()
                stats.batches += 1
        finally:
            model.train(was_training)
    finally:
        for hook in hooks:
            hook.remove()
        for n, p in params.items():
            p.grad = None
            p.requires_grad_(flags[n])
    scores = Scores(rule)
    for c in candidates.low_rank:
        ranks = min(max_rank, c.max_rank)
        scores.rank_gains[c.name], directions = stats.rank_gains(c.name, ranks, c.output_on_rows)
        if directions is not None and c.kind != "Embedding":  # an embedding's LoRA starts from B, not A
            scores.directions[c.name] = directions
    for name in whole_names:
        scores.param_gains[name] = (
            float(params[name].detach().float().pow(2).sum())
            if rule == "activation"
            else stats.param_gain(name)
        )
    passes = 0 if rule == "activation" else len(batches)
    scores.cost = ProbeCost(len(batches), passes, time.perf_counter() - started, stats.nbytes())
    return scores


class _Stats:
    """Running sums per module: the gradient sum (``gradient``, ``adam``), the per-batch gradient second moment
    on the smaller side (``fisher``), or the output second moment (``activation``)."""

    def __init__(self, rule: str) -> None:
        self.rule = rule
        self.batches = 0
        self.sums: dict[str, torch.Tensor] = {}

    def gradient_hook(self, name: str):
        def hook(param: torch.Tensor) -> None:
            grad = param.grad.detach().float()
            param.grad = None  # folded in: free it now rather than after the whole backward pass
            if grad.dim() >= 2:
                grad = grad.reshape(grad.shape[0], -1)
                if self.rule == "fisher":
                    small = grad if grad.shape[0] <= grad.shape[1] else grad.T
                    grad = small @ small.T
            elif self.rule == "fisher":
                grad = grad.pow(2).sum().reshape(1)
            self._add(name, grad)

        return hook

    def activation_hook(self, name: str):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            out = output.detach().float()
            bias = getattr(module, "bias", None)
            channel_last = out.dim() <= 3 or isinstance(module, (nn.Linear, nn.Embedding))
            rows = (
                out.reshape(-1, out.shape[-1])
                if channel_last
                else out.movedim(1, -1).reshape(-1, out.shape[1])
            )
            if isinstance(bias, torch.Tensor):
                rows = rows - bias.detach().float()
            self._add(name, rows.T @ rows / rows.shape[0])

        return hook

    def _add(self, name: str, value: torch.Tensor) -> None:
        if name in self.sums:
            self.sums[name] += value
        else:
            self.sums[name] = value.clone()

    def rank_gains(
        self, name: str, ranks: int, output_on_rows: bool = True
    ) -> tuple[list[float], torch.Tensor | None]:
        """The gains of ranks 1..``ranks`` and, for the mean-gradient rules, their input-side directions."""
        total = self.sums.get(name)
        if total is None or self.batches == 0:
            return [0.0] * ranks, None
        directions = None
        if self.rule in ("gradient", "adam"):
            left, singular, right_t = torch.linalg.svd(total / self.batches, full_matrices=False)
            inputs, outputs = (right_t, left.T) if output_on_rows else (left.T, right_t)  # rows: directions
            if self.rule == "gradient":
                values = singular.pow(2)
                order = torch.arange(len(values))
            else:
                # sk * ||u_k||_1 need not fall with k; a rank-k adapter can take the k best directions,
                # so the k-th rank is worth the k-th largest of them
                values, order = (singular * outputs.abs().sum(1)).sort(descending=True)
            directions = inputs[order[:ranks]].contiguous()
        else:  # a symmetric second moment: its eigenvalues
            values = torch.linalg.eigvalsh(total / self.batches).flip(0).clamp_min(0.0)
        values = values[:ranks].tolist()
        return values + [0.0] * (ranks - len(values)), directions

    def param_gain(self, name: str) -> float:
        total = self.sums.get(name)
        if total is None or self.batches == 0:
            return 0.0
        if self.rule == "gradient":
            return float((total / self.batches).pow(2).sum())
        if self.rule == "adam":
            return float((total / self.batches).abs().sum())
        return float(total.sum() / self.batches)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.sums.values())

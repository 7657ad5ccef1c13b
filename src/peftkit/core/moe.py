"""Mixture-of-experts blocks whose experts are stacked parameters, found from the module tree and shapes.

Since transformers 5, Qwen3-MoE, Mixtral, OLMoE and most other MoE models hold their experts as 3-D
``nn.Parameter`` tensors of one module (``mlp.experts.gate_up_proj`` of shape (experts, 2 * inner,
hidden), ``mlp.experts.down_proj`` of shape (experts, hidden, inner)) and the router as a module whose
2-D weight (experts, hidden) scores each token. Neither is a linear layer, so a search for linear modules
misses most of the MLP parameters; :func:`find` lists them so that targeting and reports can name them.

The evidence, whatever the names:

1. **Experts**: a module (not one of torch's own layers: a ``Conv1d`` weight is 3-D too) whose own 3-D
   floating-point parameters all have the same first dimension, the number of experts (at least 2).
2. **Layout**: a stack is (experts, out, in), as ``F.linear`` reads one expert's slice, unless the module
   says ``is_transposed`` (transformers' ``use_experts_implementation`` sets it; gpt-oss stores
   (experts, in, out)). This is also the reference library's rule for its per-expert LoRA layout.
3. **Router**: a sibling of the experts module (a child of the same block) whose 2-D ``weight`` is
   (experts, hidden), hidden being a width the experts read.
4. **Fused gate and up**: an expert weight reading the hidden width whose output is twice the input of
   the weight writing the hidden width (the down projection) holds two linear maps.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from .anatomy import _pattern, user_modules


@dataclass
class ExpertWeight:
    """One stacked expert weight."""

    name: str  # the full parameter name, "model.layers.0.mlp.experts.gate_up_proj"
    shape: tuple[int, ...]
    d_in: int
    d_out: int
    maps: int = 1  # linear maps fused in it: 2 for a gate-and-up projection

    @property
    def role(self) -> str:
        return "fused gate and up" if self.maps == 2 else "expert weights"


@dataclass
class MoEBlock:
    """A block with stacked experts, and its router when one was found."""

    name: str  # the block holding experts and router, "model.layers.0.mlp"
    experts: str  # the module holding the stacked weights, "model.layers.0.mlp.experts"
    num_experts: int
    transposed: bool  # stacks stored (experts, in, out)
    weights: list[ExpertWeight] = field(default_factory=list)
    others: list[tuple[str, tuple[int, ...]]] = field(default_factory=list)  # per-expert biases ...
    router: str | None = None  # the router module, "model.layers.0.mlp.gate"
    router_weight: str | None = None  # its scoring weight, "model.layers.0.mlp.gate.weight"
    router_linear: bool = False  # the router is an nn.Linear (a linear layer like any other)
    hidden: int | None = None  # the width the block reads and writes


def stack_layout(module: nn.Module, shape: tuple[int, ...]) -> tuple[int, int, int]:
    """(experts, in, out) of a parameter of ``shape`` on ``module``: a 3-D stack is (experts, out, in)
    unless the module sets ``is_transposed``; a 2-D weight is (out, in), one "expert"."""
    if len(shape) == 2:
        return 1, shape[1], shape[0]
    if len(shape) != 3:
        raise ValueError(f"a weight of shape {tuple(shape)} is neither a matrix nor a stack of them")
    if getattr(module, "is_transposed", False):
        return shape[0], shape[1], shape[2]
    return shape[0], shape[2], shape[1]


def _is_torch_layer(module: nn.Module) -> bool:
    return type(module).__module__.startswith("torch.nn")


def _stacks(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [
        (n, p)
        for n, p in module._parameters.items()
        if p is not None and p.dim() == 3 and p.is_floating_point()
    ]


def find(model: nn.Module) -> list[MoEBlock]:
    """Every block of ``model`` holding stacked experts, in module order (adapted modules are seen as
    their base layers)."""
    modules = dict(user_modules(model))
    blocks: list[MoEBlock] = []
    for name, module in modules.items():
        stacks = _stacks(module)
        if not stacks or _is_torch_layer(module):
            continue
        experts = {p.shape[0] for _, p in stacks}
        if len(experts) != 1 or next(iter(experts)) < 2:
            continue
        prefix = f"{name}." if name else ""
        block = MoEBlock(
            name.rpartition(".")[0],
            name,
            next(iter(experts)),
            bool(getattr(module, "is_transposed", False)),
        )
        for pname, param in stacks:
            _, d_in, d_out = stack_layout(module, tuple(param.shape))
            block.weights.append(ExpertWeight(prefix + pname, tuple(param.shape), d_in, d_out))
        stacked = {n for n, _ in stacks}
        block.others = [
            (prefix + n, tuple(p.shape))
            for n, p in module._parameters.items()
            if p is not None and n not in stacked
        ]
        _find_router(block, modules)
        _mark_fused(block)
        blocks.append(block)
    return blocks


def _siblings(block: MoEBlock, modules: dict[str, nn.Module]) -> Iterator[tuple[str, nn.Module]]:
    parent = modules.get(block.name)
    if parent is None or not block.experts:
        return
    for child_name, child in parent.named_children():
        full = f"{block.name}.{child_name}" if block.name else child_name
        if full != block.experts:
            yield full, modules.get(full, child)


def _find_router(block: MoEBlock, modules: dict[str, nn.Module]) -> None:
    reads = {w.d_in for w in block.weights}
    for name, module in _siblings(block, modules):
        weight = module._parameters.get("weight")
        if weight is None or weight.dim() != 2 or weight.shape[0] != block.num_experts:
            continue
        if weight.shape[1] in reads:
            block.router, block.router_weight = name, f"{name}.weight"
            block.router_linear = isinstance(module, nn.Linear)
            block.hidden = int(weight.shape[1])
            return
    # no router beside the experts: the hidden width is the one the stacks both read and write
    both = reads & {w.d_out for w in block.weights}
    block.hidden = next(iter(both)) if len(both) == 1 else None


def _mark_fused(block: MoEBlock) -> None:
    if block.hidden is None:
        return
    inner = {w.d_in for w in block.weights if w.d_out == block.hidden}
    for weight in block.weights:
        if weight.d_in == block.hidden and any(weight.d_out == 2 * i for i in inner):
            weight.maps = 2


def summary(blocks: list[MoEBlock]) -> list[str]:
    """One line per distinct block layout (the block index as N), for reports."""
    lines: dict[str, None] = {}
    for block in blocks:
        weights = ", ".join(
            f"{w.name.rpartition('.')[2]} {tuple(w.shape)}" + (" (fused gate and up)" if w.maps == 2 else "")
            for w in block.weights
        )
        router = (
            f"; router {_pattern(block.router)}" + (" (nn.Linear)" if block.router_linear else "")
            if block.router
            else "; no router found beside them"
        )
        lines[f"{_pattern(block.experts)}: {block.num_experts} experts, {weights}{router}"] = None
    return list(lines)

"""LoRA-GA (Wang et al. 2024, arXiv:2407.05000): LoRA started along the full weight gradient.

Before the adapter exists, a few training batches estimate each target weight's gradient G (the mean
over backward passes, :func:`estimate_gradients`). With ``G ~ U S V^T`` (2r components), A takes r rows
of ``V^T`` and B r columns of ``U S``, so that the first steps of LoRA move ``s B A`` the way full
fine-tuning would move W (the paper's section 3.2: which halves, ``direction``, and how large,
``scale``). B A is not zero, so the base weight is offset: ``W' = W - s B0 A0`` and the adapted model
starts exactly where the base model was. That is the reference library's algorithm and config
(``LoraGAConfig``: direction, scale, stable_gamma), including its randomised SVD, so that the factors are
the reference's for the same gradient and random state.

Because the base is rewritten, an adapter saved as it is belongs on ``W'``; ``save_adapter(...,
portable=True)`` writes the equivalent rank-2r LoRA on the original W (as for PiSSA), which is what
a run saves.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError

GRAD_ATTR = "_peftkit_lora_ga_grad"  # on each target module, from estimate_gradients to the adapter's init
DIRECTIONS = ("ArBr", "A2rBr", "ArB2r", "random")
SCALES = ("stable", "weight_svd", "gd_scale", "unit")
DEFAULTS: dict[str, Any] = {"direction": "ArB2r", "scale": "stable", "stable_gamma": 16}


def options_problems(options: Any) -> list[str]:
    """What is wrong with a ``lora_ga_config`` (None means the defaults)."""
    if options is None:
        return []
    if not isinstance(options, dict):
        return [f"lora_ga_config: a mapping with keys {', '.join(DEFAULTS)}, got {options!r}"]
    out = [
        f"lora_ga_config: unknown key {k!r}; its keys are {', '.join(DEFAULTS)}"
        for k in options
        if k not in DEFAULTS
    ]
    if options.get("direction", "ArB2r") not in DIRECTIONS:
        out.append(f"lora_ga_config.direction: one of {', '.join(DIRECTIONS)}, got {options['direction']!r}")
    if options.get("scale", "stable") not in SCALES:
        out.append(f"lora_ga_config.scale: one of {', '.join(SCALES)}, got {options['scale']!r}")
    gamma = options.get("stable_gamma", 16)
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or gamma <= 0:
        out.append(f"lora_ga_config.stable_gamma: a positive number, got {gamma!r}")
    return out


def estimate_gradients(model: nn.Module, config: Any, train_step: Callable[[], None]) -> int:
    """Run ``train_step`` (forward and backward passes of the training loss, as many as it likes) with
    gradients on the weights that ``config`` targets only, and keep each one's mean gradient on its
    module for :func:`peftkit.inject` with ``init_lora_weights="lora_ga"``. Returns how many modules got one.

    The model's ``requires_grad`` flags, its train/eval mode and its ``.grad`` fields are as before.

    Raises:
        ConfigError: ``config`` targets no linear layer, or ``train_step`` ran no backward pass.
    """
    from ..core.targeting import HFConv1D, resolve

    kinds = (nn.Linear, HFConv1D) if HFConv1D else (nn.Linear,)
    modules = {t.name: t.module for t in resolve(model, config).targets if isinstance(t.module, kinds)}
    if not modules:
        raise ConfigError(
            [
                "lora_ga: the config targets no nn.Linear (or GPT-2 Conv1D) layer, whose gradients LoRA-GA starts from"
            ],
            what="LoRA-GA",
        )
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    saved = [p.grad for p in params]
    counts = dict.fromkeys(modules, 0)
    hooks = []
    was_training = model.training
    try:
        for p in params:
            p.requires_grad_(False)
            p.grad = None
        for name, module in modules.items():
            module.weight.requires_grad_(True)
            hooks.append(module.weight.register_post_accumulate_grad_hook(_counter(counts, name)))
        model.train()
        with torch.enable_grad():
            train_step()
        if not any(counts.values()):
            raise ConfigError(
                [
                    "lora_ga: train_step ran no backward pass through the targeted weights; call loss.backward()"
                ],
                what="LoRA-GA",
            )
        for name, module in modules.items():
            if counts[name]:
                setattr(module, GRAD_ATTR, module.weight.grad.detach().float() / counts[name])
    finally:
        for hook in hooks:
            hook.remove()
        for p, flag, grad in zip(params, flags, saved, strict=True):
            p.requires_grad_(flag)
            p.grad = grad
        model.train(was_training)
    return sum(1 for c in counts.values() if c)


def _counter(counts: dict[str, int], name: str) -> Callable[[torch.Tensor], None]:
    def hook(_: torch.Tensor) -> None:
        counts[name] += 1

    return hook


def take_gradient(base_layer: nn.Module) -> torch.Tensor:
    """The gradient :func:`estimate_gradients` left on ``base_layer`` (removed from it: used once)."""
    grad = base_layer.__dict__.pop(GRAD_ATTR, None)
    if grad is None:
        raise ConfigError(
            [
                "init_lora_weights: 'lora_ga' starts from the weight gradients of a few training batches, and this "
                f"{type(base_layer).__name__} has none: call peftkit.methods.lora_ga.estimate_gradients(model, "
                "config, train_step) before inject (a run does it on select.probe_batches training batches), or "
                "choose another init"
            ],
            what="LoRA-GA",
        )
    return grad


@torch.no_grad()
def factors(
    grad: torch.Tensor, weight: torch.Tensor, r: int, s: float, options: dict[str, Any] | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) for an ``out x in`` gradient and weight, rank ``r``, scaling ``s`` (section 3.2 of the paper).

    G's top 2r singular triplets (a randomised SVD, 4 power iterations: the reference's) are shared
    out: ``ArB2r`` gives A the first r right vectors and B the next r left ones, times their singular
    values. ``scale`` then sizes B: "stable" multiplies by ``out**0.25 / sqrt(gamma)`` (the paper's
    stable output scale), "weight_svd" matches B's largest singular value to W's, "gd_scale" divides
    both by s, "unit" leaves them.
    """
    opts = {**DEFAULTS, **(options or {})}
    grad = grad.float()
    u, sv, v = torch.svd_lowrank(grad, q=min(4 * r, min(grad.shape)), niter=4)
    u, sv, vh = u[:, : 2 * r], sv[: 2 * r], v.T[: 2 * r]
    direction = opts["direction"]
    if direction == "ArBr":
        a_idx, b_idx = torch.arange(1, 2 * r, 2), torch.arange(0, 2 * r, 2)
    elif direction == "A2rBr":
        a_idx, b_idx = torch.arange(r, 2 * r), torch.arange(r)
    elif direction == "ArB2r":
        a_idx, b_idx = torch.arange(r), torch.arange(r, 2 * r)
    else:  # "random": the same r components on both sides
        a_idx = b_idx = torch.randperm(2 * r)[:r]
    a, s_b = vh[a_idx], sv[b_idx]
    b = u[:, b_idx] * s_b
    if opts["scale"] == "stable":
        b = b * (grad.shape[0] ** 0.25 / opts["stable_gamma"] ** 0.5)
    elif opts["scale"] == "weight_svd":
        _, weight_sv, _ = torch.svd_lowrank(weight.float(), q=r, niter=4)
        if s_b[0] > 0:
            b = b * (weight_sv[0] / s_b[0])
    elif opts["scale"] == "gd_scale":
        a, b = a / s, b / s
    return a, b

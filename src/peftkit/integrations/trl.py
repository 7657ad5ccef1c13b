"""TRL's ``SFTTrainer`` and ``DPOTrainer`` on a peftkit-adapted causal LM (docs/integrations.md).

TRL recognises adapters only as the reference library's ``PeftModel``; a peftkit model is a plain
``PreTrainedModel`` to it, so TRL runs it as full fine-tuning. The optimizer then holds the trainable
(adapter) parameters only, as ``Trainer``'s does, and saving writes the adapter (``peftkit.inject`` gave
the model an adapter-aware ``save_pretrained``). Four things differ from what an adapter run needs:

* given no ``ref_model``, ``DPOTrainer`` loads a *second copy* of the model from
  ``config._name_or_path``. Its public ``ref_model`` argument takes any module called like the policy:
  :func:`reference_model` is one that owns no weights and runs the policy itself under
  :func:`peftkit.disable` (the base model), so nothing is loaded twice;
* both trainers compute log-probabilities from ``get_output_embeddings().weight`` directly (their fused
  LM head), so an adapter or a ``modules_to_save`` copy on the LM head would be skipped and never
  trained, without an error: :func:`check_model` refuses that;
* resuming from a checkpoint, or loading the best one at the end, looks for full weights and fails:
  the mixin of :mod:`peftkit.integrations.transformers_trainer` reads the adapter files instead;
* an AdaLoRA adapter needs a per-step hook no ``Trainer`` calls: refused, as for ``PeftkitTrainer``.

:class:`PeftkitSFTTrainer` and :class:`PeftkitDPOTrainer` are TRL's trainers with all four handled (the
DPO one uses :func:`reference_model` when given no ``ref_model``); everything else is TRL's own.

Importing this module imports ``trl``; ``import peftkit`` does not.
"""

from __future__ import annotations

from typing import Any

import torch
import trl
from torch import nn

from ..api import disable
from ..core.inject import adapter_layers, saved_modules
from ..errors import ConfigError
from .transformers_trainer import PeftkitTrainerMixin
from .transformers_trainer import check_model as check_trainer_model

__all__ = ["PeftkitDPOTrainer", "PeftkitSFTTrainer", "ReferenceModel", "check_model", "reference_model"]


def check_model(model: nn.Module) -> nn.Module:
    """Check that TRL's trainers will train every adapter of ``model`` as asked; returns ``model``.

    Raises:
        AdapterNameError: ``model`` has no peftkit adapters.
        ConfigError: the LM head carries an adapter or a ``modules_to_save`` copy, which TRL's fused LM
            head bypasses (it multiplies by ``lm_head.weight`` itself), or an adapter needs a per-step
            hook (AdaLoRA). The message names each problem and its fix.
    """
    check_trainer_model(model)
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    problems = [
        f"{name!r} (the LM head) carries adapter(s) {list(layer.adapters)}, but TRL computes log-probabilities from "
        f"{name}.weight itself, so the adapter would get no gradient and no say in the loss; remove {name!r} from "
        "target_modules"
        for name, layer in adapter_layers(model)
        if head is not None and layer is head
    ] + [
        f"{name!r} (the LM head) is in modules_to_save, but TRL computes log-probabilities from the original "
        f"{name}.weight, so the trained copy would be ignored; remove {name!r} from modules_to_save"
        for name, wrapper in saved_modules(model)
        if head is not None and wrapper is head
    ]
    if problems:
        raise ConfigError(problems, what="model for TRL")
    return model


class ReferenceModel(nn.Module):
    """A policy model with its adapters disabled, as a DPO reference that holds no weights of its own.

    Calling it runs the policy inside :func:`peftkit.disable` and ``torch.no_grad()``: the base model's
    output, whatever the adapters have learnt so far. Made by :func:`reference_model`.

    ``__call__`` is defined here, not only ``forward``, because trainers patch a reference's ``forward``
    (``DPOTrainer`` installs its fused LM head on it, accelerate its autocast). The policy carries the
    same patches already, so the view keeps calling the policy instead of a forward rebuilt around a
    backbone it does not own.
    """

    def __init__(self, policy: nn.Module) -> None:
        super().__init__()
        # Not registered as a submodule: the view must never own the policy's parameters, so moving,
        # freezing, counting, DDP-wrapping or evaluating the view leaves the policy as it is.
        self.__dict__["policy"] = policy

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return ReferenceModel.forward(self, *args, **kwargs)  # the class's, whatever was set on the instance

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with torch.no_grad(), disable(self.policy):
            return self.policy(*args, **kwargs)

    @property
    def config(self) -> Any:
        """The policy's config (trainers read the model type and LM-head settings from it)."""
        return self.policy.config

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:  # type: ignore[override]
        """The policy's. ``DPOTrainer`` names its cache of precomputed reference log-probabilities after a
        hash of the reference's state dict; an empty one would give every model the same cache."""
        return self.policy.state_dict(*args, **kwargs)

    def extra_repr(self) -> str:
        return f"policy={type(self.policy).__name__}, adapters disabled"


def reference_model(model: nn.Module) -> ReferenceModel:
    """The DPO reference for ``model``: its base output, computed by ``model`` itself with its adapters
    disabled, so no second copy of the weights is ever loaded::

        DPOTrainer(model=model, ref_model=reference_model(model), args=..., train_dataset=..., ...)

    The reference is the base model, also for an adapter loaded to be trained further. To start DPO from
    an SFT adapter, fold it in first (``peftkit.unload(model, merge=True)``) and inject a fresh adapter:
    the reference is then the SFT model.

    Raises:
        AdapterNameError, ConfigError: see :func:`check_model`.
    """
    return ReferenceModel(check_model(model))


class PeftkitSFTTrainer(PeftkitTrainerMixin, trl.SFTTrainer):
    """TRL's ``SFTTrainer`` for a model holding peftkit adapters (pass the adapted model, no ``peft_config``):
    the model is checked (:func:`check_model`), checkpoints hold the adapter, and ``resume_from_checkpoint``
    and ``load_best_model_at_end`` read it back. Takes ``SFTTrainer``'s arguments and ``lora_plus_ratio``."""

    def __init__(self, model: nn.Module, *args: Any, **kwargs: Any) -> None:
        _check_arguments(model, kwargs)
        super().__init__(model, *args, **kwargs)


class PeftkitDPOTrainer(PeftkitTrainerMixin, trl.DPOTrainer):
    """TRL's ``DPOTrainer`` for a model holding peftkit adapters. Given no ``ref_model``, the reference is
    :func:`reference_model` (the base model, no second copy); otherwise as :class:`PeftkitSFTTrainer`.

    Raises:
        ConfigError: ``args.sync_ref_model`` with the built-in reference: it has no weights to move
            towards the policy (pass a model copy as ``ref_model`` to sync one).
    """

    def __init__(
        self, model: nn.Module, ref_model: nn.Module | None = None, *args: Any, **kwargs: Any
    ) -> None:
        _check_arguments(model, kwargs)
        if ref_model is None:
            sync = getattr(kwargs.get("args") or (args[0] if args else None), "sync_ref_model", False)
            if sync:
                raise ConfigError(
                    [
                        "sync_ref_model=True moves the reference's weights towards the policy's, and the "
                        "built-in reference (the base model under peftkit.disable) has none: set "
                        "sync_ref_model=False, or pass a copy of the model as ref_model"
                    ],
                    what="PeftkitDPOTrainer",
                )
            ref_model = reference_model(model)
        super().__init__(model, ref_model, *args, **kwargs)


def _check_arguments(model: Any, kwargs: dict[str, Any]) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"pass the adapted model itself, not {type(model).__name__} {model!r}: load it, "
            "peftkit.inject(model, config), then build the trainer with it"
        )
    check_model(model)
    if kwargs.get("peft_config") is not None:
        raise ConfigError(
            [
                "peft_config builds a second, reference-library adapter on top of the peftkit one: "
                "inject the adapter with peftkit.inject(model, config) and pass no peft_config"
            ],
            what="TRL trainer",
        )

"""transformers' ``Trainer`` on a peftkit-adapted model: :class:`PeftkitTrainer` (docs/integrations.md).

transformers recognises adapters only as the reference library's ``PeftModel``; to it a peftkit model is
a plain model. Saving is already right without this module: ``Trainer.save_model`` and every checkpoint
call ``model.save_pretrained``, which ``peftkit.inject`` made write the adapter (``core/pretrained.py``).
Reading them back is not: for a plain model ``Trainer`` looks for full weights in a checkpoint, so
``resume_from_checkpoint`` fails and ``load_best_model_at_end`` cannot find the best model. The subclass
changes only what differs, each through a method ``Trainer`` documents for overriding or calls itself:

* checkpoints and ``save_model`` hold the adapter files (kilobytes) beside Trainer's own optimizer,
  scheduler, RNG and state files, for any ``nn.Module`` (a non-transformers model included);
* ``resume_from_checkpoint`` and ``load_best_model_at_end`` copy the saved adapter tensors into the live
  adapters in place: the parameters stay the objects the optimizer holds, and the values are exact;
* with gradient checkpointing the input embeddings' output requires grad, so reentrant checkpointing
  over a frozen base still passes gradients to the adapters inside checkpointed blocks;
* the optimizer covers trainable parameters only (as ``Trainer``'s own does), in LoRA+ groups with
  ``lora_plus_ratio`` (:func:`peftkit.train.param_groups`), with the optimizer class ``args.optim`` names;
* adapters whose method needs a training loop to drive it each step (AdaLoRA's rank allocation) are
  refused rather than trained as something else.

Everything else is ``Trainer``'s: the model is the user's own class, so ``label_names``,
``remove_unused_columns``, evaluation and prediction read its ``forward`` signature as for a plain model.

Importing this module imports transformers' Trainer; ``import peftkit`` does not.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn
from transformers import Trainer
from transformers.utils import logging

from ..api import adapter_config, adapter_names
from ..core import pretrained
from ..core.config import AdapterConfig
from ..core.inject import is_adapted
from ..errors import AdapterNameError, ConfigError

logger = logging.get_logger(__name__)
TRAINING_ARGS_NAME = "training_args.bin"  # transformers' name for the saved TrainingArguments

__all__ = ["PeftkitTrainer", "PeftkitTrainerMixin"]


def _adapted(model: nn.Module | None) -> bool:
    return is_adapted(model)


def check_model(model: nn.Module) -> nn.Module:
    """Check that ``model`` holds peftkit adapters a ``Trainer`` can train as they are; returns ``model``.

    Raises:
        AdapterNameError: the model has no peftkit adapters.
        ConfigError: an adapter's method needs its own per-step hook (AdaLoRA), which ``Trainer`` never calls.
    """
    if not _adapted(model):
        raise AdapterNameError(
            f"PeftkitTrainer trains peftkit adapters, and this {type(model).__name__} has none: call "
            "peftkit.inject(model, config) before building the trainer (or use transformers.Trainer to fine-tune "
            "the whole model)"
        )
    hooked = [
        name
        for name in adapter_names(model)
        if type(adapter_config(model, name)).training_hook is not AdapterConfig.training_hook
    ]
    if hooked:
        raise ConfigError(
            [
                f"adapter {name!r} ({type(adapter_config(model, name)).__name__}) must be driven every step by its "
                "training hook (AdaLoRA's rank allocation and orthogonality penalty), which Trainer does not call, so "
                "it would silently train a fixed-rank adapter: train it with peftkit.train.fit, or use LoRA"
                for name in hooked
            ],
            what="model for PeftkitTrainer",
        )
    return model


def enable_input_grads(model: nn.Module) -> None:
    """Make the input embeddings' output require grad (once), so that reentrant activation checkpointing
    over a frozen base still back-propagates into the adapters of checkpointed blocks (its recomputed
    segment gets gradients only if an input of the segment requires them)."""
    enable = getattr(model, "enable_input_require_grads", None)
    if callable(enable) and not getattr(model, "_require_grads_hooks", None):
        enable()


class PeftkitTrainerMixin:
    """What :class:`PeftkitTrainer` adds to a ``transformers.Trainer``, for other ``Trainer`` subclasses
    (``class MyTrainer(PeftkitTrainerMixin, SomeTrainer)``).

    Args (keyword, beside those of the trainer it is mixed into):
        lora_plus_ratio: LoRA+ (arXiv:2402.12354): LoRA B matrices learn at this many times
            ``args.learning_rate``; embedding adapters at 1e-6. None: the plain groups of ``Trainer``.
    """

    def __init__(self, *args: Any, lora_plus_ratio: float | None = None, **kwargs: Any) -> None:
        self.lora_plus_ratio = lora_plus_ratio
        super().__init__(*args, **kwargs)
        if lora_plus_ratio is not None and self.optimizer is not None:
            raise ConfigError(
                [
                    f"lora_plus_ratio={lora_plus_ratio} builds the optimizer, and optimizers= passed one "
                    "already: drop one of the two"
                ],
                what="PeftkitTrainer",
            )
        if self.model_init is None:  # with model_init, call_model_init checks every model it builds
            check_model(self._peftkit_model())

    def _peftkit_model(self) -> nn.Module:
        return self.accelerator.unwrap_model(self.model, keep_torch_compile=False)

    def _prepare(self, model: nn.Module) -> nn.Module:
        check_model(model)
        if getattr(self.args, "activation_checkpointing", None) or self.args.gradient_checkpointing:
            enable_input_grads(model)
        return model

    def call_model_init(self, trial: Any = None) -> nn.Module:
        return self._prepare(super().call_model_init(trial))

    def train(self, *args: Any, **kwargs: Any) -> Any:
        if self.model_init is None:  # else call_model_init prepares the model train() builds
            self._prepare(self._peftkit_model())
        return super().train(*args, **kwargs)

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        if self.lora_plus_ratio is None or self.optimizer is not None:
            return super().create_optimizer(model) if model is not None else super().create_optimizer()
        from ..train.optim import param_groups

        opt_model = self.model if model is None else model
        groups = param_groups(
            opt_model, self.args.learning_rate, self.args.weight_decay, self.lora_plus_ratio
        )
        if self.optimizer_cls_and_kwargs is not None:
            optimizer_cls, optimizer_kwargs = self.optimizer_cls_and_kwargs
        else:
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        if (
            not isinstance(optimizer_cls, type)
            or not issubclass(optimizer_cls, torch.optim.Optimizer)
            or ({"params", "model", "optimizer_dict"} & set(optimizer_kwargs))
        ):
            raise ConfigError(
                [
                    f"lora_plus_ratio needs an optimizer built from parameter groups, and optim={self.args.optim!r} builds "
                    "its own (GaLore, LOMO, layer-wise or factory optimizers): use e.g. optim='adamw_torch'"
                ],
                what="PeftkitTrainer",
            )
        self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        model = self._peftkit_model()
        if not _adapted(model):
            return super()._save(output_dir, state_dict)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return None
        logger.info(f"Saving the peftkit adapters to {output_dir}")
        pretrained.save_pretrained(model, output_dir, state_dict=state_dict)
        processor = self.processing_class
        if processor is None:  # as Trainer does: the collator's tokenizer stands in
            processor = getattr(self.data_collator, "tokenizer", None)
        if processor is not None:
            processor.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))
        return None

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        target = self._peftkit_model() if model is None else self.accelerator.unwrap_model(model)
        if not _adapted(target):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        logger.info(f"Loading the peftkit adapters from {resume_from_checkpoint}")
        _load_adapters(target, resume_from_checkpoint)
        return None

    def _load_best_model(self) -> None:
        model = self._peftkit_model()
        if not _adapted(model):
            return super()._load_best_model()
        best = self.state.best_model_checkpoint
        logger.info(f"Loading the best adapters from {best} (score: {self.state.best_metric}).")
        _load_adapters(model, best)
        return None


def _load_adapters(model: nn.Module, checkpoint: str) -> None:
    try:
        pretrained.load_saved_adapters(model, checkpoint)
    except FileNotFoundError as exc:
        raise FileNotFoundError(
            f"checkpoint {checkpoint!r} does not hold this model's adapters {adapter_names(model)} ({exc}); it was "
            "written by another trainer or for another model. Resume from a checkpoint PeftkitTrainer wrote for "
            "a model with the same adapters."
        ) from exc


class PeftkitTrainer(PeftkitTrainerMixin, Trainer):
    """``transformers.Trainer`` for a model holding peftkit adapters; see the module's docstring.

    Example::

        peftkit.inject(model, peftkit.LoraConfig(r=8, target_modules=["query", "value"]))
        trainer = PeftkitTrainer(model=model, args=TrainingArguments("out"), train_dataset=train)
        trainer.train()            # checkpoints hold only the adapter
        trainer.save_model("out")  # adapter_config.json + adapter_model.safetensors
    """

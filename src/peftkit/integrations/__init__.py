"""Where users already train: other libraries' trainers and formats on a peftkit-adapted model.

Each module imports its library only when it is itself imported, so ``import peftkit`` stays light:

* ``transformers_trainer``: :class:`~peftkit.integrations.transformers_trainer.PeftkitTrainer`, transformers'
  ``Trainer`` with adapter-only checkpoints, resume, best-model loading and LoRA+ (docs/integrations.md).
"""

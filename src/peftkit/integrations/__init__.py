"""Where users already train: other libraries' trainers and formats on a peftkit-adapted model.

Each module imports its library only when it is itself imported, so ``import peftkit`` stays light:

* ``transformers_trainer``: :class:`~peftkit.integrations.transformers_trainer.PeftkitTrainer`, transformers'
  ``Trainer`` with adapter-only checkpoints, resume, best-model loading and LoRA+ (docs/integrations.md);
* ``trl``: ``PeftkitSFTTrainer`` and ``PeftkitDPOTrainer`` (the disabled policy as the DPO reference,
  no second copy of the weights), ``reference_model``;
* ``sentence_transformers``: ``PeftkitSentenceTransformerTrainer`` and ``load`` for adapters on a
  ``SentenceTransformer``'s transformer module.
"""

"""Tasks (text classification, causal LM, seq2seq, image classification), one file each.

Every module in this package is imported, so a task registers itself without an edit here.
"""

import importlib
import pkgutil

from .base import Batch, Example, Task, register_task, registered_tasks, task_class

# pooled_classifier is a model class, not a task, and imports transformers: it loads when a task needs it
for _info in pkgutil.iter_modules(__path__):
    if _info.name not in ("base", "pooled_classifier"):
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = ["Batch", "Example", "Task", "register_task", "registered_tasks", "task_class"]

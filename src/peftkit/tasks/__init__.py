"""Tasks (text classification, causal LM, seq2seq, image classification), one file each.

Every module in this package is imported, so a task registers itself without an edit here.
"""

import importlib
import pkgutil

from .base import Batch, Example, Task, register_task, registered_tasks, task_class

for _info in pkgutil.iter_modules(__path__):
    if _info.name != "base":
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = ["Batch", "Example", "Task", "register_task", "registered_tasks", "task_class"]

"""PEFT methods, one file each. Importing this package registers every built-in method.

Every module in this package is imported, so a new method needs no edit here (STYLE.md rule 1).
"""

import importlib
import pkgutil

for _info in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_info.name}")

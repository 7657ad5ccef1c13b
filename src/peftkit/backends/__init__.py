"""Quantized base layers (STYLE.md rule 5): each module here adds dispatch rows for one quantization
library's layer types, and how merges read and write their weights.

Every module in this package is imported, each import guarded, so a backend whose library is absent
(or broken) costs nothing and the rest of peftkit works. A backend module itself stays cheap to
import: it declares itself with :func:`peftkit.core.registry.register_backend` and imports its
library only when a layer of that library is first dispatched (bitsandbytes alone takes ~3 s to
import on this project's CPU machine, longer than the rest of ``import peftkit.api``).
"""

import importlib
import pkgutil
import warnings

for _info in pkgutil.iter_modules(__path__):
    try:
        importlib.import_module(f"{__name__}.{_info.name}")
    except ImportError as _exc:  # a backend for a library that is not installed: skip it, say why
        warnings.warn(f"peftkit backend {_info.name!r} is unavailable: {_exc}", ImportWarning, stacklevel=2)

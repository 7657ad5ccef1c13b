"""Suite-wide settings."""

from __future__ import annotations

import os

import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Under `pytest -n 2` on a 2-core machine, two workers with two intra-op threads each
    # oversubscribe the cores and make tiny-model tests many times slower.
    torch.set_num_threads(1)

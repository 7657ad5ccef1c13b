"""LoKr: every factor layout (full or decomposed W1 and W2, Tucker W2) and both zero-inits.

On the tiny nets (Linear 6->5, Conv1d/Conv2d 3->4 with 3-wide kernels) the factorisation gives
W1 1x2 and W2 5x3 for Linear, W1 2x1 and W2 2x3(xkernel) for the convolutions, so:
r=2: Linear W2 decomposed, convolutions full W2; r=1: W2 decomposed everywhere (or a Tucker core
with use_effective_conv2d); decompose_factor=5 with decompose_both: Linear W1 decomposed (5x2).
"""

from contract_rows import Row
from peftkit.methods.lokr import LoKrConfig

KINDS = ["Linear", "Conv1d", "Conv2d"]  # the reference library's LoKr layer kinds


def _config(**options):
    options = {"r": 2, "alpha": 4, **options}
    return lambda kind: LoKrConfig(target_modules=["layer"], modules_to_save=["head"], **options)


ROWS = [
    Row(name="lokr", config=_config(), kinds=KINDS),
    Row(name="lokr-r1", config=_config(r=1), kinds=KINDS),
    Row(
        name="lokr-effective-conv", config=_config(r=1, use_effective_conv2d=True), kinds=["Conv1d", "Conv2d"]
    ),
    Row(
        name="lokr-decompose-both", config=_config(decompose_both=True, decompose_factor=5), kinds=["Linear"]
    ),
    Row(name="lokr-lycoris-init", config=_config(init_weights="lycoris", r=1), kinds=["Linear", "Conv2d"]),
]

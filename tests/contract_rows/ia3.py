"""(IA)³: output scaling (attention-style targets) and input scaling (feedforward targets)."""

from contract_rows import Row
from peftkit.methods.ia3 import IA3Config

KINDS = ["Linear", "Conv1D", "Conv1d", "Conv2d", "Conv3d"]  # no Embedding: the reference has none either


def _config(feedforward):
    return lambda kind: IA3Config(
        target_modules=["layer"],
        feedforward_modules=["layer"] if feedforward else [],
        modules_to_save=["head"],
    )


ROWS = [
    Row(name="ia3-output", config=_config(False), kinds=list(KINDS)),
    Row(name="ia3-feedforward", config=_config(True), kinds=list(KINDS)),
]

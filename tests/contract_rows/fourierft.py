"""FourierFT: the zero-spectrum init (starts at the base) and the default N(0, 1) spectrum, on Linear and Conv1D."""

from contract_rows import Row
from peftkit.methods.fourierft import FourierFTConfig

KINDS = ["Linear", "Conv1D"]  # the reference library's FourierFT layer kinds


def _config(init_weights):
    # 6 x 5 layers: 12 of their 30 spectral entries train; scaling keeps the delta near the weight's size
    return lambda kind: FourierFTConfig(
        n_frequency=12,
        scaling=10.0,
        target_modules=["layer"],
        modules_to_save=["head"],
        init_weights=init_weights,
    )


ROWS = [
    Row(name="fourierft", config=_config(True), kinds=KINDS),
    Row(name="fourierft-random", config=_config(False), kinds=KINDS, starts_at_base=False),
]

"""LoHa: the matrix form on every supported kind, the Tucker (effective conv) form on convolutions."""

from contract_rows import Row
from peftkit.methods.loha import LoHaConfig

KINDS = ["Linear", "Conv1d", "Conv2d"]  # the reference library's LoHa layer kinds


def _config(**options):
    return lambda kind: LoHaConfig(
        r=2, alpha=4, target_modules=["layer"], modules_to_save=["head"], **options
    )


ROWS = [
    Row(name="loha", config=_config(), kinds=KINDS),
    Row(name="loha-effective-conv", config=_config(use_effective_conv2d=True), kinds=["Conv1d", "Conv2d"]),
]

"""HRA (Householder reflections): the symmetric init, Gram-Schmidt, a random init."""

from contract_rows import Row
from peftkit.methods.hra import HRAConfig

VARIANTS = {
    "hra": {"r": 2},  # the symmetric init: pairs of equal reflections, the model starts at the base
    "hra-gs": {"r": 4, "apply_GS": True},  # I - 2UUᵀ: never the identity, so not at the base
    "hra-random-init": {"r": 3, "init_weights": False},
}


def _config(options):
    return lambda kind: HRAConfig(target_modules=["layer"], modules_to_save=["head"], **options)


ROWS = [
    Row(
        name=name,
        config=_config(options),
        kinds=["Linear", "Conv2d"],  # the reference's two HRA layer kinds
        dtypes=["fp32", "bf16"] if name == "hra" else ["fp32"],
        starts_at_base=name == "hra",
    )
    for name, options in VARIANTS.items()
]

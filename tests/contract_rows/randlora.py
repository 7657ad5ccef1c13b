"""RandLoRA: the default init (Λ = 0: starts at the base), a random Λ, and sparse bases, on the matrix kinds."""

from contract_rows import Row
from peftkit.methods.randlora import RandLoraConfig
from support.tiny import MATRIX_KINDS


def _config(**options):
    # r=2 on the tiny 6 x 5 layers: ceil(5 / 2) = 3 bases, so the bases' pairing and slicing are exercised;
    # alpha = 2 keeps the scaling at 1 (the reference's 640 would dwarf the tiny layer's weight)
    return lambda kind: RandLoraConfig(
        r=2, randlora_alpha=2, target_modules=["layer"], modules_to_save=["head"], **options
    )


ROWS = [
    Row(name="randlora", config=_config(), kinds=sorted(MATRIX_KINDS)),
    Row(name="randlora-sparse", config=_config(sparse=True), kinds=sorted(MATRIX_KINDS), dtypes=["fp32"]),
    # Λ ~ N(0, 1) makes the delta as large as the tiny weight, so a bf16 merge then unmerge loses bits of W
    # at the delta's scale: fp32 only
    Row(
        name="randlora-random",
        config=_config(init_weights=False),
        kinds=sorted(MATRIX_KINDS),
        starts_at_base=False,
        dtypes=["fp32"],
    ),
]

"""OFT (orthogonal finetuning): Cayley-Neumann and exact rotations, block sharing, COFT, random init."""

from contract_rows import Row
from peftkit.methods.oft import OFTConfig
from support.tiny import KINDS

# Input features each tiny layer rotates (Linear/Conv1D/Embedding: 6; Conv1d: 3x3; Conv2d: 3x3x3;
# Conv3d: 2x2x2x2) and a block size dividing them, so that every layer has several blocks.
BLOCK = {"Linear": 3, "Conv1D": 3, "Embedding": 3, "Conv1d": 3, "Conv2d": 9, "Conv3d": 4}

VARIANTS = {
    "oft": {},  # the reference defaults: Cayley-Neumann, 5 terms
    "oft-exact": {"use_cayley_neumann": False},
    "oft-shared": {"block_share": True},
    # COFT with a radius wide enough that three steps visibly move the output
    "oft-coft": {"coft": True, "eps": 0.5},
    "oft-random-init": {"init_weights": False},
}
FULL = {"oft", "oft-exact"}  # every kind and dtype; the others on one matrix and one conv kind, float32


def _config(options):
    return lambda kind: OFTConfig(
        oft_block_size=BLOCK[kind], target_modules=["layer"], modules_to_save=["head"], **options
    )


ROWS = [
    Row(
        name=name,
        config=_config(options),
        kinds=list(KINDS) if name in FULL else ["Linear", "Conv2d"],
        dtypes=["fp32", "bf16"] if name in FULL else ["fp32"],
        starts_at_base=options.get("init_weights", True),
    )
    for name, options in VARIANTS.items()
]

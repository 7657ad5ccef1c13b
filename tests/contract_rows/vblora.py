"""VB-LoRA: a shared vector bank of length-1 vectors (they must divide the tiny layers' 6 and 5), on the
matrix kinds. The fresh adapter acts at once: its bank and logits both start random, as in the reference."""

from contract_rows import Row
from peftkit.methods.vblora import VBLoRAConfig
from support.tiny import MATRIX_KINDS


def _config(**options):
    return lambda kind: VBLoRAConfig(
        r=2,
        num_vectors=6,
        vector_length=1,
        init_vector_bank_bound=0.5,  # the default 0.02 barely moves the tiny net's output
        target_modules=["layer"],
        modules_to_save=["head"],
        **options,
    )


ROWS = [
    Row(name="vblora", config=_config(), kinds=sorted(MATRIX_KINDS), starts_at_base=False),
    Row(
        name="vblora-top3",
        config=_config(topk=3),
        kinds=sorted(MATRIX_KINDS),
        starts_at_base=False,
        dtypes=["fp32"],
    ),
]

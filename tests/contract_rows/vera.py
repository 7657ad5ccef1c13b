"""VeRA: default init (starts at the base) and init_weights=False (b = 1, d random), on the matrix kinds."""

from contract_rows import Row
from peftkit.methods.vera import VeraConfig
from support.tiny import MATRIX_KINDS


def _config(init_weights):
    # r above the tiny layers' sizes on purpose: VeRA's shared A and B are r x in and out x r whatever r is
    return lambda kind: VeraConfig(
        r=8, d_initial=0.5, target_modules=["layer"], modules_to_save=["head"], init_weights=init_weights
    )


ROWS = [
    Row(name="vera", config=_config(True), kinds=sorted(MATRIX_KINDS)),
    # b = 1 and d ~ N(0, 1) make the delta larger than the tiny layer's weight, so a bf16 merge then
    # unmerge loses bits of W at the delta's scale (beyond the matrix's 1% bound): fp32 only.
    Row(
        name="vera-random",
        config=_config(False),
        kinds=sorted(MATRIX_KINDS),
        starts_at_base=False,
        dtypes=["fp32"],
    ),
]

"""LoRA and its variants (rsLoRA, DoRA) x inits."""

import peftkit
from contract_rows import Row
from support.tiny import KINDS, MATRIX_KINDS, build_with_bias

VARIANTS = {"lora": {}, "rslora": {"use_rslora": True}, "dora": {"use_dora": True}}
SVD_INITS = {"pissa", "olora"}  # refused for non-matrix kinds; see test_errors.py


def lora_row_config(init, options):
    """The config every LoRA row builds: rank 2 on ``layer``, the head saved, ``init`` and ``options``."""
    return lambda kind: peftkit.LoraConfig(
        r=2,
        lora_alpha=4,
        target_modules=["layer"],
        modules_to_save=["head"],
        init_lora_weights=init,
        **options,
    )


ROWS = [
    Row(
        name=f"lora-{variant}-{init}" if variant != "lora" else f"lora-{init}",
        config=lora_row_config(init, options),
        kinds=sorted(MATRIX_KINDS) if init in SVD_INITS else list(KINDS),
        rewrites_base=init in SVD_INITS,
    )
    for variant, options in VARIANTS.items()
    for init in ("default", "gaussian", "pissa", "olora")
]
# lora_bias: B's bias, merged into the base bias (not on embeddings, nor with the SVD inits)
ROWS.append(
    Row(
        name="lora-bias-default",
        config=lora_row_config(True, {"lora_bias": True}),
        kinds=[k for k in KINDS if k != "Embedding"],
        build=build_with_bias,
    )
)

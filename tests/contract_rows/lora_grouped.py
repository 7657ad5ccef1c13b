"""LoRA and DoRA on grouped and depthwise convolutions, in the reference library's layout: a rank that is
a multiple of the groups, and no merging (the delta is a dense kernel the grouped weight cannot hold)."""

import peftkit
from contract_rows import Row
from support.tiny import GROUPED_KINDS, build_grouped

RANKS = {"Conv2dGroups": 2, "Conv2dDepthwise": 4, "Conv1dGroups": 3}  # multiples of each layer's groups


def _config(**options):
    return lambda kind: peftkit.LoraConfig(
        r=RANKS[kind], lora_alpha=4, target_modules=["layer"], modules_to_save=["head"], **options
    )


ROWS = [
    Row(
        name=f"lora-grouped-{name}",
        config=_config(**options),
        kinds=GROUPED_KINDS,
        build=build_grouped,
        mergeable=False,
    )
    for name, options in {
        "default": {},
        "rslora-gaussian": {"use_rslora": True, "init_lora_weights": "gaussian"},
        "dora": {"use_dora": True},
    }.items()
]

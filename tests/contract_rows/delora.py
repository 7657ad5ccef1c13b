"""DeLoRA (decoupled low-rank adaptation): the default init, and a random one with a per-module lambda."""

from contract_rows import Row
from peftkit.methods.delora import DeloraConfig

VARIANTS = {
    "delora": {"r": 2},  # B = 0: the model starts at the base
    "delora-random-init": {"r": 3, "init_weights": False, "lambda_pattern": {"layer": 2.0}},
}


def _config(options):
    return lambda kind: DeloraConfig(target_modules=["layer"], modules_to_save=["head"], **options)


ROWS = [
    Row(
        name=name,
        config=_config(options),
        kinds=["Linear"],  # the reference's one DeLoRA layer kind
        dtypes=["fp32", "bf16"] if name == "delora" else ["fp32"],
        starts_at_base=name == "delora",
    )
    for name, options in VARIANTS.items()
]

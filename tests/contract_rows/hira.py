"""HiRA (Hadamard high-rank adaptation): the default and Gaussian inits (B zero: the model starts at the
base) and a random init, on every layer kind the reference supports."""

from contract_rows import Row
from peftkit.methods.hira import HiraConfig

VARIANTS = {
    "hira": {},
    "hira-gaussian": {"init_weights": "gaussian"},
    "hira-random-init": {"init_weights": False},  # A and B standard normal: not at the base
}


def _config(options):
    return lambda kind: HiraConfig(r=2, target_modules=["layer"], modules_to_save=["head"], **options)


ROWS = [
    Row(
        name=name,
        config=_config(options),
        # Linear, GPT-2's Conv1D, Embedding, Conv1d/2d/3d: the reference's HiRA layer kinds
        dtypes=["fp32", "bf16"] if name == "hira" else ["fp32"],
        starts_at_base=name != "hira-random-init",
    )
    for name, options in VARIANTS.items()
]

"""AdaLoRA: a fresh adapter at init_r, and one reloaded at pruned ranks (rank_pattern)."""

from contract_rows import Row
from peftkit.methods.adalora import AdaLoraConfig

KINDS = ["Linear", "Conv1D", "Conv1d", "Conv2d", "Conv3d"]  # no Embedding (nor does the reference)


def _config(**options):
    # A large alpha so that three steps move the output visibly: Λ starts at zero and P, Q at N(0, 0.02).
    return lambda kind: AdaLoraConfig(
        init_r=4,
        target_r=2,
        lora_alpha=32,
        total_step=10,
        target_modules=["layer"],
        modules_to_save=["head"],
        **options,
    )


ROWS = [
    Row(name="adalora", config=_config(), kinds=KINDS, lr=0.1),
    # what loading a pruned adapter builds: two of the four triplets kept
    Row(
        name="adalora-pruned",
        config=_config(rank_pattern={"layer.lora_E": [True, False, False, True]}),
        kinds=["Linear", "Conv2d"],
        lr=0.1,
    ),
]

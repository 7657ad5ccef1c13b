"""LoRA-FA: plain LoRA adapters trained by the LoRA-FA optimizer (A frozen, B's gradient projected)."""

from contract_rows import Row
from peftkit.methods.lora import LoraConfig
from peftkit.methods.lora_fa import lora_fa_optimizer

# every LoRA kind but Embedding, whose A starts at zero: frozen there, B would never get a gradient
KINDS = ["Linear", "Conv1D", "Conv1d", "Conv2d", "Conv3d"]


def _config(kind):
    return LoraConfig(r=2, lora_alpha=4, target_modules=["layer"], modules_to_save=["head"])


ROWS = [
    Row(
        name="lora-fa",
        config=_config,
        kinds=KINDS,
        # the projected step moves B less per step than AdamW on A and B together
        lr=1e-1,
        optimizer=lambda model, lr: lora_fa_optimizer(model, lr=lr),
    ),
]

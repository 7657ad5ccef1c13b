"""LoRA on torch's ``nn.MultiheadAttention``: the module named as a target (sequence-first and batch-first),
and ``all-linear`` on an ``nn.TransformerEncoder``, which takes each attention module whole."""

import peftkit
from contract_rows import Row
from support.attention import KINDS, build


def _lora(kind: str, **options) -> peftkit.LoraConfig:
    targets = "all-linear" if kind == "TransformerEncoder" else ["attn"]
    options = {"r": 2, "lora_alpha": 4, **options}
    return peftkit.LoraConfig(target_modules=targets, modules_to_save=["head"], **options)


ROWS = [
    Row(name="lora-mha", config=_lora, kinds=KINDS, build=build),
    Row(
        name="lora-mha-gaussian-rslora",
        config=lambda kind: _lora(kind, init_lora_weights="gaussian", use_rslora=True),
        kinds=KINDS,
        build=build,
    ),
    Row(
        name="lora-mha-random",
        # random A and B at a smaller scale: out_proj's delta counts twice (methods/lora_mha.py), and a
        # merge rounded to bf16 and taken out again must stay within 1% of the weights
        config=lambda kind: _lora(kind, init_lora_weights=False, lora_alpha=1),
        kinds=KINDS,
        build=build,
        starts_at_base=False,
    ),
]

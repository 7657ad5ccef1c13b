"""LoRA on parameters (``target_parameters``): stacked experts and routers of a MoE block, a 2-D weight of
each tiny layer kind, and tiny transformers 5 MoE models adapted by ``all-linear``."""

import torch

import peftkit
from contract_rows import Row
from support.moe import MoEBlock, batch, tiny_transformers_moe
from support.tiny import Net, build

EXPERT_KINDS = ["Experts", "ExpertsTransposed"]
WEIGHT_KINDS = ["Linear", "Conv1D", "Embedding"]  # their 2-D weight as a parameter target
TRANSFORMERS_KINDS = ["qwen3_moe", "mixtral", "olmoe"]


def build_moe(kind: str, seed: int = 0):
    if kind in TRANSFORMERS_KINDS:
        return tiny_transformers_moe(kind, seed), batch()
    if kind in WEIGHT_KINDS:
        return build(kind, seed)
    torch.manual_seed(seed)
    x = torch.randn(5, 6)
    return Net(MoEBlock(transposed=kind == "ExpertsTransposed"), x), x


def _lora(kind: str, **options) -> peftkit.LoraConfig:
    if kind in TRANSFORMERS_KINDS:  # all-linear: attention projections, stacked experts, routers
        return peftkit.LoraConfig(r=2, lora_alpha=4, target_modules="all-linear", **options)
    if kind in WEIGHT_KINDS:
        return peftkit.LoraConfig(
            r=2,
            lora_alpha=4,
            target_modules=[],
            target_parameters=["layer.weight"],
            modules_to_save=["head"],
            **options,
        )
    # the experts' two stacks and the router's weight as parameters, beside a module target in one adapter
    return peftkit.LoraConfig(
        r=2,
        lora_alpha=4,
        target_modules=["proj"],
        target_parameters=["experts.gate_up_proj", "experts.down_proj", "gate.weight"],
        modules_to_save=["head"],
        **options,
    )


ROWS = [
    Row(name="lora-parameters", config=_lora, kinds=EXPERT_KINDS + WEIGHT_KINDS, build=build_moe),
    Row(
        name="lora-parameters-gaussian-rslora",
        config=lambda kind: _lora(kind, init_lora_weights="gaussian", use_rslora=True),
        kinds=EXPERT_KINDS,
        build=build_moe,
    ),
    Row(
        name="lora-parameters-random",
        config=lambda kind: _lora(kind, init_lora_weights=False),
        kinds=EXPERT_KINDS,
        build=build_moe,
        starts_at_base=False,
    ),
    Row(
        name="lora-all-linear-moe",
        config=_lora,
        kinds=TRANSFORMERS_KINDS,
        build=build_moe,
        lr=2e-2,
    ),
]

"""Parity with the reference library (peft 0.21.2) for LoRA on parameters (``target_parameters``) and
``all-linear`` on mixture-of-experts models, both ways, on tiny Qwen3-MoE, Mixtral and OLMoE models built
from transformers 5 configs (experts fused as 3-D parameters, TopKRouter routers).

"peftkit->peft": trained by peftkit, saved with ``peftkit.save_adapter``, loaded with
``peft.PeftModel.from_pretrained``. "peft->peftkit": trained by peft, saved with ``save_pretrained``, loaded
with ``peftkit.load_adapter``. Each compares the routed outputs unmerged, merged in place and merged and
unloaded; and a fresh adapter from the same config has the same tensors (keys, shapes) in both libraries.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from torch import nn

import peftkit
from support.moe import ARCHS, batch, tiny_transformers_moe

pytestmark = [
    pytest.mark.filterwarnings(
        "ignore:.*is_gradient_checkpointing.*:FutureWarning", "ignore:.*eos_token_id.*"
    ),
    pytest.mark.usefixtures("one_thread"),
]

peft = pytest.importorskip("peft")
from peft.utils import get_peft_model_state_dict  # noqa: E402

ATOL = 1e-5
STEPS, LR = 3, 1e-2

EXPERTS = ["experts.gate_up_proj", "experts.down_proj"]
CONFIGS: dict[str, dict] = {
    # the reference expands all-linear on these architectures to the attention projections, both expert
    # stacks (gate_up_proj at twice the rank and alpha) and the router weight
    "all_linear": {"target_modules": "all-linear"},
    "experts_beside_modules": {"target_modules": ["q_proj", "v_proj"], "target_parameters": EXPERTS},
    "router_in_full": {
        "target_modules": ["q_proj"],
        "target_parameters": EXPERTS,
        "modules_to_save": ["mlp.gate"],
    },
    "router_and_down_rslora": {
        "target_modules": [],
        "target_parameters": ["gate.weight", "down_proj"],
        "use_rslora": True,
        "rank_pattern": {"down_proj": 3},
        "alpha_pattern": {"gate.weight": 5},
    },
    "weights_2d": {
        "target_modules": [],
        "target_parameters": ["self_attn.q_proj.weight", "self_attn.o_proj.weight"],
    },
}


@pytest.fixture(scope="module")
def bases():
    return {arch: tiny_transformers_moe(arch) for arch in ARCHS}


def _options(name: str) -> dict:
    return {"r": 2, "lora_alpha": 4, **copy.deepcopy(CONFIGS[name])}  # fresh lists: peft edits them in place


def _train(model: nn.Module) -> None:
    torch.manual_seed(2)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR)
    inputs = batch()
    for _ in range(STEPS):
        model(**inputs, labels=inputs["input_ids"]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def _logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch(seed=3)).logits


def _close(ours: nn.Module, theirs: nn.Module, base: torch.Tensor) -> None:
    a, b = _logits(ours), _logits(theirs)
    assert (a - base).abs().max() > 1e-3, (
        "the adapter does not change the output: the comparison proves nothing"
    )
    assert (a - b).abs().max() <= ATOL, f"peftkit vs peft: max abs diff {(a - b).abs().max():.3e}"


def _trained_b(tensors: dict[str, torch.Tensor]) -> None:
    b_keys = [k for k in tensors if k.endswith("lora_B.weight")]
    assert b_keys and all(tensors[k].abs().max() > 0 for k in b_keys)


def _pair(direction: str, base: nn.Module, options: dict, directory: Path) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    if direction == "peftkit->peft":
        ours = peftkit.inject(copy.deepcopy(base), peftkit.LoraConfig(**copy.deepcopy(options)))
        _train(ours)
        _trained_b(peftkit.adapter_state_dict(ours))
        peftkit.save_adapter(ours, directory)
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), directory).eval()
    else:
        theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**copy.deepcopy(options)))
        _train(theirs)
        _trained_b(get_peft_model_state_dict(theirs))
        theirs.save_pretrained(directory)
        ours = peftkit.load_adapter(copy.deepcopy(base), directory).eval()
    return ours, theirs


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("direction", ["peftkit->peft", "peft->peftkit"])
def test_outputs_agree_unmerged_merged_and_unloaded(bases, direction, arch, name, tmp_path):
    base = _logits(bases[arch])
    ours, theirs = _pair(direction, bases[arch], _options(name), tmp_path / "adapter")
    _close(ours, theirs, base)
    peftkit.merge(ours, safe=True)
    theirs.merge_adapter()
    _close(ours, theirs, base)
    _close(peftkit.unload(ours, merge=True), theirs.merge_and_unload(), base)


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("arch", ARCHS)
def test_a_fresh_adapter_has_the_same_tensors_and_targets_in_both(bases, arch, name, tmp_path):
    ours = peftkit.inject(copy.deepcopy(bases[arch]), peftkit.LoraConfig(**_options(name)))
    theirs = peft.get_peft_model(copy.deepcopy(bases[arch]), peft.LoraConfig(**_options(name)))
    shapes = {k: tuple(v.shape) for k, v in peftkit.adapter_state_dict(ours).items()}
    assert shapes == {k: tuple(v.shape) for k, v in get_peft_model_state_dict(theirs).items()}
    peftkit.save_adapter(ours, tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    written = [json.loads((tmp_path / d / "adapter_config.json").read_text()) for d in ("ours", "theirs")]
    for key in ("rank_pattern", "alpha_pattern", "modules_to_save"):
        assert written[0][key] == written[1][key], key
    # the same parameters named (as sets: the reference writes a set as a list in any order)
    assert set(written[0]["target_parameters"] or []) == set(written[1]["target_parameters"] or [])


@pytest.fixture(scope="module")
def gpt_oss():
    return tiny_transformers_moe("gpt_oss")


@pytest.mark.parametrize("direction", ["peftkit->peft", "peft->peftkit"])
def test_transposed_stacks_agree_gpt_oss(gpt_oss, direction, tmp_path):
    """gpt-oss stores its stacks (experts, in, out) (``is_transposed``) and routes with ``mlp.router``."""
    options = {
        "r": 2,
        "lora_alpha": 4,
        "target_modules": ["q_proj"],
        "target_parameters": [*EXPERTS, "router.weight"],
    }
    base = _logits(gpt_oss)
    ours, theirs = _pair(direction, gpt_oss, options, tmp_path / "adapter")
    _close(ours, theirs, base)
    peftkit.merge(ours, safe=True)
    theirs.merge_adapter()
    _close(ours, theirs, base)


def test_all_linear_beyond_the_references_table_still_interchanges(gpt_oss, tmp_path):
    """The reference's all-linear leaves gpt-oss's experts out (gpt_oss is not in its v4->v5 conversion
    table); peftkit's takes them and records explicit lists, which the reference loads as the same adapter."""
    theirs_fresh = peft.get_peft_model(copy.deepcopy(gpt_oss), peft.LoraConfig(target_modules="all-linear"))
    assert not any("experts" in k for k in get_peft_model_state_dict(theirs_fresh))
    base = _logits(gpt_oss)
    ours = peftkit.inject(copy.deepcopy(gpt_oss), peftkit.LoraConfig(r=2, target_modules="all-linear"))
    _train(ours)
    peftkit.save_adapter(ours, tmp_path / "a")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(gpt_oss), tmp_path / "a").eval()
    assert any("experts" in k for k in get_peft_model_state_dict(theirs))
    _close(ours, theirs, base)


def test_all_linear_with_the_router_in_full_loads_in_the_reference(bases, tmp_path):
    """The reference refuses all-linear beside a router in modules_to_save (it wraps the router for LoRA
    first); peftkit leaves the router to modules_to_save and records explicit lists the reference reads."""
    base = _logits(bases["qwen3_moe"])
    config = peftkit.LoraConfig(r=2, lora_alpha=4, target_modules="all-linear", modules_to_save=["mlp.gate"])
    ours = peftkit.inject(copy.deepcopy(bases["qwen3_moe"]), config)
    _train(ours)
    peftkit.save_adapter(ours, tmp_path / "a")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(bases["qwen3_moe"]), tmp_path / "a").eval()
    _close(ours, theirs, base)
    gate = theirs.base_model.model.model.layers[0].mlp.gate
    assert type(gate).__name__ == "ModulesToSaveWrapper"

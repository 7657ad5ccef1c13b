"""VB-LoRA: the factors assembled from the bank, the shared trainable bank, the top-k file form, options,
errors, and parity with the reference library.

Parity: every VB-LoRA case of the reference's custom-model matrix (peft 0.21.2, tests/test_custom_models.py:
6 cases on MLP and GPT-2's Conv1D), both ways (trained by one library, saved, loaded by the other), unmerged
and merged, float32 max abs diff <= 1e-5; plus top-k files (k = 1 and 3), longer vectors and dropout, which
that matrix does not cover.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import peftkit
from peftkit.errors import AdapterFileError, ConfigError, UnsupportedLayerError
from peftkit.methods.vblora import VBLoRAConfig, VBLoRALinear, VectorBank
from support import custom_models as cm

peft = pytest.importorskip("peft")

pytestmark = [
    pytest.mark.usefixtures("one_thread"),  # tiny models: one intra-op thread is fastest
    pytest.mark.filterwarnings(
        "ignore:All adapters are already merged:UserWarning"
    ),  # peft's merge_and_unload
    pytest.mark.filterwarnings("ignore:fan_in_fan_out is set to:UserWarning"),  # peft, on GPT-2's Conv1D
]


class One(nn.Module):
    """One layer (not an nn.Sequential, which would also call the model-level part)."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = copy.deepcopy(layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


def _single(layer: nn.Module, **options) -> tuple[nn.Module, VBLoRALinear]:
    model = peftkit.inject(One(layer), VBLoRAConfig(target_modules=["layer"], **options))
    return model, model.layer.adapters["default"]


def _mixture(logits: torch.Tensor, bank: torch.Tensor, k: int) -> torch.Tensor:
    """One sub-vector written out: softmax over its top-k logits, times those bank rows."""
    values, indices = logits.topk(k)
    weights = torch.softmax(values, dim=0)
    return sum(w * bank[i] for w, i in zip(weights, indices))


# -- the update -----------------------------------------------------------------------------------


def test_factors_are_sub_vectors_mixed_from_the_bank():
    torch.manual_seed(0)
    layer = nn.Linear(6, 4)
    model, adapter = _single(layer, r=3, num_vectors=5, vector_length=2, topk=2, init_vector_bank_bound=1.0)
    bank = model.peftkit_parts["default"].vblora_vector_bank.detach()
    la, lb = adapter.vblora_logits_A.detach(), adapter.vblora_logits_B.detach()
    assert la.shape == (3, 3, 5) and lb.shape == (2, 3, 5)
    a = torch.stack([torch.cat([_mixture(la[i, t], bank, 2) for t in range(3)]) for i in range(3)])  # 3 x 6
    b = torch.stack([torch.cat([_mixture(lb[t, i], bank, 2) for t in range(2)]) for i in range(3)], dim=1)
    ours_a, ours_b = adapter.factors()
    assert torch.allclose(ours_a, a, atol=1e-6) and torch.allclose(ours_b, b, atol=1e-6)
    x = torch.randn(5, 6)
    assert torch.allclose(model(x), layer(x) + x @ (b @ a).T, atol=1e-5)
    assert torch.allclose(adapter.delta_weight(layer.weight), b @ a, atol=1e-6)


def test_conv1d_gpt2_transposes_its_delta():
    torch.manual_seed(0)
    layer = Conv1D(4, 6)  # in 6, out 4, weight stored (6, 4)
    model, adapter = _single(layer, r=2, num_vectors=3, vector_length=2)
    delta = adapter.delta_weight(layer.weight)
    assert delta.shape == (6, 4)
    x = torch.randn(2, 6)
    assert torch.allclose(model(x), layer(x) + x @ delta, atol=1e-5)
    assert peftkit.adapter_config(model).fan_in_fan_out is True


def test_the_bank_is_one_trainable_parameter_shared_by_every_layer():
    model = peftkit.inject(
        cm.base("MLP"), VBLoRAConfig(target_modules=["lin0", "lin1"], vector_length=2, num_vectors=7)
    )
    trainable = {n: tuple(p.shape) for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {
        "lin0.adapters.default.vblora_logits_A": (4, 5, 7),
        "lin0.adapters.default.vblora_logits_B": (10, 4, 7),
        "lin1.adapters.default.vblora_logits_A": (4, 10, 7),
        "lin1.adapters.default.vblora_logits_B": (1, 4, 7),
        "peftkit_parts.default.vblora_vector_bank": (7, 2),
    }
    bank = model.peftkit_parts["default"].vblora_vector_bank
    assert bank.abs().max() <= 0.02  # uniform in ±init_vector_bank_bound
    model(cm.inputs(0)).sum().backward()  # both layers reach the bank's gradient
    assert bank.grad is not None and bank.grad.abs().sum() > 0
    keys = set(peftkit.adapter_state_dict(model))
    assert "base_model.vblora_vector_bank" in keys and not any(
        "vector_bank" in k for k in keys - {"base_model.vblora_vector_bank"}
    )


def test_the_logits_start_normal_with_the_configured_std():
    torch.manual_seed(0)
    _, adapter = _single(nn.Linear(64, 64), r=8, num_vectors=64, vector_length=1, init_logits_std=0.3)
    assert abs(adapter.vblora_logits_A.std().item() - 0.3) < 0.01


# -- the top-k form -------------------------------------------------------------------------------


def _trained(**options) -> nn.Module:
    model = peftkit.inject(cm.base("MLP"), VBLoRAConfig(target_modules=["lin0", "lin1"], **options))
    cm.train(model)
    return model


def test_topk_file_holds_indices_and_all_but_one_weight_and_loads_for_inference(tmp_path):
    model = _trained(vector_length=2, num_vectors=300, topk=3, save_only_topk_weights=True)
    state = peftkit.adapter_state_dict(model)
    indices = state["base_model.model.lin0.vblora_logits_A_topk_indices"]
    weights = state["base_model.model.lin0.vblora_logits_A_topk_weights"]
    assert indices.dtype == torch.int16 and indices.shape == (4, 5, 3)  # 300 vectors: int16, as the reference
    assert weights.shape == (4, 5, 2) and bool((weights.sum(-1) < 1).all())
    assert not any(k.endswith(("vblora_logits_A", "vblora_logits_B")) for k in state)
    peftkit.save_adapter(model, tmp_path)
    loaded = peftkit.load_adapter(cm.base("MLP"), tmp_path)
    assert (cm.out(loaded) - cm.out(model)).abs().max() <= 1e-6
    logits = loaded.lin0.adapters["default"].vblora_logits_A
    assert int(torch.isfinite(logits).sum()) == 4 * 5 * 3  # -inf off the top k
    assert loaded.train()(cm.inputs(0)).shape == (9, 2)  # frozen (is_trainable=False): runs in train mode
    trainable = peftkit.load_adapter(cm.base("MLP"), tmp_path, is_trainable=True).train()
    with pytest.raises(AdapterFileError, match="save_only_topk_weights"):
        trainable(cm.inputs(0))
    loaded.eval()
    peftkit.merge(loaded.eval())  # inference and merging work
    assert (cm.out(loaded) - cm.out(model)).abs().max() <= 1e-5


def test_smallest_index_dtype_follows_num_vectors():
    model = peftkit.inject(
        cm.base("MLP"),
        VBLoRAConfig(target_modules=["lin0"], vector_length=10, num_vectors=5, save_only_topk_weights=True),
    )
    assert (
        peftkit.adapter_state_dict(model)["base_model.model.lin0.vblora_logits_B_topk_indices"].dtype
        == torch.uint8
    )


# -- errors ---------------------------------------------------------------------------------------


def test_defaults_follow_the_reference_config():
    ours, theirs = VBLoRAConfig(), peft.VBLoRAConfig()
    for key in (
        "r",
        "num_vectors",
        "vector_length",
        "topk",
        "save_only_topk_weights",
        "vblora_dropout",
        "fan_in_fan_out",
        "bias",
        "init_vector_bank_bound",
        "init_logits_std",
    ):
        assert getattr(ours, key) == getattr(theirs, key), key


def test_every_config_problem_is_reported_at_once():
    with pytest.raises(ConfigError) as info:
        VBLoRAConfig(
            r=0,
            num_vectors=2,
            topk=3,
            vector_length=True,
            vblora_dropout=-0.1,
            init_logits_std=float("nan"),
            bias="lora_only",
            alpha_pattern={"lin0": 2},
        )
    problems = info.value.problems
    for field in (
        "r:",
        "topk:",
        "vector_length:",
        "vblora_dropout:",
        "init_logits_std:",
        "bias:",
        "alpha_pattern:",
    ):
        assert any(p.startswith(field) for p in problems), (field, problems)


def test_a_vector_length_that_does_not_divide_a_layer_is_refused_before_any_change():
    model = cm.base("MLP")
    with pytest.raises(UnsupportedLayerError, match=r"lin1: .*vector_length=5.*output 2 size"):
        peftkit.inject(model, VBLoRAConfig(target_modules=["lin0", "lin1"], vector_length=5, num_vectors=3))
    assert isinstance(model.lin0, nn.Linear) and "peftkit_parts" not in model._modules
    with pytest.raises(UnsupportedLayerError, match="conv2d"):
        peftkit.inject(
            cm.base("Conv2d"), VBLoRAConfig(target_modules=["conv2d"], vector_length=1, num_vectors=3)
        )


def test_each_adapter_has_its_own_bank_and_unload_removes_it():
    model = cm.base("MLP")
    x = cm.inputs(0)
    base = model(x).detach()
    peftkit.inject(model, VBLoRAConfig(target_modules=["lin0", "lin1"], vector_length=2, num_vectors=5))
    peftkit.inject(model, VBLoRAConfig(target_modules=["lin0"], vector_length=5, num_vectors=3), "other")
    parts = model.peftkit_parts
    assert isinstance(parts["other"], VectorBank) and parts["other"].vblora_vector_bank.shape == (3, 5)
    peftkit.set_active(model, ["default", "other"])
    both = model(x).detach()
    peftkit.merge(model, safe=True)
    assert (model(x) - both).abs().max() <= 1e-5
    peftkit.unload(model)
    assert "peftkit_parts" not in model._modules and (model(x) - base).abs().max() <= 1e-5


# -- parity with the reference library ------------------------------------------------------------

# The reference matrix's 6 VB-LoRA cases (name, model, options), then what it does not cover.
CASES = [
    ("Vanilla MLP 1 VBLoRA", "MLP", {"target_modules": "lin0", "vector_length": 1, "num_vectors": 5}),
    ("Vanilla MLP 2 VBLoRA", "MLP", {"target_modules": ["lin0"], "vector_length": 1, "num_vectors": 5}),
    ("Vanilla MLP 3 VBLoRA", "MLP", {"target_modules": ["lin1"], "vector_length": 2, "num_vectors": 5}),
    (
        "Vanilla MLP 4 VBLoRA",
        "MLP",
        {"target_modules": ["lin0", "lin1"], "vector_length": 1, "num_vectors": 5},
    ),
    (
        "Vanilla MLP 5 VBLoRA",
        "MLP",
        {"target_modules": ["lin0"], "modules_to_save": ["lin1"], "vector_length": 1, "num_vectors": 5},
    ),
    (
        "Embedding + transformers Conv1D 1 VBLoRA",
        "EmbConv1D",
        {"target_modules": ["conv1d"], "vector_length": 1, "num_vectors": 2},
    ),
    (
        "MLP VB-LoRA top-3 file, longer vectors",
        "MLP",
        {
            "target_modules": ["lin0", "lin1"],
            "vector_length": 2,
            "num_vectors": 7,
            "topk": 3,
            "save_only_topk_weights": True,
        },
    ),
    (
        "MLP VB-LoRA top-1 file",
        "MLP",
        {
            "target_modules": ["lin0", "lin1"],
            "vector_length": 2,
            "num_vectors": 7,
            "topk": 1,
            "save_only_topk_weights": True,
        },
    ),
    (
        "MLP VB-LoRA rank 6, dropout",
        "MLP",
        {
            "target_modules": ["lin0", "lin1"],
            "r": 6,
            "vector_length": 2,
            "num_vectors": 9,
            "vblora_dropout": 0.1,
        },
    ),
]
REFERENCE_CASES = 6


def _configs(options):
    return VBLoRAConfig(**copy.deepcopy(options)), peft.VBLoRAConfig(**copy.deepcopy(options))


def test_the_reference_matrix_is_covered():
    assert len([c for c in CASES if c[0].endswith(" VBLoRA")]) == REFERENCE_CASES


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("direction", cm.DIRECTIONS)
def test_parity_with_the_reference(direction, case, tmp_path):
    _, model_id, options = case
    cm.assert_parity(direction, model_id, *_configs(options), tmp_path)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_a_fresh_adapter_has_the_same_tensors_and_config_in_both(case, tmp_path):
    _, model_id, options = case
    ours_config, theirs_config = _configs(options)
    ours = peftkit.inject(cm.base(model_id), ours_config)
    theirs = peft.get_peft_model(cm.base(model_id), theirs_config)
    keys = ("r", "num_vectors", "vector_length", "topk", "save_only_topk_weights", "init_logits_std")
    cm.assert_same_fresh_adapter(ours, theirs, ours_config, tmp_path, keys, dtypes=True)


def test_docs_example_runs(capsys):
    text = (Path(__file__).resolve().parents[2] / "docs" / "vblora.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert len(blocks) == 1
    exec(compile(blocks[0], "docs/vblora.md", "exec"), {"__name__": "docs_vblora"})
    assert "VB-LoRA trained" in capsys.readouterr().out

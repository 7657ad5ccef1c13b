"""DeLoRA: the normalised update and its bound, the frozen weight norms, options, errors, and parity with
the reference library.

Parity: every DeLoRA case of the reference's custom-model matrix (peft 0.21.2, tests/test_custom_models.py),
both ways (trained by one library, saved, loaded by the other), unmerged and merged, float32 max abs
diff <= 1e-5; plus a random init with rank_pattern and lambda_pattern, which that matrix does not cover.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import torch
from torch import nn

import peftkit
from peftkit.errors import ConfigError, UnsupportedLayerError
from peftkit.methods.delora import DeloraConfig
from support import custom_models as cm

peft = pytest.importorskip("peft")

pytestmark = [
    pytest.mark.usefixtures("one_thread"),  # tiny models: one intra-op thread is fastest
    pytest.mark.filterwarnings(
        "ignore:All adapters are already merged:UserWarning"
    ),  # peft's merge_and_unload
]


def _adapted(r=3, lam=2.0, seed=0):
    torch.manual_seed(seed)
    layer = nn.Linear(6, 5)
    config = DeloraConfig(r=r, delora_lambda=lam, init_weights=False, target_modules=["0"])
    model = peftkit.inject(nn.Sequential(copy.deepcopy(layer)), config)
    return model, model[0].adapters["default"], layer


# -- the update -----------------------------------------------------------------------------------


def test_delta_is_the_sum_of_normalised_rank_one_terms_times_lambda_over_r_and_the_weight_norms():
    model, adapter, layer = _adapted()
    a, b = adapter.delora_A.detach(), adapter.delora_B.detach()
    norms = layer.weight.detach().norm(dim=0)
    expected = sum(torch.outer(b[:, i], a[i]) / (a[i].norm() * b[:, i].norm()) for i in range(3)) * 2.0 / 3
    expected = expected * norms
    assert torch.allclose(adapter.delta_weight(layer.weight.detach()), expected, atol=1e-6)
    x = torch.randn(4, 6)
    assert torch.allclose(model(x), nn.functional.linear(x, layer.weight + expected, layer.bias), atol=1e-5)
    left, right = adapter.delta_factors(layer.weight)
    assert torch.allclose(left @ right, expected, atol=1e-6)


def test_lambda_bounds_the_update_whatever_the_factors():
    model, adapter, layer = _adapted(lam=0.5)
    with torch.no_grad():
        adapter.delora_A.mul_(1e3)
        adapter.delora_B.mul_(-7)
    delta = adapter.delta_weight(layer.weight.detach()) / layer.weight.detach().norm(dim=0)
    assert torch.linalg.matrix_norm(delta, ord=2) <= 0.5 + 1e-6


def test_the_weight_norms_are_frozen_when_the_adapter_is_made_and_saved_with_it():
    model, adapter, layer = _adapted()
    assert "delora_w_norm" in dict(adapter.named_buffers())
    assert not any(n == "delora_w_norm" for n, _ in adapter.named_parameters())
    before = adapter.delora_w_norm.clone()
    peftkit.merge(model)  # the base weight changes; the norms the delta uses do not
    assert torch.equal(adapter.delora_w_norm, before)
    assert torch.allclose(before, layer.weight.detach().norm(dim=0))


def test_default_init_starts_at_the_base_with_lambda_from_the_config():
    torch.manual_seed(0)
    layer = nn.Linear(6, 5)
    model = peftkit.inject(nn.Sequential(copy.deepcopy(layer)), DeloraConfig(r=2, target_modules=["0"]))
    adapter = model[0].adapters["default"]
    assert torch.equal(adapter.delora_B, torch.zeros(5, 2)) and adapter.delora_lambda.item() == 15
    x = torch.randn(3, 6)
    assert torch.equal(model(x), layer(x))


def test_rank_and_lambda_patterns_set_each_module():
    config = DeloraConfig(
        r=4, rank_pattern={"lin1": 2}, lambda_pattern={"lin0": 3}, target_modules=["lin0", "lin1"]
    )
    model = peftkit.inject(cm.base("MLP"), config)
    lin0, lin1 = model.lin0.adapters["default"], model.lin1.adapters["default"]
    assert (lin0.r, lin0.delora_lambda.item()) == (4, 3)
    assert (lin1.r, lin1.delora_lambda.item()) == (2, 15)


def test_saved_keys_and_shapes():
    model = peftkit.inject(cm.base("MLP"), DeloraConfig(r=4, target_modules=["lin0"]))
    assert {k: tuple(v.shape) for k, v in peftkit.adapter_state_dict(model).items()} == {
        "base_model.model.lin0.delora_A": (4, 10),
        "base_model.model.lin0.delora_B": (20, 4),
        "base_model.model.lin0.delora_lambda": (1,),
        "base_model.model.lin0.delora_w_norm": (10,),
    }


# -- errors ---------------------------------------------------------------------------------------


def test_config_reports_every_problem_at_once():
    with pytest.raises(ConfigError) as info:
        DeloraConfig(r=0, delora_lambda="big", module_dropout=1.0, bias="lora_only", alpha_pattern={"a": 2})
    text = str(info.value)
    assert "5 problem" in text
    for needle in ("r: must be", "delora_lambda", "module_dropout", "'delora_only'", "alpha_pattern"):
        assert needle in text, needle


def test_unsupported_layers_are_refused_when_named():
    with pytest.raises(UnsupportedLayerError):
        peftkit.inject(nn.Sequential(nn.Conv2d(4, 4, 3)), DeloraConfig(r=2, target_modules=["0"]))


# -- parity with the reference library ------------------------------------------------------------

# The reference matrix's DeLoRA cases (name, model, options), and beyond it a random init with patterns.
CASES = [
    ("Vanilla MLP 1 DeLoRA", "MLP", {"target_modules": "lin0"}),
    ("Vanilla MLP 2 DeLoRA", "MLP", {"target_modules": ["lin0"]}),
    ("Vanilla MLP 3 DeLoRA", "MLP", {"target_modules": ["lin1"]}),
    ("Vanilla MLP 4 DeLoRA", "MLP", {"target_modules": ["lin0", "lin1"]}),
    ("Vanilla MLP 5 DeLoRA", "MLP", {"target_modules": ["lin0"], "module_dropout": 0.1}),
    (
        "MLP DeLoRA random init with patterns",
        "MLP",
        {
            "target_modules": ["lin0", "lin1"],
            "r": 4,
            "init_weights": False,
            "rank_pattern": {"lin1": 2},
            "lambda_pattern": {"lin0": 3},
        },
    ),
]


def _configs(options):
    return DeloraConfig(**copy.deepcopy(options)), peft.DeloraConfig(**copy.deepcopy(options))


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
    cm.assert_same_fresh_adapter(
        ours,
        theirs,
        ours_config,
        tmp_path,
        (
            "r",
            "delora_lambda",
            "module_dropout",
            "bias",
            "init_weights",
            "rank_pattern",
            "lambda_pattern",
        ),
    )


def test_docs_example_runs(capsys):
    text = (Path(__file__).resolve().parents[2] / "docs" / "delora.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert len(blocks) == 1
    exec(compile(blocks[0], "docs/delora.md", "exec"), {"__name__": "docs_delora"})
    assert "merged vs unmerged" in capsys.readouterr().out

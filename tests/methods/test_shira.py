"""SHiRA: the sparse update, its mask, options, and two-way parity with the reference library (peft 0.21.2).

Parity: every SHiRA case of the reference's custom-model matrix (its tests/test_custom_models.py, "Vanilla MLP
1-5 SHiRA"), both ways (trained by one library, saved, loaded by the other), unmerged, merged and merged and
unloaded, float32 max abs diff <= 1e-5; plus a random init and a bigger r, which that matrix does not cover.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import peftkit
from peftkit.errors import ConfigError, UnsupportedLayerError
from peftkit.methods.shira import ShiraConfig, ShiraLinear, random_mask_indices
from support import custom_models as cm

peft = pytest.importorskip("peft")
from peft.tuners.shira.mask_functions import random_mask  # noqa: E402
from peft.utils import get_peft_model_state_dict  # noqa: E402

pytestmark = [
    pytest.mark.usefixtures("one_thread"),  # tiny models: one intra-op thread is fastest
    pytest.mark.filterwarnings("ignore:All adapters are already merged:UserWarning"),  # peft merge_and_unload
    pytest.mark.filterwarnings("ignore:Sparse invariant checks:UserWarning"),  # peft's sparse delta
]


# -- config ---------------------------------------------------------------------------------------


def test_defaults_follow_the_reference_config():
    ours, theirs = ShiraConfig(), peft.ShiraConfig()
    for key in ("r", "mask_type", "random_seed", "fan_in_fan_out", "init_weights"):
        assert getattr(ours, key) == getattr(theirs, key), key


def test_every_config_problem_is_reported_at_once():
    with pytest.raises(ConfigError) as info:
        ShiraConfig(r=0, mask_type="magnitude", random_seed="7", init_weights="zeros", rank_pattern={"a": 2})
    problems = info.value.problems
    for field in ("r:", "mask_type:", "random_seed:", "init_weights:", "rank_pattern:"):
        assert any(p.startswith(field) for p in problems), (field, problems)


# -- the mask and the update ----------------------------------------------------------------------


@pytest.mark.parametrize("seed", [None, 0, 56])
def test_the_mask_is_the_references(seed):
    layer = nn.Linear(10, 20)
    mask = random_mask(layer, 2, random_seed=seed)
    rows, cols = torch.where(mask == 1)
    indices = random_mask_indices(20, 10, 2 * 30, seed)
    assert indices.dtype == torch.int32
    assert torch.equal(indices.long(), torch.stack([rows, cols]))


def test_the_update_is_the_sparse_matrix_of_the_trained_entries():
    torch.manual_seed(0)
    layer = nn.Linear(6, 5)
    adapter = ShiraLinear(layer, r=1, seed=3, init_weights=False)
    assert adapter.shira_weight.shape == (11,) and adapter.shira_indices.shape == (2, 11)
    expected = torch.zeros(5, 6)
    for k, (i, j) in enumerate(adapter.shira_indices.T.tolist()):
        expected[i, j] = adapter.shira_weight[k].detach()
    assert torch.equal(adapter.delta_weight(layer.weight.detach()), expected)
    assert (expected != 0).sum() == 11
    x = torch.randn(3, 6)
    model = peftkit.inject(
        nn.Sequential(copy.deepcopy(layer)), ShiraConfig(r=1, random_seed=3, target_modules=["0"])
    )
    with torch.no_grad():
        model[0].adapters["default"].shira_weight.copy_(adapter.shira_weight)
        assert torch.allclose(model(x), x @ (layer.weight + expected).T + layer.bias, atol=1e-6)


def test_repeated_positions_add_up_as_in_the_reference():
    adapter = ShiraLinear(nn.Linear(4, 3), r=1, seed=0, init_weights=False)
    with torch.no_grad():
        adapter.shira_indices[:, 1] = adapter.shira_indices[:, 0]
    delta = adapter.delta_weight(torch.zeros(3, 4))
    i, j = adapter.shira_indices[:, 0].tolist()
    assert torch.allclose(delta[i, j], adapter.shira_weight[0] + adapter.shira_weight[1])


def test_init_weights_zero_starts_at_the_base_and_only_the_values_train():
    model, x = cm.base("MLP"), cm.inputs(1)
    before = model(x)
    peftkit.inject(model, ShiraConfig(r=1, target_modules=["lin0", "lin1"]))
    assert torch.equal(model(x), before)
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"lin0.adapters.default.shira_weight": 30, "lin1.adapters.default.shira_weight": 22}


def test_too_big_an_r_and_other_layer_kinds_are_refused():
    model = cm.base("MLP")
    with pytest.raises(
        UnsupportedLayerError, match=r"r=2 asks for .* = 44 trained entries, more than the 2 x 20 = 40"
    ):
        peftkit.inject(model, ShiraConfig(r=2, target_modules=["lin1"]))
    assert isinstance(model.lin1, nn.Linear)
    with pytest.raises(UnsupportedLayerError):
        peftkit.inject(cm.base("Conv2d"), ShiraConfig(r=1, target_modules=["conv2d"]))


def test_a_bf16_base_gets_float32_values_and_merges():
    model, x = cm.base("MLP").to(torch.bfloat16), cm.inputs(1).to(torch.bfloat16)
    peftkit.inject(model, ShiraConfig(r=1, target_modules=["lin0"], init_weights=False))
    assert model.lin0.adapters["default"].shira_weight.dtype == torch.float32
    unmerged = model(x)
    assert unmerged.dtype == torch.bfloat16
    peftkit.merge(model)
    assert (model(x).float() - unmerged.float()).abs().max() <= 0.05


def test_the_saved_file_carries_the_positions_and_loading_keeps_them(tmp_path):
    ours = peftkit.inject(
        cm.base("MLP"), ShiraConfig(r=1, random_seed=5, target_modules=["lin0"], init_weights=False)
    )
    with torch.no_grad():  # a mask no seed draws: loading must not redraw it
        ours.lin0.adapters["default"].shira_indices.copy_(random_mask_indices(20, 10, 30, 99))
    peftkit.save_adapter(ours, tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert {k: (v.dtype, tuple(v.shape)) for k, v in saved.items()} == {
        "base_model.model.lin0.shira_weight": (torch.float32, (30,)),
        "base_model.model.lin0.shira_indices": (torch.int32, (2, 30)),
    }
    loaded = peftkit.load_adapter(cm.base("MLP"), tmp_path)
    assert torch.equal(loaded.lin0.adapters["default"].shira_indices, random_mask_indices(20, 10, 30, 99))
    assert torch.equal(loaded(cm.inputs(1)), ours(cm.inputs(1)))


def test_two_adapters_on_one_layer_add_their_sparse_deltas_and_merge_together():
    model, x = cm.base("MLP"), cm.inputs(1)
    base = model(x)
    peftkit.inject(model, ShiraConfig(r=1, random_seed=1, target_modules=["lin0"], init_weights=False), "a")
    peftkit.inject(model, ShiraConfig(r=1, random_seed=2, target_modules=["lin0"], init_weights=False), "b")
    peftkit.set_active(model, ["a", "b"])
    weight = model.lin0.base_layer.weight.detach().clone()
    both = sum(model.lin0.adapters[n].delta_weight(weight) for n in ("a", "b"))
    with torch.no_grad():
        unmerged = model(x)
        peftkit.merge(model)
        assert torch.allclose(model.lin0.base_layer.weight, weight + both, atol=1e-6)
        assert (model(x) - unmerged).abs().max() <= 1e-5 and (unmerged - base).abs().max() > 1e-3
        peftkit.unmerge(model)
    assert (model.lin0.base_layer.weight - weight).abs().max() <= 1e-6


# -- parity with the reference library ------------------------------------------------------------

# The reference matrix's 5 SHiRA cases (name, model, options), then what it does not cover.
CASES = [
    ("Vanilla MLP 1 SHiRA", "MLP", {"r": 1, "target_modules": "lin0"}),
    ("Vanilla MLP 2 SHiRA", "MLP", {"r": 1, "target_modules": ["lin0"]}),
    ("Vanilla MLP 3 SHiRA", "MLP", {"r": 1, "target_modules": ["lin1"]}),
    ("Vanilla MLP 4 SHiRA", "MLP", {"r": 1, "target_modules": ["lin0", "lin1"], "random_seed": 56}),
    ("Vanilla MLP 5 SHiRA", "MLP", {"r": 1, "target_modules": ["lin0"]}),
    ("MLP SHiRA random init", "MLP", {"r": 1, "target_modules": ["lin0", "lin1"], "init_weights": False}),
    (
        "MLP2 SHiRA r=3 modules_to_save",
        "MLP2",
        {"r": 3, "target_modules": ["lin0"], "modules_to_save": ["lin1"]},
    ),
]
REFERENCE_CASES = 5


def _configs(options):
    return ShiraConfig(**copy.deepcopy(options)), peft.ShiraConfig(**copy.deepcopy(options))


def test_the_reference_matrix_is_covered():
    assert len([c for c in CASES if re.fullmatch(r"Vanilla MLP \d SHiRA", c[0])]) == REFERENCE_CASES


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
    ours_state, theirs_state = peftkit.adapter_state_dict(ours), get_peft_model_state_dict(theirs)
    assert ours_state.keys() == theirs_state.keys()
    for key, value in ours_state.items():  # the same positions, drawn independently
        assert value.dtype == theirs_state[key].dtype and torch.equal(value, theirs_state[key]), key
    assert peftkit.trainable_summary(ours, show=False).trainable == sum(
        p.numel() for p in theirs.parameters() if p.requires_grad
    )
    keys = ("r", "mask_type", "random_seed", "init_weights", "fan_in_fan_out")
    cm.assert_same_fresh_adapter(ours, theirs, ours_config, tmp_path, keys)


def test_docs_example_runs(capsys):
    text = (Path(__file__).resolve().parents[2] / "docs" / "shira.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert len(blocks) == 1
    exec(compile(blocks[0], "docs/shira.md", "exec"), {"__name__": "docs_shira"})
    assert "merged vs unmerged" in capsys.readouterr().out

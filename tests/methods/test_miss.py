"""MiSS: the shard-sharing algebra of its three forms, errors, and parity with the reference library.

Parity: every MiSS case of the reference's custom-model matrix (peft 0.21.2, tests/test_custom_models.py),
both ways (trained by one library, saved, loaded by the other), unmerged and merged, float32 max abs
diff <= 1e-5; plus a padded last shard with a random start, and the mini form, which that matrix does not
cover.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import torch
from torch import nn

import peftkit
from peftkit.errors import AdapterNameError, ConfigError, UnsupportedLayerError
from peftkit.methods.miss import MissConfig
from support import custom_models as cm

peft = pytest.importorskip("peft")

pytestmark = [
    pytest.mark.usefixtures("one_thread"),  # tiny models: one intra-op thread is fastest
    pytest.mark.filterwarnings(
        "ignore:All adapters are already merged:UserWarning"
    ),  # peft's merge_and_unload
]


def _adapted(features=7, out=6, seed=0, **options):
    torch.manual_seed(seed)
    layer = nn.Linear(features, out)
    model = peftkit.inject(nn.Sequential(copy.deepcopy(layer)), MissConfig(target_modules=["0"], **options))
    adapter = model[0].adapters["default"]
    with torch.no_grad():
        adapter.miss_block.copy_(torch.randn(adapter.miss_block.shape) * 0.3)
    return model, adapter, layer


# -- the three forms ------------------------------------------------------------------------------


def test_balance_delta_repeats_the_block_over_every_shard_and_pads_the_last():
    model, adapter, layer = _adapted(r=3)  # 7 input features: shards of 3, 3 and 1
    block = adapter.miss_block.detach()
    delta = adapter.delta_weight(layer.weight.detach())
    for o in range(6):
        for i in range(7):
            assert delta[o, i] == block[i % 3, o]
    x = torch.randn(5, 7)
    assert torch.allclose(model(x), nn.functional.linear(x, layer.weight + delta, layer.bias), atol=1e-6)
    left, right = adapter.delta_factors(layer.weight)
    assert left.shape == (6, 3) and right.shape == (3, 7) and torch.allclose(left @ right, delta)


def test_mini_repeats_its_columns_along_the_outputs():
    model, adapter, layer = _adapted(r=2, init_weights="mini", mini_r=3)
    assert adapter.miss_block.shape == (2, 3)
    block = adapter.miss_block.detach()
    delta = adapter.delta_weight(layer.weight.detach())
    assert all(delta[o, i] == block[i % 2, o % 3] for o in range(6) for i in range(7))
    x = torch.randn(5, 7)
    assert torch.allclose(model(x), nn.functional.linear(x, layer.weight + delta, layer.bias), atol=1e-6)


def test_bat_turns_each_block_with_its_block_rows_matrix_and_unmerges_exactly():
    model, adapter, layer = _adapted(features=6, out=4, r=2, init_weights="bat")
    assert adapter.miss_block.shape == (2, 2, 2)
    b, w = adapter.miss_block.detach(), layer.weight.detach()
    expected = w.clone()
    for p in range(2):
        for q in range(3):
            blk = w[2 * p : 2 * p + 2, 2 * q : 2 * q + 2]
            expected[2 * p : 2 * p + 2, 2 * q : 2 * q + 2] = blk @ (torch.eye(2) + b[p]) + b[p]
    assert torch.allclose(adapter.merged_weight(w), expected, atol=1e-6)
    x = torch.randn(5, 6)
    assert torch.allclose(model(x), nn.functional.linear(x, expected, layer.bias), atol=1e-6)
    assert (adapter.unmerged_weight(expected) - w).abs().max() <= 1e-6


@pytest.mark.parametrize("init", [True, "mini", "bat"])
def test_fresh_adapters_start_at_the_base(init):
    torch.manual_seed(0)
    layer = nn.Linear(6, 4)
    model = peftkit.inject(
        nn.Sequential(copy.deepcopy(layer)), MissConfig(r=2, init_weights=init, target_modules=["0"])
    )
    x = torch.randn(3, 6)
    assert torch.equal(model(x), layer(x))


def test_random_init_changes_the_output_at_once():
    torch.manual_seed(0)
    layer = nn.Linear(6, 4)
    model = peftkit.inject(
        nn.Sequential(copy.deepcopy(layer)), MissConfig(r=2, init_weights=False, target_modules=["0"])
    )
    x = torch.randn(3, 6)
    assert not torch.allclose(model(x), layer(x), atol=1e-3)


def test_saved_keys_and_shapes():
    model = peftkit.inject(cm.base("MLP"), MissConfig(r=2, target_modules=["lin0", "lin1"]))
    assert {k: tuple(v.shape) for k, v in peftkit.adapter_state_dict(model).items()} == {
        "base_model.model.lin0.miss_block": (2, 20),
        "base_model.model.lin1.miss_block": (2, 2),
    }


# -- errors ---------------------------------------------------------------------------------------


def test_config_reports_every_problem_at_once():
    with pytest.raises(ConfigError) as info:
        MissConfig(r=0, init_weights="lora", miss_dropout=1.5, bias="lora_only", rank_pattern={"lin0": 2})
    text = str(info.value)
    assert "5 problem" in text
    for needle in ("r: must be", "init_weights", "miss_dropout", "'MiSS_only'", "rank_pattern"):
        assert needle in text, needle


@pytest.mark.parametrize(
    ("options", "needle"),
    [
        ({"r": 8}, "wider than this layer's 6 input features"),
        ({"r": 4, "init_weights": "bat"}, "r=4 must divide both"),
        ({"r": 2, "init_weights": "mini", "mini_r": 4}, "mini_r=4 columns over the 5 output"),
    ],
)
def test_layers_that_do_not_fit_are_refused(options, needle):
    with pytest.raises(UnsupportedLayerError, match=needle):
        peftkit.inject(nn.Sequential(nn.Linear(6, 5)), MissConfig(target_modules=["0"], **options))


def test_unsupported_layers_are_refused_when_named():
    with pytest.raises(UnsupportedLayerError):
        peftkit.inject(nn.Sequential(nn.Conv2d(4, 4, 3)), MissConfig(r=2, target_modules=["0"]))


def test_bat_merge_beside_another_adapter_on_the_same_layer_is_refused():
    model = nn.Sequential(nn.Linear(6, 4))
    peftkit.inject(model, MissConfig(r=2, init_weights="bat", target_modules=["0"]), "a")
    peftkit.inject(model, MissConfig(r=2, init_weights=False, target_modules=["0"]), "b")
    peftkit.set_active(model, ["a", "b"])
    with pytest.raises(AdapterNameError, match="cannot merge"):
        peftkit.merge(model)
    peftkit.set_active(model, "a")
    peftkit.merge(model)


# -- parity with the reference library ------------------------------------------------------------

# The reference matrix's MiSS cases (name, model, options; it names two pairs alike, told apart here by
# their form), and beyond it a padded last shard with a random start, and the mini form.
CASES = [
    ("Vanilla MLP 1 MiSS", "MLP", {"target_modules": "lin0", "r": 2}),
    ("Vanilla MLP 2 MiSS", "MLP", {"target_modules": ["lin0"], "r": 2}),
    ("Vanilla MLP 3 MiSS", "MLP", {"target_modules": ["lin0", "lin1"], "r": 2}),
    ("Vanilla MLP 5 MiSS", "MLP", {"target_modules": ["lin0"], "modules_to_save": ["lin1"], "r": 2}),
    ("Vanilla MLP 1 MiSS bat", "MLP", {"target_modules": "lin0", "r": 2, "init_weights": "bat"}),
    ("Vanilla MLP 2 MiSS bat", "MLP", {"target_modules": ["lin0"], "r": 2, "init_weights": "bat"}),
    (
        "Vanilla MLP 3 MiSS with bat",
        "MLP",
        {"target_modules": ["lin0", "lin1"], "r": 2, "init_weights": "bat"},
    ),
    (
        "Vanilla MLP 5 MiSS bat",
        "MLP",
        {"target_modules": ["lin0"], "modules_to_save": ["lin1"], "r": 2, "init_weights": "bat"},
    ),
    (
        "MLP MiSS padded random init",
        "MLP",
        {"target_modules": ["lin0", "lin1"], "r": 3, "init_weights": False},
    ),
    ("MLP MiSS mini", "MLP", {"target_modules": ["lin0"], "r": 2, "init_weights": "mini", "mini_r": 4}),
]


def _configs(options):
    return MissConfig(**copy.deepcopy(options)), peft.MissConfig(**copy.deepcopy(options))


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
        ours, theirs, ours_config, tmp_path, ("r", "miss_dropout", "mini_r", "init_weights", "bias")
    )


def test_docs_example_runs(capsys):
    text = (Path(__file__).resolve().parents[2] / "docs" / "miss.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert len(blocks) == 1
    exec(compile(blocks[0], "docs/miss.md", "exec"), {"__name__": "docs_miss"})
    assert "merged vs unmerged" in capsys.readouterr().out

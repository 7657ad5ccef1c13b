"""RoAd: the grouped 2-D rotations of its three variants, merging into weight and bias, errors, and parity
with the reference library.

Parity: every RoAd case of the reference's custom-model matrix (peft 0.21.2, tests/test_custom_models.py),
both ways (trained by one library, saved, loaded by the other), unmerged and merged, float32 max abs
diff <= 1e-5; plus random inits with wider groups (where the pairing inside a group shows), which that
matrix does not cover.
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
from peftkit.methods.road import RoadConfig
from support import custom_models as cm

peft = pytest.importorskip("peft")

pytestmark = [
    pytest.mark.usefixtures("one_thread"),  # tiny models: one intra-op thread is fastest
    pytest.mark.filterwarnings(
        "ignore:All adapters are already merged:UserWarning"
    ),  # peft's merge_and_unload
]


def _adapted(variant="road_1", group_size=4, out=8, seed=0):
    torch.manual_seed(seed)
    layer = nn.Linear(5, out)
    config = RoadConfig(variant=variant, group_size=group_size, init_weights=False, target_modules=["0"])
    model = peftkit.inject(nn.Sequential(copy.deepcopy(layer)), config)
    return model, model[0].adapters["default"], layer


def _rotation(theta, alpha, variant, group_size, out):
    """R as a dense (out, out) matrix, pair by pair from the paper's 2x2 blocks (the reference's layout)."""
    half = group_size // 2
    r = torch.zeros(out, out)
    for g in range(out // group_size):
        for j in range(half):
            k, p = g * group_size + j, g * group_size + half + j  # feature k pairs with p
            if variant == "road_1":
                i = g * half + j
                (tk, ak), (tp, ap) = (theta[i], alpha[i]), (theta[i], alpha[i])
                fk, sk, fp, sp = ak * tk.cos(), ak * tk.sin(), ap * tp.cos(), ap * tp.sin()
            elif variant == "road_2":
                fk, sk = alpha[k] * theta[k].cos(), alpha[k] * theta[k].sin()
                fp, sp = alpha[p] * theta[p].cos(), alpha[p] * theta[p].sin()
            else:  # road_4: per group [f entries | s entries]
                base = 2 * g * group_size
                fk, fp = (alpha[base + i] * theta[base + i].cos() for i in (j, half + j))
                sk, sp = (
                    alpha[base + group_size + i] * theta[base + group_size + i].sin() for i in (j, half + j)
                )
            r[k, k], r[k, p], r[p, k], r[p, p] = fk, -sk, sp, fp
    return r


# -- the rotations --------------------------------------------------------------------------------


@pytest.mark.parametrize(("variant", "size"), [("road_1", 4), ("road_2", 8), ("road_4", 16)])
def test_each_variant_turns_the_output_in_pairs_of_its_group(variant, size):
    model, adapter, layer = _adapted(variant)
    theta, alpha = adapter.road_theta.detach(), adapter.road_alpha.detach()
    assert theta.shape == alpha.shape == (size,)
    r = _rotation(theta, alpha, variant, 4, 8)
    x = torch.randn(3, 5)
    assert torch.allclose(model(x), layer(x) @ r.T, atol=1e-6)
    merged = adapter.merged_tensors({"weight": layer.weight.detach(), "bias": layer.bias.detach()})
    assert torch.allclose(merged["weight"], r @ layer.weight, atol=1e-6)
    assert torch.allclose(merged["bias"], r @ layer.bias, atol=1e-6)


def test_merge_writes_weight_and_bias_and_unmerge_restores_both():
    model, _, layer = _adapted("road_4")
    x = torch.randn(3, 5)
    unmerged = model(x)
    peftkit.merge(model, safe=True)
    assert not torch.allclose(model[0].base_layer.bias, layer.bias)
    assert torch.allclose(model(x), unmerged, atol=1e-6)
    peftkit.unmerge(model)
    for name in ("weight", "bias"):
        assert (getattr(model[0].base_layer, name) - getattr(layer, name)).abs().max() <= 1e-6


def test_a_layer_without_bias_merges_only_its_weight():
    model = peftkit.inject(
        nn.Sequential(nn.Linear(5, 4, bias=False)), RoadConfig(group_size=2, target_modules=["0"])
    )
    assert model[0].adapters["default"].merge_into == ("weight",)


def test_a_fresh_adapter_is_the_identity_and_a_random_one_is_not():
    torch.manual_seed(0)
    layer = nn.Linear(5, 4)
    x = torch.randn(3, 5)
    fresh = peftkit.inject(
        nn.Sequential(copy.deepcopy(layer)), RoadConfig(group_size=4, target_modules=["0"])
    )
    assert torch.equal(fresh(x), layer(x))
    random = peftkit.inject(
        nn.Sequential(copy.deepcopy(layer)),
        RoadConfig(group_size=4, init_weights=False, target_modules=["0"]),
    )
    assert not torch.allclose(random(x), layer(x), atol=1e-3)


def test_a_mixed_batch_routes_each_example_through_its_own_rotation():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4)).eval()
    for name in ("a", "b"):
        peftkit.inject(model, RoadConfig(group_size=4, init_weights=False, target_modules=["0"]), name)
    x = torch.randn(3, 5)
    alone = {}
    for name in ("a", "b"):
        peftkit.set_active(model, name)
        alone[name] = model(x).detach()
    with torch.no_grad(), peftkit.per_example_adapters(model, ["a", "b", None]):
        mixed = model(x)
    assert torch.allclose(mixed[0], alone["a"][0]) and torch.allclose(mixed[1], alone["b"][1])
    with peftkit.disable(model):
        assert torch.allclose(mixed[2], model(x)[2])


def test_saved_keys_and_shapes():
    model = peftkit.inject(
        cm.base("MLP"), RoadConfig(variant="road_4", group_size=2, target_modules=["lin0"])
    )
    assert {k: tuple(v.shape) for k, v in peftkit.adapter_state_dict(model).items()} == {
        "base_model.model.lin0.road_theta": (40,),
        "base_model.model.lin0.road_alpha": (40,),
    }


# -- errors ---------------------------------------------------------------------------------------


def test_config_reports_every_problem_at_once():
    with pytest.raises(ConfigError) as info:
        RoadConfig(
            variant="road_3",
            group_size=3,
            init_weights="yes",
            exclude_modules=["lin1"],
            rank_pattern={"a": 2},
        )
    text = str(info.value)
    assert "5 problem" in text
    for needle in (
        "variant",
        "group_size",
        "init_weights",
        "exclude_modules: not part of the ROAD",
        "rank_pattern",
    ):
        assert needle in text, needle


def test_a_group_size_not_dividing_the_outputs_is_refused():
    with pytest.raises(UnsupportedLayerError, match="group_size=4 must divide the layer's 6 output"):
        peftkit.inject(nn.Sequential(nn.Linear(5, 6)), RoadConfig(group_size=4, target_modules=["0"]))


def test_unsupported_layers_are_refused_when_named():
    with pytest.raises(UnsupportedLayerError):
        peftkit.inject(nn.Sequential(nn.Conv2d(4, 4, 3)), RoadConfig(group_size=2, target_modules=["0"]))


def test_merge_beside_another_adapter_on_the_same_layer_is_refused():
    model = nn.Sequential(nn.Linear(5, 4))
    peftkit.inject(model, RoadConfig(group_size=2, target_modules=["0"], init_weights=False), "a")
    peftkit.inject(model, RoadConfig(group_size=2, target_modules=["0"], init_weights=False), "b")
    peftkit.set_active(model, ["a", "b"])
    with pytest.raises(AdapterNameError, match="cannot merge"):
        peftkit.merge(model)
    peftkit.set_active(model, "a")
    peftkit.merge(model)


# -- parity with the reference library ------------------------------------------------------------

# The reference matrix's RoAd cases (name, model, options), and beyond it random inits in wider groups.
CASES = [
    ("Vanilla MLP 1 RoAd", "MLP", {"target_modules": "lin0", "group_size": 2}),
    ("Vanilla MLP 2 RoAd", "MLP", {"target_modules": ["lin0"], "group_size": 2}),
    ("Vanilla MLP 3 RoAd", "MLP", {"target_modules": ["lin1"], "group_size": 2}),
    ("Vanilla MLP 4 RoAd", "MLP", {"target_modules": ["lin0", "lin1"], "group_size": 2}),
    ("Vanilla MLP 5 RoAd", "MLP", {"target_modules": ["lin0"], "variant": "road_2", "group_size": 2}),
    ("Vanilla MLP 6 RoAd", "MLP", {"target_modules": ["lin0"], "variant": "road_4", "group_size": 2}),
    (
        "MLP RoAd 4 random init groups of 4",
        "MLP",
        {"target_modules": ["lin0"], "variant": "road_4", "group_size": 4, "init_weights": False},
    ),
    (
        "MLP RoAd 1 random init groups of 10",
        "MLP",
        {"target_modules": ["lin0"], "group_size": 10, "init_weights": False, "modules_to_save": ["lin1"]},
    ),
]


def _configs(options):
    return RoadConfig(**copy.deepcopy(options)), peft.RoadConfig(**copy.deepcopy(options))


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
        ours, theirs, ours_config, tmp_path, ("variant", "group_size", "init_weights")
    )


def test_docs_example_runs(capsys):
    text = (Path(__file__).resolve().parents[2] / "docs" / "road.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert len(blocks) == 1
    exec(compile(blocks[0], "docs/road.md", "exec"), {"__name__": "docs_road"})
    assert "merged vs unmerged" in capsys.readouterr().out

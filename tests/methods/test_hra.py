"""HRA: the reflections' algebra, Gram-Schmidt, init, errors, and parity with the reference library.

Parity: every HRA case of the reference's custom-model matrix (peft 0.21.2, tests/test_custom_models.py),
both ways (trained by one library, saved, loaded by the other), unmerged and merged, float32 max abs
diff <= 1e-5; plus apply_GS and a random init, which that matrix does not cover.
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
from peftkit.methods.hra import HRAConfig, _orthonormal
from support import custom_models as cm

peft = pytest.importorskip("peft")

pytestmark = [
    pytest.mark.usefixtures("one_thread"),  # tiny models: one intra-op thread is fastest
    pytest.mark.filterwarnings(
        "ignore:All adapters are already merged:UserWarning"
    ),  # peft's merge_and_unload
]


def _adapter(features=6, r=4, gram_schmidt=False, seed=0):
    model = peftkit.inject(
        nn.Sequential(nn.Linear(features, 3)),
        HRAConfig(r=r, apply_GS=gram_schmidt, init_weights=False, target_modules=["0"]),
    )
    adapter = model[0].adapters["default"]
    with torch.no_grad():
        adapter.hra_u.copy_(torch.randn(adapter.hra_u.shape, generator=torch.Generator().manual_seed(seed)))
    return model, adapter


def _dense(adapter) -> torch.Tensor:
    """H as a matrix: the identity's rows turned."""
    return adapter.reflect(torch.eye(adapter.hra_u.shape[0])).detach()


# -- the reflections ------------------------------------------------------------------------------


def test_h_is_the_product_of_the_normalised_reflections_in_column_order():
    _, adapter = _adapter()
    u = adapter.hra_u.detach()
    expected = torch.eye(6)
    for i in range(u.shape[1]):
        col = (u[:, i] / u[:, i].norm()).unsqueeze(1)
        expected = expected @ (torch.eye(6) - 2 * col @ col.T)
    h = _dense(adapter)
    assert torch.allclose(h, expected, atol=1e-6)
    assert torch.allclose(h @ h.T, torch.eye(6), atol=1e-6)
    assert torch.allclose(adapter.reflect(torch.eye(6), transpose=True), h.T, atol=1e-6)


def test_gram_schmidt_gives_a_symmetric_involution():
    _, adapter = _adapter(gram_schmidt=True)
    q = _orthonormal(adapter.hra_u.detach())
    assert torch.allclose(q.T @ q, torch.eye(4), atol=1e-6)
    h = _dense(adapter)
    assert torch.allclose(h, torch.eye(6) - 2 * q @ q.T, atol=1e-6)
    assert torch.allclose(h, h.T, atol=1e-6) and torch.allclose(h @ h, torch.eye(6), atol=1e-5)


def test_linear_turns_the_input_and_merges_as_w_h():
    torch.manual_seed(0)
    model, adapter = _adapter()
    layer = model[0].base_layer
    x = torch.randn(5, 6)
    h = _dense(adapter)
    assert torch.allclose(model(x), nn.functional.linear(x, layer.weight @ h, layer.bias), atol=1e-6)
    assert torch.allclose(adapter.merged_weight(layer.weight.detach()), layer.weight @ h, atol=1e-6)


@pytest.mark.parametrize("r", [2, 8])
def test_default_init_pairs_equal_columns_and_starts_at_the_base(r):
    torch.manual_seed(0)
    layer = nn.Linear(6, 4)
    model = peftkit.inject(nn.Sequential(copy.deepcopy(layer)), HRAConfig(r=r, target_modules=["0"]))
    u = model[0].adapters["default"].hra_u.detach()
    assert u.shape == (6, r) and torch.equal(u[:, 0::2], u[:, 1::2])
    x = torch.randn(3, 6)
    assert torch.allclose(model(x), layer(x), atol=1e-6)


def test_odd_r_warns_and_starts_random():
    with pytest.warns(UserWarning, match="r=3 is odd"):
        config = HRAConfig(r=3, target_modules=["0"])
    torch.manual_seed(0)
    layer = nn.Linear(6, 4)
    model = peftkit.inject(nn.Sequential(copy.deepcopy(layer)), config)
    x = torch.randn(3, 6)
    assert not torch.allclose(model(x), layer(x), atol=1e-3)


def test_gram_schmidt_default_init_is_random():
    model = peftkit.inject(
        nn.Sequential(nn.Linear(6, 3)), HRAConfig(r=4, apply_GS=True, target_modules=["0"])
    )
    u = model[0].adapters["default"].hra_u.detach()
    assert not torch.equal(u[:, 0], u[:, 1])
    assert torch.isfinite(_dense(model[0].adapters["default"])).all()


def test_conv2d_turns_each_receptive_field_with_any_kernel_shape_and_dilation():
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, (3, 2), stride=(2, 1), padding=(1, 2), dilation=(1, 2))
    model = peftkit.inject(
        nn.Sequential(copy.deepcopy(conv)), HRAConfig(r=4, init_weights=False, target_modules=["0"])
    )
    adapter = model[0].adapters["default"]
    assert adapter.hra_u.shape == (2 * 3 * 2, 4)
    x = torch.randn(2, 2, 7, 7)
    turned = (conv.weight.reshape(3, -1) @ _dense(adapter)).reshape(conv.weight.shape)
    assert torch.allclose(model(x), conv._conv_forward(x, turned, conv.bias), atol=1e-5)
    unmerged = model(x)
    peftkit.merge(model)
    assert torch.allclose(model(x), unmerged, atol=1e-5)
    peftkit.unmerge(model)
    assert (model[0].base_layer.weight - conv.weight).abs().max() <= 1e-6


def test_saved_keys_and_shapes():
    model = peftkit.inject(cm.base("Conv2d"), HRAConfig(r=4, target_modules=["conv2d", "lin0"]))
    assert {k: tuple(v.shape) for k, v in peftkit.adapter_state_dict(model).items()} == {
        "base_model.model.conv2d.hra_u": (45, 4),
        "base_model.model.lin0.hra_u": (10, 4),
    }


# -- errors ---------------------------------------------------------------------------------------


def test_config_reports_every_problem_at_once():
    with pytest.raises(ConfigError) as info:
        HRAConfig(r=0, apply_GS="yes", bias="lora_only", rank_pattern={"lin0": 2})
    text = str(info.value)
    assert "4 problem" in text
    for needle in ("r: the number of reflections", "apply_GS", "'hra_only'", "rank_pattern"):
        assert needle in text, needle


def test_gram_schmidt_with_more_reflections_than_features_is_refused():
    with pytest.raises(UnsupportedLayerError, match="apply_GS needs r <= the 6 features"):
        peftkit.inject(nn.Sequential(nn.Linear(6, 2)), HRAConfig(r=8, apply_GS=True, target_modules=["0"]))


def test_unsupported_layers_are_refused_when_named():
    with pytest.raises(UnsupportedLayerError, match="groups=2"):
        peftkit.inject(nn.Sequential(nn.Conv2d(4, 4, 3, groups=2)), HRAConfig(r=2, target_modules=["0"]))
    with pytest.raises(UnsupportedLayerError):
        peftkit.inject(nn.Sequential(nn.Conv1d(4, 4, 3)), HRAConfig(r=2, target_modules=["0"]))


def test_merge_beside_another_adapter_on_the_same_layer_is_refused():
    model = nn.Sequential(nn.Linear(8, 3))
    peftkit.inject(model, HRAConfig(r=2, target_modules=["0"], init_weights=False), "a")
    peftkit.inject(model, HRAConfig(r=2, target_modules=["0"], init_weights=False), "b")
    peftkit.set_active(model, ["a", "b"])
    with pytest.raises(AdapterNameError, match="cannot merge"):
        peftkit.merge(model)
    peftkit.set_active(model, "a")
    peftkit.merge(model)


# -- parity with the reference library ------------------------------------------------------------

# The reference matrix's HRA cases (name, model, options), and beyond it Gram-Schmidt and a random init.
CASES = [
    ("Vanilla MLP 1 HRA", "MLP", {"target_modules": "lin0"}),
    ("Vanilla MLP 2 HRA", "MLP", {"target_modules": ["lin0"]}),
    ("Vanilla MLP 3 HRA", "MLP", {"target_modules": ["lin0", "lin1"]}),
    ("Vanilla MLP 5 HRA", "MLP", {"target_modules": ["lin0"], "modules_to_save": ["lin1"]}),
    ("Conv2d 1 HRA", "Conv2d", {"target_modules": ["conv2d"]}),
    # the reference's paired init under Gram-Schmidt normalises rounding noise: start both at random
    (
        "MLP HRA Gram-Schmidt",
        "MLP",
        {"target_modules": ["lin0"], "r": 6, "apply_GS": True, "init_weights": False},
    ),
    ("Conv2d HRA random init", "Conv2d", {"target_modules": ["conv2d", "lin0"], "init_weights": False}),
]


def _configs(options):
    return HRAConfig(**copy.deepcopy(options)), peft.HRAConfig(**copy.deepcopy(options))


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
        ours, theirs, ours_config, tmp_path, ("r", "apply_GS", "init_weights", "bias")
    )


def test_docs_example_runs(capsys):
    text = (Path(__file__).resolve().parents[2] / "docs" / "hra.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert len(blocks) == 1
    exec(compile(blocks[0], "docs/hra.md", "exec"), {"__name__": "docs_hra"})
    assert "merged vs unmerged" in capsys.readouterr().out

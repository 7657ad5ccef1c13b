"""HiRA: the Hadamard update on every layer kind, merge and unmerge, inits, errors, and parity with the
reference library.

Parity: every HiRA case of the reference's custom-model matrix (peft 0.21.2, tests/test_custom_models.py:
14 cases on MLP, EmbConv1D, Conv1d, Conv2d, Conv3d), both ways (trained by one library, saved, loaded by
the other), unmerged and merged, float32 max abs diff <= 1e-5; plus rank_pattern, the Gaussian and the
random init, which that matrix does not cover.
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
from peftkit.errors import AdapterNameError, ConfigError, UnsupportedLayerError
from peftkit.methods.hira import HiraConfig
from support import custom_models as cm

peft = pytest.importorskip("peft")

pytestmark = [
    pytest.mark.usefixtures("one_thread"),  # tiny models: one intra-op thread is fastest
    pytest.mark.filterwarnings(
        "ignore:All adapters are already merged:UserWarning"
    ),  # peft's merge_and_unload
]


def _single(layer: nn.Module, **options) -> tuple[nn.Module, nn.Module]:
    """(adapted model, the adapter) on one copy of ``layer``, A and B random."""
    model = peftkit.inject(
        nn.Sequential(copy.deepcopy(layer)), HiraConfig(target_modules=["0"], init_weights=False, **options)
    )
    return model, model[0].adapters["default"]


# -- the update -----------------------------------------------------------------------------------


def test_linear_adds_x_times_w0_hadamard_ba():
    torch.manual_seed(0)
    layer = nn.Linear(6, 4)
    model, adapter = _single(layer, r=3)
    a, b = adapter.hira_A.detach(), adapter.hira_B.detach()
    assert a.shape == (3, 6) and b.shape == (4, 3)
    x = torch.randn(5, 6)
    expected = layer(x) + x @ (layer.weight * (b @ a)).T
    assert torch.allclose(model(x), expected, atol=1e-5)


def test_conv1d_gpt2_reads_its_transposed_weight():
    torch.manual_seed(0)
    layer = Conv1D(4, 6)  # in 6, out 4, weight stored (6, 4)
    model, adapter = _single(layer, r=2)
    a, b = adapter.hira_A.detach(), adapter.hira_B.detach()
    assert a.shape == (2, 6) and b.shape == (4, 2)
    x = torch.randn(3, 6)
    assert torch.allclose(model(x), layer(x) + x @ (layer.weight.T * (b @ a)).T, atol=1e-5)


def test_embedding_looks_up_rows_of_w0_hadamard_ba_transposed():
    torch.manual_seed(0)
    layer = nn.Embedding(12, 5, padding_idx=0)
    model, adapter = _single(layer, r=3)
    a, b = adapter.hira_embedding_A.detach(), adapter.hira_embedding_B.detach()
    assert a.shape == (3, 12) and b.shape == (5, 3)
    ids = torch.tensor([[0, 3, 11], [4, 4, 7]])
    dense = layer.weight * (b @ a).T
    assert torch.allclose(model(ids), layer(ids) + dense[ids], atol=1e-5)


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv1d(2, 3, 3, padding=1),
        nn.Conv2d(2, 3, (3, 2), stride=(2, 1), padding=(1, 2), dilation=(1, 2)),
        nn.Conv2d(2, 3, 1),
        nn.Conv3d(2, 3, 2),
    ],
    ids=["conv1d", "conv2d-any-shape", "conv2d-1x1", "conv3d"],
)
def test_conv_also_convolves_with_w0_hadamard_the_factors_kernel(conv):
    torch.manual_seed(0)
    model, adapter = _single(conv, r=2)
    a, b = adapter.hira_A.detach(), adapter.hira_B.detach()
    assert a.shape == (2, 2, *conv.kernel_size) and b.shape == (3, 2, *[1] * (conv.weight.dim() - 2))
    m = (b.reshape(3, 2) @ a.reshape(2, -1)).reshape(conv.weight.shape)
    x = torch.randn(2, 2, *[6] * (conv.weight.dim() - 2))
    expected = conv(x) + conv._conv_forward(x, conv.weight * m, None)
    assert torch.allclose(model(x), expected, atol=1e-4)


@pytest.mark.parametrize("layer", [nn.Linear(6, 4), Conv1D(4, 6), nn.Embedding(12, 5), nn.Conv2d(2, 3, 3)])
def test_merge_writes_w0_times_one_plus_m_and_unmerge_restores_it(layer):
    torch.manual_seed(0)
    model, adapter = _single(layer, r=2)
    x = (
        torch.randint(0, 12, (3, 4))
        if isinstance(layer, nn.Embedding)
        else torch.randn(3, *{nn.Linear: (6,), Conv1D: (6,), nn.Conv2d: (2, 5, 5)}[type(layer)])
    )
    unmerged = model(x)
    peftkit.merge(model, safe=True)
    weight = model[0].base_layer.weight.detach()
    assert torch.allclose(weight, layer.weight * (1 + adapter.modulation(layer.weight)), atol=1e-5)
    assert torch.allclose(model(x), unmerged, atol=1e-4)
    peftkit.unmerge(model)
    assert torch.allclose(model[0].base_layer.weight, layer.weight, rtol=1e-6, atol=0)


def test_unmerge_is_exact_to_rounding_where_one_plus_m_is_tiny():
    torch.manual_seed(0)
    layer = nn.Linear(4, 3)
    model, adapter = _single(layer, r=1)
    with torch.no_grad():  # M = -1 + 1e-4 everywhere: the merged weight is W0 / 10^4
        adapter.hira_A.fill_(1.0)
        adapter.hira_B.fill_(-1 + 1e-4)
    peftkit.merge(model)
    peftkit.unmerge(model)
    assert torch.allclose(model[0].base_layer.weight, layer.weight, rtol=1e-5, atol=0)


def test_merge_beside_another_adapter_on_the_same_layer_is_refused():
    model = nn.Sequential(nn.Linear(8, 3))
    peftkit.inject(model, HiraConfig(r=2, target_modules=["0"], init_weights=False), "a")
    peftkit.inject(model, HiraConfig(r=2, target_modules=["0"], init_weights=False), "b")
    peftkit.set_active(model, ["a", "b"])
    with pytest.raises(AdapterNameError, match="cannot merge"):
        peftkit.merge(model)
    peftkit.set_active(model, "a")
    peftkit.merge(model)


# -- inits ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("init", [True, "gaussian"])
@pytest.mark.parametrize("kind", ["Linear", "Embedding", "Conv2d"])
def test_default_inits_start_at_the_base(init, kind):
    torch.manual_seed(0)
    layer, x = {
        "Linear": (nn.Linear(6, 4), torch.randn(3, 6)),
        "Embedding": (nn.Embedding(10, 4), torch.randint(0, 10, (3, 2))),
        "Conv2d": (nn.Conv2d(2, 3, 3), torch.randn(2, 2, 5, 5)),
    }[kind]
    model = peftkit.inject(
        nn.Sequential(copy.deepcopy(layer)), HiraConfig(r=4, init_weights=init, target_modules=["0"])
    )
    assert torch.equal(model(x), layer(x))
    params = dict(model[0].adapters["default"].named_parameters())
    zero = "hira_embedding_A" if kind == "Embedding" else "hira_B"
    assert not params[zero].any() and all(p.any() for n, p in params.items() if n != zero)


def test_gaussian_init_draws_a_with_std_one_over_r():
    torch.manual_seed(0)
    model = peftkit.inject(
        nn.Sequential(nn.Linear(400, 4)), HiraConfig(r=8, init_weights="gaussian", target_modules=["0"])
    )
    assert abs(model[0].adapters["default"].hira_A.std().item() - 1 / 8) < 0.01


def test_saved_keys_and_shapes_are_the_references():
    model = peftkit.inject(cm.base("EmbConv1D"), HiraConfig(r=4, target_modules=["emb", "conv1d", "lin0"]))
    assert {k: tuple(v.shape) for k, v in peftkit.adapter_state_dict(model).items()} == {
        "base_model.model.emb.hira_embedding_A": (4, 100),
        "base_model.model.emb.hira_embedding_B": (5, 4),
        "base_model.model.conv1d.hira_A": (4, 5),
        "base_model.model.conv1d.hira_B": (1, 4),
        "base_model.model.lin0.hira_A": (4, 10),
        "base_model.model.lin0.hira_B": (2, 4),
    }


def test_rank_pattern_warns_and_is_ignored_as_the_reference_ignores_it():
    with pytest.warns(UserWarning, match="rank_pattern=.* is ignored"):
        config = HiraConfig(r=4, target_modules=["lin0", "lin1"], rank_pattern={"lin1": 2})
    model = peftkit.inject(cm.base("MLP"), config)
    assert model.lin1.adapters["default"].hira_A.shape == (4, 20)
    theirs = peft.get_peft_model(
        cm.base("MLP"), peft.HiraConfig(r=4, target_modules=["lin1"], rank_pattern={"lin1": 2})
    )
    assert theirs.base_model.model.lin1.hira_A["default"].shape == (4, 20)


# -- errors ---------------------------------------------------------------------------------------


def test_config_reports_every_problem_at_once():
    with pytest.raises(ConfigError) as info:
        HiraConfig(r=0, hira_dropout=1.5, init_weights="pissa", alpha_pattern={"q": 2})
    text = str(info.value)
    assert "4 problem" in text
    for needle in ("r: must be a positive integer", "hira_dropout", "init_weights", "alpha_pattern"):
        assert needle in text, needle


def test_grouped_convolutions_are_refused_when_named():
    with pytest.raises(UnsupportedLayerError, match="groups=2"):
        peftkit.inject(nn.Sequential(nn.Conv2d(4, 4, 3, groups=2)), HiraConfig(r=2, target_modules=["0"]))


# -- parity with the reference library ------------------------------------------------------------

# The reference matrix's 14 HiRA cases (name, model, options), then what it does not cover.
CASES = [
    ("Vanilla MLP 1 HiRA", "MLP", {"target_modules": "lin0"}),
    ("Vanilla MLP 2 HiRA", "MLP", {"target_modules": ["lin0"]}),
    ("Vanilla MLP 3 HiRA", "MLP", {"target_modules": ["lin1"]}),
    ("Vanilla MLP 4 HiRA", "MLP", {"target_modules": ["lin0", "lin1"]}),
    ("Vanilla MLP 5 HiRA", "MLP", {"target_modules": ["lin0"], "modules_to_save": ["lin1"]}),
    ("Vanilla MLP 6 HiRA", "MLP", {"target_modules": ["lin0"], "hira_dropout": 0.1}),
    ("Embedding + transformers Conv1D 1 HiRA", "EmbConv1D", {"target_modules": ["conv1d"]}),
    ("Embedding + transformers Conv1D 2 HiRA", "EmbConv1D", {"target_modules": ["emb"]}),
    ("Embedding + transformers Conv1D 3 HiRA", "EmbConv1D", {"target_modules": ["emb", "conv1d"]}),
    ("Conv1d HiRA", "Conv1d", {"target_modules": ["conv1d"]}),
    ("Conv2d 1 HiRA", "Conv2d", {"target_modules": ["conv2d"]}),
    ("Conv2d 2 HiRA", "Conv2d", {"target_modules": ["conv2d", "lin0"]}),
    ("Conv3d 1 HiRA", "Conv3d", {"target_modules": ["conv3d"]}),
    ("Conv3d 2 HiRA", "Conv3d", {"target_modules": ["conv3d", "lin0"]}),
    (
        "MLP HiRA rank_pattern",
        "MLP",
        {"target_modules": ["lin0", "lin1"], "r": 4, "rank_pattern": {"lin1": 2}},
    ),
    ("MLP HiRA gaussian init", "MLP", {"target_modules": ["lin0"], "r": 4, "init_weights": "gaussian"}),
    (
        "Conv2d HiRA random init",
        "Conv2d",
        {"target_modules": ["conv2d", "lin0"], "r": 2, "init_weights": False},
    ),
]
REFERENCE_CASES = 14


def _configs(options):
    return HiraConfig(**copy.deepcopy(options)), peft.HiraConfig(**copy.deepcopy(options))


def test_the_reference_matrix_is_covered():
    assert len([c for c in CASES if c[0].endswith(" HiRA")]) == REFERENCE_CASES


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("direction", cm.DIRECTIONS)
@pytest.mark.filterwarnings("ignore:fan_in_fan_out is set to False:UserWarning")  # peft, on GPT-2's Conv1D
@pytest.mark.filterwarnings("ignore:HiRA rank_pattern:UserWarning")
def test_parity_with_the_reference(direction, case, tmp_path):
    _, model_id, options = case
    cm.assert_parity(direction, model_id, *_configs(options), tmp_path)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@pytest.mark.filterwarnings("ignore:HiRA rank_pattern:UserWarning")
@pytest.mark.filterwarnings("ignore:fan_in_fan_out is set to False:UserWarning")
def test_a_fresh_adapter_has_the_same_tensors_and_config_in_both(case, tmp_path):
    _, model_id, options = case
    ours_config, theirs_config = _configs(options)
    ours = peftkit.inject(cm.base(model_id), ours_config)
    theirs = peft.get_peft_model(cm.base(model_id), theirs_config)
    keys = ("r", "hira_dropout", "init_weights", "fan_in_fan_out", "rank_pattern")
    cm.assert_same_fresh_adapter(ours, theirs, ours_config, tmp_path, keys, ignore=("HiRA rank_pattern",))


def test_docs_example_runs(capsys):
    text = (Path(__file__).resolve().parents[2] / "docs" / "hira.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert len(blocks) == 1
    exec(compile(blocks[0], "docs/hira.md", "exec"), {"__name__": "docs_hira"})
    assert "merged vs unmerged" in capsys.readouterr().out

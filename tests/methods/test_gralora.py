"""GraLoRA: the block grid against its definition, the factor form, inits, errors, and parity with the
reference library.

Parity: every GraLoRA case of the reference's custom-model matrix (peft 0.21.2, tests/test_custom_models.py:
8 cases on MLP and EmbConv1D), both ways (trained by one library, saved, loaded by the other), unmerged and
merged, float32 max abs diff <= 1e-5; plus k = 4, a bigger hybrid rank and a random init, which that matrix
does not cover.
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
from peftkit.errors import ConfigError, UnsupportedLayerError
from peftkit.methods.gralora import GraloraConfig
from support import custom_models as cm

peft = pytest.importorskip("peft")

pytestmark = [
    pytest.mark.usefixtures("one_thread"),  # tiny models: one intra-op thread is fastest
    pytest.mark.filterwarnings(
        "ignore:All adapters are already merged:UserWarning"
    ),  # peft's merge_and_unload
    pytest.mark.filterwarnings(
        "ignore:fan_in_fan_out is set to False:UserWarning"
    ),  # peft, on GPT-2's Conv1D
]


def _single(layer: nn.Module, **options) -> tuple[nn.Module, nn.Module]:
    """(adapted model, the adapter) on one copy of ``layer``, A and B random."""
    model = peftkit.inject(
        nn.Sequential(copy.deepcopy(layer)),
        GraloraConfig(target_modules=["0"], init_weights=False, **options),
    )
    return model, model[0].adapters["default"]


def _grid(adapter) -> torch.Tensor:
    """The unscaled update (out x in) built block by block from the paper's definition: block (j, n) is
    the pair (A_jn, B_jn) = (column slice j of A[n], row slice n of B[j]), each of rank r/k."""
    a, b = adapter.gralora_A.detach(), adapter.gralora_B.detach()
    k, s = adapter.k, adapter.r // adapter.k
    rows = []
    for j in range(k):
        blocks = [(a[n][:, j * s : (j + 1) * s] @ b[j][n * s : (n + 1) * s, :]).T for n in range(k)]
        rows.append(torch.cat(blocks, dim=1))
    return torch.cat(rows, dim=0)


# -- the update -----------------------------------------------------------------------------------


@pytest.mark.parametrize("k, r", [(1, 2), (2, 4), (3, 6), (4, 4)])
def test_forward_and_delta_are_the_block_grid(k, r):
    torch.manual_seed(0)
    layer = nn.Linear(12, 24)
    model, adapter = _single(layer, r=r, gralora_k=k, alpha=3)
    assert adapter.gralora_A.shape == (k, 12 // k, r) and adapter.gralora_B.shape == (k, r, 24 // k)
    delta = _grid(adapter) * 3 / r
    assert torch.allclose(adapter.delta_weight(layer.weight.detach()), delta, atol=1e-6)
    x = torch.randn(2, 5, 12)  # leading dims of any number
    assert torch.allclose(model(x), layer(x) + x @ delta.T, atol=1e-5)
    left, right = adapter.delta_factors(layer.weight)
    assert left.shape == (24, k * r) and torch.allclose(left @ right, delta, atol=1e-6)


def test_block_pairs_touch_only_their_block():
    torch.manual_seed(0)
    model, adapter = _single(nn.Linear(8, 8), r=4, gralora_k=2)
    with torch.no_grad():  # keep only the pair of output block 1, input block 0
        adapter.gralora_A[1].zero_()
        adapter.gralora_A[0][:, :2].zero_()
    delta = adapter.delta_weight(model[0].base_layer.weight.detach())
    assert delta[4:, :4].abs().sum() > 0
    assert not delta[:4].any() and not delta[:, 4:].any()


def test_hybrid_adds_a_lora_pair_at_the_same_scale():
    torch.manual_seed(0)
    layer = nn.Linear(8, 6)
    model, adapter = _single(layer, r=4, hybrid_r=2, alpha=12)
    g = adapter.gralora_B_general.weight.detach() @ adapter.gralora_A_general.weight.detach()
    delta = (_grid(adapter) + g) * 12 / (4 + 2)
    assert torch.allclose(adapter.delta_weight(layer.weight.detach()), delta, atol=1e-6)
    x = torch.randn(3, 8)
    assert torch.allclose(model(x), layer(x) + x @ delta.T, atol=1e-5)


def test_conv1d_gpt2_reads_its_transposed_weight_and_merges_back():
    torch.manual_seed(0)
    layer = Conv1D(6, 4)  # in 4, out 6, weight stored (4, 6)
    model, adapter = _single(layer, r=2, hybrid_r=1)
    delta = (
        _grid(adapter) + adapter.gralora_B_general.weight.detach() @ adapter.gralora_A_general.weight.detach()
    )
    delta = delta * 64 / 3
    x = torch.randn(3, 4)
    assert torch.allclose(model(x), layer(x) + x @ delta.T, atol=1e-4)
    unmerged = model(x)
    peftkit.merge(model, safe=True)
    assert torch.allclose(model[0].base_layer.weight, layer.weight + delta.T, atol=1e-5)
    assert torch.allclose(model(x), unmerged, atol=1e-4)
    peftkit.unmerge(model)
    assert torch.allclose(model[0].base_layer.weight, layer.weight, atol=1e-6)


def test_combine_sums_gralora_adapters_exactly_through_their_factors():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6))
    for name in ("a", "b"):
        peftkit.inject(model, GraloraConfig(r=2, target_modules=["0"], init_weights=False), name)
    x = torch.randn(3, 8)
    peftkit.set_active(model, ["a", "b"])
    both = model(x)
    peftkit.combine(model, ["a", "b"], [1.0, 1.0], name="sum")
    peftkit.set_active(model, "sum")
    assert torch.allclose(model(x), both, atol=1e-5)


# -- inits ----------------------------------------------------------------------------------------


def test_default_init_starts_at_the_base_and_keeps_lora_counts():
    torch.manual_seed(0)
    layer = nn.Linear(8, 6)
    model = peftkit.inject(
        nn.Sequential(copy.deepcopy(layer)), GraloraConfig(r=4, hybrid_r=2, target_modules=["0"])
    )
    x = torch.randn(3, 8)
    assert torch.equal(model(x), layer(x))
    adapter = model[0].adapters["default"]
    assert not adapter.gralora_B.any() and not adapter.gralora_B_general.weight.any()
    assert sum(p.numel() for p in adapter.parameters()) == (4 + 2) * (8 + 6)  # LoRA's at rank r + hybrid_r


def test_saved_keys_and_shapes_are_the_references():
    model = peftkit.inject(cm.base("MLP"), GraloraConfig(r=4, hybrid_r=2, target_modules=["lin0", "lin1"]))
    assert {k: tuple(v.shape) for k, v in peftkit.adapter_state_dict(model).items()} == {
        "base_model.model.lin0.gralora_A": (2, 5, 4),
        "base_model.model.lin0.gralora_B": (2, 4, 10),
        "base_model.model.lin0.gralora_A_general.weight": (2, 10),
        "base_model.model.lin0.gralora_B_general.weight": (20, 2),
        "base_model.model.lin1.gralora_A": (2, 10, 4),
        "base_model.model.lin1.gralora_B": (2, 4, 1),
        "base_model.model.lin1.gralora_A_general.weight": (2, 20),
        "base_model.model.lin1.gralora_B_general.weight": (2, 2),
    }


# -- errors ---------------------------------------------------------------------------------------


def test_config_reports_every_problem_at_once():
    with pytest.raises(ConfigError) as info:
        GraloraConfig(r=6, gralora_k=4, hybrid_r=-1, alpha=0, bias="lora_only", exclude_modules=["x"])
    text = str(info.value)
    assert "5 problem" in text
    for needle in ("multiple of gralora_k=4", "hybrid_r", "alpha", "'gralora_only'", "exclude_modules"):
        assert needle in text, needle


def test_layers_not_divisible_by_k_are_refused_with_the_fix():
    with pytest.raises(UnsupportedLayerError, match="multiples of 2; this layer has 7 in and 4 out"):
        peftkit.inject(nn.Sequential(nn.Linear(7, 4)), GraloraConfig(r=2, target_modules=["0"]))
    with pytest.raises(UnsupportedLayerError):
        peftkit.inject(nn.Sequential(nn.Conv2d(4, 4, 3)), GraloraConfig(r=2, target_modules=["0"]))


# -- parity with the reference library ------------------------------------------------------------

# The reference matrix's 8 GraLoRA cases (name, model, options), then what it does not cover.
CASES = [
    ("Vanilla MLP 1 GraLoRA", "MLP", {"target_modules": "lin0"}),
    ("Vanilla MLP 2 GraLoRA", "MLP", {"target_modules": ["lin0"]}),
    ("Vanilla MLP 3 GraLoRA", "MLP", {"target_modules": ["lin1"]}),
    ("Vanilla MLP 4 GraLoRA", "MLP", {"target_modules": ["lin0", "lin1"]}),
    ("Vanilla MLP 5 GraLoRA", "MLP", {"target_modules": ["lin0"], "modules_to_save": ["lin1"]}),
    ("Vanilla MLP 6 GraLoRA", "MLP", {"target_modules": ["lin0", "lin1"], "modules_to_save": ["lin1"]}),
    (
        "Vanilla MLP 7 Hybrid GraLoRA",
        "MLP",
        {"target_modules": ["lin0", "lin1"], "modules_to_save": ["lin1"], "hybrid_r": 4},
    ),
    (
        "Embedding + transformers Conv1D 1 GraLoRA",
        "EmbConv1D",
        {"target_modules": ["conv1d"], "gralora_k": 1},
    ),
    (
        "MLP GraLoRA hybrid random init",
        "MLP",
        {"target_modules": ["lin0"], "r": 4, "hybrid_r": 6, "gralora_dropout": 0.1, "init_weights": False},
    ),
]
REFERENCE_CASES = 8


def _configs(options):
    return GraloraConfig(**copy.deepcopy(options)), peft.GraloraConfig(**copy.deepcopy(options))


def test_the_reference_matrix_is_covered():
    assert len([c for c in CASES if c[0].endswith(" GraLoRA")]) == REFERENCE_CASES


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
        ("r", "hybrid_r", "alpha", "gralora_dropout", "gralora_k", "bias", "init_weights"),
    )


@pytest.mark.parametrize("k", [3, 4])
@pytest.mark.parametrize("direction", cm.DIRECTIONS)
def test_parity_with_the_reference_on_finer_grids(direction, k, tmp_path):
    """k > 2 (no model of the matrix has features divisible by 3 or 4): random adapters, moved across."""

    def base():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(12, 24), nn.Tanh(), nn.Linear(24, 12)).eval()

    options = {"target_modules": ["0", "2"], "r": 2 * k, "gralora_k": k, "hybrid_r": 1, "init_weights": False}
    torch.manual_seed(1)
    if direction == "peftkit->peft":
        ours = peftkit.inject(base(), GraloraConfig(**options))
        peftkit.save_adapter(ours, tmp_path)
        theirs = peft.PeftModel.from_pretrained(base(), tmp_path).eval()
    else:
        theirs = peft.get_peft_model(base(), peft.GraloraConfig(**options)).eval()
        theirs.save_pretrained(tmp_path)
        ours = peftkit.load_adapter(base(), tmp_path)
    x = torch.randn(5, 12)
    with torch.no_grad():
        assert (ours(x) - base()(x)).abs().max() > 1e-3
        assert (ours(x) - theirs(x)).abs().max() <= cm.ATOL
        peftkit.merge(ours)
        theirs.merge_adapter()
        assert (ours(x) - theirs(x)).abs().max() <= cm.ATOL


def test_docs_example_runs(capsys):
    text = (Path(__file__).resolve().parents[2] / "docs" / "gralora.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert len(blocks) == 1
    exec(compile(blocks[0], "docs/gralora.md", "exec"), {"__name__": "docs_gralora"})
    assert "merged vs unmerged" in capsys.readouterr().out

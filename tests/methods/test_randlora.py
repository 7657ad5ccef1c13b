"""RandLoRA: the shared bases, the update and its basis pairing, options, errors, and parity with the
reference library.

Parity: every RandLoRA case of the reference's custom-model matrix (peft 0.21.2, tests/test_custom_models.py:
7 cases on MLP, dense, sparse and very sparse bases), both ways (trained by one library, saved, loaded by
the other), unmerged and merged, float32 max abs diff <= 1e-5; plus unsaved projections, a random init,
several bases per layer and GPT-2's Conv1D, which that matrix does not cover.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import peftkit
from peftkit.errors import AdapterFileError, ConfigError, UnsupportedLayerError
from peftkit.methods.randlora import RandLoraBases, RandLoraConfig, RandLoraLinear, random_bases
from support import custom_models as cm

peft = pytest.importorskip("peft")
from peft.utils import get_peft_model_state_dict  # noqa: E402

pytestmark = [
    pytest.mark.usefixtures("one_thread"),  # tiny models: one intra-op thread is fastest
    pytest.mark.filterwarnings(
        "ignore:All adapters are already merged:UserWarning"
    ),  # peft's merge_and_unload
    pytest.mark.filterwarnings("ignore:Specified to not save:UserWarning"),  # peft, save_projection=False
    pytest.mark.filterwarnings("ignore:fan_in_fan_out is set to:UserWarning"),  # peft, on GPT-2's Conv1D
]


class One(nn.Module):
    """One layer (not an nn.Sequential, which would also call the model-level part)."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = copy.deepcopy(layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


def _single(layer: nn.Module, **options) -> tuple[nn.Module, RandLoraLinear]:
    model = peftkit.inject(
        One(layer), RandLoraConfig(target_modules=["layer"], init_weights=False, **options)
    )
    return model, model.layer.adapters["default"]


def _paired_delta(adapter: RandLoraLinear, part: RandLoraBases, in_features: int, out_features: int):
    """delta W (out x in) written out index by index: the reference's pairing of A's rank-major rows with
    B's basis-major columns (see the module docstring of peftkit.methods.randlora)."""
    lam, gam = adapter.randlora_lambda.detach(), adapter.randlora_gamma.detach()
    r, n = lam.shape
    small, large = min(in_features, out_features), max(in_features, out_features)
    a, b = part.randlora_A[:, 0, :small], part.randlora_B[:large, :n, :]
    delta = torch.zeros(large, small)
    for k in range(r * n):
        i, basis = divmod(k, n)  # row k of the scaled A: rank i of basis `basis`
        column = b[:, k // r, k % r]  # column k of the flattened B: basis k // r, rank k % r
        delta += torch.outer(column, lam[i, basis] * a[i] * gam[basis])
    delta *= adapter.scaling
    return delta if in_features <= out_features else delta.T


# -- the update -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("fan_in", "fan_out"), [(5, 9), (9, 5), (6, 6)], ids=["in<out", "in>out", "square"])
def test_delta_is_the_sum_over_bases_with_the_references_pairing(fan_in, fan_out):
    torch.manual_seed(0)
    layer = nn.Linear(fan_in, fan_out)
    model, adapter = _single(layer, r=2, randlora_alpha=3.0)
    part = model.peftkit_parts["default"]
    small = min(fan_in, fan_out)
    assert adapter.randlora_lambda.shape == (2, 3) and adapter.randlora_gamma.shape == (3, small)
    expected = _paired_delta(adapter, part, fan_in, fan_out)
    assert torch.allclose(adapter.delta_weight(layer.weight), expected, atol=1e-5)
    x = torch.randn(4, fan_in)
    assert torch.allclose(model(x), layer(x) + x @ expected.T, atol=1e-5)


def test_one_basis_is_the_papers_update():
    """With N = 1 (r >= the smaller side) there is nothing to mispair: B Λ A Γ exactly."""
    torch.manual_seed(0)
    layer = nn.Linear(4, 7)
    model, adapter = _single(layer, r=8, randlora_alpha=8.0)
    part = model.peftkit_parts["default"]
    lam, gam = adapter.randlora_lambda.detach()[:, 0], adapter.randlora_gamma.detach()[0]
    b, a = part.randlora_B[:7, 0, :], part.randlora_A[:, 0, :4]
    assert torch.allclose(
        adapter.delta_weight(layer.weight), b @ torch.diag(lam) @ a @ torch.diag(gam), atol=1e-5
    )


def test_the_scales_backward_equals_autograds():
    torch.manual_seed(0)
    model, adapter = _single(nn.Linear(5, 7), r=2)
    model.double()
    x = torch.randn(3, 5, dtype=torch.float64)
    model(x).pow(2).sum().backward()
    ours = adapter.randlora_lambda.grad.clone(), adapter.randlora_gamma.grad.clone()
    part = model.peftkit_parts["default"]
    lam = adapter.randlora_lambda.detach().clone().requires_grad_()
    gam = adapter.randlora_gamma.detach().clone().requires_grad_()
    scaled = (lam[:, :, None] * part.randlora_A[:, :, :5] * gam[None]).flatten(0, 1)
    wide = part.randlora_B[:7, :3, :].flatten(1)
    delta = (x @ scaled.T) @ wide.T * adapter.scaling
    (model.layer.base_layer(x) + delta).pow(2).sum().backward()
    assert torch.allclose(ours[0], lam.grad) and torch.allclose(ours[1], gam.grad)


def test_conv1d_gpt2_transposes_its_delta():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    layer = Conv1D(7, 4)  # in 4, out 7, weight stored (4, 7)
    model, adapter = _single(layer, r=3, randlora_alpha=3.0)
    delta = adapter.delta_weight(layer.weight)
    assert delta.shape == (4, 7)
    x = torch.randn(2, 4)
    assert torch.allclose(model(x), layer(x) + x @ delta, atol=1e-5)
    assert peftkit.adapter_config(model).fan_in_fan_out is True


def test_default_init_starts_at_the_base_with_the_references_scales():
    torch.manual_seed(0)
    layer = nn.Linear(10, 20)
    model = peftkit.inject(One(layer), RandLoraConfig(r=4, target_modules=["layer"]))
    adapter = model.layer.adapters["default"]
    x = torch.randn(3, 10)
    assert torch.equal(model(x), layer(x))
    assert not adapter.randlora_lambda.any()
    assert torch.all(adapter.randlora_gamma == 1 / 10)  # 1 / max(N, min): 1 / min
    _, random = _single(layer, r=4)
    assert torch.all(random.randlora_gamma == 1 / 20)  # the reference's other init: 1 / max(in, out)


def test_trainable_numbers_per_layer_are_r_n_plus_n_min():
    model = peftkit.inject(cm.base("MLP"), RandLoraConfig(r=3, target_modules=["lin0", "lin1"]))
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    # lin0: 10 -> 20, N = ceil(10 / 3) = 4; lin1: 20 -> 2, N = 1
    assert trainable == {
        "lin0.adapters.default.randlora_lambda": 3 * 4,
        "lin0.adapters.default.randlora_gamma": 4 * 10,
        "lin1.adapters.default.randlora_lambda": 3 * 1,
        "lin1.adapters.default.randlora_gamma": 1 * 2,
    }
    part = model.peftkit_parts["default"]
    assert not list(part.parameters()), "the bases must be buffers, never trained"
    # sized for the largest target in each dimension: out 20, in 20 -> min 20, N = 7
    assert part.randlora_A.shape == (3, 1, 20) and part.randlora_B.shape == (20, 7, 3)


# -- the shared bases -----------------------------------------------------------------------------


def _tiny_llama() -> nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=64,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize(
    "kind", [{}, {"sparse": True}, {"very_sparse": True}, {"sparse": True, "very_sparse": True}]
)
def test_bases_equal_the_reference_generator(kind):
    targets = ["q_proj", "k_proj", "v_proj", "gate_proj", "down_proj"]
    for key in (0, 1234):
        base = _tiny_llama()
        ours = peftkit.inject(
            copy.deepcopy(base), RandLoraConfig(r=8, target_modules=targets, projection_prng_key=key, **kind)
        )
        theirs = peft.get_peft_model(
            copy.deepcopy(base),
            peft.RandLoraConfig(r=8, target_modules=list(targets), projection_prng_key=key, **kind),
        )
        part = ours.peftkit_parts["default"]
        assert part.randlora_A.shape == (8, 1, 48) and part.randlora_B.shape == (48, 6, 8)
        assert torch.equal(part.randlora_A, theirs.base_model.randlora_A["default"])
        assert torch.equal(part.randlora_B, theirs.base_model.randlora_B["default"])


def test_sparse_bases_are_ternary_at_unit_std():
    a, b = random_bases(4, 64, 32, key=0, sparse=True)
    for t in (a, b):
        levels = torch.unique(t)
        assert len(levels) == 3 and torch.allclose(levels, levels[2] * torch.tensor([-1.0, 0.0, 1.0]))
        assert abs(t.std().item() - 1) < 1e-5
    dense, _ = random_bases(4, 64, 32, key=0)
    assert dense.dtype == torch.float32 and torch.equal(dense, dense.bfloat16().float())  # drawn in bf16


def test_saved_keys_are_the_references_with_the_bases_under_every_layer():
    model = peftkit.inject(cm.base("MLP"), RandLoraConfig(target_modules=["lin0", "lin1"]))
    theirs = peft.get_peft_model(cm.base("MLP"), peft.RandLoraConfig(target_modules=["lin0", "lin1"]))
    ours = {k: tuple(v.shape) for k, v in peftkit.adapter_state_dict(model).items()}
    assert ours == {k: tuple(v.shape) for k, v in get_peft_model_state_dict(theirs).items()}
    assert {"base_model.randlora_A", "base_model.model.lin1.randlora_A"} <= set(ours)
    unsaved = peftkit.inject(cm.base("MLP"), RandLoraConfig(target_modules=["lin0"], save_projection=False))
    assert set(peftkit.adapter_state_dict(unsaved)) == {
        "base_model.model.lin0.randlora_lambda",
        "base_model.model.lin0.randlora_gamma",
    }


def test_a_file_whose_copies_of_the_bases_disagree_is_refused(tmp_path):
    model = peftkit.inject(cm.base("MLP"), RandLoraConfig(r=4, target_modules=["lin0", "lin1"]))
    peftkit.save_adapter(model, tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(path)
    tensors["base_model.model.lin1.randlora_A"] = tensors["base_model.model.lin1.randlora_A"] * 2
    save_file(tensors, path)
    fresh = cm.base("MLP")
    with pytest.raises(AdapterFileError, match="randlora_A"):
        peftkit.load_adapter(fresh, tmp_path)
    assert isinstance(fresh.lin0, nn.Linear)


def test_unsaved_bases_are_regenerated_from_the_key(tmp_path):
    model = peftkit.inject(
        cm.base("MLP"),
        RandLoraConfig(
            r=4,
            target_modules=["lin0", "lin1"],
            save_projection=False,
            projection_prng_key=7,
            init_weights=False,
        ),
    )
    peftkit.save_adapter(model, tmp_path)
    x = cm.inputs(0)
    fresh = peftkit.load_adapter(cm.base("MLP"), tmp_path)
    assert torch.equal(fresh(x), model(x))


def test_each_adapter_has_its_own_bases_and_unload_removes_them():
    model = cm.base("MLP")
    x = cm.inputs(0)
    base = model(x).detach()
    options = {"init_weights": False, "randlora_alpha": 1}
    peftkit.inject(model, RandLoraConfig(r=4, target_modules=["lin0", "lin1"], **options))
    peftkit.inject(
        model, RandLoraConfig(r=6, target_modules=["lin0"], projection_prng_key=3, **options), "other"
    )
    parts = model.peftkit_parts
    assert parts["default"].randlora_A.shape == (4, 1, 20) and parts["other"].randlora_A.shape == (6, 1, 10)
    peftkit.set_active(model, ["default", "other"])
    both = model(x).detach()
    peftkit.merge(model, safe=True)  # additive: exact beside another adapter on the same layer
    assert (model(x) - both).abs().max() <= 1e-5
    peftkit.unmerge(model)
    peftkit.set_active(model, "default")
    peftkit.delete_adapter(model, "other")
    assert list(model.peftkit_parts) == ["default"]
    peftkit.unload(model)
    assert "peftkit_parts" not in model._modules and (model(x) - base).abs().max() <= 1e-5


def test_randlora_only_bias_trains_the_adapted_layers_biases():
    model = peftkit.inject(cm.base("MLP"), RandLoraConfig(r=4, target_modules=["lin0"], bias="randlora_only"))
    assert model.lin0.base_layer.bias.requires_grad and not model.lin1.bias.requires_grad
    assert "base_model.model.lin0.base_layer.bias" in peftkit.adapter_state_dict(model)


# -- errors ---------------------------------------------------------------------------------------


def test_defaults_follow_the_reference_config():
    ours, theirs = RandLoraConfig(), peft.RandLoraConfig()
    for key in (
        "r",
        "projection_prng_key",
        "save_projection",
        "sparse",
        "very_sparse",
        "randlora_dropout",
        "randlora_alpha",
        "fan_in_fan_out",
        "bias",
        "init_weights",
    ):
        assert getattr(ours, key) == getattr(theirs, key), key


def test_every_config_problem_is_reported_at_once():
    with pytest.raises(ConfigError) as info:
        RandLoraConfig(
            r=0,
            projection_prng_key="seed",
            sparse="yes",
            randlora_dropout=1.5,
            randlora_alpha=float("inf"),
            bias="lora_only",
            rank_pattern={"lin0": 2},
        )
    problems = info.value.problems
    for field in ("r:", "projection_prng_key:", "sparse:", "randlora_dropout:", "randlora_alpha:", "bias:"):
        assert any(p.startswith(field) for p in problems), (field, problems)
    assert any(p.startswith("rank_pattern:") for p in problems)


def test_unsupported_layers_and_layers_too_large_for_the_bases_are_refused():
    model = cm.base("Conv2d")
    with pytest.raises(UnsupportedLayerError, match="conv2d"):
        peftkit.inject(model, RandLoraConfig(target_modules=["conv2d", "lin0"]))
    assert isinstance(model.lin0, nn.Linear) and "peftkit_parts" not in model._modules
    part = RandLoraBases(*random_bases(3, 4, 6, key=0), save_projection=True)
    with pytest.raises(UnsupportedLayerError, match=r"larger side 10"):
        RandLoraLinear(nn.Linear(4, 10), r=3, alpha=3, dropout=0.0, init_weights=True, part=part)


# -- parity with the reference library ------------------------------------------------------------

# The reference matrix's 7 RandLoRA cases (name, model, options), then what it does not cover.
CASES = [
    ("Vanilla MLP 1 RandLora", "MLP", {"target_modules": "lin0", "randlora_alpha": 1}),
    ("Vanilla MLP 2 RandLora", "MLP", {"target_modules": ["lin0"], "randlora_alpha": 1}),
    ("Vanilla MLP 3 RandLora", "MLP", {"target_modules": ["lin1"], "randlora_alpha": 1}),
    ("Vanilla MLP 4 RandLora", "MLP", {"target_modules": ["lin0", "lin1"], "randlora_alpha": 1}),
    (
        "Vanilla MLP 5 RandLora",
        "MLP",
        {"target_modules": ["lin0", "lin1"], "sparse": True, "randlora_alpha": 1},
    ),
    (
        "Vanilla MLP 6 RandLora",
        "MLP",
        {"target_modules": ["lin0", "lin1"], "very_sparse": True, "randlora_alpha": 1},
    ),
    (
        "Vanilla MLP 7 RandLora",
        "MLP",
        {"target_modules": ["lin0"], "modules_to_save": ["lin1"], "randlora_alpha": 1},
    ),
    (
        "MLP RandLoRA several bases, unsaved projections",
        "MLP",
        {"target_modules": ["lin0", "lin1"], "r": 3, "randlora_alpha": 3, "save_projection": False},
    ),
    (
        "MLP RandLoRA random init, dropout",
        "MLP",
        {
            "target_modules": ["lin0", "lin1"],
            "r": 4,
            "randlora_alpha": 1,
            "init_weights": False,
            "randlora_dropout": 0.1,
        },
    ),
    ("EmbConv1D RandLoRA", "EmbConv1D", {"target_modules": ["conv1d", "lin0"], "r": 2, "randlora_alpha": 2}),
]
REFERENCE_CASES = 7


def _configs(options):
    return RandLoraConfig(**copy.deepcopy(options)), peft.RandLoraConfig(**copy.deepcopy(options))


def test_the_reference_matrix_is_covered():
    assert len([c for c in CASES if c[0].endswith(" RandLora")]) == REFERENCE_CASES


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
    ours_state = peftkit.adapter_state_dict(ours)
    theirs_state = get_peft_model_state_dict(theirs)
    assert {k: tuple(v.shape) for k, v in ours_state.items()} == {
        k: tuple(v.shape) for k, v in theirs_state.items()
    }
    for key, tensor in ours_state.items():  # the bases equal, and so does the initial gamma
        if "lambda" not in key and ".lin1.weight" not in key and ".lin1.bias" not in key:
            assert torch.equal(tensor, theirs_state[key]), key
    keys = ("r", "randlora_alpha", "sparse", "very_sparse", "save_projection", "projection_prng_key")
    cm.assert_same_fresh_adapter(ours, theirs, ours_config, tmp_path, keys, ignore=("Specified to not save",))


def test_docs_example_runs(capsys):
    text = (Path(__file__).resolve().parents[2] / "docs" / "randlora.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert len(blocks) == 1
    exec(compile(blocks[0], "docs/randlora.md", "exec"), {"__name__": "docs_randlora"})
    assert "RandLoRA trained" in capsys.readouterr().out

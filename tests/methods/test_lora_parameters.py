"""LoRA on parameters (``target_parameters``) and targeting that knows mixture-of-experts models (issue 21
items 1 and 2): tiny Qwen3-MoE, Mixtral and OLMoE models built from transformers 5 configs, and a plain
torch MoE block. Parity with the reference library is in tests/test_parity_moe.py."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch

import peftkit
from peftkit.core import moe, registry
from peftkit.core.layer import AdapterLayer
from peftkit.errors import AdapterNameError, ConfigError, NoTargetMatchedError, UnsupportedLayerError
from support.moe import ARCHS, MoEBlock, batch, tiny_transformers_moe

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning"),
    pytest.mark.usefixtures("one_thread"),
]


@pytest.fixture(scope="module")
def bases():
    return {arch: tiny_transformers_moe(arch) for arch in ARCHS}


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


# -- the structure ------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_stacked_experts_and_routers_are_found(bases, arch):
    blocks = moe.find(bases[arch])
    assert [b.experts for b in blocks] == [f"model.layers.{i}.mlp.experts" for i in range(2)]
    block = blocks[0]
    assert block.num_experts == 4 and not block.transposed
    assert block.router == "model.layers.0.mlp.gate" and not block.router_linear
    weights = {w.name.rpartition(".")[2]: (w.shape, w.maps) for w in block.weights}
    assert weights == {"gate_up_proj": ((4, 32, 32), 2), "down_proj": ((4, 32, 16), 1)}


def test_no_mixture_of_experts_on_dense_models_and_convolutions():
    import transformers

    llama = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=50,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
        )
    )
    assert moe.find(llama) == []
    assert moe.find(torch.nn.Sequential(torch.nn.Conv1d(4, 4, 3), torch.nn.Conv1d(4, 4, 3))) == []


# -- issue 21's measured case: every parameter adapted or skipped is reported ---------------------


def test_all_linear_on_qwen3_moe_adapts_and_reports_experts_and_routers(bases):
    model = peftkit.inject(
        copy.deepcopy(bases["qwen3_moe"]), peftkit.LoraConfig(r=4, target_modules="all-linear")
    )
    summary = peftkit.trainable_summary(model, show=False)
    adapted = {name: kind for name, kind, _, _ in summary.adapted}
    for i in range(2):
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            assert f"model.layers.{i}.self_attn.{proj}" in adapted
        layer = f"model.layers.{i}.mlp"
        # the fused gate-and-up stack at twice the rank, as the reference builds it
        assert adapted[f"{layer}.experts.gate_up_proj"] == "LoRA r=8 x 4 experts (4, 32, 32)"
        assert adapted[f"{layer}.experts.down_proj"] == "LoRA r=4 x 4 experts (4, 32, 16)"
        assert adapted[f"{layer}.gate.weight"] == "LoRA r=4 (4, 32)"
    assert len(summary.adapted) == 14 and summary.skipped == []
    experts = {name: status for name, _, status in summary.experts}
    assert len(experts) == 6 and all(s.startswith("adapted: default (LoRA") for s in experts.values())
    text = str(summary)
    assert "adapted modules: 8 | adapted parameters: 6" in text
    assert "model.layers.1.mlp.experts.down_proj" in text and "router (4, 32)" in text
    # recorded as explicit lists, which the reference library reads as the same adapter
    config = peftkit.adapter_config(model)
    assert config.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert config.target_parameters == ["gate_up_proj", "down_proj", "gate.weight"]
    assert config.rank_pattern == {r".*\.gate_up_proj": 8} and config.alpha_pattern == {
        r".*\.gate_up_proj": 16
    }


def test_experts_left_out_are_listed_as_frozen_with_the_fix(bases):
    model = peftkit.inject(
        copy.deepcopy(bases["qwen3_moe"]), peftkit.LoraConfig(target_modules=["q_proj", "v_proj"])
    )
    summary = peftkit.trainable_summary(model, show=False)
    assert [status for *_, status in summary.experts] == ["frozen, not adapted"] * 6
    assert "target_modules='all-linear' or target_parameters=[...] adapts them" in str(summary)
    # and on a model with no adapter at all
    assert len(peftkit.trainable_summary(bases["qwen3_moe"], show=False).experts) == 6


def test_router_trained_in_full_beside_expert_lora(bases):
    config = peftkit.LoraConfig(r=4, target_modules="all-linear", modules_to_save=["mlp.gate"])
    model = peftkit.inject(copy.deepcopy(bases["mixtral"]), config)
    summary = peftkit.trainable_summary(model, show=False)
    status = {name: s for name, _, s in summary.experts}
    assert status["model.layers.0.mlp.gate"] == "trained in full (modules_to_save): default"
    assert status["model.layers.0.mlp.experts.gate_up_proj"].startswith("adapted: default")
    assert not any(name.endswith("gate.weight") for name, *_ in summary.adapted)
    assert peftkit.adapter_config(model).target_parameters == ["gate_up_proj", "down_proj"]


def test_a_method_without_parameter_support_reports_what_all_linear_could_not_reach(bases):
    model = peftkit.inject(copy.deepcopy(bases["olmoe"]), peftkit.LoHaConfig(target_modules="all-linear"))
    skipped = {name: reason for name, _, reason in peftkit.trainable_summary(model, show=False).skipped}
    assert len(skipped) == 6
    assert "adapts modules only" in skipped["model.layers.0.mlp.experts.gate_up_proj"]


def test_per_expert_biases_are_reported_as_skipped():
    model = MoEBlock()
    model.experts.register_parameter("down_proj_bias", torch.nn.Parameter(torch.zeros(3, 6)))
    # the bias is never read by the forward: it only has to be reported
    peftkit.inject(model, peftkit.LoraConfig(target_modules="all-linear"))
    skipped = peftkit.trainable_summary(model, show=False).skipped
    assert [(n, r.split(";")[0]) for n, _, r in skipped] == [
        ("experts.down_proj_bias", "all-linear adapts the experts' weights")
    ]


# -- the forward, merging, gradients ------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_routed_forward_unmerged_equals_merged(bases, arch):
    model = peftkit.inject(
        copy.deepcopy(bases[arch]),
        peftkit.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False),
    )
    inputs = batch()
    base, unmerged = _logits(bases[arch], inputs), _logits(model, inputs)
    assert (unmerged - base).abs().max() > 1e-2
    peftkit.merge(model, safe=True)
    assert (_logits(model, inputs) - unmerged).abs().max() < 1e-5
    peftkit.unmerge(model)
    assert (_logits(model, inputs) - unmerged).abs().max() < 1e-5
    plain = peftkit.unload(model, merge=True)
    assert not any(isinstance(m, AdapterLayer) for m in plain.modules())
    assert (_logits(plain, inputs) - unmerged).abs().max() < 1e-5


@pytest.mark.parametrize("arch", ARCHS)
def test_gradients_flow_only_to_the_experts_adapters(bases, arch):
    config = peftkit.LoraConfig(
        r=2,
        target_modules=[],
        target_parameters=["experts.gate_up_proj", "experts.down_proj"],
        init_lora_weights="gaussian",
    )
    model = peftkit.inject(copy.deepcopy(bases[arch]), config).train()
    model(**batch(), labels=batch()["input_ids"]).loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert with_grad == trainable
    assert with_grad and all(".mlp.experts.adapters.default.targets." in n for n in with_grad)
    assert {n.rsplit(".", 2)[0].rsplit(".", 1)[1] for n in with_grad} == {"gate_up_proj", "down_proj"}
    # B starts at zero, so only B gets a gradient from the first step; A's follows once B moved
    assert all(model.get_parameter(n).grad.abs().sum() > 0 for n in with_grad if ".lora_B." in n)


def test_per_expert_delta_has_the_reference_layout():
    """lora_A is (r * experts, in) with expert e's rows at e*r..; lora_B is (out, r * experts) with rank k of
    expert e in column k * experts + e; expert e's delta is scaling * B_e @ A_e (transposed for a stack
    stored (experts, in, out))."""
    for transposed in (False, True):
        torch.manual_seed(0)
        model = MoEBlock(experts=3, hidden=6, inner=4, transposed=transposed)
        before = model.experts.down_proj.detach().clone()
        config = peftkit.LoraConfig(
            r=2, lora_alpha=6, target_modules=[], target_parameters=["experts.down_proj"]
        )
        peftkit.inject(model, config)
        target = model.experts.adapters["default"].targets["down_proj"]
        a, b = torch.randn(target.lora_A.weight.shape), torch.randn(target.lora_B.weight.shape)
        assert a.shape == (2 * 3, 4) and b.shape == (6, 2 * 3)  # in 4 (inner), out 6 (hidden)
        with torch.no_grad():
            target.lora_A.weight.copy_(a), target.lora_B.weight.copy_(b)
        peftkit.merge(model)
        for e in range(3):
            a_e = a[e * 2 : e * 2 + 2]  # (r, in)
            b_e = torch.stack([b[:, k * 3 + e] for k in range(2)], dim=1)  # (out, r)
            delta = 3.0 * b_e @ a_e  # alpha / r = 3
            merged = model.experts.base_layer.down_proj[e] - before[e]
            assert torch.allclose(merged, delta.T if transposed else delta, atol=1e-5)


def test_several_parameters_of_one_module_save_under_the_reference_nesting(bases):
    model = peftkit.inject(
        copy.deepcopy(bases["qwen3_moe"]),
        peftkit.LoraConfig(
            r=2, target_modules=[], target_parameters=["experts.down_proj", "experts.gate_up_proj"]
        ),
    )
    keys = {k: tuple(v.shape) for k, v in peftkit.adapter_state_dict(model).items() if ".layers.0." in k}
    prefix = "base_model.model.model.layers.0.mlp.experts."
    # the parameter registered last (down_proj) is the reference's outer wrapper
    assert keys == {
        prefix + "base_layer.lora_A.weight": (8, 32),
        prefix + "base_layer.lora_B.weight": (32, 8),
        prefix + "lora_A.weight": (8, 16),
        prefix + "lora_B.weight": (32, 8),
    }


def test_save_and_load_round_trip_with_strict_checks(bases, tmp_path):
    model = peftkit.inject(
        copy.deepcopy(bases["olmoe"]),
        peftkit.LoraConfig(r=2, target_modules="all-linear", init_lora_weights=False),
    )
    inputs = batch()
    peftkit.save_adapter(model, tmp_path / "a")
    loaded = peftkit.load_adapter(copy.deepcopy(bases["olmoe"]), tmp_path / "a")
    assert torch.equal(_logits(loaded, inputs), _logits(model, inputs))
    # a base with another expert count: the shapes say so, naming the module and both shapes
    other = tiny_transformers_moe("olmoe")
    import transformers

    other = transformers.OlmoeForCausalLM(
        transformers.OlmoeConfig(**{**other.config.to_dict(), "num_experts": 3})
    )
    with pytest.raises(peftkit.errors.AdapterMismatchError, match="experts"):
        peftkit.load_adapter(other, tmp_path / "a")
    assert not any(isinstance(m, AdapterLayer) for m in other.modules())


def test_two_adapters_on_the_same_experts(bases, tmp_path):
    model = copy.deepcopy(bases["qwen3_moe"])
    first = peftkit.LoraConfig(
        r=2, target_modules=[], target_parameters=["gate_up_proj"], init_lora_weights=False
    )
    second = peftkit.LoraConfig(
        r=3, target_modules=[], target_parameters=["down_proj"], init_lora_weights=False
    )
    peftkit.inject(model, first, "up")
    peftkit.inject(model, second, "down")
    inputs = batch()
    assert set(model.model.layers[0].mlp.experts.adapters) == {"up", "down"}
    only_down = _logits(model, inputs)
    peftkit.set_active(model, ["up", "down"])
    both = _logits(model, inputs)
    peftkit.merge(model)
    assert (_logits(model, inputs) - both).abs().max() < 1e-5
    peftkit.unmerge(model)
    peftkit.set_active(model, "down")
    assert (_logits(model, inputs) - only_down).abs().max() < 1e-5  # W + d - d: rounding only
    peftkit.save_adapter(model, tmp_path / "down", "down")
    fresh = peftkit.load_adapter(copy.deepcopy(bases["qwen3_moe"]), tmp_path / "down")
    assert torch.equal(_logits(fresh, inputs), only_down)


# -- refusals that name the fix -----------------------------------------------------------------


def test_config_refuses_what_parameters_cannot_do():
    with pytest.raises(ConfigError) as err:
        peftkit.LoraConfig(target_parameters=["experts.down_proj"], lora_dropout=0.1, use_dora=True)
    assert "lora_dropout: must be 0 with target_parameters" in str(err.value) and "use_dora" in str(err.value)
    with pytest.raises(ConfigError, match="expected a list of parameter names"):
        peftkit.LoraConfig(target_parameters="experts.down_proj")
    # [] is the reference's "no module targets" beside target_parameters, and "none" on its own
    assert peftkit.LoraConfig(target_modules=[], target_parameters=["down_proj"]).target_modules == []
    assert peftkit.LoraConfig(target_modules=["q"], target_parameters=[]).target_parameters is None
    with pytest.raises(ConfigError, match="empty list"):
        peftkit.LoraConfig(target_modules=[])


def test_all_linear_with_dropout_on_a_moe_model_says_how_to_fix_it(bases):
    model = copy.deepcopy(bases["qwen3_moe"])
    with pytest.raises(
        UnsupportedLayerError,
        match=r"with lora_dropout .* lora_dropout=0, .* exclude_modules=\['experts', 'gate'\]",
    ):
        peftkit.inject(model, peftkit.LoraConfig(target_modules="all-linear", lora_dropout=0.1))
    with pytest.raises(UnsupportedLayerError, match=r"with lora_bias .* lora_bias=False"):
        peftkit.inject(
            model, peftkit.LoraConfig(target_modules="all-linear", lora_dropout=0.0, lora_bias=True)
        )
    with pytest.raises(
        ConfigError, match=r"lora_bias: the reference library refuses it on target_parameters"
    ):
        peftkit.LoraConfig(target_parameters=["mlp.experts.down_proj"], lora_bias=True)
    assert not any(isinstance(m, AdapterLayer) for m in model.modules())
    # leaving the experts and routers out is the other way
    config = peftkit.LoraConfig(
        target_modules="all-linear", lora_dropout=0.1, exclude_modules=["experts", "gate"]
    )
    adapted = peftkit.trainable_summary(peftkit.inject(model, config), show=False).adapted
    assert len(adapted) == 8


def test_parameter_targets_that_cannot_work_are_refused(bases):
    model = MoEBlock()
    with pytest.raises(
        NoTargetMatchedError, match="'experts.down_prj' matched 0 parameters; closest: 'experts.down_proj'"
    ):
        peftkit.inject(model, peftkit.LoraConfig(target_modules=[], target_parameters=["experts.down_prj"]))
    with pytest.raises(UnsupportedLayerError, match=r"proj.bias \(6,\): a 1-D parameter"):
        peftkit.inject(model, peftkit.LoraConfig(target_modules=[], target_parameters=["proj.bias"]))
    with pytest.raises(UnsupportedLayerError, match="adapted as a module .* one adapter cannot do both"):
        peftkit.inject(model, peftkit.LoraConfig(target_modules=["proj"], target_parameters=["proj.weight"]))
    with pytest.raises(UnsupportedLayerError, match="init_lora_weights='pissa'"):
        peftkit.inject(
            model,
            peftkit.LoraConfig(target_modules=[], target_parameters=["down_proj"], init_lora_weights="pissa"),
        )
    with pytest.raises(UnsupportedLayerError, match="every module matched by 'all-linear' is unsupported"):
        peftkit.inject(model, peftkit.LoHaConfig(target_modules="all-linear", exclude_modules=["proj"]))
    assert not any(isinstance(m, AdapterLayer) for m in model.modules())
    assert registry.adapts_parameters("LORA") and not registry.adapts_parameters("LOHA")


def test_mixed_adapter_batches_refuse_parameter_adapters(bases):
    model = peftkit.inject(copy.deepcopy(bases["qwen3_moe"]), peftkit.LoraConfig(target_modules="all-linear"))
    with pytest.raises(AdapterNameError, match="adapt parameters"):
        with peftkit.per_example_adapters(model, ["default", None]):
            pass


def test_filters_do_not_apply_to_named_parameters_and_say_so():
    model = MoEBlock()
    config = peftkit.LoraConfig(
        target_modules=[], target_parameters=["experts.down_proj"], exclude_modules=["experts"]
    )
    with pytest.warns(UserWarning, match="exclude_modules / layers_to_transform would leave out"):
        peftkit.inject(model, config)
    assert "default" in model.experts.adapters


def test_target_modules_unset_beside_parameters_takes_only_a_table_default(bases):
    # qwen3_moe is in no table: only the parameters, as the reference does, recorded as target_modules=[]
    # so that the file says so (the reference's own table has mixtral, whose default peftkit finds by
    # structure: there the two differ, and the recorded [] keeps files unambiguous; docs/moe.md)
    for arch in ("qwen3_moe", "mixtral"):
        model = peftkit.inject(
            copy.deepcopy(bases[arch]), peftkit.LoraConfig(target_parameters=["down_proj"])
        )
        assert {n for n, *_ in peftkit.trainable_summary(model, show=False).adapted} == {
            f"model.layers.{i}.mlp.experts.down_proj" for i in range(2)
        }
        assert peftkit.adapter_config(model).target_modules == []


def test_lora_plus_gives_expert_b_matrices_the_higher_rate(bases):
    from peftkit.methods.lora import lora_plus_param_groups

    model = peftkit.inject(copy.deepcopy(bases["qwen3_moe"]), peftkit.LoraConfig(target_modules="all-linear"))
    groups = {g["name"]: g for g in lora_plus_param_groups(model, lr=1e-3, lr_ratio=16)}
    b_ids = {id(p) for p in groups["lora_plus_B"]["params"]}
    expert_b = model.model.layers[0].mlp.experts.adapters["default"].targets["gate_up_proj"].lora_B.weight
    assert id(expert_b) in b_ids and math.isclose(groups["lora_plus_B"]["lr"], 16e-3)
    assert "lora_plus_other" not in groups


def test_inspect_lists_the_experts(bases, tmp_path):
    from peftkit.run.inspect import inspect_model

    bases["qwen3_moe"].save_pretrained(tmp_path / "m")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = inspect_model(str(tmp_path / "m"))
    assert report.experts == [
        "model.layers.N.mlp.experts: 4 experts, gate_up_proj (4, 32, 32) (fused gate and up), "
        "down_proj (4, 32, 16); router model.layers.N.mlp.gate"
    ]
    all_linear = next(t for t in report.target_sets if t.spec == "all-linear")
    assert all_linear.note == "incl. 6 expert weights and routers held as parameters"
    assert "mixture of experts held as parameters" in str(report)

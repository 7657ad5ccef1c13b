"""Quantized base models (QLoRA): the bitsandbytes backend, quantize / prepare / merge / export, the
run-config option, and parity with the reference library's QLoRA set-up on the bundled MiniLM.

The contract invariants run on a tiny BERT built from a config (hidden 64, so every linear layer's
in_features is a multiple of bitsandbytes' 4-bit block of 64) quantized in place, for NF4, FP4 and
int8, with LoRA and IA3.
"""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

bnb = pytest.importorskip(
    "bitsandbytes", reason="quantized base models need bitsandbytes: pip install bitsandbytes"
)

import peftkit  # noqa: E402
import peftkit.errors  # noqa: E402
from peftkit.backends import bitsandbytes as bnb_backend  # noqa: E402
from peftkit.core.inject import adapter_layers  # noqa: E402
from peftkit.errors import ConfigError, UnsupportedLayerError  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
QUANTS = {"nf4": (4, "nf4"), "fp4": (4, "fp4"), "int8": (8, "nf4")}
BNB_TYPES = (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)

pytestmark = pytest.mark.filterwarnings("ignore::peftkit.QuantizedMergeWarning")


def tiny_bert(quant: str | None, seed: int = 0) -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=100,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        max_position_embeddings=32,
        num_labels=3,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    model = BertForSequenceClassification(config).eval()
    if quant is not None:
        bits, kind = QUANTS[quant]
        peftkit.quantize(model, bits=bits, quant_type=kind)
    return model


def batch(seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "input_ids": torch.randint(1, 100, (4, 12), generator=g),
        "attention_mask": torch.ones(4, 12, dtype=torch.long),
    }


def logits(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def adapter_config(method: str) -> peftkit.AdapterConfig:
    if method == "lora":  # random A and B: the adapter changes the output from the start
        return peftkit.LoraConfig(
            r=4, lora_alpha=8, target_modules=["query", "value"], init_lora_weights=False
        )
    return peftkit.IA3Config(
        target_modules=["query", "value", "intermediate.dense"],
        feedforward_modules=["intermediate.dense"],
        init_ia3_weights=False,
    )


def packed(model: nn.Module) -> dict[str, torch.Tensor]:
    """The stored (quantized) weight bytes of every bitsandbytes layer, by module name (adapted or not)."""
    return {
        n.removesuffix(".base_layer"): m.weight.data.clone()
        for n, m in model.named_modules()
        if isinstance(m, BNB_TYPES)
    }


# -- import cost and dispatch ---------------------------------------------------------------------


def test_importing_peftkit_and_adapting_a_dense_model_never_imports_bitsandbytes():
    code = (
        "import sys, torch, peftkit, peftkit.api\n"
        "m = torch.nn.Sequential(torch.nn.Linear(4, 4))\n"
        "peftkit.inject(m, peftkit.LoraConfig(target_modules=['0']))\n"
        "print('bitsandbytes' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "False", out.stderr


_HIDE_BNB = (
    "import importlib.util, sys\n"
    "sys.modules['bitsandbytes'] = None  # `import bitsandbytes` now raises ImportError\n"
    "_find = importlib.util.find_spec\n"
    "importlib.util.find_spec = lambda name, *a: None if name.split('.')[0] == 'bitsandbytes' else _find(name, *a)\n"
)


@pytest.mark.slow
def test_without_bitsandbytes_everything_else_works_and_every_message_says_how_to_install(tmp_path):
    code = _HIDE_BNB + (
        "import torch, peftkit, pytest\n"
        "from peftkit.errors import ConfigError\n"
        "from peftkit.run.config import parse_config\n"
        "m = peftkit.inject(torch.nn.Sequential(torch.nn.Linear(4, 4)), peftkit.LoraConfig(target_modules=['0']))\n"
        "try:\n    peftkit.quantize(torch.nn.Linear(64, 64))\nexcept ImportError as e:\n    print('QUANTIZE:', e)\n"
        "try:\n    parse_config({'data': {'name': 'rotten_tomatoes'}, 'model': {'quantize': 'nf4'}})\n"
        "except ConfigError as e:\n    print('CONFIG:', e)\n"
        f"sys.exit(pytest.main(['-q', '-n', '0', '-rs', '-p', 'no:cacheprovider', {str(Path(__file__))!r}]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 5, (
        out.stdout[-2000:] + out.stderr[-2000:]
    )  # pytest: no test ran (module skipped)
    lines = out.stdout.splitlines()
    assert any(line.startswith("QUANTIZE:") and "pip install bitsandbytes" in line for line in lines)
    assert any(
        "model.quantize: nf4 needs bitsandbytes; install it with `pip install bitsandbytes`" in line
        for line in lines
    )
    assert "1 skipped" in out.stdout and "pip install bitsandbytes" in out.stdout


@pytest.mark.parametrize("quant", list(QUANTS))
def test_quantize_replaces_linears_but_keeps_the_fresh_head_and_skipped_modules(quant):
    model = tiny_bert(None)
    bits, kind = QUANTS[quant]
    peftkit.quantize(model, bits=bits, quant_type=kind, skip=["pooler.dense"])
    expected = bnb.nn.Linear4bit if bits == 4 else bnb.nn.Linear8bitLt
    layer = model.bert.encoder.layer[0]
    assert type(layer.attention.self.query) is expected and type(layer.output.dense) is expected
    assert type(model.classifier) is nn.Linear and type(model.bert.pooler.dense) is nn.Linear
    if bits == 4:
        assert layer.attention.self.query.weight.quant_type == kind
        assert layer.attention.self.query.weight.dtype == torch.uint8


@pytest.mark.parametrize("quant", list(QUANTS))
def test_trainable_summary_counts_a_quantized_weight_by_its_logical_shape(quant):
    dense = tiny_bert(None)
    expected = peftkit.trainable_summary(dense, show=False).total
    model = tiny_bert(None)
    bits, kind = QUANTS[quant]
    peftkit.quantize(model, bits=bits, quant_type=kind)
    peftkit.inject(model, peftkit.LoraConfig(r=2, target_modules=["query"]))
    peftkit.inject(dense, peftkit.LoraConfig(r=2, target_modules=["query"]))
    quantized, reference = (
        peftkit.trainable_summary(model, show=False),
        peftkit.trainable_summary(dense, show=False),
    )
    assert reference.total > expected  # the adapter's parameters count
    assert (quantized.total, quantized.trainable) == (reference.total, reference.trainable)


def test_quantize_refuses_bad_arguments_and_an_adapted_model():
    with pytest.raises(ConfigError, match="bits: expected 4 or 8"):
        peftkit.quantize(tiny_bert(None), bits=3)
    with pytest.raises(ConfigError, match="quant_type"):
        peftkit.quantize(tiny_bert(None), quant_type="int4")
    model = peftkit.inject(tiny_bert(None), peftkit.LoraConfig(target_modules=["query"]))
    with pytest.raises(ConfigError, match="quantize the base first, then inject"):
        peftkit.quantize(model)


def test_quantize_leaves_layers_off_the_4bit_block_and_says_so():
    model = nn.Sequential(nn.Linear(64, 8), nn.Linear(8, 64))
    with pytest.warns(UserWarning, match="left 1 linear layer"):
        peftkit.quantize(model, bits=4)
    assert isinstance(model[0], bnb.nn.Linear4bit) and type(model[1]) is nn.Linear


@pytest.mark.parametrize("method", ["loha", "vera"])
def test_methods_without_quantized_rows_refuse_with_the_fix(method):
    config = peftkit.make_config(method, target_modules=["query"])
    with pytest.raises(UnsupportedLayerError, match="use LoRA or IA3"):
        peftkit.inject(tiny_bert("nf4"), config)


@pytest.mark.parametrize("fields", [{"use_dora": True}, {"init_lora_weights": "pissa"}])
def test_lora_variants_that_need_the_dense_weight_refuse(fields):
    with pytest.raises(UnsupportedLayerError, match="query"):
        peftkit.inject(tiny_bert("nf4"), peftkit.LoraConfig(target_modules=["query"], **fields))


# -- the contract on a quantized base -------------------------------------------------------------


@pytest.mark.parametrize("quant", list(QUANTS))
@pytest.mark.parametrize("method", ["lora", "ia3"])
def test_contract_on_a_quantized_base(quant, method):
    model, x = tiny_bert(quant), batch()
    base, stored = logits(model, x), packed(model)
    originals = {n: m for n, m in model.named_modules() if isinstance(m, BNB_TYPES)}
    assert stored
    peftkit.inject(model, adapter_config(method))
    kinds = {type(a).__name__ for _, layer in adapter_layers(model) for a in layer.adapters.values()}
    assert kinds == {"LoraQuantLinear" if method == "lora" else "IA3QuantLinear"}
    adapted = logits(model, x)
    assert not torch.allclose(adapted, base, atol=1e-3)  # output changes when active
    with peftkit.disable(model):
        assert torch.equal(logits(model, x), base)  # disabled == base, exactly

    with pytest.warns(peftkit.QuantizedMergeWarning, match="re-quantized"):
        peftkit.merge(model)
    report = peftkit.merge_report(model)
    assert set(report) == {n for n, _ in adapter_layers(model)}
    merged = logits(model, x)
    # merged == unmerged up to the re-quantization the report measures
    assert (merged - adapted).abs().max() < 0.5
    with peftkit.disable(model):  # unmerges (restoring the stored original), then merges back
        assert torch.equal(logits(model, x), base)
    peftkit.unmerge(model)
    assert torch.equal(logits(model, x), adapted)  # unmerge restores the quantized base bit for bit
    assert all(torch.equal(packed(model)[n], t) for n, t in stored.items())

    peftkit.unload(model)  # unload restores the quantized module objects
    assert {n: m for n, m in model.named_modules() if isinstance(m, BNB_TYPES)} == originals
    assert torch.equal(logits(model, x), base)


@pytest.mark.parametrize("quant", ["nf4", "int8"])
@pytest.mark.parametrize("scale", [1.0, 1e-4])
def test_merge_report_is_the_error_of_the_stored_weight_against_the_exact_merge(quant, scale):
    model = peftkit.inject(tiny_bert(quant), adapter_config("lora"))
    name = "bert.encoder.layer.0.attention.self.query"
    layer = dict(adapter_layers(model))[name]
    access = bnb_backend.registry.base_access(layer.base_layer)
    with torch.no_grad():
        layer.adapters["default"].lora_B.weight.mul_(scale)
        before = access.read(layer.base_layer, "weight")
        delta = layer.adapters["default"].delta_weight(before)
    exact = before + delta
    peftkit.merge(model)
    stored = access.read(layer.base_layer, "weight")
    report = peftkit.merge_report(model)[name]
    assert report["max_abs"] == pytest.approx(float((stored - exact).abs().max()), rel=1e-6)
    assert report["relative"] == pytest.approx(float((stored - exact).norm() / exact.norm()), rel=1e-6)
    assert report["of_delta"] == pytest.approx(float((stored - exact).norm() / delta.norm()), rel=1e-5)
    assert 0 < report["relative"] < 0.2
    if scale < 1:  # a delta far below the quantization step is rounded away: the report shows it
        assert report["of_delta"] > 0.9


@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_lora_delta_weight_is_exact_on_the_dequantized_weight(quant):
    model = peftkit.inject(tiny_bert(quant), adapter_config("lora"))
    layer = dict(adapter_layers(model))["bert.encoder.layer.1.attention.self.value"]
    adapter = layer.adapters["default"]
    weight = bnb_backend.registry.base_access(layer.base_layer).read(layer.base_layer, "weight")
    delta = adapter.delta_weight(weight)
    assert torch.equal(delta, adapter.scaling * adapter.lora_B.weight @ adapter.lora_A.weight)
    # the forward pass is the quantized base plus exactly that delta applied to the input
    x = torch.randn(3, 64)
    with torch.no_grad():
        base_out = layer.base_layer(x)
        assert torch.allclose(layer(x), base_out + x @ delta.T, atol=1e-5)
    assert adapter.lora_A.weight.dtype == torch.float32


@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_unload_merge_dequantize_exports_an_exact_dense_model(quant):
    model, x = peftkit.inject(tiny_bert(quant), adapter_config("lora")), batch()
    adapted = logits(model, x)
    peftkit.unload(model, merge=True, dequantize=True)
    assert not any(isinstance(m, BNB_TYPES) for m in model.modules())
    assert type(model.bert.encoder.layer[0].attention.self.query) is nn.Linear
    # LLM.int8() also quantizes the activations (row-wise, per matmul): the dense model skips that step
    assert torch.allclose(logits(model, x), adapted, atol=1e-5 if quant == "nf4" else 1e-3)


@pytest.mark.parametrize("method", ["lora", "ia3"])
def test_save_load_and_training_touch_only_the_adapter(method, tmp_path):
    model, x = peftkit.inject(tiny_bert("nf4"), adapter_config(method)), batch()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    stored = packed(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(3):
        loss = F.cross_entropy(model(**x).logits, torch.tensor([0, 1, 2, 0]))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    after = dict(model.named_parameters())
    assert all(torch.equal(after[n], t) for n, t in frozen.items())
    assert all(not torch.equal(after[n], t) for n, t in trained.items())
    assert all(torch.equal(packed(model)[n], t) for n, t in stored.items())

    peftkit.save_adapter(model, tmp_path / "adapter")
    with warnings.catch_warnings():
        # the fingerprint uses the logical weight shape, so the same architecture matches quantized or not
        warnings.simplefilter("error", peftkit.errors.BaseModelMismatchWarning)
        fresh = peftkit.load_adapter(tiny_bert("nf4"), tmp_path / "adapter")
        dense = peftkit.load_adapter(tiny_bert(None), tmp_path / "adapter")
    assert torch.equal(logits(fresh, x), logits(model, x))
    assert (logits(dense, x) - logits(model, x)).abs().max() < 0.05  # the same adapter on the dense base


# -- preparation for k-bit training ----------------------------------------------------------------


def _checkpointed_lora_grads(prepare: bool) -> list[torch.Tensor | None]:
    """LoRA B gradients of a bf16 4-bit tiny BERT trained with reentrant gradient checkpointing."""
    model = tiny_bert(None).to(torch.bfloat16)
    peftkit.quantize(model, bits=4, compute_dtype=torch.bfloat16)
    if prepare:
        peftkit.prepare_for_kbit_training(model)
    peftkit.inject(model, peftkit.LoraConfig(target_modules=["query", "value"]))
    # reentrant checkpointing only back-propagates into a block whose input requires grad
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns that no checkpoint input requires grad (unprepared)
        model(**batch()).logits.float().sum().backward()
    return [p.grad for n, p in model.named_parameters() if "lora_B" in n]


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_prepare_puts_norms_and_head_in_float32_and_lets_reentrant_checkpointing_train_adapters():
    model = tiny_bert(None).to(torch.bfloat16)
    peftkit.quantize(model, bits=4, compute_dtype=torch.bfloat16)
    peftkit.prepare_for_kbit_training(model)
    assert model.bert.embeddings.LayerNorm.weight.dtype == torch.float32
    assert model.classifier.weight.dtype == torch.float32
    assert model.bert.encoder.layer[0].attention.self.query.weight.dtype == torch.uint8
    assert not any(p.requires_grad for p in model.parameters())
    peftkit.inject(model, peftkit.LoraConfig(target_modules=["query", "value"]))
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)

    # the input-grad hook: a frozen embedding's output requires grad only after prepare
    ids = batch()["input_ids"]
    assert model.bert.embeddings.word_embeddings(ids).requires_grad
    assert not tiny_bert(None).requires_grad_(False).bert.embeddings.word_embeddings(ids).requires_grad
    grads = _checkpointed_lora_grads(prepare=True)
    assert len(grads) == 4 and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_training_still_back_propagates_after_an_evaluation():
    """bitsandbytes switches a 4-bit layer to an inference-only CPU kernel on its first eval-mode
    forward (on AVX512-BF16 CPUs); prepare_for_kbit_training and the adapters switch it back."""
    torch.manual_seed(0)
    layers = []
    for _ in range(2):  # built with bitsandbytes directly, as transformers' loader does
        dense = nn.Linear(64, 64)
        layer = bnb.nn.Linear4bit(64, 64, compute_dtype=torch.float32, quant_type="nf4")
        layer.weight = bnb.nn.Params4bit(dense.weight.data, requires_grad=False, quant_type="nf4")
        layer.bias = nn.Parameter(dense.bias.data, requires_grad=False)
        layers.append(layer.to("cpu"))
    model, x = nn.Sequential(*layers).eval(), torch.randn(3, 64)
    with torch.no_grad():
        before = model(x)  # may repack the weights for the inference kernel
    peftkit.prepare_for_kbit_training(model)
    with torch.no_grad():
        assert torch.allclose(model(x), before, atol=0.02)  # the same layer, on the float32 path now
    peftkit.inject(model, peftkit.LoraConfig(target_modules=["0"], init_lora_weights=False))
    for _ in range(2):
        model.eval()
        with torch.no_grad():
            model(x)
        model.train()
        model(x).sum().backward()  # the gradient passes back through layer 1 to layer 0's adapter
        grad = model[0].adapters["default"].lora_B.weight.grad
        assert grad is not None and grad.abs().sum() > 0


# -- run config -----------------------------------------------------------------------------------


def test_run_config_checks_the_quantize_option():
    from peftkit.run.config import parse_config

    data = {"data": {"name": "rotten_tomatoes"}}
    assert parse_config({**data, "model": {"quantize": "nf4"}}).model.quantize == "nf4"
    with pytest.raises(ConfigError, match="model.quantize: expected null, nf4, fp4 or int8"):
        parse_config({**data, "model": {"quantize": "int4"}})
    with pytest.raises(ConfigError, match="full fine-tuning cannot train quantized weights"):
        parse_config({**data, "model": {"quantize": "nf4"}, "adapter": {"method": "full"}})


def test_causal_lm_task_loads_quantized_with_lm_head_dense_and_trains_lora(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from peftkit.data.config import DataConfig
    from peftkit.models.config import ModelConfig
    from peftkit.tasks.causal_lm import CausalLMTask
    from support.generation import char_tokenizer  # tests/ is on sys.path

    tokenizer = char_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    LlamaForCausalLM(config).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    task = CausalLMTask(
        data=DataConfig(max_length=32),
        model=ModelConfig(name_or_path=str(tmp_path / "model"), quantize="nf4"),
    )
    model = task.load_model()
    assert isinstance(model.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    assert isinstance(model.model.layers[0].mlp.down_proj, bnb.nn.Linear4bit)
    assert type(model.lm_head) is nn.Linear  # transformers' default skip list is replaced: lm_head named
    peftkit.inject(model, peftkit.LoraConfig(target_modules=["q_proj", "v_proj"]))
    batch = task.collate([{"prompt": "cat", "response": "chat"}, {"prompt": "dog", "response": "chien"}])
    model.train()
    model(**batch).loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
    assert len(grads) == 4 and all(g is not None and g.abs().sum() > 0 for g in grads)


# -- the bundled MiniLM: loading, parity with the reference library, training ---------------------


def _minilm_task(quant: str):
    from peftkit.run.config import parse_config
    from peftkit.run.runner import build_task

    config = {
        "model": {"name_or_path": "minilm", "quantize": quant, "num_labels": 2},
        "data": {"name": "rotten_tomatoes", "labels": ["rotten", "fresh"], "max_length": 32},
    }
    return build_task(parse_config(config))


@pytest.mark.slow
@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_parity_with_the_reference_qlora_setup_on_minilm(quant, tmp_path):
    """peftkit's adapter, trained on the quantized MiniLM and saved, loads with peft on the same
    bitsandbytes model (transformers' BitsAndBytesConfig) and gives the same logits."""
    peft = pytest.importorskip("peft")
    task = _minilm_task(quant)
    model = task.load_model()
    assert isinstance(model.bert.encoder.layer[0].attention.self.query, BNB_TYPES)
    assert type(model.classifier) is nn.Linear  # the fresh head was skipped
    peftkit.inject(model, peftkit.LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"]))
    x = dict(
        task.tokenizer(["a gripping, funny film", "dull and far too long"], return_tensors="pt", padding=True)
    )
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(3):  # B non-zero and the head copy moved
        F.cross_entropy(model(**x).logits, torch.tensor([1, 0])).backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    ours = logits(model, x)
    peftkit.save_adapter(model, tmp_path / "adapter")

    reference = peft.PeftModel.from_pretrained(_minilm_task(quant).load_model(), tmp_path / "adapter").eval()
    lora_types = {
        type(m).__module__ for m in reference.modules() if type(m).__name__ in ("Linear4bit", "Linear8bitLt")
    }
    assert "peft.tuners.lora.bnb" in lora_types  # peft's own QLoRA layers, not a dense fallback
    theirs = logits(reference, x)
    with peftkit.disable(model):
        base = logits(model, x)
    assert (ours - base).abs().max() > 1e-2
    assert torch.allclose(ours, theirs, atol=1e-5), (ours - theirs).abs().max()


@pytest.mark.slow
def test_train_from_the_command_line_with_model_quantize_nf4(tmp_path):
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "peftkit",
        "train",
        str(ROOT / "configs" / "sentiment-minilm-lora.yaml"),
        "model.quantize=nf4",
        "train.steps=2",
        "train.batch_size=4",
        "train.eval_every=1",
        "train.log_every=1",
        "data.max_train_examples=16",
        "data.max_eval_examples=16",
        "eval.before_training=false",
        f"output_dir={out}",
    ]
    result = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**__import__("os").environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    model = _minilm_task("nf4").load_model()
    peftkit.load_adapter(model, out / "adapter")
    assert isinstance(model.bert.encoder.layer[0].attention.self.query.base_layer, bnb.nn.Linear4bit)
    # `peftkit merge` of a QLoRA run exports a dense model that plain transformers loads
    from transformers import AutoModelForSequenceClassification

    from peftkit.run.runner import load_run, merge_run

    merged_dir = merge_run(out, tmp_path / "merged")
    assert "quantization_config" not in (merged_dir / "config.json").read_text()
    merged = AutoModelForSequenceClassification.from_pretrained(merged_dir, trust_remote_code=True).eval()
    adapted = load_run(out)
    x = dict(adapted.task.tokenizer(["a gripping film", "dull"], return_tensors="pt", padding=True))
    assert torch.allclose(logits(merged, x), logits(adapted.model, x), atol=1e-4)


@pytest.mark.slow
def test_dense_export_of_a_quantized_minilm_saves_a_plain_checkpoint(tmp_path):
    from transformers import AutoModelForSequenceClassification

    task = _minilm_task("nf4")
    model = task.load_model()
    peftkit.inject(model, peftkit.LoraConfig(r=8, target_modules=["query", "value"], init_lora_weights=False))
    x = dict(task.tokenizer(["a gripping film", "dull"], return_tensors="pt", padding=True))
    adapted = logits(model, x)
    peftkit.unload(model, merge=True, dequantize=True)
    model.save_pretrained(tmp_path / "export")
    assert "quantization_config" not in (tmp_path / "export" / "config.json").read_text()
    reloaded = AutoModelForSequenceClassification.from_pretrained(
        tmp_path / "export", trust_remote_code=True
    ).eval()
    assert torch.allclose(logits(reloaded, x), adapted, atol=1e-5)

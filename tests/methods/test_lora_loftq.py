"""LoftQ (init_lora_weights="loftq"): the quantized base plus the adapter start closer to the original
weights than the quantized base alone; the factors and the base are the reference library's
(``peft.utils.loftq_utils.loftq_init``) in float32; adapters move between the two libraries both ways.

The reference's ``loftq_init`` moves the weight to "cuda" (or "xpu") whatever the machine; on a CPU the
tests run its own source with that device name replaced by "cpu", which changes nothing else.
"""

from __future__ import annotations

import copy
import inspect
import json

import peft
import pytest
import torch
from peft.utils import loftq_utils
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import peftkit
from peftkit.core import registry
from peftkit.errors import ConfigError, UnsupportedLayerError

pytest.importorskip("bitsandbytes")

IDS = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def reference_loftq_init():
    """The reference's ``loftq_init`` with its compute device "cuda" replaced by "cpu"."""
    source = inspect.getsource(loftq_utils.loftq_init).replace('"cuda"', '"cpu"')
    namespace = dict(vars(loftq_utils))
    exec(compile(source, loftq_utils.__file__, "exec"), namespace)  # noqa: S102 - the reference's own code
    return namespace["loftq_init"]


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return LlamaForCausalLM(cfg).eval()


def _structured(out_f: int, in_f: int, seed: int) -> torch.Tensor:
    """A weight with a decaying spectrum, as trained weights have (a random one's is flat)."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(out_f, out_f, generator=g))
    v, _ = torch.linalg.qr(torch.randn(in_f, in_f, generator=g))
    k = min(out_f, in_f)
    return (u[:, :k] * (1.0 / torch.arange(1, k + 1).float()) @ v[:, :k].T) * 0.5


def _loftq(r: int, alpha: float, bits: int = 4, iters: int = 1, **kw) -> peftkit.LoraConfig:
    return peftkit.LoraConfig(
        r=r,
        lora_alpha=alpha,
        init_lora_weights="loftq",
        loftq_config={"loftq_bits": bits, "loftq_iter": iters},
        **kw,
    )


def _relative(w: torch.Tensor, approx: torch.Tensor) -> float:
    return float((w - approx.detach()).norm() / w.norm())


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("iters", [1, 3])
def test_loftq_lowers_the_quantization_error(bits, iters):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 192), nn.Linear(192, 128))
    with torch.no_grad():
        model[0].weight.copy_(_structured(192, 128, 1))
        model[1].weight.copy_(_structured(128, 192, 2))
    originals = [m.weight.detach().clone() for m in model]
    peftkit.inject(
        model, _loftq(8, 16, bits, iters, target_modules=["0", "1"])
    )  # s = 2: not the reference's case
    for layer, w in zip(model, originals, strict=True):
        adapter = layer.adapters["default"]
        base = layer.base_layer.weight.detach()
        alone = _relative(w, registry.quantizer(bits)(w))
        with_adapter = _relative(w, base + adapter.scaling * adapter.lora_B.weight @ adapter.lora_A.weight)
        # NF4's error is close to white noise, so rank 8 of a 128-wide weight takes a modest share of it
        assert with_adapter < 0.95 * alone, (alone, with_adapter)
        if iters == 1:  # Q = Q(W), and s B A is the best rank-r fit of W - Q: what is left is the SVD's tail
            tail = torch.linalg.svdvals(w - base)[8:]
            assert with_adapter == pytest.approx(float(tail.norm() / w.norm()), rel=1e-4)
        # the base holds a quantized weight: quantizing it again changes (next to) nothing
        assert _relative(base, registry.quantizer(bits)(base)) < 1e-6


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("iters", [1, 2, 5])
def test_factors_and_base_match_the_reference_loftq_init(reference_loftq_init, bits, iters):
    w = _structured(128, 256, 3) + 0.01 * torch.randn(128, 256, generator=torch.Generator().manual_seed(4))
    layer = nn.Linear(256, 128, bias=False)
    with torch.no_grad():
        layer.weight.copy_(w)
    model = nn.Sequential(layer)
    peftkit.inject(model, _loftq(8, 8, bits, iters, target_modules=["0"]))  # alpha = r: s = 1
    adapter = model[0].adapters["default"]
    q, a, b = reference_loftq_init(w.clone(), num_bits=bits, reduced_rank=8, num_iter=iters)
    ours_q = model[0].base_layer.weight.detach()
    # quantization is a step function: a later iteration may round a few values the other way
    assert (ours_q != q).float().mean() < 1e-3
    assert torch.allclose(adapter.lora_A.weight, a, atol=1e-4) and torch.allclose(
        adapter.lora_B.weight, b, atol=1e-4
    )
    if iters == 1:
        assert torch.equal(ours_q, q)
        assert torch.allclose(adapter.lora_A.weight, a, atol=1e-6)


def test_a_scaling_other_than_one_keeps_the_product_and_splits_it_evenly():
    w = _structured(64, 128, 5)
    models = []
    for alpha in (4, 16):
        layer = nn.Linear(128, 64, bias=False)
        with torch.no_grad():
            layer.weight.copy_(w)
        models.append(peftkit.inject(nn.Sequential(layer), _loftq(4, alpha, target_modules=["0"])))
    (one, four) = (m[0].adapters["default"] for m in models)
    delta = lambda ad: ad.scaling * ad.lora_B.weight @ ad.lora_A.weight  # noqa: E731
    assert torch.allclose(delta(one), delta(four), atol=1e-6)
    assert torch.allclose(four.lora_A.weight, one.lora_A.weight / 2, atol=1e-6)


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


def test_saved_adapter_loads_in_the_reference_on_the_quantized_base(
    llama, tmp_path, monkeypatch, reference_loftq_init
):
    model = peftkit.inject(copy.deepcopy(llama), _loftq(4, 4, 4, 2, target_modules=TARGETS))
    expected = _logits(model)
    peftkit.save_adapter(model, tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["init_lora_weights"] == "loftq" and saved["loftq_config"] == {
        "loftq_bits": 4,
        "loftq_iter": 2,
    }
    with pytest.raises(ConfigError, match="portable=True: a LoftQ adapter"):
        peftkit.save_adapter(model, tmp_path / "portable", portable=True)
    assert not (tmp_path / "portable").exists()
    base = peftkit.unload(model)  # the base keeps LoftQ's quantized weights: this is the base to ship
    assert not torch.equal(
        base.model.layers[0].self_attn.q_proj.weight, llama.model.layers[0].self_attn.q_proj.weight
    )
    base.save_pretrained(tmp_path / "base")

    ours = peftkit.load_adapter(
        LlamaForCausalLM.from_pretrained(tmp_path / "base").eval(), tmp_path / "adapter"
    )
    assert (_logits(ours) - expected).abs().max() <= 1e-5
    # loading re-runs LoftQ (deterministic): on the original base it quantizes it as training did
    again = peftkit.load_adapter(copy.deepcopy(llama), tmp_path / "adapter")
    assert (_logits(again) - expected).abs().max() <= 1e-5
    # the reference re-runs LoftQ on the loaded base (on its GPU; here its code on the CPU), then loads the
    # saved factors over its own: quantizing an already quantized base leaves it as it was
    monkeypatch.setattr(peft.tuners.lora.layer, "loftq_init", reference_loftq_init)
    theirs = peft.PeftModel.from_pretrained(
        LlamaForCausalLM.from_pretrained(tmp_path / "base").eval(), tmp_path / "adapter"
    )
    assert (_logits(theirs) - expected).abs().max() <= 1e-4


def test_reference_adapter_loads_in_peftkit(llama, tmp_path, monkeypatch, reference_loftq_init):
    monkeypatch.setattr(peft.tuners.lora.layer, "loftq_init", reference_loftq_init)
    config = peft.LoraConfig(
        r=4,
        lora_alpha=4,
        target_modules=TARGETS,
        init_lora_weights="loftq",
        loftq_config=peft.LoftQConfig(loftq_bits=4, loftq_iter=1),
    )
    theirs = peft.get_peft_model(copy.deepcopy(llama), config).eval()
    expected = _logits(theirs)
    theirs.save_pretrained(tmp_path / "adapter")
    theirs.unload().save_pretrained(tmp_path / "base")
    ours = peftkit.load_adapter(
        LlamaForCausalLM.from_pretrained(tmp_path / "base").eval(), tmp_path / "adapter"
    )
    assert (_logits(ours) - expected).abs().max() <= 1e-5
    # and peftkit's own LoftQ on the original model is the reference's (alpha = r)
    again = peftkit.inject(copy.deepcopy(llama), _loftq(4, 4, 4, 1, target_modules=TARGETS))
    assert (_logits(again) - expected).abs().max() <= 1e-4


def test_bad_combinations_name_the_fix(llama):
    with pytest.raises(ConfigError, match="loftq_config: init_lora_weights='loftq' needs it"):
        peftkit.LoraConfig(init_lora_weights="loftq")
    with pytest.raises(ConfigError, match="used only with init_lora_weights='loftq'"):
        peftkit.LoraConfig(loftq_config={"loftq_bits": 4})
    with pytest.raises(ConfigError) as info:
        peftkit.LoraConfig(
            init_lora_weights="loftq", loftq_config={"loftq_bits": 3, "loftq_iter": 0, "bits": 4}
        )
    assert len(info.value.problems) == 3
    with pytest.raises(UnsupportedLayerError, match="in_features divisible by 64"):
        peftkit.inject(nn.Sequential(nn.Linear(48, 64)), _loftq(4, 4, target_modules=["0"]))
    quantized = peftkit.quantize(nn.Sequential(nn.Linear(64, 64)))
    with pytest.raises(UnsupportedLayerError, match="load the model unquantized"):
        peftkit.inject(quantized, _loftq(4, 4, target_modules=["0"]))


def test_without_bitsandbytes_the_config_says_to_install_it(monkeypatch):
    assert registry.quantizer(4) is not None  # the backends are imported (and register) once
    monkeypatch.setattr(registry, "_QUANTIZERS", {})
    with pytest.raises(ConfigError, match="pip install bitsandbytes"):
        _loftq(4, 4)
    monkeypatch.undo()


def test_run_config_reaches_loftq():
    from peftkit.run.adapter import adapter_problems

    assert (
        adapter_problems(
            "lora", {"init_lora_weights": "loftq", "loftq_config": {"loftq_bits": 4, "loftq_iter": 5}}
        )
        == []
    )
    problems = adapter_problems("lora", {"init_lora_weights": "loftq"})
    assert problems and problems[0].startswith("adapter.loftq_config:")

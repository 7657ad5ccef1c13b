"""CorDA (context-oriented decomposition): the algebra of both modes, parity with the reference library's
``preprocess_corda``, and portable files that load on the original base in both libraries."""

from __future__ import annotations

import copy
import dataclasses
import importlib
import json
import sys
import types

import peft
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import peftkit
from peftkit.errors import ConfigError, UnsupportedLayerError
from peftkit.methods import lora_corda

pytestmark = pytest.mark.usefixtures("one_thread")

TARGETS = ["q_proj", "v_proj", "down_proj"]


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return LlamaForCausalLM(cfg).eval()


def _batches(n=8, size=1, seed=3):
    # one sequence per batch: the reference's covariance hook reads one sample per call
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, 64, (size, 24), generator=g)} for _ in range(n)]


IDS = _batches(1, size=2, seed=9)[0]["input_ids"]


def _config(mode, **options):
    return peftkit.LoraConfig(
        r=4,
        lora_alpha=8,
        init_lora_weights="corda",
        corda_config={"corda_method": mode},
        target_modules=TARGETS,
        **options,
    )


@pytest.mark.parametrize("mode", ["ipm", "kpm"])
def test_the_model_starts_at_the_base(llama, mode):
    model = copy.deepcopy(llama)
    peftkit.inject_corda(model, _config(mode), _batches())
    with torch.no_grad():
        assert (model(IDS).logits - llama(IDS).logits).abs().max() <= 1e-5
    layer = model.model.layers[0].self_attn.q_proj
    adapter = layer.adapters["default"]
    residual = layer.base_layer.weight.detach()
    assert not torch.allclose(residual, llama.model.layers[0].self_attn.q_proj.weight)  # W moved
    restored = residual + adapter.scaling * adapter.lora_B.weight @ adapter.lora_A.weight
    assert (restored - llama.model.layers[0].self_attn.q_proj.weight).abs().max() <= 1e-5


def test_ipm_takes_the_largest_components_and_kpm_the_smallest(llama):
    w = llama.model.layers[0].self_attn.q_proj.weight.detach()
    inputs = []
    handle = llama.model.layers[0].self_attn.q_proj.register_forward_hook(lambda m, a, o: inputs.append(a[0]))
    with torch.no_grad():
        for batch in _batches():
            llama(**batch)
    handle.remove()
    cov = sum((x := i.reshape(-1, 32) / i.max().abs()).T @ x for i in inputs) / len(inputs)
    fixed = cov + torch.eye(32) * cov.diagonal().mean() * 0.01  # well conditioned here: the first damping
    u, s, vh = torch.linalg.svd(w @ fixed)
    parts = {"ipm": slice(0, 4), "kpm": slice(28, 32)}
    for mode, keep in parts.items():
        a, b = lora_corda.corda_factors(w, cov, 4, mode, scaling=2.0)
        # s B A is exactly the kept components of W = U S Vᵀ C⁻¹
        expected = u[:, keep] @ torch.diag(s[keep]) @ vh[keep] @ torch.linalg.inv(fixed)
        assert torch.allclose(2.0 * b @ a, expected, atol=1e-5)
        assert torch.linalg.svdvals(b.T @ u[:, keep] / b.norm(dim=0)[:, None]).min() > 0.9999  # B spans U_r
    big, small = (lora_corda.corda_factors(w, cov, 4, m, 2.0) for m in ("ipm", "kpm"))
    assert (big[1] @ big[0] @ fixed).norm() > (
        small[1] @ small[0] @ fixed
    ).norm()  # on the data: IPM's is larger


@pytest.mark.parametrize("mode", ["ipm", "kpm"])
def test_same_adapter_as_the_reference(llama, mode, monkeypatch):
    try:
        import attr  # noqa: F401
    except ImportError:  # the reference imports attrs for one dataclass decorator; not a peftkit dependency
        monkeypatch.setitem(sys.modules, "attr", types.SimpleNamespace(dataclass=dataclasses.dataclass))
    preprocess_corda = importlib.import_module("peft.tuners.lora.corda").preprocess_corda
    batches = _batches()
    ours = copy.deepcopy(llama)
    peftkit.inject_corda(ours, _config(mode), batches)
    theirs = copy.deepcopy(llama)
    config = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        init_lora_weights="corda",
        target_modules=TARGETS,
        corda_config=importlib.import_module("peft.tuners.lora.config").CordaConfig(corda_method=mode),
    )

    def run_model():
        for batch in batches:
            theirs(**batch)

    preprocess_corda(theirs, config, run_model=run_model)
    theirs = peft.get_peft_model(theirs, config)
    names = [n for n, _ in ours.named_modules() if n.endswith(tuple(TARGETS))]
    for name in names:
        mine, ref = ours.get_submodule(name), theirs.base_model.model.get_submodule(name)
        a, b = mine.adapters["default"].lora_A.weight, mine.adapters["default"].lora_B.weight
        ra, rb = ref.lora_A["default"].weight, ref.lora_B["default"].weight
        assert torch.allclose(b @ a, rb @ ra, atol=1e-5), name  # the same adapter product
        assert torch.allclose(mine.base_layer.weight, ref.base_layer.weight, atol=1e-6), name  # same residual


@pytest.mark.parametrize("mode", ["ipm", "kpm"])
def test_saved_adapter_is_portable_and_loads_on_the_original_base(llama, tmp_path, mode):
    model = copy.deepcopy(llama)
    peftkit.inject_corda(model, _config(mode, use_rslora=mode == "kpm"), _batches())
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        model(IDS, labels=IDS).loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        expected = model(IDS).logits
    peftkit.save_adapter(model, tmp_path)  # CorDA: always portable, the file cannot carry the data
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["init_lora_weights"] is True and saved["r"] == 8
    ours = peftkit.load_adapter(copy.deepcopy(llama), tmp_path)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(llama), tmp_path).eval()
    with torch.no_grad():
        assert (ours(IDS).logits - expected).abs().max() <= 1e-5
        assert (theirs(IDS).logits - expected).abs().max() <= 1e-5
    peftkit.unload(model)  # and the base comes back
    with torch.no_grad():
        assert (model(IDS).logits - llama(IDS).logits).abs().max() <= 1e-5


def test_errors_name_the_fix(llama):
    with pytest.raises(ConfigError, match=r"inject_corda\(model, config, batches\).*portable=True"):
        peftkit.inject(copy.deepcopy(llama), _config("ipm"))  # no data
    with pytest.raises(ConfigError, match="none were given"):
        peftkit.inject_corda(copy.deepcopy(llama), _config("ipm"), [])
    with pytest.raises(ConfigError, match=r"corda_config.corda_method: 'ipm' .* or 'kpm'"):
        _config("both")
    with pytest.raises(UnsupportedLayerError, match=r"needs r <= min\(out, in\) = 16"):
        peftkit.inject_corda(
            copy.deepcopy(llama), _config("kpm").replace(r=20, target_modules=["k_proj"]), _batches(2)
        )
    with pytest.raises(UnsupportedLayerError, match="not linear layers: model.embed_tokens"):
        peftkit.inject_corda(
            copy.deepcopy(llama), _config("ipm").replace(target_modules=["embed_tokens"]), _batches(2)
        )


def test_gpt2_conv1d_weights_are_read_transposed():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32)).eval()
    model = copy.deepcopy(base)
    config = peftkit.LoraConfig(
        r=4,
        init_lora_weights="corda",
        corda_config={"corda_method": "kpm"},
        target_modules=["c_attn", "c_fc"],
    )
    peftkit.inject_corda(model, config, _batches(4))
    with torch.no_grad():
        assert (model(IDS).logits - base(IDS).logits).abs().max() <= 1e-5

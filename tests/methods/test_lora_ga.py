"""LoRA-GA (init_lora_weights="lora_ga"): the adapted model starts at the base model's outputs, A and B
span the gradient's top singular directions, the gradients and factors are the reference library's
(``peft.tuners.lora.loraga``, ``LoraLayer.lora_ga_init``), and adapters move between the libraries.
"""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from peft.tuners.lora.loraga import preprocess_loraga
from transformers import LlamaConfig, LlamaForCausalLM

import peftkit
from peftkit.errors import ConfigError
from peftkit.methods import lora_ga

BATCHES = [torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(i)) for i in range(3)]
IDS = BATCHES[0]
TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]


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


def _step(model):
    def step():
        for ids in BATCHES:
            model(ids, labels=ids).loss.backward()

    return step


def _config(**kw):
    return peftkit.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights="lora_ga", **kw)


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


def _ga_model(llama, **kw):
    model = copy.deepcopy(llama)
    config = _config(**kw)
    assert lora_ga.estimate_gradients(model, config, _step(model)) == 2 * len(TARGETS)
    grads = {
        n: m.__dict__[lora_ga.GRAD_ATTR].clone()
        for n, m in model.named_modules()
        if lora_ga.GRAD_ATTR in m.__dict__
    }
    return peftkit.inject(model, config), grads


def test_starts_at_the_base_and_spans_the_gradient(llama):
    model, grads = _ga_model(llama)
    assert (_logits(model) - _logits(llama)).abs().max() <= 1e-5
    assert all(not p.requires_grad or "lora_" in n for n, p in model.named_parameters())
    for name, grad in grads.items():
        adapter = model.get_submodule(name).adapters["default"]
        a, b = adapter.lora_A.weight.detach(), adapter.lora_B.weight.detach()
        u, _, vh = torch.linalg.svd(grad, full_matrices=False)
        # ArB2r (the default): A's rows are G's top r right singular vectors, B's columns the next r left ones (scaled)
        assert (a @ vh[:4].T).abs().max(dim=1).values.sub(1).abs().max() < 1e-3, name
        in_span = u[:, 4:8] @ (u[:, 4:8].T @ b)
        assert (b - in_span).norm() / b.norm() < 1e-2, name  # a randomised SVD's 5th-8th components
    # unload gives the original weights back (the offset is undone)
    restored = peftkit.unload(model)
    assert (_logits(restored) - _logits(llama)).abs().max() <= 1e-5


def test_gradients_match_the_reference(llama):
    ours, theirs = copy.deepcopy(llama), copy.deepcopy(llama)
    lora_ga.estimate_gradients(ours, _config(), _step(ours))
    config = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=TARGETS,
        init_lora_weights="lora_ga",
        lora_ga_config=peft.LoraGAConfig(),
    )
    preprocess_loraga(theirs, config, _step(theirs))
    names = [n for n, m in theirs.named_modules() if hasattr(m, "_peft_loraga_grad")]
    assert len(names) == 2 * len(TARGETS)
    for name in names:
        mine = ours.get_submodule(name).__dict__[lora_ga.GRAD_ATTR]
        assert torch.allclose(mine, theirs.get_submodule(name)._peft_loraga_grad, atol=1e-7), name
    assert all(p.grad is None for p in ours.parameters())


@pytest.mark.parametrize("direction", lora_ga.DIRECTIONS)
@pytest.mark.parametrize("scale", lora_ga.SCALES)
def test_factors_match_the_reference_lora_ga_init(llama, direction, scale):
    options = {"direction": direction, "scale": scale, "stable_gamma": 8}
    theirs = peft.get_peft_model(
        copy.deepcopy(llama), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["up_proj"])
    )
    layer = theirs.base_model.model.model.layers[0].mlp.up_proj
    weight = layer.base_layer.weight.detach().clone()
    grad = torch.randn(weight.shape, generator=torch.Generator().manual_seed(3)) @ torch.diag(
        torch.linspace(2, 0.1, weight.shape[1])
    )
    layer.base_layer._peft_loraga_grad = grad.clone()
    torch.manual_seed(7)
    layer.lora_ga_init("default", peft.LoraGAConfig(**options))
    torch.manual_seed(7)
    a, b = lora_ga.factors(grad, weight, 4, 2.0, options)
    assert torch.allclose(a, layer.lora_A["default"].weight, atol=1e-6)
    assert torch.allclose(b, layer.lora_B["default"].weight, atol=1e-6)
    # and the reference offsets its base the same way: W - s B A
    assert torch.allclose(layer.base_layer.weight, weight - 2.0 * b @ a, atol=1e-6)


def test_portable_save_loads_on_the_original_base_in_both_libraries(llama, tmp_path):
    model, _ = _ga_model(llama)
    with torch.no_grad():  # as if trained a little
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.add_(0.01 * torch.randn_like(p))
    expected = _logits(model)
    peftkit.save_adapter(model, tmp_path, portable=True)
    ours = peftkit.load_adapter(copy.deepcopy(llama), tmp_path)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(llama), tmp_path).eval()
    assert (_logits(ours) - expected).abs().max() <= 1e-5
    assert (_logits(theirs) - expected).abs().max() <= 1e-5


def test_reference_converted_adapter_loads_in_peftkit(llama, tmp_path):
    model = copy.deepcopy(llama)
    config = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=TARGETS,
        init_lora_weights="lora_ga",
        lora_ga_config=peft.LoraGAConfig(),
    )
    preprocess_loraga(model, config, _step(model))
    theirs = peft.get_peft_model(model, config).eval()
    assert (_logits(theirs) - _logits(llama)).abs().max() <= 1e-5
    theirs.peft_config[
        "default"
    ].init_lora_weights = True  # the reference's recipe: save the start as plain LoRA
    theirs.save_pretrained(tmp_path / "init")
    theirs.peft_config["default"].init_lora_weights = "lora_ga"
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_B" in name:
                p.add_(0.01 * torch.randn_like(p))
    expected = _logits(theirs)
    theirs.save_pretrained(
        tmp_path / "final", path_initial_model_for_weight_conversion=str(tmp_path / "init")
    )
    ours = peftkit.load_adapter(copy.deepcopy(llama), tmp_path / "final")
    assert (_logits(ours) - expected).abs().max() <= 1e-5


def test_bad_combinations_name_the_fix(llama):
    with pytest.raises(ConfigError, match="estimate_gradients"):
        peftkit.inject(copy.deepcopy(llama), _config())
    with pytest.raises(ConfigError, match="used only with init_lora_weights='lora_ga'"):
        peftkit.LoraConfig(lora_ga_config={"direction": "ArB2r"})
    with pytest.raises(ConfigError) as info:
        _config(lora_ga_config={"direction": "up", "scale": "big", "gamma": 1})
    assert len(info.value.problems) == 3
    model = copy.deepcopy(llama)
    with pytest.raises(ConfigError, match="no backward pass"):
        lora_ga.estimate_gradients(model, _config(), lambda: None)
    assert all(p.requires_grad for p in model.parameters())  # flags restored


def test_run_config_reaches_lora_ga():
    from peftkit.run.adapter import adapter_problems

    fields = {"init_lora_weights": "lora_ga", "lora_ga_config": {"direction": "ArB2r", "scale": "stable"}}
    assert adapter_problems("lora", fields) == []

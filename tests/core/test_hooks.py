"""Core mechanisms that only show when methods meet: transforms beside deltas, hooks released on
unload, exclusive model parts, train/eval mode of new wrappers."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

import peftkit
from peftkit.errors import AdapterNameError


def _linear_net() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5)), torch.randn(4, 6)


def test_an_output_transform_and_a_delta_on_one_layer_compose_as_scaled_base_plus_delta():
    model, x = _linear_net()
    base = model[0]
    with torch.no_grad():
        plain = base(x)
    peftkit.inject(
        model, peftkit.IA3Config(target_modules=["0"], feedforward_modules=[], init_ia3_weights=False), "s"
    )
    peftkit.inject(model, peftkit.LoraConfig(r=2, target_modules=["0"], init_lora_weights=False), "d")
    peftkit.set_active(model, ["s", "d"])
    layer = model[0]
    scale = layer.adapters["s"].ia3_l.detach().reshape(-1)
    with torch.no_grad():
        lora = layer.adapters["d"].delta_output(x, plain, layer.base_layer)
        assert torch.allclose(model(x), plain * scale + lora, atol=1e-6)


def test_a_recomputing_delta_beside_a_transform_sees_the_plain_base_output():
    # OFT on a convolution recomputes the layer and subtracts the base output it is given: with an
    # (IA)^3 output scaling active too, it must be given the unscaled output, or the scaling cancels.
    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Conv1d(4, 4, 3, padding=1)), torch.randn(2, 4, 8)
    peftkit.inject(
        model, peftkit.IA3Config(target_modules=["0"], feedforward_modules=[], init_ia3_weights=False), "s"
    )
    alone = model(x).detach()
    peftkit.inject(model, peftkit.OFTConfig(r=0, oft_block_size=2, target_modules=["0"]), "rot")  # R = I
    peftkit.set_active(model, ["s", "rot"])
    assert torch.allclose(model(x), alone, atol=1e-5)


def _tiny_bert() -> nn.Module:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        num_labels=2,
    )
    return BertForSequenceClassification(config).eval()


def test_unload_with_merge_releases_hooks_of_every_adapter_merged_or_not():
    model = _tiny_bert()
    peftkit.inject(model, peftkit.BottleneckConfig(placement="parallel"), "side")
    peftkit.inject(model, peftkit.LoraConfig(r=2, target_modules=["query"]), "main")  # active alone
    assert any(m._forward_pre_hooks for m in model.modules())
    plain = peftkit.unload(model, merge=True)
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in plain.modules())


def test_two_soft_prompts_cannot_be_active_together_and_set_active_says_so():
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=40,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
        )
    )
    peftkit.inject(model, peftkit.PromptTuningConfig(num_virtual_tokens=2), "a")
    peftkit.inject(model, peftkit.PromptTuningConfig(num_virtual_tokens=3), "b")
    with pytest.raises(AdapterNameError, match="cannot be active together"):
        peftkit.set_active(model, ["a", "b"])
    assert peftkit.active_adapters(model) == ["b"]  # unchanged by the refused call


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_new_wrappers_and_adapters_take_the_models_mode(mode):
    model = _tiny_bert().train(mode == "train")
    peftkit.inject(model, peftkit.LoraConfig(r=2, target_modules=["query"], lora_dropout=0.5))
    peftkit.inject(model, peftkit.PromptTuningConfig(num_virtual_tokens=2), "p")
    assert {m.training for m in model.modules()} == {mode == "train"}


def _encoder(nested: bool) -> nn.TransformerEncoder:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    return nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=nested).eval()


@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
@pytest.mark.parametrize(
    "config",
    [
        peftkit.LoraConfig(r=2, target_modules=["linear1"], init_lora_weights=False),
        peftkit.IA3Config(target_modules=["linear2"], feedforward_modules=[], init_ia3_weights=False),
    ],
    ids=["lora", "ia3"],
)
def test_torch_transformer_encoder_runs_its_adapters_in_eval_mode(config, nested):
    # In eval mode, with frozen weights, torch's encoder layer runs a fused kernel on the weights it reads
    # from its children, never calling them: without the no-op hook every adapter there would be skipped.
    base = _encoder(nested)
    x, pad = torch.randn(2, 3, 16), torch.tensor([[False, False, True], [False, False, False]])
    model = peftkit.inject(_encoder(nested), config)
    torch.backends.mha.set_fastpath_enabled(False)  # the regular path everywhere: what the adapter computes
    try:
        with torch.no_grad():
            expected, expected_padded = model(x), model(x, src_key_padding_mask=pad)
    finally:
        torch.backends.mha.set_fastpath_enabled(True)
    with torch.no_grad():
        assert (model(x) - base(x)).abs().max() > 1e-2
        assert torch.allclose(model(x), expected, atol=1e-5)
        padded = model(x, src_key_padding_mask=pad)  # the encoder would pack a nested tensor here
        assert torch.allclose(padded[~pad], expected_padded[~pad], atol=1e-5)
    assert model.use_nested_tensor is False
    peftkit.unload(model)
    assert model.use_nested_tensor is nested
    assert not any(m._forward_pre_hooks for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(x), base(x))

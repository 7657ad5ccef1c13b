"""LoRA-specific behaviour beyond the contract matrix and the parity tests.

- PiSSA/OLoRA adapters saved with portable=True apply to the original base weights anywhere.
- LoRA on a Conv2d subclass whose constructor and forward differ from nn.Conv2d's (as EfficientNet
  ports' "same"-padding convolutions do): the adapter must follow the subclass's own forward.
- Grouped and depthwise convolutions in the reference library's layout (issue 21 item 6): A reads every
  input channel, B is a grouped 1x1 conv, r a multiple of the groups; not mergeable.
"""

from __future__ import annotations

import copy
import json

import peft
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import peftkit
from peftkit.errors import AdapterNameError, UnsupportedLayerError


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


IDS = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))


def _trained(base, **options):
    model = peftkit.inject(
        copy.deepcopy(base),
        peftkit.LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=["q_proj", "v_proj"],
            rank_pattern={"v_proj": 2},
            alpha_pattern={"v_proj": 4},
            **options,
        ),
    )
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        model(IDS, labels=IDS).loss.backward()
        opt.step()
    return model.eval()


@pytest.mark.parametrize(
    "options",
    [
        {"init_lora_weights": "pissa"},
        {"init_lora_weights": "olora"},
        {"init_lora_weights": "pissa", "use_rslora": True},
        {"init_lora_weights": "pissa", "use_dora": True},
    ],
    ids=["pissa", "olora", "pissa-rslora", "pissa-dora"],
)
def test_portable_adapter_gives_the_same_model_on_the_original_base(llama, tmp_path, options):
    model = _trained(llama, **options)
    with torch.no_grad():
        expected = model(IDS).logits
    peftkit.save_adapter(model, tmp_path, portable=True)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (
        config["init_lora_weights"] is True and config["r"] == 8 and config["rank_pattern"] == {"v_proj": 4}
    )
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (8, 32)

    ours = peftkit.load_adapter(copy.deepcopy(llama), tmp_path)  # no init re-run on the base
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(llama), tmp_path).eval()
    with torch.no_grad():
        assert (ours(IDS).logits - expected).abs().max() <= 1e-5
        assert (theirs(IDS).logits - expected).abs().max() <= 1e-5


def test_portable_changes_nothing_for_plain_inits(llama, tmp_path):
    model = _trained(llama)
    peftkit.save_adapter(model, tmp_path / "a")
    peftkit.save_adapter(model, tmp_path / "b", portable=True)
    a, b = (
        load_file(tmp_path / "a" / "adapter_model.safetensors"),
        load_file(tmp_path / "b" / "adapter_model.safetensors"),
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "a" / "adapter_config.json").read_text() == (
        tmp_path / "b" / "adapter_config.json"
    ).read_text()


class SamePaddingConv(nn.Conv2d):
    """Pads asymmetrically in forward (TensorFlow "SAME"), takes a different constructor."""

    def __init__(
        self, channels_in: int, channels_out: int, kernel: int, stride: int, image_size: int
    ) -> None:
        super().__init__(channels_in, channels_out, kernel, stride)
        out = -(-image_size // stride)
        pad = max((out - 1) * stride + kernel - image_size, 0)
        self.pad = (pad // 2, pad - pad // 2, pad // 2, pad - pad // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.pad(x, self.pad), self.weight, self.bias, self.stride)


@pytest.mark.parametrize("dora", [False, True])
def test_lora_follows_a_conv_subclass_forward(dora, tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(SamePaddingConv(3, 4, 3, 2, image_size=8))
    x = torch.randn(2, 3, 8, 8)
    original = copy.deepcopy(model)
    peftkit.inject(
        model, peftkit.LoraConfig(r=2, target_modules=["0"], init_lora_weights=False, use_dora=dora)
    )
    with torch.no_grad():
        adapted = model(x)
        assert adapted.shape == original(x).shape
        assert (adapted - original(x)).abs().max() > 1e-3
        # the delta is the subclass's own computation with the low-rank kernel
        layer = model[0]
        if not dora:
            kernel = layer.base_layer.weight + layer.adapters["default"].delta_weight(layer.base_layer.weight)
            expected = F.conv2d(F.pad(x, layer.base_layer.pad), kernel, layer.base_layer.bias, 2)
            assert torch.allclose(adapted, expected, atol=1e-5)
    peftkit.save_adapter(model, tmp_path / "a")
    fresh = peftkit.load_adapter(copy.deepcopy(original), tmp_path / "a")
    with torch.no_grad():
        assert torch.equal(fresh(x), adapted)
        peftkit.merge(model)
        assert torch.allclose(model(x), adapted, atol=1e-5)


# -- grouped and depthwise convolutions -------------------------------------------------------------


class GroupedSamePaddingConv(SamePaddingConv):
    def __init__(self, channels: int, groups: int, stride: int, image_size: int) -> None:
        super().__init__(channels, channels, 3, stride, image_size)
        self.groups = groups
        self.weight = nn.Parameter(torch.randn(channels, channels // groups, 3, 3) * 0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.pad(x, self.pad), self.weight, self.bias, self.stride, groups=self.groups)


@pytest.mark.parametrize("through_base", [False, True], ids=["Conv2d", "subclass"])
@pytest.mark.parametrize("groups", [2, 8], ids=["grouped", "depthwise"])
def test_a_grouped_conv_adds_a_dense_low_rank_path(groups, through_base):
    torch.manual_seed(0)
    conv = (
        GroupedSamePaddingConv(8, groups, 2, image_size=7)
        if through_base
        else nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=groups)
    )
    model, x = nn.Sequential(conv), torch.randn(2, 8, 7, 7)
    peftkit.inject(
        model, peftkit.LoraConfig(r=8, lora_alpha=4, target_modules=["0"], init_lora_weights=False)
    )
    adapter = model[0].adapters["default"]
    # the reference's layout: A reads all 8 input channels, B is grouped (8 / groups inputs per output)
    assert adapter.lora_A.weight.shape == (8, 8, 3, 3) and adapter.lora_B.weight.shape == (
        8,
        8 // groups,
        1,
        1,
    )
    padded = F.pad(x, conv.pad) if through_base else F.pad(x, (1, 1, 1, 1))
    low_rank = F.conv2d(
        F.conv2d(padded, adapter.lora_A.weight, stride=2), adapter.lora_B.weight, groups=groups
    )
    with torch.no_grad():
        assert torch.allclose(model(x), conv(x) + 0.5 * low_rank, atol=1e-5)


@pytest.mark.parametrize("dora", [False, True])
def test_a_grouped_conv_adapter_saves_loads_and_refuses_to_merge(dora, tmp_path):
    torch.manual_seed(0)
    base, x = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1, groups=2)), torch.randn(2, 4, 5, 5)
    model = peftkit.inject(
        copy.deepcopy(base),
        peftkit.LoraConfig(r=4, target_modules=["0"], init_lora_weights=False, use_dora=dora),
    )
    with torch.no_grad():
        adapted = model(x)
    assert (adapted - base(x)).abs().max() > 1e-3
    for merge in (lambda: peftkit.merge(model, safe=True), lambda: peftkit.unload(model, merge=True)):
        with pytest.raises(AdapterNameError, match="groups=2 LoRA's delta is a dense kernel"):
            merge()
    with torch.no_grad():
        assert torch.equal(model(x), adapted)
    peftkit.save_adapter(model, tmp_path / "a")
    fresh = peftkit.load_adapter(copy.deepcopy(base), tmp_path / "a")
    with torch.no_grad():
        assert torch.equal(fresh(x), adapted)
    assert type(peftkit.unload(model)[0]) is nn.Conv2d


def test_a_rank_not_divisible_by_the_groups_is_refused_with_a_rank_that_fits():
    model = nn.Sequential(nn.Conv2d(6, 6, 3, groups=3), nn.Conv2d(6, 6, 1))
    with pytest.raises(
        UnsupportedLayerError, match=r"^0: .*groups=3 needs a rank divisible by 3.*r=6 through rank_pattern"
    ):
        peftkit.inject(model, peftkit.LoraConfig(r=4, target_modules=r"\d"))
    assert not any(isinstance(m, peftkit.core.layer.AdapterLayer) for m in model.modules())
    peftkit.inject(model, peftkit.LoraConfig(r=4, target_modules=r"\d", rank_pattern={"0": 6}))
    assert model[0].adapters["default"].r == 6 and model[1].adapters["default"].r == 4

"""LoRA on a Conv2d subclass whose constructor and forward differ from nn.Conv2d's (as EfficientNet
ports' "same"-padding convolutions do): the adapter must follow the subclass's own forward."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import peftkit


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

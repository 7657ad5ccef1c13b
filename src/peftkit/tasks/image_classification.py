"""Image classification with a pretrained CNN and a new head: ``task: image-classification``.

The model is the bundled EfficientNet-Lite0 (``peftkit.models.efficientnet``); the data a bundled
image data set (``data.name: fashion_mnist``) or files whose ``image`` column holds image file paths
(relative to the working directory) and whose ``label`` column holds class names or ids.

An example is ``{"image": ..., "label": ...}``. The image may be a tensor or array (``[H, W]`` grey,
``[C, H, W]`` or ``[H, W, C]`` with 1, 3 or 4 channels; uint8 in 0..255 or float in 0..1), a PIL
image, or a file path (``.npy``, ``.pt``, or PNG/JPEG/... when Pillow is installed). The label is a
class id or a class name. Every image becomes RGB (grey is repeated over the three channels; alpha is
dropped), is resized to ``data.image_size`` squared (default 64: small enough for a CPU, and the
28x28 Fashion-MNIST images are upsampled anyway) and normalised with the ImageNet statistics the
weights were trained with.

The new head ``_fc`` is trained in full beside the adapter: when the run's adapter config does not
name ``modules_to_save``, the task sets it to ``["_fc"]`` (a plain ``nn.Module`` is not a transformers
``*ForSequenceClassification`` model, whose head is found automatically).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..core.registry import DEFAULT_METHOD, FULL_FINE_TUNING
from ..data.config import DataConfig
from ..data.files import load_examples
from ..errors import ConfigError
from ..models import bundled_model_path
from ..models.config import ModelConfig
from ..models.efficientnet import HEAD, IMAGENET_MEAN, IMAGENET_STD, load_efficientnet_lite0
from ..models.efficientnet import NAME as EFFICIENTNET
from ..models.loading import DTYPES as MODEL_DTYPES
from ..train.config import TrainConfig
from .base import Batch, Example, eval_mode, register_task
from .classification import Classifier, head_problems, metric_problems
from .config import EvalConfig
from .probes import BehaviourProbe, head_input_features

ROLES = ["image", "label"]
# the dtypes this task loads EfficientNet-Lite0 in (no float16)
DTYPES = {name: MODEL_DTYPES[name] for name in ("float32", "bfloat16")}
DEFAULT_IMAGE_SIZE = 64
MIN_IMAGE_SIZE = 32
_TENSOR_FILES = (".npy", ".pt", ".pth")
_RANGE_SLACK = 1e-3  # float images may overshoot 0..1 by rounding (e.g. after their own resizing)


def _bundled_class_names(data_name: str | None) -> list[str] | None:
    if data_name == "fashion_mnist":
        from ..data.fashion_mnist import CLASS_NAMES

        return list(CLASS_NAMES)
    return None


# --- images -> model inputs -------------------------------------------------------------------------


def read_image(path: str | Path) -> torch.Tensor:
    """An image file as a tensor: ``.npy`` / ``.pt`` as stored, other formats through Pillow (uint8 HWC).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ModuleNotFoundError: the file needs Pillow (or numpy for ``.npy``), which is not installed.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    if suffix in (".pt", ".pth"):
        loaded = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(loaded, torch.Tensor):
            raise ValueError(f"{path} holds a {type(loaded).__name__}, expected a single image tensor")
        return loaded
    if suffix == ".npy":
        import numpy as np  # comes with transformers; only needed for this format

        return torch.from_numpy(np.load(path, allow_pickle=False))
    try:
        from PIL import Image
    except ModuleNotFoundError:
        raise ModuleNotFoundError(
            f"reading {path.name} needs Pillow (`pip install pillow`); without it give images as "
            f"{', '.join(_TENSOR_FILES)} files or tensors"
        ) from None
    with Image.open(path) as image:
        return _from_pil(image)


def _from_pil(image: Any) -> torch.Tensor:
    import numpy as np

    mode = "L" if image.mode in ("1", "L", "I", "I;16", "F") else "RGB"
    return torch.from_numpy(np.array(image.convert(mode)))  # uint8 [H, W] or [H, W, 3]


def to_chw(image: Any) -> torch.Tensor:
    """One image (tensor, array, PIL image or file path) as float RGB ``[3, H, W]`` in 0..1.

    Raises:
        ValueError: the value does not have the shape or type of an image (the message says what it got).
    """
    if isinstance(image, (str, Path)):
        image = read_image(image)
    elif type(image).__module__.startswith("PIL."):
        image = _from_pil(image)
    elif not isinstance(image, torch.Tensor):
        image = torch.as_tensor(image)  # numpy arrays, nested lists
    if image.dim() == 2:
        image = image.unsqueeze(0)
    elif image.dim() == 3 and image.shape[0] not in (1, 3, 4) and image.shape[-1] in (1, 3, 4):
        image = image.permute(2, 0, 1)  # HWC (PIL, numpy) -> CHW
    if image.dim() != 3 or image.shape[0] not in (1, 3, 4):
        raise ValueError(
            f"an image must be [H, W], [C, H, W] or [H, W, C] with 1, 3 or 4 channels; got shape {tuple(image.shape)}"
        )
    pixels = image.float() / 255.0 if image.dtype == torch.uint8 else image.float()
    low, high = pixels.min().item(), pixels.max().item()
    if low < -_RANGE_SLACK or high > 1 + _RANGE_SLACK:
        # 0..255 values in a float array would otherwise saturate every pixel without a word.
        raise ValueError(
            f"a {image.dtype} image must hold values in 0..1, got {low:g}..{high:g}; divide it by 255, or "
            "give it as uint8 (0..255); normalisation is done by the task"
        )
    if pixels.shape[0] == 4:  # RGBA: the alpha channel is not part of what the network saw in training
        pixels = pixels[:3]
    return pixels.expand(3, -1, -1) if pixels.shape[0] == 1 else pixels


_MEAN = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
_STD = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


def pixel_values(images: Sequence[Any], image_size: int) -> torch.Tensor:
    """A batch of model inputs ``[N, 3, image_size, image_size]``: RGB, resized, ImageNet-normalised."""
    chw = [to_chw(image) for image in images]
    # Same-sized images (all of Fashion-MNIST) are resized in one call, which is far cheaper.
    groups = [torch.stack(chw)] if len({c.shape for c in chw}) == 1 else [c.unsqueeze(0) for c in chw]
    resized = [
        g
        if g.shape[-2:] == (image_size, image_size)
        # antialias: photos larger than image_size are downsampled without aliasing (no-op when upsampling)
        else F.interpolate(
            g, size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=True
        )
        for g in groups
    ]
    return (torch.cat(resized) - _MEAN) / _STD


# --- the task ---------------------------------------------------------------------------------------


@register_task("image-classification")
class ImageClassificationTask(Classifier):
    """Fine-tune an image classifier (the bundled EfficientNet-Lite0) on labelled images.

    Built from the run-config sections it reads (each defaults to that section's defaults):
    ``model`` (``name_or_path``: "efficientnet-lite0" or an EfficientNet-Lite0 weights file, ``dtype``,
    ``num_labels``), ``data`` (``image_size``, ``labels``, a bundled data set or files with ``image`` and
    ``label`` columns), ``eval`` (``metrics``), ``train`` (``seed``, which seeds the new head) and
    ``adapter``, which it changes in place: unless the method is full fine-tuning or the section names
    ``modules_to_save``, the new head ``_fc`` is trained in full beside the adapter.

    Attributes:
        model_config, data, eval: Those sections.
        seed: Seeds the new head.
        image_size: Side of the square model inputs.
        labels: Class names in label-id order (None until given by ``data.labels``, the bundled data
            set or the data).
        data_info: How the data was loaded and split (``peftkit.data.files.Splits.info``), once loaded.
    """

    name: str
    input_role = ROLES[0]  # the key `peftkit predict` reads from a JSON input
    default_metric = "accuracy"
    greater_is_better = True
    empty_split_hint = "check data.split and data.max_eval_examples"
    unnamed_label = "{}"

    sections = ("model", "data", "eval", "train", "adapter")

    def __init__(
        self,
        *,
        model: ModelConfig | None = None,
        data: DataConfig | None = None,
        eval: EvalConfig | None = None,
        train: TrainConfig | None = None,
        adapter: dict[str, Any] | None = None,
    ) -> None:
        self.model_config = model or ModelConfig()
        self.data = data or DataConfig()
        self.eval = eval or EvalConfig()
        self.seed = (train or TrainConfig()).seed
        self.image_size = self.data.image_size or DEFAULT_IMAGE_SIZE
        names = self.data.labels or _bundled_class_names(self.data.name)
        self.labels: list[str] | None = [str(n) for n in names] if names else None
        self.data_info: dict[str, Any] | None = None
        self._splits: dict[str, list[dict[str, Any]]] | None = None
        problems = _config_problems(self.model_config, self.data, self.eval)
        if problems:
            raise ConfigError(problems, what="image-classification config")
        adapter = {"method": DEFAULT_METHOD} if adapter is None else adapter
        if (
            adapter.get("method", DEFAULT_METHOD) != FULL_FINE_TUNING
            and adapter.get("modules_to_save") is None
        ):
            adapter["modules_to_save"] = [HEAD]  # the fresh head trains in full beside the adapter

    # -- loading -----------------------------------------------------------------------------------

    def load_data(self) -> dict[str, Sequence[Example]]:
        """The configured splits (loaded once); fixes the class names from the data when unset.

        Raises:
            ConfigError: bad data config, or label values that fit neither ``data.labels`` nor ids.
        """
        if self._splits is None:
            splits = load_examples(self.data, ROLES)
            if self.labels is None:
                self.labels = _names_from_values([e["label"] for part in splits.values() for e in part])
            self.data_info = dict(splits.info, labels=list(self.labels))
            self._splits = dict(splits)
        return self._splits

    def load_model(self) -> nn.Module:
        """EfficientNet-Lite0 with ImageNet weights and a fresh head with one output per class.

        Raises:
            ConfigError: ``model.name_or_path`` is neither the bundled model nor a weights file,
                ``model.num_labels`` is below the number of classes, or the classes are unknown.
            DataNotInstalledError: the model's packages are not installed.
        """
        model_cfg = self.model_config
        if self.labels is None and not model_cfg.num_labels:
            self.load_data()
        num_labels = model_cfg.num_labels or len(self.labels or [])
        problems = []
        if self.labels is not None and num_labels < len(self.labels):
            problems.append(
                f"model.num_labels is {num_labels} but there are {len(self.labels)} classes; raise it or unset it"
            )
        source = model_cfg.name_or_path
        weights = bundled_model_path(EFFICIENTNET) if source.lower() == EFFICIENTNET else source
        if source.lower() != EFFICIENTNET and not Path(source).is_file():
            problems.append(
                f"model.name_or_path: {source!r} is neither the bundled {EFFICIENTNET!r} nor an existing "
                "EfficientNet-Lite0 weights file (.pth, .pt, .safetensors)"
            )
        if problems:
            raise ConfigError(problems, what="image-classification config")
        model = load_efficientnet_lite0(num_labels, self.image_size, weights, seed=self.seed)
        return model.to(DTYPES[model_cfg.dtype])

    # -- batches and loss --------------------------------------------------------------------------

    def label_id(self, value: Any) -> int:
        """The class id of a label value: a class name, or an integer id below the number of classes.

        Raises:
            KeyError: the value is not a known class (the message lists the classes).
        """
        if self.labels is None:
            raise KeyError(
                "the classes are not known yet: call load_data() or load_model() first, or set data.labels"
            )
        if str(value) in self.labels:
            return self.labels.index(str(value))
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(self.labels):
            return value
        raise KeyError(
            f"label {value!r} is neither a class name in {self.labels} nor an id below {len(self.labels)}"
        )

    def collate(self, examples: Sequence[Example]) -> Batch:
        """``{"pixel_values": float [N, 3, S, S], "labels": int64 [N]}`` (``labels`` when every example has one)."""
        batch: dict[str, Any] = {
            "pixel_values": pixel_values([_image_of(e) for e in examples], self.image_size)
        }
        if examples and all(isinstance(e, Mapping) and "label" in e for e in examples):
            batch["labels"] = torch.tensor([self.label_id(e["label"]) for e in examples], dtype=torch.long)
        return batch

    def batch_logits(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        return _logits(model, batch["pixel_values"])

    def inputs(self, items: Sequence[Any]) -> Batch:
        """Images: file paths, tensors, arrays, PIL images, or mappings with an ``"image"`` key."""
        return {"pixel_values": pixel_values([_image_of(item) for item in items], self.image_size)}

    # -- evaluation and prediction (loss, evaluate, baseline, predict: Classifier) ------------------

    def behaviour_probe(self, model: nn.Module, n: int, batch_size: int) -> BehaviourProbe:
        """The pooled backbone features (the classifier head's input) of the first ``n`` test images:
        what ``peftkit compare`` measures forgetting with. No general image set ships here, so the
        probe uses held-out images of the task itself: it measures how far the pretrained feature
        space moved, not the model's skill on other images.

        Raises:
            ValueError: the data has no test images, or the model has no linear head with one output
                per class.
        """
        images = [_image_of(e) for e in self.load_data().get("test", [])[:n]]
        if len(images) < 2:
            raise ValueError("the behaviour probe needs at least 2 test images; the test split has fewer")
        width = len(self.labels or [])
        heads = [m for m in model.modules() if isinstance(m, nn.Linear) and m.out_features == width]
        if not heads:
            raise ValueError(
                f"found no nn.Linear head with {width} outputs (one per class) to read features from"
            )
        features = []
        with eval_mode(model):
            for start in range(0, len(images), batch_size):
                pixels = pixel_values(images[start : start + batch_size], self.image_size)
                features.append(head_input_features(heads, lambda p=pixels: _logits(model, p)))
        return BehaviourProbe("features", "held-out test images of the task", features=torch.cat(features))


def _config_problems(model: ModelConfig, data: DataConfig, eval: EvalConfig) -> list[str]:
    """Every problem in the sections this task reads, so they can be reported together."""
    problems = []
    if data.image_size is not None and data.image_size < MIN_IMAGE_SIZE:
        problems.append(
            f"data.image_size: expected at least {MIN_IMAGE_SIZE} pixels (the network downsamples 32x), "
            f"got {data.image_size}"
        )
    return problems + head_problems(model, data, list(DTYPES)) + metric_problems(eval, "image classification")


def _names_from_values(values: Sequence[Any]) -> list[str]:
    """Class names from the label values of the data: ids 0..max for integers, else the sorted names."""
    distinct = set(values)
    if len(distinct) < 2:
        raise ConfigError(
            [
                f"the data has {len(distinct)} distinct label value(s) {sorted(distinct, key=str)}; classification "
                "needs at least 2: check data.columns.label points at the label column"
            ],
            what="image-classification data",
        )
    if all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in distinct):
        return [
            str(i) for i in range(max(distinct) + 1)
        ]  # ids: a class missing from a small sample keeps its id
    return sorted(str(v) for v in distinct)


def _image_of(item: Any) -> Any:
    return item["image"] if isinstance(item, Mapping) else item


def _logits(model: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    param = next(model.parameters())
    out = model(pixels.to(device=param.device, dtype=param.dtype))
    logits = out if isinstance(out, torch.Tensor) else out.logits
    return logits.float()  # loss and softmax in float32, also for a bfloat16 model

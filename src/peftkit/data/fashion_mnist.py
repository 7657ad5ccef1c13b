"""Fashion-MNIST (Xiao et al. 2017): 70,000 28x28 greyscale photos of clothing in 10 classes.

The images ship in the Debian package ``dataset-fashion-mnist`` as the original IDX files, gzipped,
under ``/usr/share/datasets/fashion-mnist/``. We parse IDX ourselves (a big-endian header, then raw
bytes; http://yann.lecun.com/exdb/mnist/ describes the format), so no extra Python package is needed.

Splits (deterministic for a seed): the 60,000 training images are permuted with
``torch.Generator().manual_seed(seed)``; the first ``round(60,000 x validation)`` of them (6,000 with
the default 0.1) are the validation split and the rest train. The official 10,000-image test set is
the test split (``split.test`` does not apply), in a seeded order too so that ``max_eval_examples``
takes a sample of every class rather than the file's first images. Both sets are class-balanced
(6,000 + 1,000 images per class).

An example is ``{"image": uint8 tensor [28, 28], "label": int}``; ``CLASS_NAMES`` gives the label names.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError, DataNotInstalledError, PeftkitError
from .registry import register_dataset

NAME = "fashion_mnist"
DEBIAN_PACKAGE = "dataset-fashion-mnist"
DEFAULT_FOLDER = Path("/usr/share/datasets/fashion-mnist")
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
CLASS_NAMES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
# IDX magic numbers: two zero bytes, a type code (0x08 = unsigned byte) and the number of dimensions.
_IDX_UBYTE = 0x08


class IdxFormatError(PeftkitError, ValueError):
    """A file is not the IDX file it should be (wrong magic number, truncated, mismatched counts)."""


def read_idx(path: str | Path) -> torch.Tensor:
    """Read a (gzipped) IDX file of unsigned bytes into a uint8 tensor of the shape its header gives.

    Args:
        path: An ``*-idx?-ubyte.gz`` file (plain, uncompressed IDX files are read too).

    Returns:
        A tensor of shape ``(n,)`` for labels or ``(n, rows, cols)`` for images.

    Raises:
        IdxFormatError: the file is not an unsigned-byte IDX file or holds fewer bytes than its header says.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        raw = handle.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise IdxFormatError(
            f"{path} does not start with an IDX magic number (00 00 <type> <ndim>); is it an IDX file?"
        )
    dtype_code, ndim = raw[2], raw[3]
    if dtype_code != _IDX_UBYTE:
        raise IdxFormatError(
            f"{path} holds IDX type 0x{dtype_code:02x}; only unsigned bytes (0x08) are supported"
        )
    header = 4 + 4 * ndim
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    count = 1
    for size in shape:
        count *= size
    if len(raw) - header != count:
        raise IdxFormatError(
            f"{path} header says shape {tuple(shape)} ({count} bytes) but {len(raw) - header} bytes follow; "
            f"the file is truncated or corrupt: reinstall it with `apt-get install --reinstall {DEBIAN_PACKAGE}`"
        )
    # bytearray: torch.frombuffer needs a writable buffer to avoid a warning, and owns its copy then.
    return torch.frombuffer(bytearray(raw[header:]), dtype=torch.uint8).reshape(shape)


def data_folder(folder: str | Path | None = None) -> Path:
    """The folder holding the four IDX files.

    Raises:
        DataNotInstalledError: a file is missing; the message names the Debian package to install.
    """
    folder = Path(folder) if folder is not None else DEFAULT_FOLDER
    missing = [name for pair in FILES.values() for name in pair if not (folder / name).is_file()]
    if missing:
        raise DataNotInstalledError(
            f"Fashion-MNIST is not installed: {folder} lacks {', '.join(missing)}; install it with "
            f"`sudo apt-get install {DEBIAN_PACKAGE}` (or run `make setup` as root)"
        )
    return folder


def read_set(which: str, folder: str | Path | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``uint8 [n, 28, 28]`` and labels ``int64 [n]`` of the "train" (60k) or "test" (10k) file pair.

    Raises:
        DataNotInstalledError: the Debian package is not installed.
        IdxFormatError: a file is corrupt, or images and labels disagree in number or range.
    """
    images_file, labels_file = FILES[which]
    root = data_folder(folder)
    images, labels = read_idx(root / images_file), read_idx(root / labels_file)
    if images.dim() != 3 or labels.dim() != 1 or images.shape[0] != labels.shape[0]:
        raise IdxFormatError(
            f"{images_file} has shape {tuple(images.shape)} and {labels_file} {tuple(labels.shape)}: "
            "expected [n, rows, cols] images and [n] labels with the same n"
        )
    if labels.numel() and int(labels.max()) >= len(CLASS_NAMES):
        raise IdxFormatError(
            f"{labels_file} holds label {int(labels.max())}; Fashion-MNIST has {len(CLASS_NAMES)} classes"
        )
    return images, labels.long()


def _examples(
    images: torch.Tensor, labels: torch.Tensor, order: torch.Tensor, limit: int | None
) -> list[dict]:
    chosen = order if limit is None else order[:limit]
    # clone: each example owns its 784 bytes instead of a view that would keep (and pickle) the whole set
    return [{"image": images[i].clone(), "label": int(labels[i])} for i in chosen.tolist()]


def load_splits(
    seed: int = 0,
    validation: float = 0.1,
    max_train_examples: int | None = None,
    max_eval_examples: int | None = None,
    folder: str | Path | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """Deterministic train / validation / test splits of Fashion-MNIST (see the module docstring).

    Args:
        seed: Seed of the permutations; the same seed always gives the same splits.
        validation: Share of the 60,000 training images held out for validation (0 <= validation < 1).
        max_train_examples: Keep only the first N training examples of the permuted order (None: all).
        max_eval_examples: Keep only the first N validation and test examples (None: all).
        folder: Where the IDX files are; by default the Debian package's folder.

    Returns:
        ``{"train", "validation", "test"}``, each a list of ``{"image": uint8 [28, 28], "label": int}``.

    Raises:
        ConfigError: ``validation`` or a limit is out of range.
        DataNotInstalledError: the Debian package is not installed (the message says how to install it).
    """
    problems = []
    if not 0 <= validation < 1:
        problems.append(f"data.split.validation: must be in [0, 1), got {validation!r}")
    for key, value in (("max_train_examples", max_train_examples), ("max_eval_examples", max_eval_examples)):
        if value is not None and value < 0:
            problems.append(f"data.{key}: must be >= 0 or null, got {value!r}")
    if problems:
        raise ConfigError(problems, what="Fashion-MNIST split")
    train_images, train_labels = read_set("train", folder)
    test_images, test_labels = read_set("test", folder)
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(train_labels), generator=generator)
    test_order = torch.randperm(len(test_labels), generator=generator)
    n_val = round(len(train_labels) * validation)
    return {
        "train": _examples(train_images, train_labels, order[n_val:], max_train_examples),
        "validation": _examples(train_images, train_labels, order[:n_val], max_eval_examples),
        "test": _examples(test_images, test_labels, test_order, max_eval_examples),
    }


@register_dataset(NAME)
def load_fashion_mnist(config: Any) -> dict[str, list[dict[str, Any]]]:
    """Registry loader: the splits for a run's ``DataConfig`` (``split.seed``, ``split.validation``,
    ``max_train_examples``, ``max_eval_examples``)."""
    return load_splits(
        seed=config.split.seed,
        validation=config.split.validation,
        max_train_examples=config.max_train_examples,
        max_eval_examples=config.max_eval_examples,
    )

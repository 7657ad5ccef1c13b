"""Parity with the reference library (peft 0.21.2) for trainable tokens, both ways, on tiny Llama models with
tied and untied embeddings: the standalone method (``TrainableTokensConfig``) and LoRA's
``trainable_token_indices`` (a list: the input embedding; a dict: the embedding and the untied head).

"peftkit->peft": trained by peftkit, saved with ``peftkit.save_adapter``, loaded with
``peft.PeftModel.from_pretrained``. "peft->peftkit": trained by peft, saved with ``save_pretrained``, loaded
with ``peftkit.load_adapter``. Each compares the outputs unmerged, merged in place, and merged and unloaded;
a fresh adapter from the same config writes the same tensor keys and shapes and the same config keys.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn

import peftkit
from support.tokens import NEW, logits, tiny_llama, train

pytestmark = [
    pytest.mark.filterwarnings(
        "ignore:.*is_gradient_checkpointing.*:FutureWarning",
        "ignore:.*tie_word_embeddings.*:UserWarning",  # the reference's own warnings on tied models
    ),
    pytest.mark.usefixtures("one_thread"),
]

peft = pytest.importorskip("peft")

ATOL = 1e-5
LORA = {"r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"]}
# name -> (tied?, config class name in both libraries, options)
CASES: dict[str, tuple[bool, str, dict]] = {
    "tokens-tied": (True, "TrainableTokensConfig", {"token_indices": NEW}),
    "tokens-untied-embedding-and-head": (
        False,
        "TrainableTokensConfig",
        {"token_indices": NEW, "target_modules": ["embed_tokens", "lm_head"]},
    ),
    "tokens-untied-embedding": (False, "TrainableTokensConfig", {"token_indices": NEW}),
    "lora-tokens-tied": (True, "LoraConfig", {**LORA, "trainable_token_indices": NEW}),
    "lora-tokens-dict-untied": (
        False,
        "LoraConfig",
        {**LORA, "trainable_token_indices": {"embed_tokens": NEW, "lm_head": NEW[:2]}},
    ),
}


@pytest.fixture(scope="module")
def bases():
    return {True: tiny_llama(tied=True), False: tiny_llama(tied=False)}


def _config(lib, name: str):
    _, cls, options = CASES[name]
    return getattr(lib, cls)(**copy.deepcopy(options))  # fresh lists: peft edits them in place


def _close(ours: nn.Module, theirs: nn.Module, base: torch.Tensor) -> None:
    a, b = logits(ours), logits(theirs)
    assert (a - base).abs().max() > 1e-3, (
        "the adapter does not change the output: the comparison proves nothing"
    )
    assert (a - b).abs().max() <= ATOL, f"peftkit vs peft: max abs diff {(a - b).abs().max():.3e}"


def _pair(direction: str, base: nn.Module, name: str, directory: Path) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    if direction == "peftkit->peft":
        ours = peftkit.inject(copy.deepcopy(base), _config(peftkit, name))
        train(ours)
        peftkit.save_adapter(ours, directory)
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), directory).eval()
    else:
        theirs = peft.get_peft_model(copy.deepcopy(base), _config(peft, name))
        train(theirs)
        theirs.save_pretrained(directory)
        ours = peftkit.load_adapter(copy.deepcopy(base), directory).eval()
    return ours, theirs


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("direction", ["peftkit->peft", "peft->peftkit"])
def test_outputs_agree_unmerged_merged_and_unloaded(bases, direction, name, tmp_path):
    base_model = bases[CASES[name][0]]
    base = logits(base_model)
    ours, theirs = _pair(direction, base_model, name, tmp_path / "adapter")
    _close(ours, theirs, base)
    peftkit.merge(ours, safe=True)
    theirs.merge_adapter()
    _close(ours, theirs, base)
    peftkit.unmerge(ours)
    theirs.unmerge_adapter()
    _close(ours, theirs, base)
    plain, theirs_plain = peftkit.unload(ours, merge=True), theirs.merge_and_unload()
    _close(plain, theirs_plain, base)
    tied = CASES[name][0]
    assert (plain.lm_head.weight is plain.model.embed_tokens.weight) == tied  # the tie is kept, not broken


@pytest.mark.parametrize("name", list(CASES))
def test_a_fresh_adapter_writes_the_same_files(bases, name, tmp_path):
    base = bases[CASES[name][0]]
    peftkit.save_adapter(peftkit.inject(copy.deepcopy(base), _config(peftkit, name)), tmp_path / "ours")
    peft.get_peft_model(copy.deepcopy(base), _config(peft, name)).save_pretrained(tmp_path / "theirs")
    shapes = []
    for side in ("ours", "theirs"):
        with safe_open(str(tmp_path / side / "adapter_model.safetensors"), "pt") as handle:
            shapes.append({k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()})
    assert shapes[0] == shapes[1]
    written = [
        json.loads((tmp_path / side / "adapter_config.json").read_text()) for side in ("ours", "theirs")
    ]
    assert set(written[0]) <= set(written[1]), "a key the reference does not know would make it warn"
    for key in ("target_modules", "token_indices", "trainable_token_indices", "init_weights"):
        ours, theirs = written[0].get(key), written[1].get(key)
        if key == "target_modules" and isinstance(theirs, list):  # the reference writes a set, in any order
            ours, theirs = set(ours), set(theirs)
        assert ours == theirs, key


def test_the_tied_head_is_saved_as_the_reference_saves_it(bases, tmp_path):
    """The standalone method writes the rows under the tied head too (the reference does); LoRA's does not."""
    for name, keys in [
        (
            "tokens-tied",
            {
                "base_model.model.model.embed_tokens.trainable_tokens_delta",
                "base_model.model.lm_head.trainable_tokens_delta",
            },
        ),
        ("lora-tokens-tied", {"base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"}),
    ]:
        ours = peftkit.inject(copy.deepcopy(bases[True]), _config(peftkit, name))
        saved = {k for k in peftkit.adapter_state_dict(ours) if "lora_" not in k}
        assert saved == keys, name

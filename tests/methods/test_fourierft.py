"""FourierFT: options, the spectral positions, and two-way parity with the reference library (peft 0.21.2).

Parity covers every FourierFT case of the reference's custom-model test matrix (its tests/test_custom_models.py,
"Vanilla MLP 1/2/3/5/6/7 FourierFT") both ways, unmerged, merged and merged-and-unloaded (fp32 max abs
diff <= 1e-5), and GPT-2's Conv1D layers.
"""

from __future__ import annotations

import copy
import re
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

import peftkit
from peftkit.errors import ConfigError, UnsupportedLayerError
from peftkit.methods.fourierft import FourierFTConfig, FourierFTLinear, spectral_positions
from support import custom_models as cm

peft = pytest.importorskip("peft")
from peft.utils import get_peft_model_state_dict  # noqa: E402

DOCS = Path(__file__).resolve().parents[2] / "docs" / "fourierft.md"

pytestmark = [
    pytest.mark.usefixtures("one_thread"),  # tiny models: one intra-op thread is fastest
    pytest.mark.filterwarnings("ignore:All adapters are already merged:UserWarning"),  # peft merge_and_unload
]


# -- config ---------------------------------------------------------------------------------------


def test_defaults_follow_the_reference_config():
    ours, theirs = FourierFTConfig(), peft.FourierFTConfig()
    for key in ("n_frequency", "scaling", "random_loc_seed", "fan_in_fan_out", "bias", "init_weights"):
        assert getattr(ours, key) == getattr(theirs, key), key
    assert ours.n_frequency_pattern == theirs.n_frequency_pattern == {}


def test_every_config_problem_is_reported_at_once():
    with pytest.raises(ConfigError) as info:
        FourierFTConfig(
            n_frequency=0,
            scaling=float("inf"),
            random_loc_seed="seed",
            bias="lora_only",
            init_weights="zeros",
            n_frequency_pattern={"lin0": 2.5},
            rank_pattern={"lin0": 2},
        )
    problems = info.value.problems
    for field in (
        "n_frequency:",
        "scaling:",
        "random_loc_seed:",
        "bias:",
        "init_weights:",
        "n_frequency_pattern[",
        "rank_pattern:",
    ):
        assert any(p.startswith(field) for p in problems), (field, problems)


# -- the spectrum ---------------------------------------------------------------------------------


def test_positions_and_delta_equal_the_references():
    for seed in (777, 3):
        base = cm.base("MLP")
        config = {"n_frequency": 7, "target_modules": ["lin0", "lin1"], "random_loc_seed": seed}
        ours = peftkit.inject(copy.deepcopy(base), FourierFTConfig(**config))
        theirs = peft.get_peft_model(copy.deepcopy(base), peft.FourierFTConfig(**copy.deepcopy(config)))
        for name in ("lin0", "lin1"):
            adapter = getattr(ours, name).adapters["default"]
            layer = getattr(theirs.base_model.model, name)
            rows, cols = layer.indices["default"]
            assert torch.equal(adapter.positions, rows * layer.in_features + cols)
            with torch.no_grad():
                adapter.fourierft_spectrum.copy_(layer.fourierft_spectrum["default"])
            delta = adapter.delta_weight(layer.base_layer.weight)
            assert (delta - layer.get_delta_weight("default")).abs().max() <= 1e-6
    assert not torch.equal(spectral_positions(20, 10, 7, 0), spectral_positions(20, 10, 7, 1))


def test_the_delta_is_the_scaled_real_inverse_dft_of_the_sparse_spectrum():
    layer = FourierFTLinear(nn.Linear(4, 3), n_frequency=5, scaling=2.0, seed=0, init_weights=False)
    dense = torch.zeros(12)
    dense[layer.positions] = layer.fourierft_spectrum.detach()
    rows, cols = torch.meshgrid(torch.arange(3.0), torch.arange(4.0), indexing="ij")
    expected = torch.zeros(3, 4)
    for flat, value in enumerate(dense):  # IDFT2 written out: (1 / MN) sum F[u, v] cos(2 pi (up/M + vq/N))
        u, v = divmod(flat, 4)
        expected += value * torch.cos(2 * torch.pi * (u * rows / 3 + v * cols / 4)) / 12
    assert torch.allclose(layer.delta_weight(torch.zeros(3, 4)), 2.0 * expected, atol=1e-6)


def test_init_weights_chooses_a_zero_or_normal_spectrum():
    model, x = cm.base("MLP"), cm.inputs(1)
    before = model(x)
    peftkit.inject(model, FourierFTConfig(n_frequency=10, target_modules=["lin0"], init_weights=True))
    assert torch.equal(model(x), before)
    peftkit.inject(model, FourierFTConfig(n_frequency=10, target_modules=["lin0"]), "normal")
    assert not torch.allclose(model(x), before)
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"lin0.adapters.normal.fourierft_spectrum": 10}


def _square(width: int = 64) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width))


def test_a_random_start_that_moves_the_weights_far_warns_with_the_numbers_and_the_fix():
    model = _square()
    with pytest.warns(peftkit.FreshAdapterWarning) as caught:
        peftkit.inject(model, FourierFTConfig(n_frequency=100, target_modules=["0", "2"]))
    (message,) = [str(w.message) for w in caught]
    worst = max(model[i].adapters["default"].start_change(model[i].base_layer) for i in (0, 2))
    assert "moves 2 of 2 adapted weights by more than 25% of their norm" in message
    assert f"by {worst:.0%} (scaling=150, n_frequency=100)" in message
    assert "init_weights=True" in message and "lower scaling" in message


@pytest.mark.parametrize(
    "options", [{"init_weights": True}, {"scaling": 1.0}], ids=["zero start", "small scaling"]
)
def test_a_start_near_the_base_does_not_warn(options):
    with warnings.catch_warnings():
        warnings.simplefilter("error", peftkit.FreshAdapterWarning)
        peftkit.inject(_square(), FourierFTConfig(n_frequency=100, target_modules=["0", "2"], **options))


def test_loading_a_saved_random_start_adapter_does_not_warn(tmp_path):
    with pytest.warns(peftkit.FreshAdapterWarning):
        model = peftkit.inject(_square(), FourierFTConfig(n_frequency=100, target_modules=["0"]))
    peftkit.save_adapter(model, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", peftkit.FreshAdapterWarning)
        peftkit.load_adapter(_square(), tmp_path)


def test_a_model_on_the_meta_device_is_priced_without_a_warning():
    # peftkit inspect counts parameters on a meta copy of the model: there are no values to measure
    with torch.device("meta"):
        model = _square()
    with warnings.catch_warnings():
        warnings.simplefilter("error", peftkit.FreshAdapterWarning)
        peftkit.inject(model, FourierFTConfig(n_frequency=100, target_modules=["0", "2"]))
    assert peftkit.trainable_summary(model, show=False).trainable == 200


@pytest.mark.parametrize("shape, n", [((64, 64), 100), ((48, 80), 700), ((20, 10), 30)])
def test_the_start_change_from_parseval_matches_the_inverse_dft(shape, n):
    torch.manual_seed(1)
    base = nn.Linear(shape[1], shape[0])
    layer = FourierFTLinear(base, n, 150.0, 777, init_weights=False)
    exact = (layer.delta_weight(base.weight).norm() / base.weight.norm()).item()
    # exact but for the positions whose mirror position was drawn too: a few percent at most
    assert layer.start_change(base) == pytest.approx(exact, rel=0.05)


def test_n_frequency_pattern_gives_modules_their_own_size_and_too_many_is_refused():
    model = cm.base("MLP")
    peftkit.inject(
        model,
        FourierFTConfig(n_frequency=30, n_frequency_pattern={"lin1": 4}, target_modules=["lin0", "lin1"]),
    )
    assert model.lin0.adapters["default"].fourierft_spectrum.shape == (30,)
    assert model.lin1.adapters["default"].fourierft_spectrum.shape == (4,)
    model = cm.base("MLP")
    with pytest.raises(UnsupportedLayerError, match=r"n_frequency=50 is more than the 2 x 20 = 40"):
        peftkit.inject(model, FourierFTConfig(n_frequency=50, target_modules=["lin0", "lin1"]))
    assert isinstance(model.lin0, nn.Linear)


def test_a_bf16_base_gets_a_float32_spectrum_and_merges():
    model, x = cm.base("MLP").to(torch.bfloat16), cm.inputs(1).to(torch.bfloat16)
    peftkit.inject(model, FourierFTConfig(n_frequency=10, scaling=1.0, target_modules=["lin0"]))
    assert model.lin0.adapters["default"].fourierft_spectrum.dtype == torch.float32
    unmerged = model(x)
    assert unmerged.dtype == torch.bfloat16
    peftkit.merge(model)
    assert (model(x).float() - unmerged.float()).abs().max() <= 0.05


def test_gpt2_conv1d_records_fan_in_fan_out_and_matches_the_reference(tmp_path):
    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=32, n_positions=16)).eval()
    ids = torch.randint(0, 32, (2, 6), generator=torch.Generator().manual_seed(1))
    ours = peftkit.inject(copy.deepcopy(base), FourierFTConfig(n_frequency=20, scaling=5.0))
    assert [n for n, _ in peftkit.adapter_state_dict(ours).items()] == [
        "base_model.model.transformer.h.0.mlp.c_proj.fourierft_spectrum"
    ]  # the reference's GPT-2 default: the MLP's output projection
    assert peftkit.adapter_config(ours).fan_in_fan_out is True
    peftkit.save_adapter(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    with torch.no_grad():
        expected = ours(ids).logits
        assert (expected - base(ids).logits).abs().max() > 1e-3
        assert (theirs(ids).logits - expected).abs().max() <= 1e-5
        peftkit.merge(ours)
        theirs.merge_adapter()
        assert (ours(ids).logits - expected).abs().max() <= 1e-5
        assert (theirs(ids).logits - expected).abs().max() <= 1e-5


# -- parity: the reference's custom-model cases ------------------------------------------------------

CASES = {
    "Vanilla MLP 1 FourierFT": {"n_frequency": 10, "target_modules": "lin0", "init_weights": True},
    "Vanilla MLP 2 FourierFT": {"n_frequency": 10, "target_modules": ["lin0"], "init_weights": True},
    "Vanilla MLP 3 FourierFT": {"n_frequency": 10, "target_modules": ["lin1"], "init_weights": True},
    "Vanilla MLP 5 FourierFT": {
        "n_frequency": 10,
        "target_modules": ["lin0"],
        "modules_to_save": ["lin1"],
        "init_weights": True,
    },
    "Vanilla MLP 6 FourierFT": {
        "n_frequency": 10,
        "target_modules": ["lin0", "lin1"],
        "modules_to_save": ["lin1"],
        "init_weights": True,
    },
    "Vanilla MLP 7 FourierFT": {
        "n_frequency_pattern": {"lin0": 5, "lin1": 10},
        "target_modules": ["lin0", "lin1"],
        "modules_to_save": ["lin1"],
        "init_weights": True,
    },
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("direction", ["peftkit->peft", "peft->peftkit"])
def test_reference_cases_agree_both_ways(direction, case, tmp_path):
    options = CASES[case]
    cm.assert_parity(
        direction,
        "MLP",
        FourierFTConfig(**copy.deepcopy(options)),
        peft.FourierFTConfig(**copy.deepcopy(options)),
        tmp_path / "adapter",
    )


@pytest.mark.parametrize("case", list(CASES))
def test_a_fresh_adapter_has_the_same_tensors_in_both(case):
    options = CASES[case]
    ours = peftkit.inject(cm.base("MLP"), FourierFTConfig(**copy.deepcopy(options)))
    theirs = peft.get_peft_model(cm.base("MLP"), peft.FourierFTConfig(**copy.deepcopy(options)))
    shapes = {k: tuple(v.shape) for k, v in peftkit.adapter_state_dict(ours).items()}
    assert shapes == {k: tuple(v.shape) for k, v in get_peft_model_state_dict(theirs).items()}
    assert peftkit.trainable_summary(ours, show=False).trainable == sum(
        p.numel() for p in theirs.parameters() if p.requires_grad
    )


def test_configs_read_in_both_libraries_without_warnings(tmp_path):
    options = CASES["Vanilla MLP 7 FourierFT"]
    ours = peftkit.inject(cm.base("MLP"), FourierFTConfig(**copy.deepcopy(options)))
    peftkit.save_adapter(ours, tmp_path / "ours")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        theirs = peft.PeftConfig.from_pretrained(tmp_path / "ours")
        peft.get_peft_model(cm.base("MLP"), peft.FourierFTConfig(**copy.deepcopy(options))).save_pretrained(
            tmp_path / "theirs"
        )
        mine = peftkit.load_adapter(cm.base("MLP"), tmp_path / "theirs")
    assert isinstance(theirs, peft.FourierFTConfig)
    assert theirs.n_frequency_pattern == {"lin0": 5, "lin1": 10}
    assert peftkit.adapter_config(mine).n_frequency_pattern == {"lin0": 5, "lin1": 10}


def test_docs_example_runs(tmp_path, monkeypatch, capsys):
    blocks = re.findall(r"```python\n(.*?)```", DOCS.read_text(), re.S)
    assert blocks, "docs/fourierft.md has no python example"
    monkeypatch.chdir(tmp_path)
    exec(compile(blocks[0], str(DOCS), "exec"), {"__name__": "__docs__"})
    assert "FourierFT trained 128 parameters" in capsys.readouterr().out

"""C3A: options, the block-circular update, and two-way parity with the reference library (peft 0.21.2).

Parity covers every C3A case of the reference's custom-model test matrix (its tests/test_custom_models.py,
"Vanilla MLP 1/2/3/5/6/7 C3A") both ways, unmerged, merged and merged-and-unloaded (fp32 max abs
diff <= 1e-5).
"""

from __future__ import annotations

import copy
import math
import re
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import peftkit
from peftkit.errors import ConfigError, UnsupportedLayerError
from peftkit.methods.c3a import C3AConfig, C3ALinear, block_correlation, circulant_blocks
from support import custom_models as cm

peft = pytest.importorskip("peft")
from peft.tuners.c3a.utils import BlockCircularConvolution, get_circulant_fast  # noqa: E402
from peft.utils import get_peft_model_state_dict  # noqa: E402

DOCS = Path(__file__).resolve().parents[2] / "docs" / "c3a.md"

pytestmark = [
    pytest.mark.usefixtures("one_thread"),  # tiny models: one intra-op thread is fastest
    pytest.mark.filterwarnings("ignore:All adapters are already merged:UserWarning"),  # peft merge_and_unload
]


# -- config ---------------------------------------------------------------------------------------


def test_defaults_follow_the_reference_config():
    ours, theirs = C3AConfig(), peft.C3AConfig()
    for key in ("block_size", "bias", "init_weights", "block_size_pattern"):
        assert getattr(ours, key) == getattr(theirs, key), key


def test_every_config_problem_is_reported_at_once():
    with pytest.raises(ConfigError) as info:
        C3AConfig(
            block_size=0,
            bias="lora_only",
            init_weights="orthogonal",
            block_size_pattern={"lin0": -2},
            alpha_pattern={"lin0": 2},
        )
    problems = info.value.problems
    for field in ("block_size:", "bias:", "init_weights:", "block_size_pattern[", "alpha_pattern:"):
        assert any(p.startswith(field) for p in problems), (field, problems)


# -- the update -----------------------------------------------------------------------------------


def test_blocks_are_circulant_and_the_fft_path_equals_the_matrix():
    kernel = torch.randn(3, 4, 5, dtype=torch.float64)
    dense = circulant_blocks(kernel)
    assert dense.shape == (15, 20)
    block = dense[5:10, 10:15]  # (m, n) = (1, 2)
    for t in range(5):
        assert torch.equal(block[t], torch.roll(kernel[1, 2], t))  # C[t, j] = k[(j - t) mod b]
    x = torch.randn(7, 20, dtype=torch.float64)
    assert torch.allclose(block_correlation(x, kernel), x @ dense.T, atol=1e-12)


def test_the_update_equals_the_references_functions():
    kernel, x = torch.randn(3, 4, 5, dtype=torch.float64), torch.randn(7, 20, dtype=torch.float64)
    assert torch.allclose(circulant_blocks(kernel), get_circulant_fast(kernel), atol=1e-12)
    assert torch.allclose(block_correlation(x, kernel), BlockCircularConvolution.apply(x, kernel), atol=1e-12)


@pytest.mark.parametrize(
    ("init", "bound"),
    [
        ("xavier_uniform", math.sqrt(6 / 30)),
        (False, math.sqrt(6 / 30)),
        ("kaiming_uniform", 1 / math.sqrt(10)),
        ("gaussian", None),
        (True, 0.0),
    ],
)
def test_inits(init, bound):
    torch.manual_seed(0)
    kernel = C3ALinear(nn.Linear(10, 20), block_size=5, init=init).c3a_kernel
    assert kernel.shape == (4, 2, 5) and kernel.dtype == torch.float32
    if bound is None:
        assert 0.5 < kernel.std() < 1.5
    else:
        assert kernel.abs().max() <= bound and (bound == 0 or kernel.abs().max() > bound / 2)


def test_block_size_must_divide_both_sizes_and_patterns_set_it_per_module():
    model = cm.base("MLP")
    with pytest.raises(
        UnsupportedLayerError, match=r"lin1: block_size=5 does not divide .*in 20, out 2.* e\.g\. 2"
    ):
        peftkit.inject(model, C3AConfig(block_size=5, target_modules=["lin0", "lin1"]))
    assert isinstance(model.lin0, nn.Linear)
    peftkit.inject(
        model, C3AConfig(block_size=10, block_size_pattern={"lin1": 2}, target_modules=["lin0", "lin1"])
    )
    assert model.lin0.adapters["default"].c3a_kernel.shape == (2, 1, 10)
    assert model.lin1.adapters["default"].c3a_kernel.shape == (1, 10, 2)


def test_two_adapters_on_one_layer_add_up():
    """The reference chains a second active adapter onto the first one's output (its forward overwrites x);
    peftkit adds their updates, as their merge does, so merged and unmerged agree."""
    model, x = cm.base("MLP"), cm.inputs(1)
    config = C3AConfig(block_size=5, target_modules=["lin0"], init_weights="gaussian")
    peftkit.inject(model, config)
    peftkit.inject(model, config, "other")
    peftkit.set_active(model, ["default", "other"])
    both = model(x).detach()
    lin0 = model.lin0
    with torch.no_grad():
        base_out = lin0.base_layer(x)
        deltas = [lin0.adapters[n].delta_output(x, base_out, lin0.base_layer) for n in ("default", "other")]
        assert torch.allclose(lin0(x), base_out + deltas[0] + deltas[1], atol=1e-6)
    peftkit.merge(model, safe=True)
    assert (model(x) - both).abs().max() <= 1e-5


def test_a_bf16_base_gets_a_float32_kernel_and_merges():
    model, x = cm.base("MLP").to(torch.bfloat16), cm.inputs(1).to(torch.bfloat16)
    peftkit.inject(model, C3AConfig(block_size=10, target_modules=["lin0"]))
    assert model.lin0.adapters["default"].c3a_kernel.dtype == torch.float32
    unmerged = model(x)
    assert unmerged.dtype == torch.bfloat16
    peftkit.merge(model)
    assert (model(x).float() - unmerged.float()).abs().max() <= 0.05


# -- parity: the reference's custom-model cases ------------------------------------------------------

CASES = {
    "Vanilla MLP 1 C3A": {"block_size": 2, "target_modules": "lin0", "init_weights": True},
    "Vanilla MLP 2 C3A": {"block_size": 2, "target_modules": ["lin0"], "init_weights": True},
    "Vanilla MLP 3 C3A": {"block_size": 2, "target_modules": ["lin1"], "init_weights": True},
    "Vanilla MLP 5 C3A": {
        "block_size": 10,
        "target_modules": ["lin0"],
        "modules_to_save": ["lin1"],
        "init_weights": True,
    },
    "Vanilla MLP 6 C3A": {
        "block_size": 10,
        "target_modules": ["lin0", "lin1"],
        "modules_to_save": ["lin1"],
        "init_weights": True,
    },
    "Vanilla MLP 7 C3A": {
        "block_size_pattern": {"lin0": 5, "lin1": 10},
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
        C3AConfig(**copy.deepcopy(options)),
        peft.C3AConfig(**copy.deepcopy(options)),
        tmp_path / "adapter",
    )


@pytest.mark.parametrize("case", list(CASES))
def test_a_fresh_adapter_has_the_same_tensors_in_both(case):
    options = CASES[case]
    ours = peftkit.inject(cm.base("MLP"), C3AConfig(**copy.deepcopy(options)))
    theirs = peft.get_peft_model(cm.base("MLP"), peft.C3AConfig(**copy.deepcopy(options)))
    shapes = {k: tuple(v.shape) for k, v in peftkit.adapter_state_dict(ours).items()}
    assert shapes == {k: tuple(v.shape) for k, v in get_peft_model_state_dict(theirs).items()}
    assert peftkit.trainable_summary(ours, show=False).trainable == sum(
        p.numel() for p in theirs.parameters() if p.requires_grad
    )


@pytest.mark.parametrize("init", ["gaussian", "kaiming_uniform"])
def test_random_inits_agree_both_ways(init, tmp_path):
    options = {"block_size": 5, "target_modules": ["lin0", "lin1"], "init_weights": init}
    options["block_size_pattern"] = {"lin1": 2}
    for direction in ("peftkit->peft", "peft->peftkit"):
        cm.assert_parity(
            direction,
            "MLP",
            C3AConfig(**copy.deepcopy(options)),
            peft.C3AConfig(**copy.deepcopy(options)),
            tmp_path / direction.replace(">", ""),
        )


def test_configs_read_in_both_libraries_without_warnings(tmp_path):
    options = CASES["Vanilla MLP 7 C3A"]
    ours = peftkit.inject(cm.base("MLP"), C3AConfig(**copy.deepcopy(options)))
    peftkit.save_adapter(ours, tmp_path / "ours")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        theirs = peft.PeftConfig.from_pretrained(tmp_path / "ours")
        peft.get_peft_model(cm.base("MLP"), peft.C3AConfig(**copy.deepcopy(options))).save_pretrained(
            tmp_path / "theirs"
        )
        mine = peftkit.load_adapter(cm.base("MLP"), tmp_path / "theirs")
    assert isinstance(theirs, peft.C3AConfig)
    assert theirs.block_size_pattern == {"lin0": 5, "lin1": 10}
    assert peftkit.adapter_config(mine).block_size_pattern == {"lin0": 5, "lin1": 10}


def test_docs_example_runs(tmp_path, monkeypatch, capsys):
    blocks = re.findall(r"```python\n(.*?)```", DOCS.read_text(), re.S)
    assert blocks, "docs/c3a.md has no python example"
    monkeypatch.chdir(tmp_path)
    exec(compile(blocks[0], str(DOCS), "exec"), {"__name__": "__docs__"})
    assert "C3A trained 256 parameters" in capsys.readouterr().out

"""BOFT: the butterfly algebra, the Cayley blocks, dropout, errors, and parity with the reference library.

Parity: every BOFT case of the reference's custom-model matrix (peft 0.21.2, tests/test_custom_models.py),
both ways (trained by one library, saved, loaded by the other), unmerged and merged, float32 max abs
diff <= 1e-5. The reference builds its butterfly (more than one factor) only through a CUDA extension it
compiles at run time, and silently uses one factor where that fails (any machine without CUDA); the cases
with several factors therefore run the reference with a pure-torch stand-in for that extension (what the
kernel computes: a batch of block-diagonal matrices), and a separate test reads what the reference writes
without it.
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
from peftkit.errors import AdapterNameError, ConfigError, UnsupportedLayerError
from peftkit.methods.boft import BOFTConfig, butterfly_permutation
from support import custom_models as cm

peft = pytest.importorskip("peft")
import peft.tuners.boft.layer as reference_boft  # noqa: E402

pytestmark = [
    pytest.mark.usefixtures("one_thread"),  # tiny models: one intra-op thread is fastest
    pytest.mark.filterwarnings(
        "ignore:All adapters are already merged:UserWarning",  # peft's merge_and_unload after merge_adapter
        "ignore:Failed to load the CUDA extension:UserWarning",  # the reference without CUDA
        "ignore:Setting boft_n_butterfly_factor to 1:UserWarning",
    ),
]


class _BlockDiagStandIn:
    """What the reference's ``fbd_cuda`` extension computes, in torch: ``forward`` turns (N, D, b, b) blocks
    into N block-diagonal (D*b, D*b) matrices, ``backward`` takes the diagonal blocks of the gradient."""

    @staticmethod
    def forward(blocks: torch.Tensor) -> list[torch.Tensor]:
        return [torch.stack([torch.block_diag(*factor) for factor in blocks])]

    @staticmethod
    def backward(grad: torch.Tensor, blocks: torch.Tensor) -> list[torch.Tensor]:
        n, d, b, _ = blocks.shape
        return [grad.reshape(n, d, b, d, b).diagonal(dim1=1, dim2=3).permute(0, 3, 1, 2).contiguous()]


@pytest.fixture
def reference_butterfly(monkeypatch):
    """The reference as it runs where its CUDA extension builds: every butterfly factor used."""
    monkeypatch.setattr(reference_boft, "_FBD_CUDA", _BlockDiagStandIn())


def _adapter(features=8, out=3, seed=0, **options):
    options = {"boft_block_size": 2, "boft_n_butterfly_factor": 2, **options}
    model = peftkit.inject(
        nn.Sequential(nn.Linear(features, out)),
        BOFTConfig(init_weights=False, target_modules=["0"], **options),
    )
    adapter = model[0].adapters["default"]
    with torch.no_grad():
        adapter.boft_R.normal_(0, 0.3, generator=torch.Generator().manual_seed(seed))
    return model, adapter


def _perm_matrix(indices: torch.Tensor) -> torch.Tensor:
    return torch.eye(len(indices))[indices]  # row i has its one at column indices[i]


def _dense_rotation(adapter) -> torch.Tensor:
    """M = B_(m-1) ... B_0 with B_i = P_i blockdiag(Q_i) P_iᵀ, built densely as the paper writes it."""
    blocks = adapter.blocks().detach()
    features = blocks.shape[1] * blocks.shape[2]
    m = torch.eye(features)
    for i, factor in enumerate(blocks):
        p = _perm_matrix(butterfly_permutation(features, adapter.block_size, i))
        m = p @ torch.block_diag(*factor) @ p.T @ m
    return m


# -- the butterfly --------------------------------------------------------------------------------


def test_permutations_put_even_half_blocks_first_within_each_group():
    assert butterfly_permutation(8, 2, 0).tolist() == list(range(8))
    assert butterfly_permutation(8, 2, 1).tolist() == [0, 2, 1, 3, 4, 6, 5, 7]
    assert butterfly_permutation(8, 2, 2).tolist() == [0, 2, 4, 6, 1, 3, 5, 7]
    assert butterfly_permutation(8, 4, 1).tolist() == [0, 1, 4, 5, 2, 3, 6, 7]


def test_blocks_are_the_exact_cayley_transform_of_the_skew_part():
    _, adapter = _adapter()
    r = adapter.boft_R.detach().double()
    s = 0.5 * (r - r.mT)
    eye = torch.eye(2, dtype=torch.float64).expand_as(s)
    q = adapter.blocks().detach().double()
    assert torch.allclose(q, (eye - s) @ torch.linalg.inv(eye + s), atol=1e-6)
    assert torch.allclose(q @ q.mT, eye, atol=1e-6)


def test_two_factors_mix_what_one_factor_keeps_apart():
    _, one = _adapter(boft_n_butterfly_factor=1)
    _, two = _adapter(boft_n_butterfly_factor=2)
    dense_one, dense_two = _dense_rotation(one), _dense_rotation(two)
    assert torch.count_nonzero(dense_one) == 4 * 2 * 2  # four 2x2 blocks
    assert torch.count_nonzero(dense_two) == 4 * 4 * 2  # two 4x4 groups mixed
    assert torch.allclose(dense_two @ dense_two.T, torch.eye(8), atol=1e-6)


@pytest.mark.parametrize("factors", [1, 2, 3])
def test_linear_turns_the_input_scales_the_output_and_merges_as_diag_s_w_mt(factors):
    torch.manual_seed(0)
    model, adapter = _adapter(boft_n_butterfly_factor=factors)
    layer = model[0].base_layer
    x = torch.randn(5, 8)
    m, s = _dense_rotation(adapter), adapter.boft_s.detach()
    assert torch.allclose(model(x), s[:, 0] * (x @ m @ layer.weight.T) + layer.bias, atol=1e-5)
    assert torch.allclose(adapter.merged_weight(layer.weight.detach()), s * (layer.weight @ m.T), atol=1e-6)


def test_conv2d_turns_each_receptive_field_with_any_kernel_shape_and_dilation():
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, (2, 2), stride=(2, 1), padding=(1, 2), dilation=(1, 2))
    model = peftkit.inject(
        nn.Sequential(copy.deepcopy(conv)),
        BOFTConfig(boft_block_size=2, boft_n_butterfly_factor=2, init_weights=False, target_modules=["0"]),
    )
    adapter = model[0].adapters["default"]
    assert adapter.boft_R.shape == (2, 4, 2, 2) and adapter.boft_s.shape == (1, 3)
    x = torch.randn(2, 2, 7, 7)
    turned = adapter.boft_s.detach().T * (conv.weight.reshape(3, -1) @ _dense_rotation(adapter).T)
    assert torch.allclose(
        model(x), conv._conv_forward(x, turned.reshape(conv.weight.shape), conv.bias), atol=1e-5
    )
    unmerged = model(x)
    peftkit.merge(model)
    assert torch.allclose(model(x), unmerged, atol=1e-5)
    peftkit.unmerge(model)
    assert (model[0].base_layer.weight - conv.weight).abs().max() <= 1e-6


def test_dropout_sets_blocks_of_one_factor_to_identity_only_while_training():
    torch.manual_seed(0)
    model, adapter = _adapter(features=16, boft_dropout=0.5)
    eye = torch.eye(2)
    model.train()
    kept = adapter.blocks(train=adapter.training)
    identity = torch.tensor([[torch.equal(b, eye) for b in factor] for factor in kept])
    assert identity.sum() == 4 and identity.any(dim=1).sum() == 1  # int(0.5 * 8) blocks of one factor
    model.eval()
    x = torch.randn(2, 16)
    assert torch.equal(model(x), model(x))


def test_saved_keys_and_shapes():
    model = peftkit.inject(
        cm.base("Conv2d2"),
        BOFTConfig(boft_block_size=2, boft_n_butterfly_factor=2, target_modules=["conv2d", "lin1"]),
    )
    assert {k: tuple(v.shape) for k, v in peftkit.adapter_state_dict(model).items()} == {
        "base_model.model.conv2d.boft_R": (2, 36, 2, 2),
        "base_model.model.conv2d.boft_s": (1, 32),
        "base_model.model.lin1.boft_R": (2, 16, 2, 2),
        "base_model.model.lin1.boft_s": (2, 1),
    }


# -- errors ---------------------------------------------------------------------------------------


def test_config_reports_every_problem_at_once():
    with pytest.raises(ConfigError) as info:
        BOFTConfig(
            boft_block_size=0,
            boft_n_butterfly_factor=0,
            boft_dropout=1.0,
            bias="lora_only",
            fan_in_fan_out=True,
            alpha_pattern={"lin0": 2},
        )
    text = str(info.value)
    assert "6 problem" in text
    for needle in (
        "set exactly one of",
        "boft_n_butterfly_factor",
        "boft_dropout",
        "'boft_only'",
        "fan_in_fan_out",
    ):
        assert needle in text, needle
    with pytest.raises(ConfigError, match="pass boft_block_size=0 with boft_block_num"):
        BOFTConfig(boft_block_num=4)


@pytest.mark.parametrize(
    ("features", "options", "needle"),
    [
        (10, {"boft_block_size": 4}, "boft_block_size=4 must divide the 10"),
        (12, {"boft_block_size": 0, "boft_block_num": 5}, "boft_block_num=5 must divide the 12"),
        (12, {"boft_block_size": 2, "boft_n_butterfly_factor": 3}, "= 8 to divide the 12"),
        (12, {"boft_block_size": 3, "boft_n_butterfly_factor": 2}, "even block size"),
    ],
)
def test_layers_the_butterfly_does_not_fit_are_refused_before_any_change(features, options, needle):
    model = nn.Sequential(nn.Linear(features, 2))
    with pytest.raises(UnsupportedLayerError, match=needle):
        peftkit.inject(model, BOFTConfig(target_modules=["0"], **options))
    assert type(model[0]) is nn.Linear


def test_unsupported_layers_are_refused_when_named():
    with pytest.raises(UnsupportedLayerError, match="groups=2"):
        peftkit.inject(nn.Sequential(nn.Conv2d(4, 4, 1, groups=2)), BOFTConfig(target_modules=["0"]))
    with pytest.raises(UnsupportedLayerError):
        peftkit.inject(nn.Sequential(nn.Conv1d(4, 4, 1)), BOFTConfig(target_modules=["0"]))


def test_merge_beside_another_adapter_on_the_same_layer_is_refused():
    model = nn.Sequential(nn.Linear(8, 3))
    peftkit.inject(model, BOFTConfig(target_modules=["0"], init_weights=False), "a")
    peftkit.inject(model, BOFTConfig(boft_block_size=2, target_modules=["0"], init_weights=False), "b")
    peftkit.set_active(model, ["a", "b"])
    with pytest.raises(AdapterNameError, match="cannot merge"):
        peftkit.merge(model)
    peftkit.set_active(model, "a")
    peftkit.merge(model)


# -- parity with the reference library ------------------------------------------------------------

# The reference matrix's BOFT cases (its names; it lists "Conv2d2 1 BOFT" twice, with 2 and 3 factors).
CASES = [
    ("Vanilla MLP 1 BOFT", "MLP", {"target_modules": ["lin1"], "boft_block_size": 2}),
    (
        "Vanilla MLP 2 BOFT",
        "MLP",
        {"target_modules": ["lin1"], "modules_to_save": ["lin0"], "boft_block_size": 2},
    ),
    ("Vanilla MLP 3 BOFT", "MLP", {"target_modules": ["lin1"], "boft_block_size": 2, "boft_dropout": 0.1}),
    (
        "Vanilla MLP 4 BOFT",
        "MLP",
        {"target_modules": ["lin1"], "boft_block_size": 2, "boft_block_num": 0, "boft_n_butterfly_factor": 1},
    ),
    (
        "Vanilla MLP 5 BOFT",
        "MLP",
        {"target_modules": ["lin1"], "boft_block_size": 0, "boft_block_num": 2, "boft_n_butterfly_factor": 1},
    ),
    (
        "Vanilla MLP 6 BOFT",
        "MLP",
        {
            "target_modules": ["lin1"],
            "boft_block_size": 10,
            "boft_block_num": 0,
            "boft_n_butterfly_factor": 2,
        },
    ),
    (
        "Conv2d 1 BOFT",
        "Conv2d",
        {
            "target_modules": ["conv2d"],
            "boft_block_size": 45,
            "boft_block_num": 0,
            "boft_n_butterfly_factor": 1,
        },
    ),
    (
        "Conv2d 2 BOFT",
        "Conv2d",
        {
            "target_modules": ["conv2d"],
            "boft_block_size": 0,
            "boft_block_num": 1,
            "boft_n_butterfly_factor": 1,
        },
    ),
    (
        "MLP2 1 BOFT",
        "MLP2",
        {"target_modules": ["lin1"], "boft_block_size": 2, "boft_block_num": 0, "boft_n_butterfly_factor": 3},
    ),
    (
        "MLP2 2 BOFT",
        "MLP2",
        {"target_modules": ["lin1"], "boft_block_size": 0, "boft_block_num": 8, "boft_n_butterfly_factor": 3},
    ),
    (
        "Conv2d2 1 BOFT (2 factors)",
        "Conv2d2",
        {
            "target_modules": ["conv2d"],
            "boft_block_size": 2,
            "boft_block_num": 0,
            "boft_n_butterfly_factor": 2,
        },
    ),
    (
        "Conv2d2 1 BOFT (3 factors)",
        "Conv2d2",
        {
            "target_modules": ["conv2d"],
            "boft_block_size": 2,
            "boft_block_num": 0,
            "boft_n_butterfly_factor": 3,
        },
    ),
]


def _configs(options):
    return BOFTConfig(**copy.deepcopy(options)), peft.BOFTConfig(**copy.deepcopy(options))


@pytest.mark.usefixtures("reference_butterfly")
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("direction", cm.DIRECTIONS)
def test_parity_with_the_reference(direction, case, tmp_path):
    _, model_id, options = case
    cm.assert_parity(direction, model_id, *_configs(options), tmp_path)


@pytest.mark.parametrize(
    "case", [c for c in CASES if c[2].get("boft_n_butterfly_factor", 1) == 1], ids=lambda c: c[0]
)
@pytest.mark.parametrize("direction", cm.DIRECTIONS)
def test_parity_with_the_reference_as_installed_for_one_factor(direction, case, tmp_path):
    """Without the stand-in: with one factor the reference's own CPU path is the same butterfly."""
    _, model_id, options = case
    cm.assert_parity(direction, model_id, *_configs(options), tmp_path)


@pytest.mark.parametrize(
    "case", [c for c in CASES if c[2].get("boft_n_butterfly_factor", 1) > 1], ids=lambda c: c[0]
)
def test_a_file_the_reference_wrote_without_its_extension_loads_as_one_factor(case, tmp_path):
    _, model_id, options = case
    reference = cm.out(cm.base(model_id))
    theirs = peft.get_peft_model(cm.base(model_id), _configs(options)[1])
    cm.train(theirs)
    theirs.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["boft_n_butterfly_factor"] > 1
    with pytest.warns(UserWarning, match="Loading it as boft_n_butterfly_factor=1"):
        ours = peftkit.load_adapter(cm.base(model_id), tmp_path)
    assert peftkit.adapter_config(ours).boft_n_butterfly_factor == 1
    cm.assert_close(ours, theirs, reference, "unmerged")
    peftkit.merge(ours)
    theirs.merge_adapter()
    cm.assert_close(ours, theirs, reference, "merged")


@pytest.mark.usefixtures("reference_butterfly")
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_a_fresh_adapter_has_the_same_tensors_and_config_in_both(case, tmp_path):
    _, model_id, options = case
    ours_config, theirs_config = _configs(options)
    ours = peftkit.inject(cm.base(model_id), ours_config)
    theirs = peft.get_peft_model(cm.base(model_id), theirs_config)
    keys = (
        "boft_block_size",
        "boft_block_num",
        "boft_n_butterfly_factor",
        "boft_dropout",
        "bias",
        "init_weights",
    )
    cm.assert_same_fresh_adapter(ours, theirs, ours_config, tmp_path, keys)


def test_docs_example_runs(capsys):
    text = (Path(__file__).resolve().parents[2] / "docs" / "boft.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert len(blocks) == 1
    exec(compile(blocks[0], "docs/boft.md", "exec"), {"__name__": "docs_boft"})
    assert "merged vs unmerged" in capsys.readouterr().out

"""LoKr: the factorisation rule, which factors are decomposed, the Kronecker formula (including the
reference's Conv1d layout), inits, dropouts, config checks, the docs example, and two-way parity with
the reference library (real MiniLM and a tiny CNN). Parity helpers come from ``test_loha.py``.
"""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from test_loha import (
    CNN_TARGETS,
    DIRECTIONS,
    check_pair,
    cnn_batch,
    config_round_trip,
    docs_example,
    load_minilm,
    make_pair,
    minilm_batch,
    needs_peft,
    peft,
    tiny_cnn,
)
from torch import nn

import peftkit
from peftkit.core.layer import AdapterLayer
from peftkit.errors import ConfigError
from peftkit.methods.loha import LoHaConfig
from peftkit.methods.lokr import LoKrAdapter, LoKrConfig, factorization, kron

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one intra-op thread is fastest

if peft is not None:
    from peft.tuners.lokr.layer import factorization as reference_factorization
    from peft.utils import get_peft_model_state_dict

LOKR = r"\.lokr_(w[12](_[ab])?|t2)$"


def _adapter(base: nn.Module, **values) -> LoKrAdapter:
    options = {
        "r": 2,
        "alpha": 3.0,
        "rank_dropout": 0.0,
        "module_dropout": 0.0,
        "rank_dropout_scale": False,
        "effective_conv": False,
        "decompose_both": False,
        "decompose_factor": -1,
        "init": False,
    }
    return LoKrAdapter(base, **{**options, **values})


def _names(adapter: nn.Module) -> set[str]:
    return {n for n, _ in adapter.named_parameters()}


@pytest.mark.parametrize(
    ("dimension", "factor", "expected"),
    [
        (256, -1, (16, 16)),
        (384, -1, (16, 24)),
        (127, -1, (1, 127)),
        (128, 4, (4, 32)),
        (384, 5, (4, 96)),
        (5, 5, (5, 1)),
        (1, -1, (1, 1)),
        (12, -1, (3, 4)),
    ],
)
def test_factorization_examples(dimension, factor, expected):
    assert factorization(dimension, factor) == expected


@needs_peft
def test_factorization_agrees_with_the_reference_everywhere_tested():
    for dimension in range(1, 700):
        for factor in (-1, 1, 2, 3, 4, 5, 7, 8, 12, 16, 64):
            assert factorization(dimension, factor) == reference_factorization(dimension, factor), (
                dimension,
                factor,
            )


def test_kron_matches_torch_kron_including_mixed_ranks():
    torch.manual_seed(0)
    for xs, ys in [((2, 3), (4, 5)), ((2, 3, 1, 1), (4, 5, 3, 2)), ((2, 3), (4, 5, 3)), ((3,), (2, 2))]:
        x, y = torch.randn(xs), torch.randn(ys)
        assert torch.equal(kron(x, y), torch.kron(x, y)), (xs, ys)
    # a stride pattern torch.kron itself rejects (a Conv1d Tucker W2, shape (b, d, k, 1))
    w2 = torch.einsum("ijkl,ip,jr->prkl", torch.randn(1, 1, 3, 1), torch.randn(1, 3), torch.randn(1, 3))
    assert kron(torch.randn(2, 2, 1, 1), w2).shape == (6, 6, 3, 1)


def test_linear_delta_is_the_scaled_kronecker_product():
    torch.manual_seed(0)
    base = nn.Linear(6, 8)  # out 8 = 2 x 4, in 6 = 2 x 3
    full = _adapter(base, r=4)
    assert {n: tuple(p.shape) for n, p in full.named_parameters()} == {"lokr_w1": (2, 2), "lokr_w2": (4, 3)}
    assert torch.allclose(
        full.delta_weight(base.weight), 0.75 * torch.kron(full.lokr_w1, full.lokr_w2)
    )  # 3 / 4
    low = _adapter(base, r=1)  # r < max(4, 3) / 2: W2 = W2a W2b
    assert _names(low) == {"lokr_w1", "lokr_w2_a", "lokr_w2_b"}
    expected = 3.0 * torch.kron(low.lokr_w1, low.lokr_w2_a @ low.lokr_w2_b)
    assert torch.allclose(low.delta_weight(base.weight), expected)
    x = torch.randn(3, 6)
    assert torch.allclose(low.delta_output(x, base(x), base), x @ expected.T, atol=1e-6)


def test_decompose_both_and_decompose_factor():
    base = nn.Linear(64, 32)
    assert _names(_adapter(base, r=2)) == {"lokr_w1", "lokr_w2_a", "lokr_w2_b"}  # 32 = 4 x 8, 64 = 8 x 8
    both = _adapter(base, r=2, decompose_both=True, decompose_factor=16)  # 32 = 16 x 2, 64 = 16 x 4
    assert both.factors == (16, 2, 16, 4)
    assert {n: tuple(p.shape) for n, p in both.named_parameters()} == {
        "lokr_w1_a": (16, 2),
        "lokr_w1_b": (2, 16),
        "lokr_w2": (2, 4),
    }


def test_conv2d_kernel_lives_in_w2_and_tucker_form():
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 8, (3, 2))  # out 8 = 2 x 4, in 6 = 2 x 3
    full = _adapter(conv)
    assert full.lokr_w2.shape == (4, 3, 3, 2)
    expected = 1.5 * torch.kron(full.lokr_w1[:, :, None, None], full.lokr_w2)
    assert torch.allclose(full.delta_weight(conv.weight), expected)
    flat = _adapter(conv, r=1)
    assert flat.lokr_w2_b.shape == (1, 3 * 3 * 2)
    cp = _adapter(conv, r=1, effective_conv=True)
    assert cp.lokr_t2.shape == (1, 1, 3, 2) and cp.lokr_w2_a.shape == (1, 4) and cp.lokr_w2_b.shape == (1, 3)
    w2 = torch.einsum("ijhw,ib,jd->bdhw", cp.lokr_t2, cp.lokr_w2_a, cp.lokr_w2_b)
    assert torch.allclose(cp.delta_weight(conv.weight), 3.0 * torch.kron(cp.lokr_w1[:, :, None, None], w2))
    assert not hasattr(_adapter(nn.Conv2d(6, 8, 1), r=1, effective_conv=True), "lokr_t2")  # 1x1: a matrix


def test_conv1d_with_a_full_w2_follows_the_reference_layout():
    # torch.kron of a 2-D W1 (a, c) and a 3-D W2 (b, d, k), reshaped to (out, in, k), puts W2's
    # index first on both channel axes: delta[b*a + i, d*c + j, k] = s * W2[b, d, k] * W1[i, j].
    torch.manual_seed(0)
    conv = nn.Conv1d(6, 8, 3)
    ad = _adapter(conv, r=2)
    a, b, c, d = ad.factors
    assert ad.lokr_w2.shape == (b, d, 3)
    expected = torch.einsum("ij,bdk->bidjk", ad.lokr_w1, ad.lokr_w2).reshape(8, 6, 3) * 1.5
    assert torch.allclose(ad.delta_weight(conv.weight), expected)


def test_inits_zero_the_side_the_reference_zeroes():
    base = nn.Linear(64, 32)
    default = _adapter(base, r=2, decompose_both=True, decompose_factor=16, init=True)
    assert torch.count_nonzero(default.lokr_w1_a) == 0 and torch.count_nonzero(default.lokr_w1_b) > 0
    lycoris = _adapter(base, r=1, init="lycoris")
    assert torch.count_nonzero(lycoris.lokr_w2_b) == 0 and torch.count_nonzero(lycoris.lokr_w2_a) > 0
    assert torch.count_nonzero(lycoris.lokr_w1) > 0
    for ad in (default, lycoris):
        assert torch.count_nonzero(ad.delta_weight(base.weight)) == 0


@pytest.mark.parametrize("scale", [False, True])
def test_rank_dropout_scales_only_when_asked(scale):
    torch.manual_seed(0)
    base = nn.Linear(6, 8)
    ad = _adapter(base, rank_dropout=0.5, rank_dropout_scale=scale).eval()
    x = torch.randn(3, 6)
    full = ad.delta_output(x, base(x), base).detach()
    ad.train()
    torch.manual_seed(3)
    dropped = ad.delta_output(x, base(x), base).detach()
    zero = (dropped == 0).all(0)
    assert 0 < int(zero.sum()) < 8
    factor = 1 / (~zero).float().mean() if scale else 1.0
    assert torch.allclose(dropped[:, ~zero], full[:, ~zero] * factor, atol=1e-5)


def test_config_reports_every_problem_at_once():
    with pytest.raises(ConfigError) as err:
        LoKrConfig(
            r=-2,
            alpha=0,
            rank_dropout=-0.5,
            decompose_factor=0,
            decompose_both="yes",
            rank_dropout_scale=None,
            init_weights="gaussian",
            target_modules=["q"],
        )
    text = str(err.value)
    for field in (
        "r:",
        "alpha:",
        "rank_dropout:",
        "decompose_factor:",
        "decompose_both:",
        "rank_dropout_scale:",
        "init_weights:",
    ):
        assert field in text, field
    assert LoKrConfig(init_weights="lycoris", decompose_factor=4).init_weights == "lycoris"


def test_loha_and_lokr_on_one_layer_add_up_and_merge_exactly():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8))
    x = torch.randn(4, 6)
    base_out = model(x).detach()
    peftkit.inject(model, LoHaConfig(r=2, target_modules=["0"], init_weights=False), "hada")
    peftkit.inject(model, LoKrConfig(r=1, target_modules=["0"], init_weights=False), "kron")
    peftkit.set_active(model, ["hada", "kron"])
    layer = model[0]
    deltas = sum(layer.adapters[n].delta_weight(layer.base_layer.weight) for n in ("hada", "kron"))
    with torch.no_grad():
        both = model(x)
        assert torch.allclose(both, base_out + x @ deltas.T, atol=1e-5)
        peftkit.merge(model, safe=True)
        assert (model(x) - both).abs().max() < 1e-5
        peftkit.unmerge(model)
        assert (peftkit.unload(model)(x) - base_out).abs().max() < 1e-6


def test_docs_example_runs():
    exec(compile(docs_example("lokr.md"), "docs/lokr.md", "exec"), {})


# -- MiniLM: default targets, parameter count, parity ----------------------------------------------


@pytest.fixture(scope="module")
def minilm():
    return load_minilm()


def test_default_targets_and_parameter_count_on_minilm(minilm):
    model = peftkit.inject(copy.deepcopy(minilm), LoKrConfig())
    adapters = [m for m in model.modules() if isinstance(m, LoKrAdapter)]
    assert len(adapters) == 12 and all(ad.factors == (16, 24, 16, 24) for ad in adapters)  # 384 = 16 x 24
    # W1 16 x 16 in full; W2 decomposed (8 < 24 / 2) into 24 x 8 and 8 x 24
    added = sum(p.numel() for ad in adapters for p in ad.parameters())
    assert added == 12 * (16 * 16 + 24 * 8 + 8 * 24) == 7_680
    layers = [n for n, m in model.named_modules() if isinstance(m, AdapterLayer)]
    assert all(n.endswith((".query", ".value")) for n in layers)


PARITY = {
    "default": {},
    "decompose-both": {
        "r": 4,
        "alpha": 8,
        "decompose_both": True,
        "decompose_factor": 8,
        "init_weights": "lycoris",
        "rank_pattern": {"value": 2},
        "alpha_pattern": {"query": 16},
    },
}
# "full-w2" puts a full W2 on every layer (for the Conv1d "seq" the reference's swapped layout).
# "tucker-decompose-both" gives conv1 a decomposed W1 and Tucker W2, the head a decomposed W1 and W2;
# it leaves out the Conv1d, whose Tucker form the reference cannot run (torch.kron rejects the
# (b, d, k, 1) W2 it builds; peftkit builds the same tensor without torch.kron).
CNN_PARITY = {
    "full-w2": ({"r": 2, "alpha": 4}, CNN_TARGETS),
    "tucker-decompose-both": (
        {
            "r": 1,
            "alpha": 2,
            "use_effective_conv2d": True,
            "decompose_both": True,
            "decompose_factor": 4,
            "init_weights": "lycoris",
        },
        [t for t in CNN_TARGETS if t != "seq"],
    ),
}


@needs_peft
@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("variant", sorted(PARITY))
def test_minilm_parity(minilm, tmp_path, direction, variant):
    extra = PARITY[variant]
    ours_config = LoKrConfig(target_modules=["query", "value"], **copy.deepcopy(extra))
    theirs_config = peft.LoKrConfig(
        task_type="SEQ_CLS", target_modules=["query", "value"], **copy.deepcopy(extra)
    )
    pair = make_pair(direction, minilm, ours_config, theirs_config, minilm_batch(), tmp_path, LOKR)
    print(f"lokr minilm {variant} {direction}: {check_pair(pair)}")


@needs_peft
@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("variant", sorted(CNN_PARITY))
def test_conv_parity(tmp_path, direction, variant):
    extra, targets = CNN_PARITY[variant]
    ours_config = LoKrConfig(target_modules=list(targets), **extra)
    theirs_config = peft.LoKrConfig(target_modules=list(targets), **extra)
    pair = make_pair(direction, tiny_cnn(), ours_config, theirs_config, cnn_batch(), tmp_path, LOKR)
    print(f"lokr cnn {variant} {direction}: {check_pair(pair)}")


class _Layouts(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(24, 18)
        self.wide = nn.Linear(64, 96)
        self.conv = nn.Conv2d(6, 12, 3)
        self.grouped = nn.Conv2d(8, 8, 3, groups=2)
        self.point = nn.Conv2d(6, 6, 1)
        self.seq = nn.Conv1d(8, 6, 3)


@needs_peft
def test_same_tensor_names_and_shapes_as_the_reference_for_every_layout_switch():
    targets = ["lin", "wide", "conv", "grouped", "point", "seq"]
    for r, both, factor, effective in itertools.product((1, 2, 4, 8), (False, True), (-1, 4), (False, True)):
        options = {
            "r": r,
            "decompose_both": both,
            "decompose_factor": factor,
            "use_effective_conv2d": effective,
        }
        ours = peftkit.inject(_Layouts(), LoKrConfig(target_modules=targets, **options))
        theirs = peft.get_peft_model(_Layouts(), peft.LoKrConfig(target_modules=targets, **options))
        mine = {k: tuple(v.shape) for k, v in peftkit.adapter_state_dict(ours).items()}
        assert mine == {k: tuple(v.shape) for k, v in get_peft_model_state_dict(theirs).items()}, options


@needs_peft
def test_config_round_trip_without_warnings(minilm, tmp_path):
    extra = {
        "r": 4,
        "alpha": 16,
        "rank_dropout": 0.1,
        "module_dropout": 0.05,
        "use_effective_conv2d": True,
        "decompose_both": True,
        "decompose_factor": 8,
        "rank_dropout_scale": True,
        "init_weights": "lycoris",
        "rank_pattern": {"value": 2},
        "alpha_pattern": {"query": 8},
        "target_modules": ["query", "value"],
    }
    fields = (
        "r",
        "alpha",
        "rank_dropout",
        "module_dropout",
        "use_effective_conv2d",
        "decompose_both",
        "decompose_factor",
        "rank_dropout_scale",
        "init_weights",
        "rank_pattern",
        "alpha_pattern",
    )
    config_round_trip(
        minilm, LoKrConfig(**extra), peft.LoKrConfig(task_type="SEQ_CLS", **extra), fields, tmp_path
    )

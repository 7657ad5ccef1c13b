"""The delta algebra behind peftkit.combine: SVD truncation, TIES, DARE and magnitude pruning against
straightforward loop implementations on small tensors, seeded DARE masks, and the channel-matrix view
every adapter's ``delta_factors`` must agree with."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

import peftkit
from peftkit.core import deltas
from peftkit.core.deltas import Delta, Options
from peftkit.core.inject import adapter_layers
from support.tiny import KINDS, build


def _random(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# -- truncation ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("keep", [1, 3, 5])
def test_truncation_error_is_the_norm_of_the_discarded_singular_values(keep):
    left, right = _random((9, 6), 0), _random((6, 7), 1)
    exact = left @ right
    singular = torch.linalg.svdvals(exact)
    new_left, new_right, report = deltas.truncate(left, right, rank=keep)
    assert new_left.shape == (9, keep) and new_right.shape == (keep, 7)
    error = torch.linalg.matrix_norm(exact - new_left @ new_right)
    discarded = singular[keep:].square().sum().sqrt()
    assert error == pytest.approx(float(discarded), rel=1e-9, abs=1e-12)
    assert report.error == pytest.approx(float(discarded), rel=1e-9)
    assert report.relative_error == pytest.approx(float(discarded / singular.square().sum().sqrt()), rel=1e-9)
    assert report.discarded == pytest.approx(singular[keep:6].tolist(), rel=1e-9)  # the 7th is rounding
    assert (report.rank, report.exact_rank) == (keep, 6)


def test_energy_keeps_the_smallest_rank_reaching_the_share():
    u, _ = torch.linalg.qr(_random((8, 8), 2))
    v, _ = torch.linalg.qr(_random((8, 8), 3))
    s = torch.tensor([4.0, 2.0, 1.0, 0.5, 0, 0, 0, 0], dtype=torch.float64)
    matrix = u @ torch.diag(s) @ v.T
    share = lambda k: float(s[:k].square().sum() / s.square().sum())  # noqa: E731
    for k in (1, 2, 3, 4):
        *_, report = deltas.factor_dense(matrix, None, share(k))
        assert report.rank == k
        *_, report = deltas.factor_dense(matrix, None, share(k) + 1e-6)
        assert report.rank == min(k + 1, 4)
    *_, report = deltas.factor_dense(matrix, None, None)
    assert report.rank == report.exact_rank == 4 and report.error < 1e-12  # exact: zeros dropped


def test_a_dense_delta_factors_exactly_at_its_numerical_rank():
    dense = _random((7, 3), 4) @ _random((3, 9), 5)
    delta = Delta(dense=dense)
    left, right = delta.factors()
    assert delta.rank == 3 and left.shape == (7, 3)
    torch.testing.assert_close(left @ right, dense, rtol=0, atol=1e-12)


# -- the elementwise methods against loops -------------------------------------------------------


def _loop_trim(t, density):
    k = int(density * t.numel())
    order = sorted(range(t.numel()), key=lambda i: -abs(float(t.reshape(-1)[i])))
    flat = torch.zeros(t.numel(), dtype=t.dtype)
    for i in order[:k]:
        flat[i] = t.reshape(-1)[i]
    return flat.reshape(t.shape)


def _loop_ties(tensors, weights, sign="total"):
    out = torch.zeros_like(tensors[0])
    for idx in itertools.product(*[range(n) for n in out.shape]):
        values = [w * float(t[idx]) for t, w in zip(tensors, weights)]
        if sign == "total":
            elected = 1.0 if sum(values) >= 0 else -1.0
        else:
            elected = 1.0 if sum((v > 0) - (v < 0) for v in values) >= 0 else -1.0
        agreeing = [v for v in values if v != 0 and (v > 0) == (elected > 0)]
        out[idx] = sum(agreeing) / len(agreeing) if agreeing else 0.0
    return out


def _loop_dare(t, density, seed):
    generator = torch.Generator().manual_seed(seed)
    draws = torch.rand(t.shape, generator=generator, dtype=torch.float64)
    out = torch.zeros_like(t)
    for idx in itertools.product(*[range(n) for n in t.shape]):
        if draws[idx] < density:
            out[idx] = t[idx] / density
    return out


TENSORS = [_random((4, 5), 10), _random((4, 5), 11), _random((4, 5), 12)]
WEIGHTS = [0.7, -1.2, 0.4]


@pytest.mark.parametrize("density", [0.2, 0.5, 1.0])
def test_trim_keeps_the_largest_magnitudes(density):
    for t in TENSORS:
        torch.testing.assert_close(deltas.trim(t, density), _loop_trim(t, density), rtol=0, atol=0)


@pytest.mark.parametrize("sign", ["total", "frequency"])
def test_ties_matches_a_loop_implementation(sign):
    options = Options("ties", density=0.5, sign=sign)
    got = deltas.combine_dense(TENSORS, WEIGHTS, options, "m")
    expected = _loop_ties([_loop_trim(t, 0.5) for t in TENSORS], WEIGHTS, sign)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_ties_elects_from_the_weighted_deltas():
    # unweighted, +1 would win this entry (1 + 1 - 1.5 > 0); weighted by (1, 1, 3) the minus wins
    tensors = [torch.tensor([[1.0]]), torch.tensor([[1.0]]), torch.tensor([[-1.5]])]
    got = deltas.combine_dense(tensors, [1.0, 1.0, 3.0], Options("ties", density=1.0), "m")
    assert float(got) == -4.5


def test_magnitude_prune_matches_a_loop_implementation():
    got = deltas.combine_dense(TENSORS, WEIGHTS, Options("magnitude_prune", density=0.4), "m")
    expected = sum(w * _loop_trim(t, 0.4) for t, w in zip(TENSORS, WEIGHTS))
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_matches_a_loop_implementation(method):
    options = Options(method, density=0.6, seed=3)
    got = deltas.combine_dense(TENSORS, WEIGHTS, options, "layer.q")
    dropped = [_loop_dare(t, 0.6, deltas.seed_for(3, "layer.q", i)) for i, t in enumerate(TENSORS)]
    if method == "dare_linear":
        expected = sum(w * d for d, w in zip(dropped, WEIGHTS))
    else:
        expected = _loop_ties(dropped, WEIGHTS)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_dare_is_reproducible_with_a_seed_and_changes_with_it():
    options = Options("dare_linear", density=0.5, seed=7)
    first = deltas.combine_dense(TENSORS, WEIGHTS, options, "m")
    assert torch.equal(first, deltas.combine_dense(TENSORS, WEIGHTS, options, "m"))
    torch.manual_seed(123)  # the global generator plays no part
    assert torch.equal(first, deltas.combine_dense(TENSORS, WEIGHTS, options, "m"))
    other = deltas.combine_dense(TENSORS, WEIGHTS, Options("dare_linear", density=0.5, seed=8), "m")
    assert not torch.equal(first, other)
    # each module and each adapter draws its own mask
    assert not torch.equal(first, deltas.combine_dense(TENSORS, WEIGHTS, options, "n"))
    assert deltas.seed_for(7, "m", 0) != deltas.seed_for(7, "m", 1)


def test_dare_keeps_about_density_and_rescales():
    big = torch.ones(200, 200, dtype=torch.float64)
    dropped = deltas.dare_drop(big, 0.3, seed=0)
    kept = dropped != 0
    assert abs(float(kept.double().mean()) - 0.3) < 0.01
    assert torch.all(dropped[kept] == 1 / 0.3)


def test_linear_combination_of_factors_is_exact_at_the_summed_rank():
    a = Delta(left=_random((6, 2), 20), right=_random((2, 5), 21))
    b = Delta(dense=_random((6, 3), 22) @ _random((3, 5), 23))
    left, right, bias, report = deltas.combine_deltas([a, None, b], [0.5, 9.0, -2.0], Options("linear"), "m")
    assert bias is None and left.shape[1] == report.rank == 5 and report.error == 0
    torch.testing.assert_close(left @ right, 0.5 * a.matrix() - 2.0 * b.matrix(), rtol=0, atol=1e-12)


def test_bias_changes_combine_with_the_same_weights():
    a = Delta(
        left=_random((3, 1), 30),
        right=_random((1, 4), 31),
        bias=torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64),
    )
    b = Delta(left=_random((3, 1), 32), right=_random((1, 4), 33))
    *_, bias, _ = deltas.combine_deltas([a, b], [2.0, 1.0], Options("cat"), "m")
    assert bias.tolist() == [2.0, 4.0, 6.0]


def test_options_report_every_problem():
    problems = Options("ties", rank=2, energy=0.9, density=None, sign="most").problems()
    assert len(problems) == 3
    assert any("density" in p for p in problems) and any("give one of them" in p for p in problems)
    assert Options("cat", rank=3).problems() == [
        "rank/energy: 'cat' keeps every factor (rank = sum of the ranks); use 'linear' to truncate"
    ]
    assert "only ties" in Options("linear", density=0.5).problems()[0]
    assert "must be one of" in Options("mean").problems()[0]


# -- the channel-matrix view -------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_lora_factors_multiply_to_the_delta_weight_as_a_channel_matrix(kind):
    model, _ = build(kind)
    peftkit.inject(
        model, peftkit.LoraConfig(r=3, lora_alpha=5, target_modules=["layer"], init_lora_weights=False)
    )
    (_, layer), *_ = adapter_layers(model)
    adapter, weight = layer.adapters["default"], layer.base_layer.weight.detach()
    left, right = adapter.delta_factors(weight)
    matrix = deltas.as_matrix(layer.base_layer, adapter.delta_weight(weight))
    torch.testing.assert_close(left @ right, matrix)
    assert torch.equal(deltas.from_matrix(layer.base_layer, matrix, weight), adapter.delta_weight(weight))
    rows = deltas.as_matrix(layer.base_layer, weight)
    assert rows.shape[0] == (weight.shape[1] if kind in ("Conv1D", "Embedding") else weight.shape[0])


def test_as_matrix_puts_output_channels_in_rows():
    linear, embedding = nn.Linear(3, 2), nn.Embedding(5, 4)
    assert deltas.as_matrix(linear, linear.weight).shape == (2, 3)
    assert deltas.as_matrix(embedding, embedding.weight).shape == (4, 5)
    conv = nn.Conv2d(3, 6, 2)
    assert deltas.as_matrix(conv, conv.weight).shape == (6, 12)


def test_the_references_svd_variant_names_point_to_peftkits_method():
    [problem] = Options("ties_svd", density=0.5).problems()
    assert "use method='ties'" in problem

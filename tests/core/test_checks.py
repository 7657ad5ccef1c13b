"""The shared field checks: what each accepts, what it refuses, and the one wording users read."""

import math
from types import SimpleNamespace

import pytest

from peftkit.core import checks


@pytest.mark.parametrize("value", [True, False])
def test_booleans_accept_bools(value):
    assert checks.booleans(SimpleNamespace(a=value, b=value), "a", "b") == []


@pytest.mark.parametrize("value", [0, 1, "true", None])
def test_booleans_refuse_look_alikes(value):
    assert checks.booleans(SimpleNamespace(a=value), "a") == [f"a: must be True or False, got {value!r}"]


def test_every_bad_field_is_reported_not_just_the_first():
    config = SimpleNamespace(a="yes", b=True, c=1)
    assert [line.split(":")[0] for line in checks.booleans(config, "a", "b", "c")] == ["a", "c"]


@pytest.mark.parametrize(
    "value, ok", [(1, True), (64, True), (0, False), (-2, False), (2.0, False), (True, False)]
)
def test_positive_ints(value, ok):
    out = checks.positive_ints(SimpleNamespace(r=value), "r")
    assert out == ([] if ok else [f"r: must be a positive integer, got {value!r}"])


@pytest.mark.parametrize(
    "value, ok", [(0, True), (-7, True), (2**40, True), (1.0, False), (False, False), ("0", False)]
)
def test_seeds(value, ok):
    assert (checks.seeds(SimpleNamespace(seed=value), "seed") == []) is ok


@pytest.mark.parametrize(
    "value, ok", [(0, True), (0.0, True), (0.5, True), (1, False), (1.0, False), (-0.1, False)]
)
def test_dropout_is_a_probability_below_one(value, ok):
    out = checks.dropout(SimpleNamespace(p=value), "p")
    assert out == ([] if ok else [f"p: must be in [0, 1), got {value!r}"])


@pytest.mark.parametrize("value", [True, "0.1", None, math.nan])
def test_dropout_refuses_non_numbers(value):
    assert checks.dropout(SimpleNamespace(p=value), "p") != []


@pytest.mark.parametrize(
    "value, ok",
    [
        (150, True),
        (-3.5, True),
        (0, True),
        (math.inf, False),
        (math.nan, False),
        (True, False),
        ("150", False),
    ],
)
def test_finite_with_and_without_hint(value, ok):
    config = SimpleNamespace(scaling=value)
    assert (checks.finite(config, "scaling") == []) is ok
    if not ok:
        assert checks.finite(config, "scaling") == [f"scaling: must be a finite number, got {value!r}"]
        assert checks.finite(config, "scaling", "usual: 100 to 300") == [
            f"scaling: must be a finite number (usual: 100 to 300), got {value!r}"
        ]


@pytest.mark.parametrize(
    "bias, ok", [("none", True), ("all", True), ("vera_only", True), ("lora_only", False), (None, False)]
)
def test_bias_mode_names_the_methods_own_mode(bias, ok):
    out = checks.bias_mode(SimpleNamespace(bias=bias), "vera_only")
    assert out == ([] if ok else [f"bias: must be 'none', 'all' or 'vera_only', got {bias!r}"])

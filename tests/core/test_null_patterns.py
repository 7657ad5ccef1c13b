"""A per-module pattern written as null (how the reference saves an unset one) reads as empty, for every method."""

import dataclasses

import pytest

from peftkit.core import registry
from peftkit.errors import ConfigError


def _pattern_fields(cls):
    return [
        f.name for f in dataclasses.fields(cls) if f.name.endswith("_pattern") and f.default_factory is dict
    ]


CONFIGS = [
    registry.config_class(t)
    for t in registry.registered_methods()
    if registry.config_class(t) is not object and _pattern_fields(registry.config_class(t))
]


@pytest.mark.parametrize("cls", CONFIGS, ids=[c.__name__ for c in CONFIGS])
def test_every_null_pattern_reads_as_empty(cls):
    names = _pattern_fields(cls)
    with_nulls = {name: None for name in names}
    try:
        config = cls(**with_nulls)
    except ConfigError as exc:  # other required fields (a prompt's length): never a pattern's problem
        assert not [p for p in exc.problems if p.split(":")[0] in names], exc.problems
        return
    assert all(getattr(config, name) == {} for name in names)

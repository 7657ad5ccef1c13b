"""The generic typed-YAML loader (peftkit.run.loader): YAML -> nested dataclasses, every problem found at
once, each headed by its field path; a field that fails keeps its default."""

from __future__ import annotations

from dataclasses import dataclass, field

from peftkit.run.loader import apply_overrides, coerce, describe, load_dataclass, parse_yaml


@dataclass
class Inner:
    size: int = 3
    ratio: float = 0.5


@dataclass
class Outer:
    name: str = "x"
    tags: list[str] = field(default_factory=list)
    limit: int | None = None
    inner: Inner = field(default_factory=Inner)
    extra: dict = field(default_factory=dict)


def test_every_problem_is_reported_at_once_with_its_field_path():
    problems: list[str] = []
    loaded = load_dataclass(
        Outer,
        {"name": 7, "tags": ["a", 2], "limit": "many", "inner": {"size": "big", "ratoi": 1}, "nmae": "y"},
        problems,
    )
    assert problems == [
        "name: expected a string, got 7 (int)",
        "tags: item 1: expected a string, got 2 (int)",
        "limit: expected an integer or null, got 'many' (str)",
        "inner.size: expected an integer, got 'big' (str)",
        "inner.ratoi: unknown key; did you mean 'ratio'?",
        "nmae: unknown key; did you mean 'name'?",
    ]
    assert loaded == Outer()  # every field that failed keeps its default


def test_values_that_fit_are_converted_and_the_rest_is_kept():
    problems: list[str] = []
    loaded = load_dataclass(
        Outer, parse_yaml("inner: {size: 1e3, ratio: 2}\nlimit: 1e3\nname: n\n"), problems
    )
    assert problems == []
    assert loaded.inner == Inner(size=1000, ratio=2.0) and isinstance(loaded.inner.ratio, float)
    assert loaded.limit == 1000 and loaded.name == "n" and loaded.tags == []


def test_a_section_that_is_not_a_mapping_names_its_keys():
    problems: list[str] = []
    load_dataclass(Outer, {"inner": [1, 2]}, problems)
    assert problems == ["inner: expected a section of keys (size, ratio), got [1, 2] (a list)"]
    problems = []
    load_dataclass(Outer, "text", problems)
    assert problems[0].startswith("config: expected a section of keys (name, tags, limit, inner, extra)")


def test_a_field_with_its_own_checker_gets_the_raw_value_and_the_problem_list():
    seen = []

    def check(value, problems):
        seen.append(value)
        problems.append("extra.mode: chosen by its own checker")
        return {"checked": True}

    problems: list[str] = []
    loaded = load_dataclass(Outer, {"extra": {"mode": 1}, "limit": "x"}, problems, custom={"extra": check})
    assert seen == [{"mode": 1}] and loaded.extra == {"checked": True}
    assert problems == [
        "extra.mode: chosen by its own checker",
        "limit: expected an integer or null, got 'x' (str)",
    ]


def test_coerce_and_describe():
    assert coerce(3, float) == (3.0, None)
    assert coerce(True, int)[1] == "expected an integer, got True (bool)"
    assert coerce(None, int)[1] == "expected an integer, got null (leave the key out to keep its default)"
    assert coerce({"a": 1}, dict[str, int]) == ({"a": 1}, None)
    assert describe(list[str] | None) == "a list of strings or null"


def test_overrides_set_dotted_paths_and_report_malformed_ones():
    problems: list[str] = []
    data = {"inner": {"size": 1}, "name": "n"}
    out = apply_overrides(data, ["inner.ratio=1e-3", "tags=[a,b]", "name.x=1", "nokey"], problems)
    assert out["inner"] == {"size": 1, "ratio": 0.001} and out["tags"] == ["a", "b"]
    assert data == {"inner": {"size": 1}, "name": "n"}  # the input is left alone
    assert problems == [
        "override 'name.x=1': name is 'n' (str), not a section with keys",
        "override 'nokey': expected KEY=VALUE with a dotted key, e.g. train.lr=1e-3",
    ]

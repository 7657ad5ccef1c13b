"""How the package is put together: layers that import one way, down, and a root that exports what the
registry holds (docs/architecture.md).

Every import in src/peftkit counts, at module level or inside a function, relative or absolute;
``from peftkit import X`` imports the package root unless X is a submodule. Imports by name at run time
(``importlib.import_module``) are not read: the registry loads the built-in methods and backends that way
on purpose, so that a new method file is found without being named anywhere.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import import_graph  # noqa: E402
import root_exports  # noqa: E402

# Lowest first. A part of peftkit imports only from lower layers and from inside itself; parts in one
# layer do not import each other. "peftkit" is the package root (src/peftkit/__init__.py).
LAYERS = [
    ["errors", "metrics", "text_metrics", "report", "resources"],  # leaf utilities: import nothing of peftkit
    ["core"],
    ["methods"],
    ["backends"],
    ["api", "peftkit"],
    ["train", "data", "models"],
    ["tasks"],
    ["select"],
    ["run", "integrations"],
    ["compare", "serve"],
    ["cli", "demo", "__main__"],
]
LAYER = {part: n for n, parts in enumerate(LAYERS) for part in parts}
ORDER = [part for parts in LAYERS for part in parts]  # the order of the graph in docs/architecture.md

# One loop any nn.Module can use: train/ knows the core and nothing of methods, the API or what runs it.
TRAIN_MAY_IMPORT = {"core", *LAYERS[0]}

# Imports inside one layer that are what the importer is for.
SAME_LAYER_ALLOWED = {
    ("peftkit", "api"): "the root re-exports the verbs",
    ("__main__", "cli"): "`python -m peftkit` is the command line",
    ("cli", "demo"): "`peftkit demo` runs the comparison the demo module ships",
}


def broken_rule(imp: import_graph.Import) -> str | None:
    """The layer rule ``imp`` breaks, worded with the fix, or None."""
    source, target = imp.source, imp.target
    if source == target:
        return None
    for part in (source, target):
        if part not in LAYER:
            return f"peftkit.{part} is in no layer: add it to LAYERS here and to docs/architecture.md"
    where = f"{source} (layer {LAYER[source]}) imports peftkit.{target} (layer {LAYER[target]})"
    if source == "train" and target not in TRAIN_MAY_IMPORT:
        return (
            f"{where}: train/ may import only core and the leaf utilities ({', '.join(LAYERS[0])}); "
            "let the caller pass the object in (a saver, a hook), or ask the registry for the method's fact"
        )
    if LAYER[target] > LAYER[source]:
        return (
            f"{where}, a higher layer: move what both need down to the lower one (a config section "
            "lives with its owner), or let the caller pass it in"
        )
    if LAYER[target] == LAYER[source] and (source, target) not in SAME_LAYER_ALLOWED:
        return (
            f"{where}, a peer in its own layer: move what both need to a lower layer, or let the caller "
            "pass it in"
        )
    return None


def _violations(src: Path = import_graph.SRC) -> list[tuple[import_graph.Import, str]]:
    return [(imp, rule) for imp in import_graph.scan(src) if (rule := broken_rule(imp)) is not None]


def test_every_part_of_the_package_is_in_a_layer():
    parts = {import_graph.part_of(p.relative_to(import_graph.SRC)) for p in import_graph.SRC.rglob("*.py")}
    missing = sorted(parts - set(LAYER))
    assert not missing, f"not in any layer: {missing}; add them to LAYERS here and to docs/architecture.md"


def test_no_module_imports_from_a_higher_layer_or_a_peer():
    new = [f"src/peftkit/{imp.file}:{imp.line}: {rule}" for imp, rule in _violations()]
    assert not new, "imports against the layer map (docs/architecture.md):\n" + "\n".join(new)


def _write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def test_the_check_reads_every_kind_of_import(tmp_path):
    src = _write(
        tmp_path,
        {
            "__init__.py": "",
            "errors.py": "",
            "api.py": "",
            "core/__init__.py": "",
            "run/__init__.py": "",
            "run/schema.py": "",
            "train/__init__.py": "",
            "data/__init__.py": "from . import files\n",
            "data/files.py": (
                "from __future__ import annotations\n"
                "import os\n"
                "from ..errors import ConfigError\n"  # down: fine
                "from .. import errors\n"  # a submodule of the root, not the root
                "from ..run.schema import DataConfig\n"  # up, relative
                "def load():\n"
                "    import peftkit.run.schema\n"  # up, absolute, inside a function
                "    from peftkit import inject\n"  # the root (layer 4) from layer 5: fine
                "    return inject\n"
            ),
            "train/loop.py": "def fit():\n    from peftkit import inject\n",  # train: only core and leaves
            "core/layer.py": "from peftkit import errors\nfrom .. import api\n",  # down, then up
        },
    )
    found = {(imp.file, imp.line, imp.target): rule for imp, rule in _violations(src)}
    assert set(found) == {
        ("data/files.py", 5, "run"),
        ("data/files.py", 7, "run"),
        ("train/loop.py", 2, "peftkit"),
        ("core/layer.py", 2, "api"),
    }
    assert "a higher layer" in found["data/files.py", 5, "run"]
    assert "train/ may import only core" in found["train/loop.py", 2, "peftkit"]


def test_the_check_refuses_a_peer_in_the_same_layer(tmp_path):
    src = _write(
        tmp_path,
        {
            "models/__init__.py": "from ..data import registry\n",
            "data/__init__.py": "",
            "data/registry.py": "",
        },
    )
    [(imp, rule)] = _violations(src)
    assert (imp.file, imp.line, imp.target) == ("models/__init__.py", 1, "data")
    assert "a peer in its own layer" in rule


def test_docs_import_graph_is_current():
    doc = (ROOT / "docs" / "architecture.md").read_text()
    assert import_graph.render(ORDER) in doc, (
        "docs/architecture.md's import graph is out of date; run `.venv/bin/python scripts/import_graph.py --write`"
    )


def test_docs_state_the_layer_map():
    doc = (ROOT / "docs" / "architecture.md").read_text()
    for n, parts in enumerate(LAYERS):
        assert f"| {n} | {', '.join(f'`{p}`' for p in parts)} |" in doc, f"layer {n} differs from LAYERS"


@pytest.mark.parametrize("name", ["__all__", "__dir__"])
def test_the_root_exports_every_registered_method_config(name):
    import peftkit
    from peftkit.core import registry

    public = peftkit.__all__ if name == "__all__" else dir(peftkit)
    for peft_type in registry.registered_methods():
        cls = registry.config_class(peft_type)
        assert cls.__name__ in public and getattr(peftkit, cls.__name__) is cls


def test_root_type_checking_block_is_current():
    assert root_exports.current() == root_exports.block(), (
        "src/peftkit/__init__.py's TYPE_CHECKING block is out of date; run "
        "`.venv/bin/python scripts/root_exports.py --write`"
    )

"""Which part of peftkit imports which: every import in ``src/peftkit``, at module level or inside a
function, relative or absolute, read from the source (nothing is imported). Run

    .venv/bin/python scripts/import_graph.py            # print the graph, package -> packages
    .venv/bin/python scripts/import_graph.py --write    # rewrite it in docs/architecture.md

``tests/test_architecture.py`` checks the layers with the same scan, and fails while the graph in the doc
is out of date.
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "peftkit"
DOC = ROOT / "docs" / "architecture.md"
START, END = "<!-- import-graph:start -->", "<!-- import-graph:end -->"
PACKAGE_ROOT = "peftkit"  # how the graph names src/peftkit/__init__.py (`from peftkit import X`)


@dataclass(frozen=True)
class Import:
    """One import of a part of peftkit.

    Attributes:
        file: The importing file, relative to ``src/peftkit`` (``"data/files.py"``).
        line: Its line.
        source: The part of peftkit the file belongs to: a top-level package or module name
            (``"data"``, ``"errors"``), or ``"peftkit"`` for the package root.
        target: The part it imports, named the same way.
    """

    file: str
    line: int
    source: str
    target: str


def part_of(relative: Path) -> str:
    """The top-level part of peftkit a file belongs to: ``data/files.py`` -> ``"data"``."""
    if relative.parts == ("__init__.py",):
        return PACKAGE_ROOT
    return relative.parts[0].removesuffix(".py")


def _is_part(src: Path, name: str) -> bool:
    return (src / f"{name}.py").is_file() or (src / name / "__init__.py").is_file()


def _targets(node: ast.Import | ast.ImportFrom, package: list[str], src: Path) -> list[str]:
    """The parts of peftkit ``node`` imports; ``package``: the importing module's package, as path parts
    below peftkit."""
    if isinstance(node, ast.Import):
        names = [alias.name.split(".") for alias in node.names]
        return [n[1] if len(n) > 1 else PACKAGE_ROOT for n in names if n[0] == "peftkit"]
    if node.level == 0:
        if node.module is None or node.module.split(".")[0] != "peftkit":
            return []
        dotted = node.module.split(".")[1:]
    else:  # `from ..run.schema import X` in data/files.py: up one package from data/, then run.schema
        dotted = package[: len(package) - (node.level - 1)] + (node.module.split(".") if node.module else [])
    if dotted:
        return [dotted[0]]
    # `from peftkit import X` / `from .. import X`: the submodule X when there is one, else the root
    return [alias.name if _is_part(src, alias.name) else PACKAGE_ROOT for alias in node.names]


def scan(src: Path = SRC) -> list[Import]:
    """Every import of a part of peftkit by a file under ``src``, in file and line order."""
    found = []
    for path in sorted(src.rglob("*.py")):
        relative = path.relative_to(src)
        package = list(relative.parts[:-1])  # an __init__.py's package is its own folder
        source = part_of(relative)
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for target in _targets(node, package, src):
                    found.append(Import(relative.as_posix(), node.lineno, source, target))
    return sorted(found, key=lambda i: (i.file, i.line, i.target))


def graph(imports: list[Import] | None = None) -> dict[str, list[str]]:
    """Part -> the other parts it imports, both sorted; parts that import none are left out."""
    edges: dict[str, set[str]] = defaultdict(set)
    for imp in scan() if imports is None else imports:
        if imp.target != imp.source:
            edges[imp.source].add(imp.target)
    return {source: sorted(targets) for source, targets in sorted(edges.items())}


def render(order: list[str] | None = None) -> str:
    """The graph as the doc shows it: one line per part, in ``order`` (default alphabetical)."""
    edges = graph()
    parts = [p for p in order if p in edges] if order else list(edges)
    width = max(len(p) for p in parts)
    lines = [f"{p:<{width}} -> {', '.join(edges[p])}" for p in parts]
    return "```\n" + "\n".join(lines) + "\n```"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help=f"rewrite the graph in {DOC.name}")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "tests"))
    from test_architecture import ORDER  # the layer map lives with the test that enforces it

    text = render(ORDER)
    if not args.write:
        print(text)
        return 0
    doc = DOC.read_text()
    if START not in doc or END not in doc:
        print(f"{DOC}: markers {START} / {END} not found", file=sys.stderr)
        return 1
    head, rest = doc.split(START, 1)
    DOC.write_text(f"{head}{START}\n{text}\n{END}{rest.split(END, 1)[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The top-level packages depend on each other in one direction only: data -> models -> facevid -> evaluation
(a package may import those to its left, never those to its right), and demo/ (the CPU demo's aids) sits on top
of the framework, which never imports it. Read from the source with ast: module-level imports and the imports
inside functions alike, so a lazy import cannot hide a cycle."""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ORDER = ["data", "models", "facevid", "evaluation"]
ABOVE_THE_FRAMEWORK = ["demo"]
PACKAGES = ORDER + ABOVE_THE_FRAMEWORK


def imported_packages(source: Path) -> set[tuple[str, int]]:
    """(top-level package, line) of every import statement in `source` that names one of PACKAGES."""
    found = set()
    for node in ast.walk(ast.parse(source.read_text(), filename=str(source))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found |= {(name.split(".")[0], node.lineno) for name in names if name.split(".")[0] in PACKAGES}
    return found


def package_graph() -> dict[str, dict[str, list[str]]]:
    """{package: {imported package: ["file:line", ...]}} over every .py file of each package."""
    graph: dict[str, dict[str, list[str]]] = {p: {} for p in PACKAGES}
    for package in PACKAGES:
        for source in sorted((REPO / package).rglob("*.py")):
            for imported, line in imported_packages(source):
                if imported != package:
                    graph[package].setdefault(imported, []).append(f"{source.relative_to(REPO)}:{line}")
    return graph


def test_imports_walk_every_kind_of_import_statement(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("import data.synth\nfrom models import unet3d\nimport numpy\nfrom . import x\n"
                      "def f():\n    from evaluation.runner import evaluate_run\n")
    assert {name for name, _ in imported_packages(source)} == {"data", "models", "evaluation"}


def test_packages_import_each_other_in_one_direction_only():
    graph = package_graph()
    backwards = [f"{package} imports {imported} ({', '.join(where)})"
                 for package, imports in graph.items() for imported, where in imports.items()
                 if PACKAGES.index(imported) > PACKAGES.index(package)]
    assert not backwards, "\n".join(backwards)
    # The check has something to check: the packages do build on each other.
    assert "data" in graph["models"] or "data" in graph["facevid"]
    assert {"data", "models", "facevid"} <= set(graph["evaluation"]) and "facevid" in graph["demo"]

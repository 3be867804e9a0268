"""The pipeline's imports run one way: cache -> store <- fit <- analysis, tools on top; nothing imports tests/.

The graph is read from the source (every import statement, function-level ones included), so a lazy
import that would only run on some path is caught too; one subprocess checks it at run time.
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# folder -> the package it is (pyproject's package-dir) and the stages it may import besides the root
STAGES = {
    "store": ("lenscache", set()),
    "cache": ("lenscache.cache", set()),
    "fit": ("lenscache.fit", set()),
    "analysis": ("lenscache.analysis", {"lenscache.fit"}),
    "tools": ("lenscache.tools", {"lenscache.cache", "lenscache.fit", "lenscache.analysis"}),
}
TEST_MODULES = {"tiny_models", "conftest"} | {p.stem for p in (REPO / "tests").glob("test_*.py")}


def imports_of(path: Path, package: str) -> set[str]:
    """Absolute names of every module `path` imports (relative imports resolved against `package`)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                names.add(".".join(base + ([node.module] if node.module else [])))
            else:
                names.add(node.module or "")
    return names


def stage_of(module: str) -> str | None:
    for _folder, (package, _allowed) in STAGES.items():
        if package != "lenscache" and (module == package or module.startswith(package + ".")):
            return package
    return "lenscache" if module == "lenscache" or module.startswith("lenscache.") else None


def test_the_stage_folders_are_the_packages_pyproject_declares():
    text = (REPO / "pyproject.toml").read_text()
    declared = dict(re.findall(r'^"(lenscache[\w.]*)" = "(\w+)"$', text, flags=re.M))
    assert {folder: package for package, folder in declared.items()} == {f: p for f, (p, _) in STAGES.items()}


@pytest.mark.parametrize("folder", sorted(STAGES))
def test_a_stage_imports_only_the_stages_before_it(folder):
    package, allowed = STAGES[folder]
    bad = []
    for path in sorted((REPO / folder).glob("*.py")):
        for module in imports_of(path, package):
            stage = stage_of(module)
            if stage not in (None, "lenscache", package) and stage not in allowed:
                bad.append(f"{path.relative_to(REPO)} imports {module}")
            if module.split(".")[0] in TEST_MODULES or module.startswith("tests"):
                bad.append(f"{path.relative_to(REPO)} imports the test module {module}")
    assert not bad, "\n".join(bad)


def test_no_package_module_puts_tests_on_the_path():
    for folder in STAGES:
        for path in (REPO / folder).glob("*.py"):
            assert "sys.path" not in path.read_text(), f"{path.relative_to(REPO)} edits sys.path"


def test_importing_analysis_does_not_import_cache():
    code = (
        "import json, sys, lenscache.analysis.evaluate, lenscache.analysis.report; "
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('lenscache.'))))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    loaded = json.loads(r.stdout.strip().splitlines()[-1])
    assert "lenscache.analysis.evaluate" in loaded
    assert not [m for m in loaded if m.startswith("lenscache.cache")], loaded

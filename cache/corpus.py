"""The built-in sample corpus: docstrings of the Python standard library, present on every machine.

Modules are parsed with `ast`, never imported, so reading the corpus runs no library code.
"""

from __future__ import annotations

import ast
import os
import sysconfig
import warnings
from collections.abc import Iterator
from pathlib import Path

# Test suites are not documentation, and third-party packages differ between machines.
_EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test"})

_DOCUMENTED = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
# Definitions can sit inside `if`, `try`, `with` or `match` blocks; none can sit inside an expression.
_STATEMENT_LIKE = (ast.stmt, ast.excepthandler, ast.match_case)


def stdlib_module_paths(root: Path | None = None) -> list[Path]:
    """The `*.py` files under `root` (default: the stdlib), test suites and site-packages excluded,
    sorted by relative path."""
    root = Path(sysconfig.get_paths()["stdlib"]) if root is None else root
    found: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Pruning here keeps the walk out of site-packages, which can be far larger than the stdlib.
        dirnames[:] = [d for d in dirnames if d not in _EXCLUDED_DIRS]
        for name in filenames:
            if name.endswith(".py"):
                path = Path(dirpath) / name
                found.append((path.relative_to(root).as_posix(), path))
    return [path for _, path in sorted(found)]


def _docstrings(node: ast.AST) -> Iterator[str]:
    """Docstrings of `node` and the definitions nested in it, in source order."""
    if isinstance(node, _DOCUMENTED):
        doc = ast.get_docstring(node, clean=True)
        if doc and doc.strip():
            yield doc.strip()
    for child in ast.iter_child_nodes(node):
        if isinstance(child, _STATEMENT_LIKE):
            yield from _docstrings(child)


def module_docstrings(path: Path) -> str | None:
    """The docstrings of one module joined by blank lines, or None if it has none or cannot be parsed."""
    try:
        source = path.read_bytes()
        # Some stdlib modules hold escape sequences that newer Pythons warn about; they still parse.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tree = ast.parse(source, filename=str(path))
    except (OSError, SyntaxError, ValueError, RecursionError):
        # ValueError covers undecodable source and null bytes.
        return None
    return "\n\n".join(_docstrings(tree)) or None


def stdlib_docstrings() -> Iterator[str]:
    """One document per standard-library module: its docstring, then its classes' and functions'."""
    for path in stdlib_module_paths():
        text = module_docstrings(path)
        if text is not None:
            yield text

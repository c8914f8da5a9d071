"""Every module and class stays small enough to read in one sitting.

A module at most 400 lines, a class at most 270 (docstrings included); ``LaplaceWrapper``, which
carries the docstrings of the public API, at most 250 lines of delegation code (docstrings
excluded).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "laplace_ggn"
MODULE_MAX, CLASS_MAX, WRAPPER_CODE_MAX = 400, 270, 250
FILES = sorted(PACKAGE.rglob("*.py"))


def _docstring_lines(node: ast.AST) -> int:
    """Lines taken by the docstrings of ``node`` and of everything defined in it."""
    n = 0
    for sub in ast.walk(node):
        body = getattr(sub, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr):
            value = body[0].value
            if isinstance(value, ast.Constant) and isinstance(value.value, str):
                n += body[0].end_lineno - body[0].lineno + 1
    return n


def test_the_package_is_found():
    assert len(FILES) > 50
    assert (PACKAGE / "wrapper.py") in FILES


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_module_and_class_sizes(path):
    source = path.read_text()
    assert len(source.splitlines()) <= MODULE_MAX, f"{path.name}: over {MODULE_MAX} lines"
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ClassDef) and node.name != "LaplaceWrapper":
            n = node.end_lineno - node.lineno + 1
            assert n <= CLASS_MAX, f"{path.name}: class {node.name} has {n} lines"


def test_laplace_wrapper_is_delegation():
    tree = ast.parse((PACKAGE / "wrapper.py").read_text())
    (cls,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "LaplaceWrapper"]
    code = cls.end_lineno - cls.lineno + 1 - _docstring_lines(cls)
    assert code <= WRAPPER_CODE_MAX, f"LaplaceWrapper has {code} lines of code"

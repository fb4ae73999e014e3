"""Slicer 5.8 runs Python 3.9: the module, its Lib and the core it runs must parse and import there.

Checked statically (no Python 3.9 here): the grammar (``ast.parse(feature_version=(3, 9))``: no ``match``, no
parenthesised context managers, ...), ``X | Y`` annotations only under ``from __future__ import annotations``
(they are evaluated at import on 3.9 otherwise), and no ``zip(..., strict=...)`` (3.10).
"""

import ast
from pathlib import Path

import pytest

MODULE_DIR = Path(__file__).resolve().parents[2]
SOURCES = sorted([MODULE_DIR / "DeepAbdominalReg.py", *(MODULE_DIR / "DeepAbdominalRegLib").glob("*.py"),
                  *(MODULE_DIR / "deepabdominalreg").rglob("*.py")])


def _problems(source: str) -> list[str]:
    tree = ast.parse(source, feature_version=(3, 9))
    future = any(isinstance(n, ast.ImportFrom) and n.module == "__future__" and
                 any(a.name == "annotations" for a in n.names) for n in tree.body)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "zip" and any(
                k.arg == "strict" for k in node.keywords):
            found.append(f"line {node.lineno}: zip(strict=...) needs Python 3.10")
        annotations = []
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            arguments = node.args.posonlyargs + node.args.args + node.args.kwonlyargs
            annotations = [a.annotation for a in arguments if a.annotation] + [node.returns]
        elif isinstance(node, ast.AnnAssign):
            annotations = [node.annotation]
        for annotation in filter(None, annotations):
            if not future and any(isinstance(n, ast.BinOp) and isinstance(n.op, ast.BitOr)
                                  for n in ast.walk(annotation)):
                found.append(f"line {annotation.lineno}: 'X | Y' annotation without "
                             "'from __future__ import annotations'")
    return found


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(MODULE_DIR)))
def test_parses_and_imports_on_python_39(path):
    assert _problems(path.read_text(encoding="utf-8")) == []


def test_the_check_finds_what_breaks_on_39():
    assert len(_problems("def f(x: int | None) -> None:\n    return list(zip(x, x, strict=True))\n")) == 2
    assert _problems("from __future__ import annotations\ndef f(x: int | None): pass\n") == []
    with pytest.raises(SyntaxError):
        _problems("match x:\n    case 1:\n        pass\n")

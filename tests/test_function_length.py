"""No function in ``jdoptim/`` is longer than 60 lines (docstring included): a longer one is
a sign that it does several jobs, which belong in named pieces (issue 14's rule)."""

from __future__ import annotations

import ast
from pathlib import Path

_PACKAGE = Path(__file__).resolve().parents[1] / "jdoptim"
_LIMIT = 60


def test_no_function_over_60_lines() -> None:
    long = []
    for path in sorted(_PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > _LIMIT:
                    long.append(f"{path.relative_to(_PACKAGE.parent)}:{node.lineno} {node.name}")
    assert not long, f"functions over {_LIMIT} lines: {long}"

"""The docs site's maths: every reST ``.. math::`` block of a docstring becomes ``$$ … $$``."""

from __future__ import annotations

import importlib.util
import pkgutil
from pathlib import Path

import jdoptim

_HOOK = Path(__file__).resolve().parents[1] / "docs" / "hooks" / "math_blocks.py"


def _math_to_markdown():
    spec = importlib.util.spec_from_file_location("math_blocks", _HOOK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.math_to_markdown


def test_block_with_continuation_lines_becomes_display_maths() -> None:
    text = "Intro.\n\n.. math::  s = a\n           + b ,\n\nAfter.\n    .. math:: x\n\n"
    expected = "Intro.\n\n$$\ns = a\n+ b ,\n$$\n\nAfter.\n    $$\n    x\n    $$\n\n"
    assert _math_to_markdown()(text) == expected


def test_no_docstring_keeps_a_math_directive() -> None:
    convert = _math_to_markdown()
    seen = 0
    for info in pkgutil.walk_packages(jdoptim.__path__, "jdoptim."):
        module = importlib.import_module(info.name)
        doc = module.__doc__ or ""
        if ".. math::" in doc:
            seen += 1
            assert ".. math::" not in convert(doc), info.name
            assert convert(doc).count("$$") % 2 == 0, info.name
    assert seen >= 20

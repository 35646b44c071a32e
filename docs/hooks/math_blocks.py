"""Griffe extension: the docstrings' reST ``.. math::`` blocks become display maths on the site.

The library's docstrings write their formulas as reST directives, which read well in ``help()``
and in an editor::

    .. math::  s = \\sum_i w_i \\ell_i ,
               w = W(G)

(the first line after ``::``, then lines indented at least as far, up to a blank line). The
Markdown that mkdocstrings renders has no such directive, so this extension rewrites each block
into ``$$ … $$`` before rendering; ``pymdownx.arithmatex`` (generic mode) and MathJax typeset it.
The docstrings themselves stay unchanged.
"""

from __future__ import annotations

import re
from typing import Any

try:
    import griffe
except ImportError:  # the test suite reads math_to_markdown without the docs extra installed
    griffe = None

_DIRECTIVE = re.compile(r"^(?P<indent>[ \t]*)\.\. math::[ \t]*(?P<first>.*)$")


def math_to_markdown(text: str) -> str:
    """``text`` with every ``.. math::`` block replaced by a ``$$`` display block."""
    lines, out, i = text.split("\n"), [], 0
    while i < len(lines):
        match = _DIRECTIVE.match(lines[i])
        if match is None:
            out.append(lines[i])
            i += 1
            continue
        indent, body = match["indent"], [match["first"].strip()] if match["first"].strip() else []
        i += 1
        while i < len(lines) and lines[i].strip() and lines[i].startswith(indent + " "):
            body.append(lines[i].strip())
            i += 1
        out.extend([f"{indent}$$", *(indent + line for line in body), f"{indent}$$"])
    return "\n".join(out)


if griffe is not None:

    class MathBlocks(griffe.Extension):
        """Rewrite ``.. math::`` blocks in every loaded object's docstring."""

        def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
            if obj.docstring is not None and ".. math::" in obj.docstring.value:
                obj.docstring.value = math_to_markdown(obj.docstring.value)

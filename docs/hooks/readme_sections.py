"""MkDocs hook: pages take sections of the README, and links leave the site for the repository.

A page line ``{{ readme: ## Recipes }}`` is replaced by the README's section of that heading (up to
the next heading of the same or a higher level); ``{{ readme: top }}`` by everything before the
first ``## Methods``-level section listed in ``_TOP_UNTIL``. One source for the README and the site.

Links are rewritten so that they work on the site: a path to a file of the documentation folder
becomes a path relative to the page; any other repository path (``jdoptim/record.py``,
``../examples/``) becomes a link to the repository on GitHub; a README anchor (``#methods``)
becomes a link to the page that includes that section.
"""

from __future__ import annotations

import posixpath
import re
from pathlib import Path
from typing import Any

_DIRECTIVE = re.compile(r"^\{\{ readme: (.+?) \}\}$", re.MULTILINE)
_LINK = re.compile(r"(\]\()([^)\s]+)(\))")
_TOP_UNTIL = "## Methods"
_ROOT = Path(__file__).resolve().parents[2]
_anchor_pages: dict[str, str] = {}


def _readme() -> str:
    return (_ROOT / "README.md").read_text(encoding="utf-8")


def _section(text: str, heading: str) -> str:
    """The README's section under ``heading``, or its top part for ``"top"``."""
    lines = text.splitlines()
    if heading == "top":
        end = lines.index(_TOP_UNTIL)
        return "\n".join(lines[1:end])  # without the "# jdoptim" title: the page has its own
    start = lines.index(heading)
    level = heading.split(" ")[0]
    end = len(lines)
    fence = False
    for index in range(start + 1, len(lines)):
        fence ^= lines[index].startswith("```")
        marker = lines[index].split(" ")[0]
        if not fence and marker.startswith("#") and set(marker) == {"#"} and marker <= level:
            end = index
            break
    return "\n".join(lines[start:end])


def _slug(heading: str) -> str:
    words = re.sub(r"[^\w\- ]", "", heading.lstrip("#").strip().lower())
    return words.replace(" ", "-")


def on_files(files: Any, config: Any) -> Any:
    """Record which page includes which README heading, for the anchors."""
    text = _readme()
    for file in files.documentation_pages():
        source = Path(file.abs_src_path).read_text(encoding="utf-8")
        for heading in _DIRECTIVE.findall(source):
            section = _section(text, heading)
            for line in section.splitlines():
                if line.startswith("#"):
                    _anchor_pages.setdefault(_slug(line), file.src_uri)
    return files


def _rewrite(markdown: str, base: str, page_uri: str, repo: str) -> str:
    """Rewrite the links of ``markdown``, whose relative paths start from ``base`` (a folder
    relative to the repository root), for the page ``page_uri`` (relative to ``docs/``)."""

    def replace(match: re.Match[str]) -> str:
        target = match.group(2)
        if re.match(r"^[a-z]+:", target):
            return match.group(0)
        path, _, anchor = target.partition("#")
        if not path:
            page = _anchor_pages.get(anchor)
            if base == "docs" or page is None or page == page_uri:
                return match.group(0)
            path_to = posixpath.relpath(page, posixpath.dirname(page_uri) or ".")
            return f"{match.group(1)}{path_to}#{anchor}{match.group(3)}"
        resolved = posixpath.normpath(posixpath.join(base, path))
        suffix = f"#{anchor}" if anchor else ""
        if resolved == "README.md" and anchor in _anchor_pages:
            path_to = posixpath.relpath(_anchor_pages[anchor], posixpath.dirname(page_uri) or ".")
            return f"{match.group(1)}{path_to}{suffix}{match.group(3)}"
        if resolved.startswith("docs/") and not resolved.endswith("/"):
            inside = resolved[len("docs/") :]
            relative = posixpath.relpath(inside, posixpath.dirname(page_uri) or ".")
            return f"{match.group(1)}{relative}{suffix}{match.group(3)}"
        kind = "tree" if path.endswith("/") or (_ROOT / resolved).is_dir() else "blob"
        return f"{match.group(1)}{repo}/{kind}/main/{resolved}{suffix}{match.group(3)}"

    return _LINK.sub(replace, markdown)


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    repo = config["repo_url"].rstrip("/")
    page_uri = page.file.src_uri
    page_dir = posixpath.dirname(posixpath.join("docs", page_uri))
    parts = []
    position = 0
    for match in _DIRECTIVE.finditer(markdown):
        own = markdown[position : match.start()]
        parts.append(_rewrite(own, page_dir, page_uri, repo))
        parts.append(_rewrite(_section(_readme(), match.group(1)), ".", page_uri, repo))
        position = match.end()
    parts.append(_rewrite(markdown[position:], page_dir, page_uri, repo))
    return "".join(parts)

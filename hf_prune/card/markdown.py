"""Markdown that shows text literally, for model cards: escaping and trusted fragments.

``escape_markdown`` makes any string inert (no emphasis, links, HTML, tables, headings or
list items); ``code_span``, ``code_block`` and ``link`` build the only markup a card adds
itself, as ``markupsafe.Markup``. ``finalize`` is the Jinja output hook that escapes every
value that is not ``Markup``.
"""

from __future__ import annotations

import re
from typing import Any

from markupsafe import Markup

_SAFE_URL = re.compile(r"^https://[A-Za-z0-9.-]+(/[A-Za-z0-9._~/%#?=&+-]*)?$")


def one_line(text: Any) -> str:
    """``text`` as one line: control characters dropped, whitespace runs collapsed."""
    text = "".join(" " if ch.isspace() else ch for ch in str(text) if ch.isprintable() or ch.isspace())
    return " ".join(text.split())


_MD_ANYWHERE = re.compile(r"([\\`*_\[\]|~$])")
# block markers that only act at the start of a line: headings, list items, rules, setext underlines
_MD_LINE_START = re.compile(r"^([#+*-](?=\s|$|[#+*-])|=|\d+[.)](?=\s|$))")


def escape_markdown(text: Any) -> Markup:
    """Inline Markdown that shows ``text`` literally: no emphasis, links, HTML, tables or blocks."""
    line = _MD_ANYWHERE.sub(r"\\\1", one_line(text))
    line = _MD_LINE_START.sub(lambda m: m.group(0)[:-1] + "\\" + m.group(0)[-1], line)
    line = line.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return Markup(line)


def paragraphs(text: str | None) -> Markup:
    """Free text (notes) as escaped Markdown paragraphs."""
    if not text:
        return Markup("")
    parts = [escape_markdown(p) for p in re.split(r"\n\s*\n", str(text)) if p.strip()]
    return Markup("\n\n".join(str(p) for p in parts))


def code_span(text: Any) -> Markup:
    """An inline code span holding ``text`` literally (on one line)."""
    line = one_line(text)
    longest = max((len(run) for run in re.findall(r"`+", line)), default=0)
    fence = "`" * (longest + 1)
    pad = " " if line.startswith("`") or line.endswith("`") or not line.strip() else ""
    return Markup(f"{fence}{pad}{line}{pad}{fence}")


def code_block(text: str, language: str = "") -> Markup:
    """A fenced code block longer than any backtick run inside, so ``text`` cannot close it."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return Markup(f"{fence}{language}\n{text.rstrip()}\n{fence}")


def link(label: Any, url: str | None) -> Markup:
    """``[label](url)`` for a plain https URL; the escaped label alone otherwise."""
    if url and _SAFE_URL.match(url):
        return Markup(f"[{escape_markdown(label)}]({url})")
    return escape_markdown(label)


def finalize(value: Any) -> Any:
    """Jinja output hook: trusted fragments pass, numbers print, anything else is escaped."""
    if isinstance(value, Markup):
        return value
    if value is None:
        return ""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value
    return escape_markdown(value)

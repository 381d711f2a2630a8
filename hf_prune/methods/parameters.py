"""Each method's parameters, with their meaning and defaults, read from the config classes themselves.

The meaning comes from the ``Args:`` section of the docstrings along a config class's MRO
(``PruningConfig`` for the shared fields, then e.g. ``StructuredConfig``, then the method's
own class; a subclass's text wins), the default from the dataclass field. ``hf-prune prune
--help-params`` prints them; nothing here is written by hand a second time.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import re
from dataclasses import dataclass

from .registry import config_class, registered_methods

_ARG = re.compile(r"^(?P<indent>\s+)(?P<name>[A-Za-z_]\w*)\s*(\([^)]*\))?:\s*(?P<text>.*)$")
_SECTION = re.compile(r"^\s*(Args|Arguments|Parameters|Attributes):\s*$")


@dataclass(frozen=True)
class ParameterDoc:
    """One field of a pruning config: its name, default (JSON, as ``--param`` reads it) and meaning."""

    name: str
    default: str
    meaning: str
    shared: bool  # a field every method has (``PruningConfig``'s)


def docstring_args(cls: type) -> dict[str, str]:
    """``name -> text`` of the ``Args:`` section of ``cls``'s own docstring (continuation lines joined)."""
    doc = inspect.cleandoc(cls.__dict__.get("__doc__") or "")
    found: dict[str, str] = {}
    in_section, indent, current = False, None, None
    for line in doc.splitlines():
        if _SECTION.match(line):
            in_section, indent, current = True, None, None
            continue
        if not in_section:
            continue
        if not line.strip():
            current = None if indent is None else current
            continue
        width = len(line) - len(line.lstrip())
        if width == 0:  # the section ended
            in_section, current = False, None
            continue
        match = _ARG.match(line)
        if match and (indent is None or width == indent):
            indent = width
            current = match.group("name")
            found[current] = match.group("text").strip()
        elif current is not None and width > (indent or 0):
            found[current] = f"{found[current]} {line.strip()}".strip()
    return found


def _default(field: dataclasses.Field) -> str:
    if field.default is not dataclasses.MISSING:
        value = field.default
    elif field.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        value = field.default_factory()  # type: ignore[misc]
    else:
        return "required"
    try:
        return json.dumps(value)
    except TypeError:
        return repr(value)


def method_parameters(method: str) -> list[ParameterDoc]:
    """Every field of ``method``'s config: the method's own first, then the shared ones, in field order."""
    cls = config_class(method)
    texts: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        texts.update(docstring_args(klass))
    from ..config import PruningConfig

    shared = {f.name for f in dataclasses.fields(PruningConfig)}
    docs = [ParameterDoc(f.name, _default(f), texts.get(f.name, ""), f.name in shared)
            for f in dataclasses.fields(cls)]
    return [d for d in docs if not d.shared] + [d for d in docs if d.shared]


def _summary(cls: type) -> str:
    doc = inspect.cleandoc(cls.__dict__.get("__doc__") or "")
    return doc.split("\n\n", 1)[0].replace("\n", " ").strip()


def _wrap(text: str, indent: str, width: int = 100) -> list[str]:
    import textwrap

    text = text.replace("``", "`")
    return textwrap.wrap(text, width=width, initial_indent=indent, subsequent_indent=indent,
                         break_on_hyphens=False) or [indent.rstrip()]


def describe_method(method: str, shared: bool = True, flags: dict[str, str] | None = None) -> str:
    """A readable list of ``method``'s parameters: name, default and meaning.

    ``flags`` maps shared field names to the command-line flag that sets them (shown beside them).
    """
    cls = config_class(method)
    lines = [f"{method} ({cls.__name__}{', ' + cls.paper if getattr(cls, 'paper', '') else ''})"]
    lines += _wrap(_summary(cls), "  ")
    params = method_parameters(method)
    own = [p for p in params if not p.shared]
    lines.append("  parameters (--param KEY=VALUE, values read as JSON):" if own else
                 "  no parameters of its own")
    for param in own:
        lines.append(f"    {param.name} = {param.default}")
        lines += _wrap(param.meaning or "(not documented)", "        ")
    if shared:
        lines.append("  shared by every method:")
        for param in (p for p in params if p.shared):
            flag = (flags or {}).get(param.name)
            lines.append(f"    {param.name} = {param.default}" + (f"   ({flag})" if flag else ""))
            lines += _wrap(param.meaning or "(not documented)", "        ")
    return "\n".join(lines)


def describe_methods(flags: dict[str, str] | None = None) -> str:
    """Every registered method's own parameters, then the shared ones once."""
    names = sorted(registered_methods())
    blocks = [describe_method(name, shared=False) for name in names]
    shared = [p for p in method_parameters("wanda") if p.shared]
    lines = ["shared by every method:"]
    for param in shared:
        flag = (flags or {}).get(param.name)
        lines.append(f"    {param.name} = {param.default}" + (f"   ({flag})" if flag else ""))
        lines += _wrap(param.meaning or "(not documented)", "        ")
    return "\n\n".join([*blocks, "\n".join(lines)])

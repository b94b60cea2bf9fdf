"""What a config field means, read from the code: its doc, type, default and allowed values.

One source for each field's meaning: ``field(metadata={"doc": ...})`` on the dataclass field, read by
the reference page, ``--help`` and the config error messages alike. The allowed values are the ones the
section's ``validate()`` checks (``check_choice`` / ``check_value``), so the reference page says what
the error message would say. ``cli/reference.py`` renders the page.

Public: ``field_doc``, ``allowed_values``, ``type_name``, ``default_text``, ``section_fields``, ``keys_help``.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import re
import sys
import textwrap
import typing
from typing import Any


def field_doc(cls: type, name: str) -> str:
    """The one-line meaning of field ``name`` of dataclass ``cls`` ('' when it has none)."""
    for f in dataclasses.fields(cls):
        if f.name == name:
            return str(f.metadata.get("doc", ""))
    return ""


def _literal(node: ast.AST, env: dict) -> Any:
    if isinstance(node, ast.Name):
        return env.get(node.id)
    try:
        return ast.literal_eval(node)
    except ValueError:
        return None


def _key(node: ast.AST, loop: dict[str, str]) -> str | None:
    """The dotted key a check names: a string, or an f-string over a loop variable of constants."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        parts = []
        for v in node.values:
            if isinstance(v, ast.Constant):
                parts.append(str(v.value))
            elif isinstance(v, ast.FormattedValue) and isinstance(v.value, ast.Name) and v.value.id in loop:
                parts.append(loop[v.value.id])
            else:
                return None
        return "".join(parts)
    return None


def _checks(body: list[ast.stmt], env: dict, loop: dict[str, str], out: dict[str, str]) -> None:
    for st in body:
        if isinstance(st, ast.For) and isinstance(st.target, ast.Name):
            values = _literal(st.iter, env)
            if isinstance(values, tuple | list) and all(isinstance(v, str) for v in values):
                for v in values:
                    _checks(st.body, env, {**loop, st.target.id: v}, out)
                continue
            _checks(st.body, env, loop, out)
            continue
        for node in ast.walk(st):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)):
                continue
            if node.func.id == "check_choice" and len(node.args) == 3:
                key, choices = _key(node.args[0], loop), _literal(node.args[2], env)
                if key and isinstance(choices, tuple | list):
                    out.setdefault(key, "one of " + ", ".join(map(str, choices)))
            elif node.func.id == "check_value" and len(node.args) == 4:
                key, allowed = _key(node.args[1], loop), _literal(node.args[3], env)
                if key and isinstance(allowed, str):
                    out.setdefault(key, allowed)


@functools.cache
def allowed_values(cls: type) -> dict[str, str]:
    """Field name -> the allowed values its section's ``validate()`` checks, in the error's words."""
    validate = cls.__dict__.get("validate")
    if validate is None:
        return {}
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(validate)))
    except (OSError, TypeError):
        return {}
    found: dict[str, str] = {}
    _checks(tree.body[0].body, vars(sys.modules[cls.__module__]), {}, found)
    out = {}
    names = {f.name for f in dataclasses.fields(cls)}
    for key, allowed in found.items():
        for part in key.split(".")[-1].split("/"):  # 'augment.scale_min/scale_max' names two fields
            tail = part.split("[")[0]
            if tail in names:
                out.setdefault(tail, allowed)
    return out


def type_name(hint: Any) -> str:
    if isinstance(hint, type) and not typing.get_args(hint):
        return hint.__name__
    return re.sub(r"\b(?:\w+\.)+(\w+)", r"\1", str(hint))  # typing.Any -> Any, list[pkg.mod.X] -> list[X]


def default_text(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return "(required)"
    if dataclasses.is_dataclass(value):
        return "(section)"
    if isinstance(value, str):
        return f"'{value}'" if value else "''"
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value)


def section_fields(cls: type) -> list[dict[str, str]]:
    """One row per field of ``cls``: name, type, default, doc, allowed (sub-sections excluded)."""
    hints = typing.get_type_hints(cls)
    allowed = allowed_values(cls)
    rows = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            continue
        rows.append(
            {
                "name": f.name,
                "type": type_name(hints[f.name]),
                "default": default_text(f),
                "doc": field_doc(cls, f.name),
                "allowed": allowed.get(f.name, ""),
            }
        )
    return rows


def keys_help(tables: list[tuple[str, type]], width: int = 100) -> str:
    """The ``--help`` epilog of a command taking dotted overrides: each key of the (section, dataclass)
    ``tables`` with its default and one-line doc ("" is the top level; sub-sections have their own table)."""
    rows = []
    for section, cls in tables:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if not dataclasses.is_dataclass(hints[f.name]):
                key = f"{section}.{f.name}" if section else f.name
                rows.append((f"{key}={default_text(f)}", str(f.metadata.get("doc", ""))))
    col = min(max(len(k) for k, _ in rows), 34) + 2
    out = []
    for key, doc in rows:
        head = f"  {key:<{col}}" if len(key) < col else f"  {key}\n" + " " * (col + 2)
        pad = " " * (col + 2)
        out.append(head + textwrap.fill(doc, width, initial_indent=pad, subsequent_indent=pad).lstrip())
    return "\n".join(out)


__all__ = ["allowed_values", "default_text", "field_doc", "keys_help", "section_fields", "type_name"]

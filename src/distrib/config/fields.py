"""The machinery every config section shares: type coercion, value checks and closest-key hints.

A section is a dataclass deriving from ``Section``: its fields are coerced to their annotations and
``validate()`` runs when it is built, so a bad value fails before anything starts.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import typing
from typing import Any

from distrib.errors import ConfigError


def _initials(word: str) -> str:
    return "".join(w[0] for w in word.replace("-", "_").split("_") if w)


def field_docs(cls: type, prefix: str = "") -> dict[str, str]:
    """Dotted key -> the one-line doc in each field's ``metadata`` (the source the reference page reads)."""
    return {f"{prefix}{f.name}": f.metadata["doc"] for f in dataclasses.fields(cls) if f.metadata.get("doc")}


def closest_key(name: str, options, docs: dict[str, str] | None = None) -> str:
    """'; did you mean X?' for the nearest option, compared on the last dotted part; an abbreviation
    either way round wins (learning_rate -> lr, wd -> weight_decay) before difflib's similarity. With
    ``docs`` (option -> doc) the suggestion says what X means, so a wrong guess is seen at once."""
    options = list(options)
    last = name.rsplit(".", 1)[-1].lower()
    tails = {o: o.rsplit(".", 1)[-1].lower() for o in options}
    match = [
        o for o, t in tails.items() if len(t) > 1 and len(last) > 1 and (t == _initials(last) or last == _initials(t))
    ]
    if not match:
        by_tail = difflib.get_close_matches(last, list(tails.values()), n=1, cutoff=0.0)
        match = [o for o, t in tails.items() if by_tail and t == by_tail[0]]
    if not match:
        return ""
    doc = (docs or {}).get(match[0])
    return f"; did you mean '{match[0]}' ({doc})?" if doc else f"; did you mean '{match[0]}'?"


class FieldError(ConfigError):
    """A bad value for one config key; the section that owns the key appends the key's doc."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key
        self.documented = False


def check_value(cond: bool, key: str, value: Any, allowed: str) -> None:
    if not cond:
        raise FieldError(key, f"invalid value for '{key}': {value!r} (allowed: {allowed})")


def check_choice(key: str, value: Any, choices) -> None:
    check_value(value in choices, key, value, "one of " + ", ".join(map(str, choices)))


class Section:
    """Base for config sections: type-checks fields against their annotations after construction."""

    _prefix = ""

    def _typecheck(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            want = hints[f.name]
            key = f"{self._prefix}.{f.name}" if self._prefix else f.name
            setattr(self, f.name, _coerce(key, value, want))

    def __post_init__(self) -> None:
        try:
            self._typecheck()
            self.validate()
        except FieldError as e:
            raise self._documented(e) from None

    def _documented(self, e: FieldError) -> FieldError:
        """``e`` with the doc of the field(s) its key names ('augment.scale_min/scale_max' names two)."""
        docs = field_docs(type(self))
        tail = re.sub(r"\[[^\]]*\]", "", e.key).rpartition(".")[2]  # tune.grid['optim.lr'] -> grid
        names = [n for n in tail.split("/") if n in docs]
        if e.documented or not names:
            return e
        meaning = "; ".join(f"{self._prefix + '.' if self._prefix else ''}{n}: {docs[n]}" for n in names)
        out = FieldError(e.key, f"{e}; {meaning}")
        out.documented = True
        return out

    def validate(self) -> None:  # overridden per section
        pass


def _coerce(key: str, value: Any, want) -> Any:
    origin = typing.get_origin(want)
    if want is Any:
        return value
    if origin is typing.Union or str(origin) == "types.UnionType":
        args = [a for a in typing.get_args(want) if a is not type(None)]
        if value is None:
            return None
        return _coerce(key, value, args[0])
    if want is float:
        if isinstance(value, str):  # YAML 1.1 reads '3e-4' (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise FieldError(key, f"invalid value for '{key}': {value!r} (expected a number)")
        return float(value)
    if want is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise FieldError(key, f"invalid value for '{key}': {value!r} (expected an integer)")
        return value
    if want is bool:
        if not isinstance(value, bool):
            raise FieldError(key, f"invalid value for '{key}': {value!r} (expected true or false)")
        return value
    if want is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise FieldError(key, f"invalid value for '{key}': {value!r} (expected a string)")
        return str(value)
    if origin is list:
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise FieldError(key, f"invalid value for '{key}': {value!r} (expected a list)")
        (inner,) = typing.get_args(want) or (Any,)
        return [_coerce(f"{key}[{i}]", v, inner) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise FieldError(key, f"invalid value for '{key}': {value!r} (expected a mapping)")
        return dict(value)
    return value

"""Type validation of JSON read from a dump against the record's dataclasses.

A manifest of the right shape but the wrong types (a string where a count belongs, a list where an
object belongs) must be refused with one line naming the field, never become an ``AttributeError``
deep inside a report. The dataclasses' type hints are the schema: :func:`check` walks a JSON value
against a hint and raises :class:`RecordTypeError` at the first mismatch, with the field's path.

Rules: keys a dataclass does not know are accepted (compatible additions from a newer kvtrap); known
keys must have their type; fields without a default are required. A field's JSON key is its name,
or ``metadata["key"]`` (``class`` is a Python keyword). A class may set ``__json_types__`` to check a
field against a more precise type than the one it stores (e.g. ``Violation.details``).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from functools import cache
from typing import Any, Union


class RecordTypeError(ValueError):
    """A JSON value does not have the type the record says. The message starts with the field's path."""


def json_key(f: dataclasses.Field[Any]) -> str:
    return str(f.metadata.get("key", f.name))


@cache
def _hints(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    hints.update(getattr(cls, "__json_types__", {}))
    return hints


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if tp is Any:
        return "anything"
    if tp is type(None):
        return "null"
    if tp is bool:
        return "true or false"
    if tp is int:
        return "an integer"
    if tp is float:
        return "a number"
    if tp is str:
        return "a string"
    if origin in (list, tuple):
        return "a list"
    if origin is dict or dataclasses.is_dataclass(tp):
        return "an object"
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def json_type(value: Any) -> str:
    """How a JSON value reads to a person: 'a string "x"', 'a list', 'null'..."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return f"the integer {value}"
    if isinstance(value, float):
        return f"the number {value}"
    if isinstance(value, str):
        shown = value if len(value) <= 24 else value[:21] + "..."
        return f"the string {shown!r}"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _fail(path: str, tp: Any, value: Any) -> RecordTypeError:
    return RecordTypeError(f"{path}: expected {_describe(tp)}, got {json_type(value)}")


def check(value: Any, tp: Any, path: str) -> None:
    """Raise :class:`RecordTypeError` unless the JSON ``value`` has type ``tp`` (a type hint)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return
            raise _fail(path, tp, value)
        others = [a for a in args if a is not type(None)]
        if len(others) == 1:
            check(value, others[0], path)
            return
        for a in others:
            try:
                check(value, a, path)
                return
            except RecordTypeError:
                continue
        raise _fail(path, tp, value)
    if tp is type(None):
        ok = value is None
    elif tp is bool:
        ok = isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif tp is str:
        ok = isinstance(value, str)
    elif origin in (list, tuple):
        if not isinstance(value, list):
            raise _fail(path, tp, value)
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        for i, item in enumerate(value):
            check(item, args[0] if args else Any, f"{path}[{i}]")
        return
    elif origin is dict:
        if not isinstance(value, dict):
            raise _fail(path, tp, value)
        _, val_tp = typing.get_args(tp) or (str, Any)
        for k, item in value.items():
            check(item, val_tp, f"{path}.{k}")
        return
    elif dataclasses.is_dataclass(tp):
        check_object(value, tp, path)
        return
    else:  # a hint this checker does not know: accept rather than refuse a good dump
        return
    if not ok:
        raise _fail(path, tp, value)


def check_object(value: Any, cls: type, path: str) -> None:
    """Check a JSON object against the dataclass ``cls``: required keys present, known keys typed."""
    if not isinstance(value, dict):
        raise RecordTypeError(f"{path}: expected an object, got {json_type(value)}")
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        key = json_key(f)
        if key not in value:
            required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            if required:
                raise RecordTypeError(f"{path}: required field {key!r} is missing")
            continue
        check(value[key], hints[f.name], f"{path}.{key}")


def to_json(obj: Any, absent: Any = None) -> Any:
    """A dataclass tree as JSON-ready values; fields holding ``absent`` are left out (not written)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out: dict[str, Any] = {}
        for f in dataclasses.fields(obj):
            v = getattr(obj, f.name)
            if absent is not None and v is absent:
                continue
            out[json_key(f)] = to_json(v, absent)
        return out
    if isinstance(obj, dict):
        return {k: to_json(v, absent) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_json(v, absent) for v in obj]
    return obj


def from_json(tp: Any, value: Any, absent: Any = None) -> Any:
    """The typed value for JSON ``value`` (already :func:`check`-ed against ``tp``).

    Dataclasses are built from their fields' hints (not ``__json_types__``: a field stored as a plain
    dict stays one); a field missing from the JSON takes its default, or ``None`` where its default is
    ``absent`` (the writer's "not written" marker: on read, "not in the dump" is ``None``). Unknown keys
    are dropped. Lists become tuples where the hint says tuple.
    """
    if value is None:
        return None
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        others = [a for a in typing.get_args(tp) if a is not type(None)]
        return from_json(others[0], value, absent) if len(others) == 1 else value
    if dataclasses.is_dataclass(tp) and isinstance(value, dict):
        hints = typing.get_type_hints(tp)
        kwargs: dict[str, Any] = {}
        for f in dataclasses.fields(tp):
            key = json_key(f)
            if key in value:
                kwargs[f.name] = from_json(hints[f.name], value[key], absent)
            elif absent is not None and f.default is absent:
                kwargs[f.name] = None
        return tp(**kwargs)
    if origin in (list, tuple) and isinstance(value, list):
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        items = [from_json(args[0], v, absent) if args else v for v in value]
        return tuple(items) if origin is tuple else items
    if origin is dict and isinstance(value, dict):
        _, val_tp = typing.get_args(tp) or (str, Any)
        return {k: from_json(val_tp, v, absent) for k, v in value.items()}
    return value

"""Build a config dataclass from YAML/CLI values, checking every value against the field's type first.

`build(cls, values)` is what every stage's loader calls, so a wrong value fails when the config is read,
before Ray, MLflow or a model starts: `--set port=abc` or `epochs: ten` is a `ConfigError` naming the key,
which the CLI reports as a usage error (exit 2). Values are converted only where that is lossless and
expected: an int where a float is declared, a YAML list for a tuple, a mapping for a nested dataclass, and
a numeric string for a float (YAML 1.1, which PyYAML follows, reads `2e-4` as a string).
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from typing import Any, Literal, Union


class ConfigError(ValueError):
    """A config key that does not exist, or a value of the wrong type or outside its range."""


def build(cls, values: dict, where: str = "", base=None):
    """`cls(**values)` with unknown keys refused and each value checked (and converted) to its field type.

    A mapping given for a section whose default is a dataclass instance (e.g. a `field(default_factory=...)`
    with its own values) changes only the keys it names: the rest keep that instance's values, as they do
    for `base`, the instance this one starts from."""
    if not isinstance(values, dict):
        raise ConfigError(f"{where.rstrip('.') or cls.__name__}: expected a mapping, got {_shown(values)}")
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"unknown keys {[where + k for k in unknown]}; "
                          f"valid keys{' of ' + where.rstrip('.') if where else ''}: {sorted(fields)}")
    checked = {f.name: getattr(base, f.name) for f in fields.values()} if base is not None else {}
    for key, value in values.items():
        default = getattr(base, key) if base is not None else _default(fields[key])
        if dataclasses.is_dataclass(default) and isinstance(value, dict):
            checked[key] = build(type(default), value, f"{where}{key}.", default)
        else:
            checked[key] = check(value, hints[key], f"{where}{key}")
    missing = sorted(f.name for f in dataclasses.fields(cls) if f.init and f.name not in checked
                     and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
    if missing:
        raise ConfigError(f"{where.rstrip('.') or cls.__name__}: missing keys {missing}")
    try:
        return cls(**checked)
    except ConfigError as err:  # a range check in __post_init__: say which section
        raise ConfigError(f"{where}{err}" if where else str(err)) from None


def _default(field: dataclasses.Field):
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None if field.default is dataclasses.MISSING else field.default


@functools.cache
def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def check(value: Any, tp: Any, where: str) -> Any:
    """`value` as type `tp` (see the module docstring for the conversions), else a ConfigError."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for option in (a for a in args if a is not type(None)):
            try:
                return check(value, option, where)
            except ConfigError:
                continue
        raise _wrong(where, tp, value)
    if origin is Literal:
        if value in args:
            return value
        raise ConfigError(f"{where}: expected one of {list(args)}, got {_shown(value)}")
    if dataclasses.is_dataclass(tp):
        return value if isinstance(value, tp) else build(tp, value, f"{where}.")
    if origin in (list, tuple) or tp in (list, tuple):
        return _sequence(value, tp, origin or tp, args, where)
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise _wrong(where, tp, value)
        return value
    return _scalar(value, tp, where)


def _sequence(value, tp, kind, args, where):
    if not isinstance(value, (list, tuple)):
        raise _wrong(where, tp, value)
    if kind is tuple and args and args[-1] is not Ellipsis:
        if len(value) != len(args):
            raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}")
        return tuple(check(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    item = args[0] if args else Any
    items = [check(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    return tuple(items) if kind is tuple else items


def _scalar(value, tp, where):
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    elif isinstance(tp, type) and isinstance(value, tp):
        return value
    raise _wrong(where, tp, value)


def _wrong(where: str, tp, value) -> ConfigError:
    name = getattr(tp, "__name__", None) if typing.get_origin(tp) is None else None
    return ConfigError(f"{where}: expected {name or str(tp).replace('typing.', '')}, got {_shown(value)}")


def _shown(value) -> str:
    return f"{value!r} ({type(value).__name__})"


def require(condition: bool, message: str) -> None:
    """Range checks in a config's `__post_init__`: a ConfigError with `message` unless `condition`."""
    if not condition:
        raise ConfigError(message)

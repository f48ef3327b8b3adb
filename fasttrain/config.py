"""Dataclass configs: nested sections built from dicts, TOML/JSON files and typed `--section.field value` overrides.

Every mistake a user can make (an unknown key, a value of the wrong type, an unreadable file) raises ConfigError,
a ValueError whose one-line message names the key and what was expected.
"""

from __future__ import annotations

import dataclasses
import json
import keyword
import types
import typing
from pathlib import Path
from typing import Any

import tomllib


class ConfigError(ValueError):
    """A config key or value the user gave is wrong."""


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _field(key: str) -> str:
    """The dataclass field a config key names: a key that is a Python keyword (`init.from`) is a field with a
    trailing underscore (PEP 8's `from_`)."""
    return key + "_" if keyword.iskeyword(key) else key


def _key(field: str) -> str:
    """The config key of a dataclass field: _field's inverse."""
    return field[:-1] if field.endswith("_") and keyword.iskeyword(field[:-1]) else field


def _describe(tp) -> str:
    if tp is type(None):
        return "none"
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _options(tp) -> tuple[Any, ...]:
    """The members of a union (`int | None` -> (int, NoneType)); (tp,) for anything else."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return typing.get_args(tp)
    return (tp,)


def check_value(value: Any, tp, key: str) -> Any:
    """value as type tp (ints are accepted for floats), else ConfigError naming key."""
    for option in _options(tp):
        if option is type(None) and value is None:
            return None
        if option is bool and isinstance(value, bool):
            return value
        if option is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if option is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if option is str and isinstance(value, str):
            return value
        if typing.get_origin(option) is list and isinstance(value, (list, tuple)):
            (item,) = typing.get_args(option)
            return [check_value(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    raise ConfigError(f"{key} expects {_describe(tp)}, got {value!r} ({type(value).__name__})")


def parse_text(text: str, tp, key: str) -> Any:
    """A command-line string as type tp: 'none' for None, true/false for bools, commas between list items."""
    # Before the other members: `str | None` would otherwise take 'none' as the string.
    if type(None) in _options(tp) and text.lower() in ("none", "null"):
        return None
    for option in _options(tp):
        if option is bool and text.lower() in ("true", "false", "1", "0", "yes", "no"):
            return text.lower() in ("true", "1", "yes")
        if option is int:
            try:
                return int(text)
            except ValueError:
                pass
        if option is float:
            try:
                return float(text)
            except ValueError:
                pass
        if option is str:
            return text
        if typing.get_origin(option) is list:
            (item,) = typing.get_args(option)
            return [parse_text(t, item, key) for t in text.split(",") if t] if text else []
    raise ConfigError(f"--{key} expects {_describe(tp)}, got {text!r}")


def from_dict(cls, data: dict[str, Any], prefix: str = ""):
    """Build dataclass cls from a nested dict; unknown keys and wrong types raise ConfigError."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a table of keys, got {type(data).__name__}")
    hints = _hints(cls)
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for name, value in data.items():
        key = prefix + name
        name = _field(name)
        if name not in fields:
            known = ", ".join(sorted(_key(f) for f in fields))
            raise ConfigError(f"unknown config key {key!r} (known in this section: {known})")
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = from_dict(tp, value, key + ".")
        else:
            kwargs[name] = check_value(value, tp, key)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"{prefix.rstrip('.')}: {e}" if prefix else str(e)) from None


def to_dict(obj) -> dict[str, Any]:
    """The nested dict of dataclass obj, keyed as configs are (`from`, not the field `from_`)."""
    return _keyed(dataclasses.asdict(obj))


def _keyed(data: dict[str, Any]) -> dict[str, Any]:
    return {_key(k): _keyed(v) if isinstance(v, dict) else v for k, v in data.items()}


def merge(base: dict[str, Any], update: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """base with update's keys laid over it, tables merged key by key (neither input is changed); ConfigError when
    update gives a plain value where base has a table (a TOML `model = 3`), which a later table would replace."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(out.get(key), dict):
            if not isinstance(value, dict):
                raise ConfigError(
                    f"{prefix}{key} must be a table of keys ([{prefix}{key}] in TOML), got {value!r} "
                    f"({type(value).__name__})"
                )
            out[key] = merge(out[key], value, f"{prefix}{key}.")
        else:
            out[key] = value
    return out


def load_file(path: str | Path) -> dict[str, Any]:
    """A config file as a nested dict: TOML (.toml) or JSON (.json, e.g. a run's saved config.json)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        if path.suffix == ".json":
            data = json.loads(path.read_text())
        else:
            data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {str(path)!r} is not valid {path.suffix.lstrip('.') or 'toml'}: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a table of sections")
    return data


def parse_overrides(cls, args: list[str]) -> dict[str, Any]:
    """`['--model.n_layer', '4', '--train.compile', 'true']` -> {'model': {'n_layer': 4}, 'train': {...}}.

    Each key must name a field of a section of cls; a field of type bool may stand alone (`--train.compile`).
    """
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise ConfigError(f"expected an override like --section.field VALUE, got {arg!r}")
        key, has_eq, text = arg[2:].partition("=")
        tp = _field_type(cls, key)
        if not has_eq:
            nxt = args[i + 1] if i + 1 < len(args) else None
            if bool in _options(tp) and (nxt is None or nxt.startswith("--")):
                text = "true"
            elif nxt is None:
                raise ConfigError(f"--{key} needs a value ({_describe(tp)})")
            else:
                text, i = nxt, i + 1
        *sections, name = key.split(".")
        table = out
        for section in sections:
            table = table.setdefault(section, {})
        table[name] = parse_text(text, tp, key)
        i += 1
    return out


def _field_type(cls, key: str):
    tp = cls
    parts = key.split(".")
    for depth, part in enumerate(parts):
        if not dataclasses.is_dataclass(tp):
            raise ConfigError(f"unknown config key {key!r}: {'.'.join(parts[:depth])!r} is not a section")
        hints = _hints(tp)
        part = _field(part)
        if part not in hints:
            known = ", ".join(sorted(_key(h) for h in hints))
            raise ConfigError(
                f"unknown config key {key!r} (known {'sections' if depth == 0 else 'fields'} of "
                f"{'.'.join(parts[:depth]) or 'the config'}: {known})"
            )
        tp = hints[part]
    if dataclasses.is_dataclass(tp):
        example = _key(dataclasses.fields(tp)[0].name)
        raise ConfigError(f"--{key} is a section; give one of its fields, e.g. --{key}.{example}")
    return tp

"""Typed dataclasses from YAML mappings and `key.sub=value` overrides, for the schema in infra/config.py.

`build` makes a dataclass from a mapping: an unknown key or a value of the wrong type raises
`ConfigError` naming the dotted key; a partial section keeps the other fields' defaults.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any

import yaml

from infra.errors import UserError


class ConfigError(UserError, ValueError):
    """A configuration that cannot run; the message names the key and the fix."""


def plain(v):
    """Nested dicts and lists only (tuples become lists): what YAML and JSON hold."""
    if isinstance(v, dict):
        return {k: plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [plain(x) for x in v]
    return v


def convert(value: Any, tp: Any, key: str) -> Any:
    """`value` as type `tp` (an annotation of the schema), or a ConfigError naming `key`."""
    origin = typing.get_origin(tp)
    if tp is Any:  # typed later against the field it names (sweep values, in validate)
        return value
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        key_type, value_type = typing.get_args(tp)
        return {convert(k, key_type, key): convert(v, value_type, f"{key}.{k}") for k, v in value.items()}
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return convert(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return build(tp, value, key)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        if origin is tuple:
            if len(value) != len(args):
                raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)}")
            return tuple(convert(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        return [convert(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {tp}")


def build(cls, data: dict, prefix: str = ""):
    """An instance of dataclass `cls` from a mapping; `prefix` is the dotted key of `data` in error messages."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(f"unknown key {where}{unknown[0]!s}; valid keys here: {', '.join(sorted(names))}")
    defaults = cls()
    kwargs = {}
    for k, v in data.items():
        current = getattr(defaults, k)
        if dataclasses.is_dataclass(current) and isinstance(v, dict):
            # a partial section overrides the field's own default (e.g. teacher_cnn keeps name=wrn_demo)
            v = merge(plain(dataclasses.asdict(current)), v)
        kwargs[k] = convert(v, hints[k], f"{prefix}.{k}" if prefix else k)
    return cls(**kwargs)


def merge(base: dict, extra: dict) -> dict:
    """`base` with `extra` laid over it, nested mappings merged key by key."""
    out = dict(base)
    for k, v in extra.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_override(text: str) -> dict:
    """`train.epochs=3` -> {"train": {"epochs": 3}}; the value is read as YAML (numbers, lists, null)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key.sub=value")
    key, raw = text.split("=", 1)
    if not key or any(not p for p in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({e})") from None
    out: dict = {}
    node = out
    parts = key.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value
    return out


def dotted(tree: dict, prefix: str = "") -> dict:
    """{"train": {"lr": [..]}} -> {"train.lr": [..]}: nested mappings joined into dotted keys."""
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        out.update(dotted(v, key + ".") if isinstance(v, dict) else {key: v})
    return out

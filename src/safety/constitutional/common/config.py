"""Config files (YAML, parsed with safe_load) onto dataclasses, and dotted command-line overrides.

`from_dict(PipelineConfig, {...})` builds nested dataclasses and names the bad field on error
(`rl.batch_size: expected int, got 'eight'`); `apply_overrides(d, ["rl.steps=10"])` edits a dict.
"""
from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any, Dict, List, Sequence, Type, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    pass


def load_yaml(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of option: value")
    return data


def deep_merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def apply_overrides(data: dict, overrides: Sequence[str]) -> dict:
    """`section.field=value` strings; values are parsed as YAML scalars (10, 1e-5, true, null, [a, b])."""
    data = dict(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.field=value")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw.strip() else None
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node[part] = dict(node.get(part) or {})
            node = node[part]
        node[parts[-1]] = value
    return data


def _coerce(value: Any, hint, where: str):
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any or hint is None:
        return value
    if origin is typing.Union:
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"{where}: bad value {value!r}")
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return from_dict(hint, value, where)
    if origin in (list, List, tuple, Sequence):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        inner = args[0] if args else Any
        return [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin in (dict, Dict):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads 5e-6 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return int(value)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if hint is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{where}: expected text, got {value!r}")
        return str(value)
    return value


def from_dict(cls: Type[T], data: dict, where: str = "") -> T:
    """Build dataclass `cls` from `data`, recursively; unknown keys and bad types name the field."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(f"unknown option {prefix}{unknown[0]} (known: {', '.join(sorted(fields))})")
    kwargs = {}
    for name, value in data.items():
        path = f"{where}.{name}" if where else name
        kwargs[name] = _coerce(value, hints.get(name, Any), path)
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"{where or cls.__name__}: {err}") from err


def to_dict(obj) -> dict:
    return dataclasses.asdict(obj)


def flatten_fields(cls, prefix: str = "") -> List[tuple]:
    """[(dotted_name, type_hint, default)] for every leaf field, for --help listings."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        hint = hints.get(f.name)
        name = f"{prefix}{f.name}"
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        if dataclasses.is_dataclass(hint):
            rows.extend(flatten_fields(hint, name + "."))
        else:
            rows.append((name, hint, default, f.metadata.get("help", "")))
    return rows


def field_comments(cls) -> Dict[str, str]:
    """Trailing `# comments` on a dataclass's field lines: the documentation shown by --help."""
    import inspect
    import re

    comments = {}
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return comments
    for line in source.splitlines():
        match = re.match(r"\s+(\w+)\s*:[^#]*#\s*(.+)$", line)
        if match:
            comments[match.group(1)] = match.group(2).strip()
    return comments


def describe_options(cls, prefix: str = "") -> List[str]:
    """One line per leaf option: `section.name (type, default X): comment`."""
    lines = []
    hints = typing.get_type_hints(cls)
    comments = field_comments(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        hint = hints.get(f.name)
        name = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(hint):
            doc = (hint.__doc__ or "").strip().splitlines()
            lines.append(f"[{name}] {doc[0] if doc else ''}")
            lines.extend(describe_options(hint, name + "."))
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = "required"
        type_name = getattr(hint, "__name__", str(hint).replace("typing.", ""))
        text = f"  {name} ({type_name}, default {default!r})"
        if comments.get(f.name):
            text += f": {comments[f.name]}"
        lines.append(text)
    return lines

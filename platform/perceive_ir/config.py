"""Typed configuration: dataclasses filled from YAML plus ``a.b=value`` overrides.

Every job declares its configuration as nested dataclasses. ``load_config`` reads a
YAML file, applies command-line overrides and validates the result against the
dataclass types *before* any work starts. Errors name the key, where it came from
(the file or the command line) and what was expected.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence, TypeVar, Union

import yaml

T = TypeVar("T")

__all__ = [
    "ConfigError",
    "load_config",
    "from_dict",
    "to_dict",
    "flatten",
    "parse_overrides",
]


class ConfigError(ValueError):
    """A configuration value is unknown, missing or of the wrong type."""


@dataclasses.dataclass
class _Origin:
    """Where each dotted key came from, for error messages."""

    file: str
    overridden: set[str] = dataclasses.field(default_factory=set)

    def of(self, key: str) -> str:
        if key in self.overridden:
            return f"command-line override '{key}'"
        return self.file


def parse_overrides(overrides: Sequence[str]) -> dict[str, Any]:
    """Parse ``["a.b=1", "c=[1, 2]"]`` into ``{"a.b": 1, "c": [1, 2]}`` (values are YAML)."""
    parsed: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"command-line override '{item}' is not of the form key.path=value")
        try:
            parsed[key.strip()] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as err:
            raise ConfigError(f"command-line override '{item}': value is not valid YAML ({err})") from None
    return parsed


def _apply_override(tree: dict[str, Any], dotted: str, value: Any) -> None:
    node = tree
    parts = dotted.split(".")
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            prefix = ".".join(parts[: i + 1])
            raise ConfigError(f"command-line override '{dotted}': '{prefix}' is a value, not a section")
        node = child
    node[parts[-1]] = value


def load_config(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """Build ``cls`` from a YAML file (optional) and ``key.path=value`` overrides.

    A file may start from another: ``extends: <file>`` (relative to the extending file's folder); each
    top-level section the file gives replaces the base's whole section (a named variant of a profile
    states what differs, section by section, and nothing of the base's section leaks into it)."""
    raw: dict[str, Any] = {}
    origin = _Origin(file=str(path) if path else "defaults")
    if path is not None:
        raw = _read_profile(Path(path), [])
    for dotted, value in parse_overrides(overrides).items():
        _apply_override(raw, dotted, value)
        origin.overridden.add(dotted)
    return _build(cls, raw, "", origin)


def _read_profile(path: Path, chain: list[Path]) -> dict[str, Any]:
    """The file's mapping, on top of the profile it ``extends`` (if any)."""
    if not path.is_file():
        via = f" (extended by '{chain[-1]}')" if chain else ""
        raise ConfigError(f"config file '{path}' does not exist{via}")
    if path.resolve() in [p.resolve() for p in chain]:
        raise ConfigError("config files extend each other in a cycle: " + " -> ".join(map(str, [*chain, path])))
    try:
        loaded = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"config file '{path}' is not valid YAML: {err}") from None
    if loaded is None:
        loaded = {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping at the top level, got {type(loaded).__name__}")
    base = loaded.pop("extends", None)
    if base is None:
        return loaded
    if not isinstance(base, str) or not base:
        raise ConfigError(f"config file '{path}': 'extends' must name a YAML file, got {base!r}")
    return {**_read_profile(path.parent / base, [*chain, path]), **loaded}


def from_dict(cls: type[T], data: Mapping[str, Any], source: str = "<dict>") -> T:
    """Validate a plain mapping into ``cls`` (used for nested files and tests)."""
    return _build(cls, dict(data), "", _Origin(file=source))


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is not None:
        args = ", ".join(_type_name(a) for a in typing.get_args(tp))
        return f"{origin.__name__}[{args}]"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _build(cls: type[T], data: Any, prefix: str, origin: _Origin) -> T:
    where = prefix.rstrip(".") or "<top level>"
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"{origin.of(prefix.rstrip('.'))}: '{where}' expects a mapping for {cls.__name__}, "
            f"got {type(data).__name__} {data!r}"
        )
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        key = prefix + str(unknown[0])
        raise ConfigError(
            f"{origin.of(key)}: unknown key '{key}' in {cls.__name__}; "
            f"expected one of: {', '.join(sorted(fields))}"
        )
    kwargs = {}
    for name, field in fields.items():
        key = prefix + name
        if name in data:
            kwargs[name] = _coerce(hints[name], data[name], key, origin)
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(
                f"{origin.file}: missing required key '{key}' ({_type_name(hints[name])})"
            )
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as err:
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(f"{origin.file}: invalid section '{where}': {err}") from None


def _coerce(tp: Any, value: Any, key: str, origin: _Origin) -> Any:
    def fail(detail: str = "") -> ConfigError:
        return ConfigError(
            f"{origin.of(key)}: key '{key}' expects {_type_name(tp)}, got "
            f"{type(value).__name__} {value!r}{detail}"
        )

    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key + ".", origin)
    kind = typing.get_origin(tp)
    args = typing.get_args(tp)
    if kind is Literal:
        if value in args:
            return value
        raise fail()
    if kind in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, key, origin)
            except ConfigError as err:
                errors.append(err)
        if len(errors) == 1:
            raise errors[0]
        raise fail()
    if kind in (list, Sequence, typing.Sequence) or tp is list:
        if not isinstance(value, (list, tuple)):
            raise fail()
        (item_tp,) = args or (Any,)
        return [_coerce(item_tp, v, f"{key}[{i}]", origin) for i, v in enumerate(value)]
    if kind is tuple:
        if not isinstance(value, (list, tuple)):
            raise fail()
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v, f"{key}[{i}]", origin) for i, v in enumerate(value))
        if len(value) != len(args):
            raise fail(f" (needs exactly {len(args)} items)")
        return tuple(_coerce(a, v, f"{key}[{i}]", origin) for i, (a, v) in enumerate(zip(args, value)))
    if kind in (dict, Mapping) or tp is dict:
        if not isinstance(value, Mapping):
            raise fail()
        key_tp, val_tp = args or (str, Any)
        return {
            _coerce(key_tp, k, f"{key}.{k}", origin): _coerce(val_tp, v, f"{key}.{k}", origin)
            for k, v in value.items()
        }
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise fail()
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise fail()
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise fail()
    if tp is str:
        if isinstance(value, str):
            return value
        raise fail()
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise fail()


def to_dict(obj: Any) -> Any:
    """A dataclass tree as plain Python (for YAML dumps and MLflow)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists are kept as values."""
    tree = to_dict(obj)
    flat: dict[str, Any] = {}
    if isinstance(tree, dict):
        for k, v in tree.items():
            name = f"{prefix}{k}"
            if isinstance(v, dict) and v:
                flat.update(flatten(v, name + "."))
            else:
                flat[name] = v
    return flat

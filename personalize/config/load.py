"""Reading a config: YAML, dotted overrides, defaults underneath, type checks.

`build` checks every key and type and names the dotted key at fault, because a typo that
silently falls back to a default costs a user a whole training run. Old keys (`db.*`,
`ti.*`, `hn.*`) are moved to their new sections first (`deprecated.py`).
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from personalize.config.checks import validate
from personalize.config.deprecated import log_renames, translate
from personalize.config.sections import PersonalizeConfig
from personalize.errors import ConfigError

# --------------------------------------------------------------------------- parsing

_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`, converting only lossless cases (int -> float)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of options, got {value!r}")
        return build(tp, value, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        # PyYAML reads `1e-4` (no dot) as a string (YAML 1.1); accept what is clearly a number.
        if isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is Any:
        return value
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")


def build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(
            f"unknown config key(s): {', '.join(where + k for k in unknown)}. "
            f"Valid keys{' under ' + prefix if prefix else ''}: {', '.join(sorted(names))}"
        )
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        if key in _PRECISION_KEYS and value is not None:
            value = _precision(value, key)
        kwargs[name] = _coerce(value, hints[name], key)
    return cls(**kwargs)


# Keys that hold a precision name, and how each spells full precision.
_PRECISION_KEYS = {
    "train.mixed_precision": "no",
    "prior.generation_precision": "no",
    "dreambooth.save_precision": "fp32",
}


def _precision(value: Any, key: str) -> str:
    """no / fp32 / false / off (YAML reads an unquoted `no` as false) all mean full precision."""
    from personalize.precision import canonical_precision

    try:
        name = canonical_precision(value)
    except ValueError as e:
        raise ConfigError(f"{key}: {e}") from None
    return _PRECISION_KEYS[key] if name == "no" else name


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted!r}: {p!r} is not a section")
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """`["train.lr=1e-4", "data.path=imgs"]` -> nested dict; values are parsed as YAML."""
    tree: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.subkey=value")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw.strip() else ""
        _set_dotted(tree, key.strip(), value)
    return tree


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def from_dict(data: dict[str, Any]) -> PersonalizeConfig:
    """A checked config from a nested mapping (old keys accepted, and logged once)."""
    data, renames = translate(data)
    log_renames(renames)
    cfg = build(PersonalizeConfig, data)
    validate(cfg)
    return cfg


def read_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """A YAML config file's top-level mapping, with errors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from e
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"{path} is not UTF-8 text (byte {e.start} cannot be decoded); re-save it as UTF-8"
        ) from e
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path} must hold a mapping of options at the top level")
    return loaded


def merge_layers(*layers: dict[str, Any]) -> dict[str, Any]:
    """Config mappings merged in order, later ones on top. Each layer's old keys are moved
    to their new names first, so a layer spelled either way replaces an earlier one's
    value; the renames are logged once."""
    data: dict[str, Any] = {}
    renames: list[tuple[str, str]] = []
    for layer in layers:
        layer, used = translate(layer)
        renames += used
        data = merge(data, layer)
    log_renames(renames)
    return data


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    base: dict[str, Any] | None = None,
) -> PersonalizeConfig:
    """Load YAML (optional), apply `base` defaults underneath and dotted overrides on top."""
    layers = [base or {}]
    if path is not None:
        layers.append(read_yaml_mapping(path))
    layers.append(parse_overrides(overrides or []))
    return from_dict(merge_layers(*layers))


# The names other modules imported before they were public.

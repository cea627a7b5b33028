"""Building a `Config`: defaults <- YAML file (and the file its `base:` names) <- dotted overrides, type-checked.

Each value is checked against its dataclass annotation (int -> float is the only silent widening),
unknown keys are refused with the nearest valid one, and the result is validated (lib.config.checks).
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from lib.config.checks import validate
from lib.config.schema import Config, ConfigError
from lib.core.paths import ROOT


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; int -> float is the only silent widening."""
    origin = typing.get_origin(tp)
    bad = ConfigError(
        f"Config key '{key}' must be {_type_name(tp)}, got {value!r} ({type(value).__name__}); "
        f"fix it in the YAML file or the command line."
    )
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):  # an item of a list of sections (model.view_backbones)
        return _build(tp, value, f"{key}.")
    if origin is Literal:
        if value not in typing.get_args(tp):
            choices = [str(a) for a in typing.get_args(tp)]
            near = difflib.get_close_matches(str(value), choices, n=1)
            hint = f" (did you mean '{near[0]}'?)" if near else ""
            raise ConfigError(
                f"Config key '{key}' has unknown value {value!r}{hint}; choose one of {', '.join(choices)}."
            )
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise bad
        (item_tp,) = typing.get_args(tp)
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            if arg is type(None) and value is None:
                return None
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
        raise bad
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise bad
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # exp: 2025 is a name, not a number
        raise bad
    raise bad


def _build(cls: type, raw: dict, prefix: str) -> Any:
    """Instantiate dataclass `cls` from a nested dict, rejecting unknown keys with a suggestion."""
    if not isinstance(raw, dict):
        raise ConfigError(f"Config key '{prefix.rstrip('.')}' must be a mapping of settings, got {raw!r}.")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        full = f"{prefix}{key}"
        if key not in fields:
            valid = [f"{prefix}{k}" for k in fields]
            near = difflib.get_close_matches(full, valid, n=1, cutoff=0.5)
            hint = f"did you mean '{near[0]}'?" if near else f"valid keys: {', '.join(valid)}."
            raise ConfigError(f"Unknown config key '{full}'; {hint}")
        tp = hints[key]
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value or {}, f"{full}.")
        else:
            kwargs[key] = _coerce(value, tp, full)
    return cls(**kwargs)


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def parse_override(text: str) -> dict:
    """`train.epochs=4` -> {'train': {'epochs': 4}}; the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"Override '{text}' is not of the form key=value (for example train.epochs=4).")
    key, _, raw = text.partition("=")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    out: dict = {}
    node = out
    parts = key.strip().split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value
    return out


def _read_yaml(path: str | Path, chain: tuple[Path, ...] = ()) -> dict:
    """A config file's settings, on top of those of the file its `base:` names (relative to the project root or to the
    file), recursively: a member recipe states only what differs from the recipe it starts from."""
    p = Path(path)
    if not p.is_file() and not p.is_absolute() and (ROOT / p).is_file():
        p = ROOT / p
    if not p.is_file():
        raise ConfigError(f"Config file '{p}' does not exist; pass an existing YAML file with --config.")
    if p.resolve() in chain:
        raise ConfigError(f"Config file '{p}' names itself as a base (through base:); break the cycle.")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"Config file '{p}' is not valid YAML ({e.__class__.__name__}); fix its syntax.") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"Config file '{p}' must be a mapping of settings; fix its contents.")
    base = raw.pop("base", None)
    if base is None:
        return raw
    near = p.parent / str(base)
    return _merge(_read_yaml(near if near.is_file() else str(base), (*chain, p.resolve())), raw)


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults <- YAML file (on top of its `base:` file, if any) <- overrides, then validated.

    A relative `path` (a command-line argument) is looked up in the current directory, then in the
    project, so `--config configs/demo.yaml` works from any working directory.
    """
    raw: dict = _read_yaml(path) if path is not None else {}
    for o in overrides:
        raw = _merge(raw, parse_override(o))
    cfg = _build(Config, raw, "")
    validate(cfg)
    _fill_context_crops(cfg)
    return cfg


def _fill_context_crops(cfg: Config) -> None:
    """Unset `prepare.context_scales` / `context_full` become the crops `model.context` reads (after validation)."""
    p, views = cfg.prepare, cfg.model.context
    if p.context_scales is None:
        p.context_scales = [float(v) for v in views if v not in ("1", "full")]
    if p.context_full is None:
        p.context_full = "full" in views

"""A config as plain data: the nested dict, the flat `section.key` values records compare, the YAML saved beside outputs."""
from __future__ import annotations

import dataclasses
from typing import Any

import yaml

from lib.config.schema import Config


def to_dict(obj: Any) -> Any:
    """Plain nested dict of a config (for YAML dumps and fingerprints)."""
    return dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) and not isinstance(obj, type) else obj


def flatten(value: Any, prefix: str) -> dict[str, Any]:
    """{'train': {'epochs': 3}} -> {'train.epochs': 3}, so changes can be named key by key."""
    value = to_dict(value)
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else k))
        return out
    return {prefix: value}


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)

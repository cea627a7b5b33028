"""Typed configuration: the schema (dataclass defaults), the loader (YAML, `base:`, dotted CLI overrides, type coercion),
the cross-field checks, and the config as plain data (flat values for records, YAML beside outputs).

Callers import from here; one module per job behind it: schema, load, checks, output. The whole
package is infrastructure for rerun decisions (lib.core.fingerprint): its defaults already sit in
the config values each record holds, so changing this code reruns nothing by itself.
"""
from lib.config.checks import NORMALIZABLE_HEADS, validate
from lib.config.load import load_config, parse_override
from lib.config.output import dump_yaml, flatten, to_dict
from lib.config.schema import (
    EXTRA_JSON,
    PSEUDO_METHODS,
    AugmentCfg,
    Config,
    ConfigError,
    DataCfg,
    DemoCfg,
    EnsembleCfg,
    HeadCfg,
    HeadName,
    KnnCfg,
    LossCfg,
    LossName,
    ModelCfg,
    PrepareCfg,
    PseudoCfg,
    RetrainCfg,
    SubmitCfg,
    TrackCfg,
    TrainCfg,
    TtaCfg,
    ViewBackboneCfg,
    project_path,
)

__all__ = [
    "EXTRA_JSON", "NORMALIZABLE_HEADS", "PSEUDO_METHODS", "AugmentCfg", "Config", "ConfigError", "DataCfg", "DemoCfg", "EnsembleCfg", "HeadCfg",
    "HeadName", "KnnCfg", "LossCfg", "LossName", "ModelCfg", "PrepareCfg", "PseudoCfg", "RetrainCfg", "SubmitCfg", "TrackCfg", "ViewBackboneCfg",
    "TrainCfg", "TtaCfg", "dump_yaml", "flatten", "load_config", "parse_override", "project_path", "to_dict", "validate",
]

"""Configuration: the schema (one dataclass per concern) and its resolution.

Public face: ``load_config(path, overrides)``, ``build_config(tree)``, ``save_config(cfg, dir)``,
``config_to_dict``, ``config_to_overrides``, ``read_yaml_mapping``, the resume guard ``check_resume``
(``changes.py``: the one allow-list of fields a --resume may change) and the section types
(``ExperimentConfig``, ``DataConfig``, ``ModelConfig``, ``OptimConfig``, ``TrainConfig``, ...).
Values resolve as defaults, then the experiment YAML, then dotted overrides (``optim.lr=3e-4``).
"""

from distrib.config.changes import RESUME_SAFE, SWEEP_RESUME_SAFE, allowed_change, check_resume, config_changes
from distrib.config.downstream import EmbedConfig, ExportConfig, StackConfig, ThresholdConfig
from distrib.config.resolve import (
    build_config,
    config_to_dict,
    config_to_overrides,
    load_config,
    parse_override,
    read_yaml_mapping,
    save_config,
    set_dotted,
)
from distrib.config.schema import (
    SECTIONS,
    AugmentConfig,
    DataConfig,
    DistConfig,
    ExperimentConfig,
    ModelConfig,
    OptimConfig,
    TrainConfig,
    TuneConfig,
)
from distrib.errors import ConfigError

__all__ = [
    "load_config",
    "build_config",
    "save_config",
    "config_to_dict",
    "config_to_overrides",
    "parse_override",
    "read_yaml_mapping",
    "set_dotted",
    "SECTIONS",
    "ExperimentConfig",
    "DataConfig",
    "AugmentConfig",
    "ModelConfig",
    "OptimConfig",
    "TrainConfig",
    "DistConfig",
    "TuneConfig",
    "EmbedConfig",
    "StackConfig",
    "ThresholdConfig",
    "ExportConfig",
    "ConfigError",
    "RESUME_SAFE",
    "SWEEP_RESUME_SAFE",
    "check_resume",
    "config_changes",
    "allowed_change",
]

"""Typed configuration: sections by concept, YAML loading, dotted overrides, validation.

One `PersonalizeConfig` describes a run. `sections.py` holds the general sections,
`method_sections.py` the ones a method or a training concept reads (each with its own
`check`), `load.py` YAML + overrides + type checks, `checks.py` the cross-section rules and
the method list, `deprecated.py` the old `db`/`ti`/`hn` keys (docs/architecture.md, Config).
"""

from personalize.config.checks import method_names, validate
from personalize.config.deprecated import new_key
from personalize.config.load import (
    build,
    from_dict,
    load_config,
    merge,
    merge_layers,
    parse_overrides,
    read_yaml_mapping,
)
from personalize.config.method_sections import (
    DreamBoothConfig,
    HypernetworkConfig,
    LoRAConfig,
    PivotalConfig,
    PriorConfig,
    RegularizationConfig,
    TextualInversionConfig,
)
from personalize.config.sections import (
    DataConfig,
    ModelConfig,
    PersonalizeConfig,
    TrainConfig,
    ValidationConfig,
)
from personalize.errors import ConfigError, need

# Derived from personalize/methods/ (see `method_names`), kept for existing imports.
METHODS = method_names()

__all__ = [
    "METHODS",
    "ConfigError",
    "DataConfig",
    "DreamBoothConfig",
    "HypernetworkConfig",
    "LoRAConfig",
    "ModelConfig",
    "PivotalConfig",
    "PersonalizeConfig",
    "PriorConfig",
    "RegularizationConfig",
    "TextualInversionConfig",
    "TrainConfig",
    "ValidationConfig",
    "build",
    "from_dict",
    "load_config",
    "merge",
    "merge_layers",
    "method_names",
    "need",
    "new_key",
    "parse_overrides",
    "read_yaml_mapping",
    "validate",
]

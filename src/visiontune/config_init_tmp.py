"""Recipe loading and typed configs (no torch import here: `visiontune validate` must stay fast)."""

from visiontune.config.loader import CONFIGS, apply_override, dump_config, load_recipe, parse_config
from visiontune.config.schema import ClassifyConfig

__all__ = ["CONFIGS", "ClassifyConfig", "apply_override", "dump_config", "load_recipe", "parse_config"]

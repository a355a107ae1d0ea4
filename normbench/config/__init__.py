"""Run configuration: the schema (schema.py: pydantic models, the config hash, the run folder)
and reading it (loading.py: YAML files, merging, ``--set`` overrides, one-line errors).

A config is a value: it is resolved (base files merged, overrides applied, defaults filled),
validated, and written to the run dir before the first step.
"""
from normbench.config.loading import (apply_overrides, deep_merge, dump_config, format_validation_error, load_config,
                                      load_config_dict, load_yaml_text, parse_overrides, read_yaml, validate_config)
from normbench.config.schema import (ARCHS, CLIP_MODES, DEFAULT_DATA_ROOT, HASHED_UNLESS_DEFAULT, AnalysisConfig,
                                     ClipConfig, DataConfig, LogConfig, ModelConfig, NormConfig, OptimConfig, RunConfig,
                                     TrainConfig)

__all__ = ["apply_overrides", "deep_merge", "dump_config", "format_validation_error", "load_config", "load_config_dict",
           "load_yaml_text", "parse_overrides", "read_yaml", "validate_config", "ARCHS", "CLIP_MODES",
           "DEFAULT_DATA_ROOT", "HASHED_UNLESS_DEFAULT", "AnalysisConfig", "ClipConfig", "DataConfig", "LogConfig",
           "ModelConfig", "NormConfig", "OptimConfig", "RunConfig", "TrainConfig"]

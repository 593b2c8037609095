"""Python config files -> typed, validated config objects (``load_config``, ``config_from_dict``), in four
modules, each importing only the ones before it:

- ``sections.py``: the dataclasses, with InternEvo's section and field names (a leaf);
- ``layout.py``: the parallel layout's rules (the tensor-mode table, pipeline modes, zero and weight groups, what a
  model and a world size must satisfy to be split);
- ``checks.py``: validation beyond types, one ``ConfigError`` line per problem;
- ``load.py``: executing a config file, ``KEY=VALUE`` overrides, building the dataclasses.

Every public name is re-exported here: ``from evo.config import X`` is the way in."""

from evo.config.checks import (ROPE_TYPES, check_choice, parse_skip_batches, require, strip_folder_prefix, validate,
                               warn_unknown)
from evo.config.layout import (KV_EXCHANGES, PIPELINE_MODE, PIPELINE_MODES, TENSOR_MODE, TENSOR_MODES, PipelineMode,
                               TensorMode, check_pipeline, check_tensor_parallel, data_and_zero_sizes, layout_error,
                               sequence_2d_error, zero_size)
from evo.config.load import (apply_overrides, config_from_dict, known_keys, load_config, model_config, parse_value,
                             read_config_file, resolve_config)
from evo.config.sections import (CKPT_CONTENTS, DTYPES, MODEL_TYPES, MOE_MODEL_TYPES, MOE_TYPES, REQUIRED, SECTIONS, AdamConfig, CkptConfig,
                                 Config, DataConfig, Fp16ScalerConfig, GradScalerConfig, HybridZeroConfig,
                                 LossConfig, LrSchedulerConfig, ModelConfig, MonitorConfig, ParallelConfig,
                                 ParallelDim, ExpertDim, Placement, Sequence2DConfig)
from evo.errors import ConfigError

__all__ = ["ROPE_TYPES", "check_choice", "parse_skip_batches", "require", "strip_folder_prefix", "validate",
           "warn_unknown", "PIPELINE_MODE", "PIPELINE_MODES", "TENSOR_MODE", "TENSOR_MODES", "TensorMode",
           "PipelineMode", "KV_EXCHANGES", "check_pipeline", "check_tensor_parallel", "sequence_2d_error", "data_and_zero_sizes", "layout_error",
           "zero_size", "apply_overrides", "config_from_dict", "known_keys", "load_config", "model_config", "resolve_config",
           "parse_value", "read_config_file", "CKPT_CONTENTS", "DTYPES", "MODEL_TYPES", "MOE_MODEL_TYPES", "MOE_TYPES",
           "REQUIRED", "SECTIONS",
           "AdamConfig", "CkptConfig", "Config", "DataConfig", "Fp16ScalerConfig", "GradScalerConfig",
           "HybridZeroConfig", "LossConfig", "LrSchedulerConfig", "ModelConfig", "MonitorConfig", "ParallelConfig",
           "ParallelDim", "ExpertDim", "Placement", "Sequence2DConfig", "ConfigError"]

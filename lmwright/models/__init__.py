"""Models: build from a named preset (no download) or load a local Hugging Face / lmwright folder."""

from lmwright.models.load import count_parameters, load_model, load_tokenizer, resolve_model_path
from lmwright.models.presets import PRESETS, ModelConfig, build_model, describe_presets, preset_names

__all__ = [
    "PRESETS",
    "ModelConfig",
    "build_model",
    "count_parameters",
    "describe_presets",
    "load_model",
    "load_tokenizer",
    "preset_names",
    "resolve_model_path",
]

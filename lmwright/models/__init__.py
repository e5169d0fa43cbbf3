"""Models: build from a named preset (no download) or load a local Hugging Face / lmwright folder."""

from lmwright.models.presets import PRESETS, ModelConfig, build_model, describe_presets, preset_names
from lmwright.models.load import count_parameters, load_model, load_tokenizer, resolve_model_path

__all__ = [
    "PRESETS", "ModelConfig", "build_model", "describe_presets", "preset_names",
    "load_model", "load_tokenizer", "resolve_model_path", "count_parameters",
]

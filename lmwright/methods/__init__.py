"""How weights are adapted: full, freeze, lora, dora, prefix, ptuning, prompt, adapter, ia3, qat.

Each method is a plugin in this package registered in ``METHODS`` by name. ``apply_method`` turns a
freshly built/loaded model into the trainable model; ``save_trained`` writes only what the method
trains; ``load_trained`` loads any folder lmwright writes (plain model or adapter) for inference.
"""

from lmwright.methods.base import (
    METHODS,
    MethodConfig,
    apply_method,
    load_trained,
    save_trained,
    trainable_report,
)

__all__ = ["METHODS", "MethodConfig", "apply_method", "load_trained", "save_trained", "trainable_report"]

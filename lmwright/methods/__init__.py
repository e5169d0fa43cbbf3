"""How weights are adapted: full, freeze, lora, dora, prefix, ptuning, prompt, adapter, ia3, qat.

Each method is a plugin in this package registered in ``METHODS`` by name. ``apply_method`` turns a
freshly built/loaded model into the trainable model; ``save_trained`` writes only what the method
trains (+ tokenizer + lmwright.json); ``load_trained`` loads any folder lmwright writes (plain model,
peft adapter, bottleneck adapter, qat) for inference; ``check_compat`` rejects impossible
combinations at validate time. QLoRA is ``model.quantize=nf4`` + ``method.name=lora``.
"""

from lmwright.methods.base import (
    COMPAT,
    METHODS,
    MethodConfig,
    apply_method,
    check_compat,
    compat_markdown,
    disabled,
    get_method,
    load_trained,
    merge_trained,
    quantized_base_memory,
    save_trained,
    trainable_report,
)

__all__ = ["COMPAT", "METHODS", "MethodConfig", "apply_method", "check_compat", "compat_markdown", "disabled", "get_method",
           "load_trained", "merge_trained", "quantized_base_memory", "save_trained", "trainable_report"]

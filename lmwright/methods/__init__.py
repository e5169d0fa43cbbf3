"""How weights are adapted: one plugin file per method (full, freeze, lora, ...; ``METHODS.names()``).

Each method is a class registered in ``METHODS`` by name in its own module (the contract:
:class:`lmwright.methods.base.Method`; docs/contributing.md shows how to add one). ``apply_method`` turns
a freshly built/loaded model into the trainable model; ``save_trained`` writes only what the method
trains (+ tokenizer + lmwright.json); ``load_trained`` loads any folder lmwright writes for inference;
``check_compat`` rejects impossible combinations at validate time. ``MethodConfig``, the flat
``method:`` config section, is built here from every plugin's options.
"""

from lmwright.methods.base import (
    METHODS,
    Compat,
    apply_method,
    build_method_config,
    check_compat,
    compat_markdown,
    compat_table,
    disabled,
    folder_method,
    get_method,
    load_trained,
    merge_trained,
    no_merge_message,
    plain_method,
    preset_names,
    quantized_base_memory,
    save_trained,
    trainable_report,
    trains_all,
    uses_virtual_tokens,
)

MethodConfig = build_method_config()  # imports every plugin module of this package (the registry finds them)
COMPAT = compat_table()

__all__ = ["COMPAT", "METHODS", "Compat", "MethodConfig", "apply_method", "check_compat", "compat_markdown",
           "compat_table", "disabled", "folder_method", "get_method", "load_trained", "merge_trained",
           "no_merge_message", "plain_method", "preset_names", "quantized_base_memory", "save_trained", "trainable_report",
           "trains_all", "uses_virtual_tokens"]

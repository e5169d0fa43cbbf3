"""The peft-backed methods: ``lora``, ``dora``, ``ia3``, ``prefix``, ``ptuning``, ``prompt``.

peft does the maths (adapter layers, merge, save/load); this file maps ``MethodConfig`` to peft
configs, makes new task heads trainable (``modules_to_save``), points the saved adapter at a real
local base folder, and handles quantized (bitsandbytes) bases: QLoRA = ``model.quantize=nf4`` +
``method.name=lora``. Merging onto a quantized base first dequantizes it into a float model, since
folding a LoRA update into 4-bit weights would re-quantize (and lose) most of it.

Prompt-learning methods (prefix, ptuning, prompt) feed extra inputs rather than changing weights, so
they cannot merge; ``prefix`` with ``prefix_projection=true`` is the P-tuning v2 "deep prompt"
setting (trainable key/values in every layer, reparametrised by an MLP).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lmwright.config import ConfigError
from lmwright.methods.base import (
    METHODS,
    MethodConfig,
    check_targets,
    head_module_names,
    model_family,
    normalize_targets,
)

_TASK_TYPES = {"causal-lm": "CAUSAL_LM", "classification": "SEQ_CLS", "reward": "SEQ_CLS",
               "seq2seq": "SEQ_2_SEQ_LM", "masked-lm": None, "embedding": "FEATURE_EXTRACTION"}


def _task_type(task: str) -> Any:
    from peft import TaskType

    tt = _TASK_TYPES.get(task)
    return TaskType[tt] if tt else None


def _modules_to_save(model: Any, cfg: MethodConfig, task: str) -> list[str] | None:
    mods = head_module_names(model, task) + [m for m in cfg.modules_to_save]
    return sorted(set(mods)) or None


def is_quantized(model: Any) -> bool:
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)
                or getattr(getattr(model, "config", None), "quantization_config", None) is not None)


class _PeftMethod:
    """Shared apply/save/merge; subclasses build the peft config."""

    name = ""
    merges = True

    def peft_config(self, model: Any, cfg: MethodConfig, task: str) -> Any:
        raise NotImplementedError

    def apply(self, model: Any, cfg: MethodConfig, task: str) -> Any:
        from peft import get_peft_model

        if is_quantized(model):
            from peft import prepare_model_for_kbit_training

            disable_bnb_cpu_repack(model)

            # casts norms/head to fp32 and freezes the base; gradient checkpointing is the engine's call
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        return get_peft_model(model, self.peft_config(model, cfg, task))

    def save(self, model: Any, out_dir: Path, base_path: str | None = None) -> None:
        if base_path is not None:
            for c in model.peft_config.values():
                c.base_model_name_or_path = base_path
        model.save_pretrained(str(out_dir), safe_serialization=True)

    def merge(self, model: Any) -> Any:
        """A plain transformers model with the adapter folded in (consumes ``model``)."""
        if not self.merges:
            raise ConfigError(f"method.name={self.name} cannot be merged into the base weights")
        if is_quantized(model.get_base_model()):
            model = _requantize_free(model)
        return model.merge_and_unload()


def _lora_targets(model: Any, cfg: MethodConfig, task: str) -> str | list[str]:
    t = normalize_targets(cfg.targets)
    if t == "auto":
        return "all-linear"
    if isinstance(t, list):
        check_targets(model, t, cfg.name, task)  # the decision check_compat made at validate time
    return t


@METHODS.register("lora")
class LoRA(_PeftMethod):
    name = "lora"
    use_dora = False

    def peft_config(self, model: Any, cfg: MethodConfig, task: str) -> Any:
        from peft import LoraConfig

        return LoraConfig(task_type=_task_type(task), r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                          target_modules=_lora_targets(model, cfg, task), use_rslora=cfg.rslora,
                          use_dora=self.use_dora, modules_to_save=_modules_to_save(model, cfg, task))

    def apply(self, model: Any, cfg: MethodConfig, task: str) -> Any:
        return lean_lora_layers(super().apply(model, cfg, task))


# ------------------------------------------------------------------------------------ lean LoRA forward
_LEAN_CLASSES: dict[type, type] = {}


def lean_lora_layers(model: Any) -> Any:
    """Give every LoRA layer of ``model`` a forward that adds the low-rank update in place.

    Why: peft computes ``result + lora_B(lora_A(x)) * scaling``, which allocates three more tensors
    of the layer's output size (B, T, out) per adapted layer, all but one freed at once. None of them
    is saved for backward, but on CPU the churn fragments glibc's heap: measured on llama-20m at 8 x
    256 tokens (all-linear, fp32), LoRA peaked at 2150 MB RSS against 1320 MB of live tensors, above
    full fine-tuning. ``result.add_(lora_B(lora_A(x)), alpha=scaling)`` is the same sum (the base
    layer's backward needs its input, never its output) without those tensors: -390 MB peak there.
    DoRA (a variant), merged or disabled adapters and mixed-adapter batches keep peft's forward.
    """
    for mod in model.modules():
        cls = type(mod)
        if issubclass(cls, _LeanLoraForward):
            continue
        if cls.__module__.startswith("peft.tuners.lora") and cls.__name__ in ("Linear", "Linear4bit", "Linear8bitLt"):
            if cls not in _LEAN_CLASSES:
                _LEAN_CLASSES[cls] = type(cls.__name__, (_LeanLoraForward, cls), {"__module__": cls.__module__})
            mod.__class__ = _LEAN_CLASSES[cls]
    return model


class _LeanLoraForward:
    """Mixin placed before a peft LoRA layer class (see :func:`lean_lora_layers`)."""

    def forward(self, x: Any, *args: Any, **kwargs: Any) -> Any:
        import torch

        if kwargs or self.disable_adapters or self.merged or self.lora_variant:
            return super().forward(x, *args, **kwargs)
        result = self.base_layer(x, *args)
        if type(self.base_layer) is not torch.nn.Linear:  # bitsandbytes' Linear4bit/8bitLt subclass it
            result = result.clone()  # peft clones their output defensively (it can be a view): so do we
        autocast = torch.is_autocast_enabled(x.device.type)
        for name in self.active_adapters:
            if name not in self.lora_A:
                continue
            lora_a = self.lora_A[name]
            h = x if autocast else self._cast_input_dtype(x, lora_a.weight.dtype)
            result.add_(self.lora_B[name](lora_a(self.lora_dropout[name](h))), alpha=self.scaling[name])
        return result


@METHODS.register("dora")
class DoRA(LoRA):
    name = "dora"
    use_dora = True


@METHODS.register("ia3")
class IA3(_PeftMethod):
    name = "ia3"

    def peft_config(self, model: Any, cfg: MethodConfig, task: str) -> Any:
        from peft import IA3Config

        t = normalize_targets(cfg.targets)
        kwargs: dict[str, Any] = {}
        if isinstance(t, list):
            check_targets(model, t, cfg.name, task)  # the decision check_compat made at validate time
            # IA3 scales the *input* of feed-forward output projections; these names are those projections
            ff = {"down_proj", "fc2", "wo", "c_proj", "dense"}
            kwargs = {"target_modules": t, "feedforward_modules": [m for m in t if m.rsplit(".", 1)[-1] in ff]}
        elif t == "all-linear":
            kwargs = {"target_modules": "all-linear", "feedforward_modules": []}
        elif model_family(model) == "phi3":  # peft 0.21 has no IA3 default for Phi-3's fused projections
            kwargs = {"target_modules": ["qkv_proj", "down_proj"], "feedforward_modules": ["down_proj"]}
        return IA3Config(task_type=_task_type(task), modules_to_save=_modules_to_save(model, cfg, task), **kwargs)


class _PromptMethod(_PeftMethod):
    merges = False


@METHODS.register("prefix")
class Prefix(_PromptMethod):
    name = "prefix"

    def peft_config(self, model: Any, cfg: MethodConfig, task: str) -> Any:
        from peft import PrefixTuningConfig

        return PrefixTuningConfig(task_type=_task_type(task), num_virtual_tokens=cfg.num_virtual_tokens,
                                  prefix_projection=cfg.prefix_projection,
                                  encoder_hidden_size=cfg.encoder_hidden_size,
                                  modules_to_save=_modules_to_save(model, cfg, task))

    def apply(self, model: Any, cfg: MethodConfig, task: str) -> Any:
        return accept_past_key_values(super().apply(model, cfg, task))


def accept_past_key_values(peft_model: Any) -> Any:
    """Let peft's prefix tuning reach an encoder backbone whose cache argument is named ``cache``.

    Why: transformers 5.24 renamed BERT's (and other encoders') ``past_key_values`` argument to
    ``cache`` (the old name still works, through ``deprecate_kwarg``), but peft 0.21's classification
    prefix forward inspects the backbone's signature for ``past_key_values`` and refuses the model.
    We give the backbone a forward that names the argument and passes it on as ``cache``: the same
    call transformers makes for the deprecated name. Remove when peft checks for ``cache`` as well
    (https://github.com/huggingface/peft, peft_model.py ``_prefix_tuning_forward``).
    """
    import functools
    import inspect

    name = getattr(peft_model, "transformer_backbone_name", None)
    if not name:
        return peft_model
    base = peft_model.base_model
    if "past_key_values" in inspect.signature(base.forward).parameters:
        return peft_model
    backbone = base.get_submodule(name)
    params = inspect.signature(backbone.forward).parameters
    if "past_key_values" in params or "cache" not in params:
        return peft_model
    original = backbone.forward

    @functools.wraps(original)
    def forward(*args: Any, past_key_values: Any = None, **kwargs: Any) -> Any:
        if past_key_values is not None:
            kwargs["cache"] = past_key_values
        return original(*args, **kwargs)

    keyword = inspect.Parameter("past_key_values", inspect.Parameter.KEYWORD_ONLY, default=None)
    plain = [p for p in params.values() if p.kind != p.VAR_KEYWORD]
    varkw = [p for p in params.values() if p.kind == p.VAR_KEYWORD]
    forward.__signature__ = inspect.signature(original).replace(parameters=[*plain, keyword, *varkw])  # type: ignore[attr-defined]
    backbone.forward = forward
    return peft_model


@METHODS.register("ptuning")
class PTuning(_PromptMethod):
    name = "ptuning"

    def peft_config(self, model: Any, cfg: MethodConfig, task: str) -> Any:
        from peft import PromptEncoderConfig

        return PromptEncoderConfig(task_type=_task_type(task), num_virtual_tokens=cfg.num_virtual_tokens,
                                   encoder_hidden_size=cfg.encoder_hidden_size,
                                   modules_to_save=_modules_to_save(model, cfg, task))


@METHODS.register("prompt")
class Prompt(_PromptMethod):
    name = "prompt"

    def peft_config(self, model: Any, cfg: MethodConfig, task: str) -> Any:
        from peft import PromptTuningConfig

        return PromptTuningConfig(task_type=_task_type(task), num_virtual_tokens=cfg.num_virtual_tokens,
                                  modules_to_save=_modules_to_save(model, cfg, task))


# ------------------------------------------------------------------------------------ quantized bases
def _requantize_free(model: Any) -> Any:
    """The same peft model on a dequantized float copy of its bitsandbytes base (consumes ``model``).

    Why not merge in place: peft's bnb merge adds the update then re-quantizes to 4 bits, throwing
    most of a small LoRA update away. We dequantize every bnb layer into ``nn.Linear``, re-attach the
    trained adapter state and let peft merge in float.
    """
    import torch
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    config = model.peft_config["default"]
    state = {k: v.detach().float().clone() for k, v in get_peft_model_state_dict(model).items()}
    base = model.unload()  # base model with bnb layers, adapters removed
    dequantize_base(base)
    base = base.to(torch.float32)
    fresh = get_peft_model(base, config)
    set_peft_model_state_dict(fresh, state)
    return fresh


def dequantize_base(model: Any) -> Any:
    """Replace every bitsandbytes Linear4bit/Linear8bitLt in ``model`` by a float32 ``nn.Linear``, and an
    Embedding4bit (model.quantize_embeddings) by a float32 ``nn.Embedding``, tied again if it was (in place)."""
    import bitsandbytes as bnb
    import torch
    from peft.utils.integrations import dequantize_module_weight

    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head is not None and head.weight is emb.weight
    for name, mod in list(model.named_modules()):
        if isinstance(mod, bnb.nn.Embedding4bit):  # model.quantize_embeddings
            new = torch.nn.Embedding(mod.num_embeddings, mod.embedding_dim, padding_idx=mod.padding_idx,
                                     dtype=torch.float32)
            with torch.no_grad():
                new.weight.copy_(bnb.functional.dequantize_4bit(mod.weight.data, mod.weight.quant_state))
        elif isinstance(mod, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)):
            _unpack_cpu_layout(mod)
            w = dequantize_module_weight(mod).to(torch.float32)
            new = torch.nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None, dtype=torch.float32)
            with torch.no_grad():
                new.weight.copy_(w)
                if mod.bias is not None:
                    new.bias.copy_(mod.bias.float())
        else:
            continue
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
    if tied:  # one quantized tensor served both: one float tensor again
        model.get_output_embeddings().weight = model.get_input_embeddings().weight
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    for attr in ("is_loaded_in_4bit", "is_loaded_in_8bit", "is_quantized"):
        if hasattr(model, attr):
            setattr(model, attr, False)
    if hasattr(model, "hf_quantizer"):
        model.hf_quantizer = None
    model.quantization_method = None
    return model


def _unpack_cpu_layout(mod: Any) -> None:
    """Undo bitsandbytes' CPU repacking of a 4-bit weight, which generic dequantization misreads.

    Why: on CPUs with avx512_bf16, ``Linear4bit.forward`` in eval/no-grad mode repacks the weight for
    a bf16 CPU kernel (``quant_state.packing_format_for_cpu``); ``dequantize_4bit`` then returns wrong
    values. bitsandbytes undoes it itself only when saving or moving to CUDA (checked on 0.50).
    """
    qs = getattr(mod.weight, "quant_state", None)
    if qs is not None and getattr(qs, "packing_format_for_cpu", False):
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        mod.weight.data, mod.weight.quant_state = _convert_weight_packed_for_cpu_inverse(mod.weight.data, qs)


def disable_bnb_cpu_repack(model: Any) -> Any:
    """Keep bitsandbytes 4-bit layers on the plain dequantize + float matmul path on CPU.

    Why: bitsandbytes 0.50, on CPUs with avx512_bf16, repacks a 4-bit weight for a bf16 kernel at the
    first eval/no-grad forward, rounding its scales to bf16 for good; peft's DoRA then dequantizes the
    repacked layout as if it were the normal one and returns wrong outputs (~0.16 off on a tiny llama),
    and eval no longer computes what training saw. Remove when both libraries handle the CPU layout.
    """
    for mod in model.modules():
        if hasattr(mod, "support_avx512bf16_for_cpu"):
            mod.support_avx512bf16_for_cpu = False
    return model


# ------------------------------------------------------------------------------------ prompt-learning generation
def is_prompt_learning(model: Any) -> bool:
    """A peft model whose active adapter is prefix, P-tuning or prompt tuning."""
    cfg = getattr(model, "active_peft_config", None)
    return bool(getattr(cfg, "is_prompt_learning", False))


def generate_uncached(model: Any, prompts: list[list[int]], max_new_tokens: int, stops: list[int],
                      temperature: float = 0.0) -> list[tuple[list[int], bool]]:
    """(new token ids without the stop token, finished) per prompt, each step one full forward of ``model``.

    Why: peft 0.21's cached generation for prompt-learning adapters does not compute what their forward
    computes under transformers 5.24 (measured on llama-tiny: prefix logits differ from the first new token,
    prompt/P-tuning from the second, by 0.1-0.2), so held-out answers were not the trained model's. One prompt
    at a time (no padding: the virtual tokens sit where training put them) and no KV cache: the forward the
    model trained with. These adapters serve tiny models here, so the quadratic cost is acceptable. Remove when
    ``model.generate`` agrees with the forward (tests/methods/test_prompt_generation.py).
    """
    import torch

    device = next(model.parameters()).device
    out: list[tuple[list[int], bool]] = []
    with torch.no_grad():
        for p in prompts:
            seq = torch.tensor([p], device=device)
            new: list[int] = []
            finished = False
            for _ in range(max_new_tokens):
                logits = model(input_ids=seq, attention_mask=torch.ones_like(seq)).logits[0, -1].float()
                if temperature > 0:
                    tok = int(torch.multinomial(torch.softmax(logits / temperature, -1), 1))
                else:
                    tok = int(logits.argmax())
                if tok in stops:
                    finished = True
                    break
                new.append(tok)
                seq = torch.cat([seq, torch.tensor([[tok]], device=device)], 1)
            out.append((new, finished))
    return out

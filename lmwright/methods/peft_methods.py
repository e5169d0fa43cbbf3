"""The peft-backed methods: ``lora``, ``dora``, ``ia3``, ``prefix``, ``ptuning``, ``prompt``.

peft does the maths (adapter layers, merge, save/load); this file maps each method's options to a peft
config, makes new task heads trainable (``modules_to_save``), points the saved adapter at a real
local base folder, and handles quantized (bitsandbytes) bases: QLoRA = ``model.quantize=nf4`` +
``method.name=lora``. Merging onto a quantized base first dequantizes it into a float model, since
folding a LoRA update into 4-bit weights would re-quantize (and lose) most of it.

Prompt-learning methods (prefix, ptuning, prompt) feed extra inputs rather than changing weights, so
they cannot merge; ``prefix`` with ``prefix_projection=true`` is the P-tuning v2 "deep prompt"
setting (trainable key/values in every layer, reparametrised by an MLP).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from lmwright.config import ConfigError, opt
from lmwright.methods.base import (
    ALL_TASKS,
    FLOAT,
    KBIT,
    METHODS,
    PROMPT_TASKS,
    Compat,
    head_module_names,
    linear_module_names,
)
from lmwright.models.introspect import model_family, unwrap

_TASK_TYPES = {"causal-lm": "CAUSAL_LM", "classification": "SEQ_CLS", "reward": "SEQ_CLS",
               "seq2seq": "SEQ_2_SEQ_LM", "masked-lm": None, "embedding": "FEATURE_EXTRACTION"}
ADAPTER_CONFIG = "adapter_config.json"


def _task_type(task: str) -> Any:
    from peft import TaskType

    tt = _TASK_TYPES.get(task)
    return TaskType[tt] if tt else None


def _modules_to_save(model: Any, opts: Any, task: str) -> list[str] | None:
    mods = head_module_names(model, task) + [m for m in opts.modules_to_save]
    return sorted(set(mods)) or None


def is_quantized(model: Any) -> bool:
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)
                or getattr(getattr(model, "config", None), "quantization_config", None) is not None)


def _read_adapter_config(folder: Path) -> dict[str, Any] | None:
    path = folder / ADAPTER_CONFIG
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None


class _PeftMethod:
    """Shared hooks (apply/save/merge/load/disable); subclasses build the peft config."""

    name = ""
    peft_type = ""  # peft's name for it, as in adapter_config.json
    use_dora = False
    merges = True
    no_merge_reason = ""
    trains_all = False
    virtual_tokens = False
    param_markers: tuple[str, ...] = ("modules_to_save",)
    presets: ClassVar[dict[str, dict[str, str]]] = {}
    recommended = False

    def peft_config(self, model: Any, opts: Any, task: str) -> Any:
        raise NotImplementedError

    def check_config(self, opts: Any, model_cfg: Any, task: str, gradient_checkpointing: bool) -> None:
        pass

    def check_model(self, opts: Any, meta_model: Any, task: str, where: str) -> None:
        pass

    def apply(self, model: Any, opts: Any, task: str) -> Any:
        from peft import get_peft_model

        if is_quantized(model):
            from peft import prepare_model_for_kbit_training

            disable_bnb_cpu_repack(model)

            # casts norms/head to fp32 and freezes the base; gradient checkpointing is the engine's call
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        return get_peft_model(model, self.peft_config(model, opts, task))

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

    def reads(self, folder: Path) -> int:
        """2 for an adapter folder of this peft type, 1 for any other peft adapter folder (the loader is shared)."""
        acfg = _read_adapter_config(folder)
        if acfg is None:
            return 0
        mine = acfg.get("peft_type") == self.peft_type and bool(acfg.get("use_dora")) == self.use_dora
        return 2 if mine else 1

    def base_of(self, folder: Path) -> str | None:
        return (_read_adapter_config(folder) or {}).get("base_model_name_or_path")

    def load(self, folder: Path, load_base: Callable[[], Any]) -> Any:
        from peft import PeftModel

        from lmwright.models.load import check_safetensors

        check_safetensors(folder)  # peft would fall back to a pickled adapter_model.bin
        base = load_base()
        if is_quantized(base):
            disable_bnb_cpu_repack(base)
        model = PeftModel.from_pretrained(base, str(folder), is_trainable=False)
        peft_type = getattr(model.peft_config.get("default"), "peft_type", None)
        if peft_type == "PREFIX_TUNING":
            model = accept_past_key_values(model)
        if peft_type == "LORA":
            model = lean_lora_layers(model)  # the forward training ran: same numbers when evaluated or served
        return model

    def owns(self, model: Any) -> bool:
        configs = getattr(model, "peft_config", None)
        if not isinstance(configs, dict) or getattr(model, "active_adapter", None) not in configs:
            return False
        c = configs[model.active_adapter]
        return c.peft_type == self.peft_type and bool(getattr(c, "use_dora", False)) == self.use_dora

    def disable(self, model: Any) -> contextlib.AbstractContextManager[Any]:
        return model.disable_adapter()


def normalize_targets(targets: str | list[str]) -> str | list[str]:
    """'auto' | 'all-linear' | list of module names (a comma string or a one-element list unwraps)."""
    if isinstance(targets, list) and len(targets) == 1:
        targets = targets[0]
    if isinstance(targets, str):
        if targets in ("auto", "all-linear"):
            return targets
        return [t.strip() for t in targets.split(",") if t.strip()]
    return list(targets)


def check_targets(model: Any, targets: list[str], method: Any, task: str, where: str = "the model") -> None:
    """The one decision on a ``method.targets`` list, made by ``check_model`` (on the meta-device model, at
    ``lmwright validate``) and by the methods' ``apply`` (on the real model, before ``get_peft_model``).

    peft matches a target by a module's name or a dotted suffix of its path (``mlp.down_proj``) and then
    fails on any matched module it cannot adapt (a block such as ``mlp``, a norm, the rotary embedding), or
    finds nothing when the target names only the task head (it trains in full: ``modules_to_save``). So a
    target must match at least one module outside the head, and every such module must be a layer type
    ``method`` adapts (its ``adapts``).
    """
    inner = unwrap(model)
    heads = set(head_module_names(model, task))
    missing, head_only, wrong = [], [], {}
    for t in targets:
        found = [(n, m) for n, m in inner.named_modules() if n and (n == t or n.endswith("." + t))]
        body = [m for n, m in found if n.split(".", 1)[0] not in heads]
        if not found:
            missing.append(t)
        elif not body:
            head_only.append(t)
        elif any(not method.adapts(m) for m in body):
            wrong[t] = type(next(m for m in body if not method.adapts(m))).__name__
    have = f"its linear modules are: {', '.join(linear_module_names(model))} (or use method.targets=all-linear)"
    if missing:
        raise ConfigError(f"method.targets {missing} not found in {where}; {have}")
    if head_only:
        raise ConfigError(f"method.targets {head_only} name only the task head of {where} ({', '.join(sorted(heads))}), "
                          f"which trains in full beside the adapter; target the body's layers: {have}")
    if wrong:
        kinds = ", ".join(f"{t} is a {k}" for t, k in wrong.items())
        raise ConfigError(f"method.targets {list(wrong)} name modules of {where} that {method.name} cannot adapt "
                          f"({kinds}; it adapts {method.adapts_doc}); {have}")


def _check_dropout(dropout: float) -> None:
    if not 0.0 <= dropout < 1.0:
        raise ConfigError(f"method.dropout must be in [0, 1), got {dropout}")


_TARGETS_HELP = "module names to adapt (e.g. [q_proj, v_proj]) or 'all-linear'; auto = "


@dataclass
class LoraOptions:
    r: int = opt(8, "rank of the low-rank update")
    alpha: float = opt(16.0, "scaling numerator; update scaled by alpha/r (alpha/sqrt(r) with rslora)")
    dropout: float = opt(0.0, "dropout on the adapter input (default 0, as in peft; dropout keeps a copy of every "
                              "adapted layer's input: ~+30% training memory)")
    targets: str | list[str] = opt("auto", _TARGETS_HELP + "all-linear")  # noqa: RUF009
    rslora: bool = opt(False, "rank-stabilised scaling alpha/sqrt(r) (better for large r)")
    modules_to_save: list[str] = opt([], "")  # noqa: RUF009 (a common key: help in CommonOptions)

    def check(self) -> None:
        if self.r < 1:
            raise ConfigError(f"method.r must be >= 1, got {self.r}")
        _check_dropout(self.dropout)


class _TargetedMethod(_PeftMethod):
    """A peft method that adapts named layers (``method.targets``)."""

    adapts_doc = "Linear, Conv1D and Conv2d layers"

    def adapts(self, module: Any) -> bool:
        """Whether peft (0.21) has a layer of this method for ``module``'s type: what its dispatchers accept."""
        import torch

        return isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) or type(module).__name__ == "Conv1D"

    def check_model(self, opts: Any, meta_model: Any, task: str, where: str) -> None:
        targets = normalize_targets(opts.targets)
        if isinstance(targets, list):
            check_targets(meta_model, targets, self, task, where=where)


@METHODS.register("lora")
class LoRA(_TargetedMethod):
    name = "lora"
    peft_type = "LORA"
    Options = LoraOptions
    compat = Compat(ALL_TASKS, FLOAT | KBIT, "model.quantize=nf4 makes it QLoRA; merge dequantizes the base first")
    param_markers = ("lora_", "modules_to_save")
    presets: ClassVar[dict[str, dict[str, str]]] = {"qlora": {"model.quantize": "nf4"}}
    recommended = True
    adapts_doc = "Linear, Conv1D, Conv and Embedding layers"

    def adapts(self, module: Any) -> bool:
        import torch

        return super().adapts(module) or isinstance(
            module, (torch.nn.Embedding, torch.nn.Conv1d, torch.nn.Conv3d, torch.nn.MultiheadAttention))

    def peft_config(self, model: Any, opts: LoraOptions, task: str) -> Any:
        from peft import LoraConfig

        targets = normalize_targets(opts.targets)
        if targets == "auto":
            targets = "all-linear"
        if isinstance(targets, list):
            check_targets(model, targets, self, task)  # the decision check_model made at validate time
        return LoraConfig(task_type=_task_type(task), r=opts.r, lora_alpha=opts.alpha, lora_dropout=opts.dropout,
                          target_modules=targets, use_rslora=opts.rslora,
                          use_dora=self.use_dora, modules_to_save=_modules_to_save(model, opts, task))

    def apply(self, model: Any, opts: LoraOptions, task: str) -> Any:
        return lean_lora_layers(super().apply(model, opts, task))


# ------------------------------------------------------------------------------------ lean LoRA forward
_LEAN_CLASSES: dict[type, type] = {}


def lean_lora_layers(model: Any) -> Any:
    """Give every LoRA layer of ``model`` a forward that adds the low-rank update in place.

    Why: peft computes ``result + lora_B(lora_A(x)) * scaling``, which allocates three more tensors
    of the layer's output size (B, T, out) per adapted layer, all but one freed at once. None of them
    is saved for backward, but on CPU the churn fragments glibc's heap: measured on llama-20m at 8 x
    256 tokens (all-linear, fp32), LoRA peaked at 2150 MB RSS against 1320 MB of live tensors, above
    full fine-tuning. ``result.add_(lora_B(lora_A(x) * scaling))`` is the same sum (the base layer's
    backward needs its input, never its output) without those tensors: -390 MB peak there. The scaling
    multiplies the rank-r intermediate (exact for a power of two, as alpha = 2r gives; else within rounding), so
    the backward has no multiplication of the output's size.
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
            low = lora_a(self.lora_dropout[name](h))
            scaling = self.scaling[name]
            # the scaling multiplies the rank-r intermediate, not the output: the backward then has no
            # multiplication of the output's size (SmolLM2 LoRA step: ~45 ms); exact where it is a power of two
            result.add_(self.lora_B[name](low * scaling if scaling != 1 else low))
        return result


@METHODS.register("dora")
class DoRA(LoRA):
    name = "dora"
    use_dora = True
    compat = Compat(ALL_TASKS, FLOAT | KBIT, "LoRA with a learned magnitude per output (peft use_dora)")
    presets: ClassVar[dict[str, dict[str, str]]] = {}
    recommended = False


@dataclass
class IA3Options:
    targets: str | list[str] = opt("auto", _TARGETS_HELP + "peft's per-family defaults")  # noqa: RUF009
    modules_to_save: list[str] = opt([], "")  # noqa: RUF009 (a common key: help in CommonOptions)


@METHODS.register("ia3")
class IA3(_TargetedMethod):
    name = "ia3"
    peft_type = "IA3"
    Options = IA3Options
    compat = Compat(ALL_TASKS, FLOAT,
                    "learned rescaling vectors; peft default targets per family (Phi-3: qkv_proj, down_proj)")
    param_markers = ("ia3_", "modules_to_save")

    def peft_config(self, model: Any, opts: IA3Options, task: str) -> Any:
        from peft import IA3Config

        t = normalize_targets(opts.targets)
        kwargs: dict[str, Any] = {}
        if isinstance(t, list):
            check_targets(model, t, self, task)  # the decision check_model made at validate time
            # IA3 scales the *input* of feed-forward output projections; these names are those projections
            ff = {"down_proj", "fc2", "wo", "c_proj", "dense"}
            kwargs = {"target_modules": t, "feedforward_modules": [m for m in t if m.rsplit(".", 1)[-1] in ff]}
        elif t == "all-linear":
            kwargs = {"target_modules": "all-linear", "feedforward_modules": []}
        elif model_family(model) == "phi3":  # peft 0.21 has no IA3 default for Phi-3's fused projections
            kwargs = {"target_modules": ["qkv_proj", "down_proj"], "feedforward_modules": ["down_proj"]}
        return IA3Config(task_type=_task_type(task), modules_to_save=_modules_to_save(model, opts, task), **kwargs)


_VIRTUAL_HELP = "number of virtual tokens"


def _check_virtual(n: int) -> None:
    if n < 1:
        raise ConfigError(f"method.num_virtual_tokens must be >= 1, got {n}")


class _PromptMethod(_PeftMethod):
    """Prompt learning: extra inputs (virtual tokens), no weight change."""

    merges = False
    virtual_tokens = True
    param_markers = ("prompt_encoder", "modules_to_save")

    @contextlib.contextmanager
    def disable(self, model: Any) -> Iterator[Any]:
        # Workaround (peft 0.21): disable_adapter() for prompt learning reads prepare_inputs_for_generation,
        # which classifiers lack, and leaves modules_to_save heads active. Remove when peft handles both.
        from peft.utils.other import ModulesToSaveWrapper

        wrappers = [m for m in model.modules() if isinstance(m, ModulesToSaveWrapper)]
        model.forward = model.base_model.forward  # instance attribute shadows PeftModel.forward
        try:
            for w in wrappers:
                w.enable_adapters(False)
            yield model
        finally:
            del model.forward
            for w in wrappers:
                w.enable_adapters(True)


@dataclass
class PrefixOptions:
    num_virtual_tokens: int = opt(20, _VIRTUAL_HELP)
    prefix_projection: bool = opt(False, "reparametrise the prefix through an MLP; with it prefix tuning is the "
                                         "P-tuning v2 'deep prompt' setting")
    encoder_hidden_size: int = opt(128, "hidden size of the projection MLP")
    modules_to_save: list[str] = opt([], "")  # noqa: RUF009 (a common key: help in CommonOptions)

    def check(self) -> None:
        _check_virtual(self.num_virtual_tokens)


@METHODS.register("prefix")
class Prefix(_PromptMethod):
    name = "prefix"
    peft_type = "PREFIX_TUNING"
    Options = PrefixOptions
    compat = Compat(PROMPT_TASKS, FLOAT, "not with gradient checkpointing; prefix_projection=true is P-tuning v2")
    no_merge_reason = "its virtual key/values are extra attention inputs, not a weight change"

    def check_config(self, opts: PrefixOptions, model_cfg: Any, task: str, gradient_checkpointing: bool) -> None:
        if gradient_checkpointing:
            raise ConfigError(f"method.name={self.name} does not work with gradient checkpointing (the prefix is "
                              "passed as a key/value cache, which checkpointed blocks drop); set "
                              "model.gradient_checkpointing=false or use another method.name (e.g. ptuning or lora)")

    def peft_config(self, model: Any, opts: PrefixOptions, task: str) -> Any:
        from peft import PrefixTuningConfig

        return PrefixTuningConfig(task_type=_task_type(task), num_virtual_tokens=opts.num_virtual_tokens,
                                  prefix_projection=opts.prefix_projection,
                                  encoder_hidden_size=opts.encoder_hidden_size,
                                  modules_to_save=_modules_to_save(model, opts, task))

    def apply(self, model: Any, opts: PrefixOptions, task: str) -> Any:
        return accept_past_key_values(super().apply(model, opts, task))


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


@dataclass
class PTuningOptions:
    num_virtual_tokens: int = opt(20, _VIRTUAL_HELP)
    encoder_hidden_size: int = opt(128, "hidden size of the prompt encoder")
    modules_to_save: list[str] = opt([], "")  # noqa: RUF009 (a common key: help in CommonOptions)

    def check(self) -> None:
        _check_virtual(self.num_virtual_tokens)


@METHODS.register("ptuning")
class PTuning(_PromptMethod):
    name = "ptuning"
    peft_type = "P_TUNING"
    Options = PTuningOptions
    compat = Compat(PROMPT_TASKS, FLOAT, "virtual tokens from an MLP prompt encoder (P-tuning v1)")
    no_merge_reason = "its virtual tokens are extra inputs produced by a prompt encoder, not a weight change"

    def peft_config(self, model: Any, opts: PTuningOptions, task: str) -> Any:
        from peft import PromptEncoderConfig

        return PromptEncoderConfig(task_type=_task_type(task), num_virtual_tokens=opts.num_virtual_tokens,
                                   encoder_hidden_size=opts.encoder_hidden_size,
                                   modules_to_save=_modules_to_save(model, opts, task))


@dataclass
class PromptOptions:
    num_virtual_tokens: int = opt(20, _VIRTUAL_HELP)
    modules_to_save: list[str] = opt([], "")  # noqa: RUF009 (a common key: help in CommonOptions)

    def check(self) -> None:
        _check_virtual(self.num_virtual_tokens)


@METHODS.register("prompt")
class Prompt(_PromptMethod):
    name = "prompt"
    peft_type = "PROMPT_TUNING"
    Options = PromptOptions
    compat = Compat(PROMPT_TASKS, FLOAT, "soft prompt embeddings only")
    no_merge_reason = "its soft prompt is extra input embeddings, not a weight change"

    def peft_config(self, model: Any, opts: PromptOptions, task: str) -> Any:
        from peft import PromptTuningConfig

        return PromptTuningConfig(task_type=_task_type(task), num_virtual_tokens=opts.num_virtual_tokens,
                                  modules_to_save=_modules_to_save(model, opts, task))


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

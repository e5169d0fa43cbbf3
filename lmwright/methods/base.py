"""Method plugin contract, the registry, the compatibility table and loading of trained folders.

A method turns a freshly built/loaded model into the model the engine trains (``apply``), writes
only what it trained (``save``), and, where the maths allows, folds itself back into a plain model
(``merge``). Every folder a method writes also gets ``lmwright.json`` ({method, task, base, ...}) so
that ``load_trained`` can rebuild the model for inference without the run's config.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, Protocol

from lmwright.config import ConfigError, opt
from lmwright.models.meta import META_FILE, read_meta
from lmwright.registry import Registry

METHODS = Registry("method", package="lmwright.methods")

TASKS = ("causal-lm", "classification", "masked-lm", "seq2seq", "embedding", "reward")
# the heads that a task adds on top of a pretrained body; they always train (they start random)
HEAD_NAMES = ("score", "classifier", "classification_head", "qa_outputs")


@dataclass
class MethodConfig:
    name: str = opt("full", "fine-tuning method: full, freeze, lora, dora, prefix, ptuning, prompt, adapter, "
                            "ia3, qat (QLoRA = lora + model.quantize=nf4)")
    r: int = opt(8, "lora/dora: rank of the low-rank update")
    alpha: float = opt(16.0, "lora/dora: scaling numerator; update scaled by alpha/r (alpha/sqrt(r) with rslora)")
    dropout: float = opt(0.0, "lora/dora: dropout on the adapter input (default 0, as in peft; dropout keeps a "
                              "copy of every adapted layer's input: ~+30% training memory); adapter: dropout "
                              "inside the bottleneck")
    targets: str | list[str] = opt(  # noqa: RUF009 (opt gives lists a default_factory)
        "auto", "lora/dora/ia3: module names to adapt (e.g. [q_proj, v_proj]) or 'all-linear'; "
                "auto = all-linear for lora/dora, peft's per-family defaults for ia3")
    rslora: bool = opt(False, "lora/dora: rank-stabilised scaling alpha/sqrt(r) (better for large r)")
    modules_to_save: list[str] = opt(  # noqa: RUF009
        [], "modules trained in full beside the adapter (a new task head is added automatically), e.g. [lm_head]")
    freeze_last_n: int = opt(2, "freeze: train only the last N transformer blocks (0 = none)")
    trainable_modules: list[str] = opt(  # noqa: RUF009
        [], "freeze: extra parameters to train, matched by name substring, e.g. [norm, embed_tokens]")
    num_virtual_tokens: int = opt(20, "prefix/ptuning/prompt: number of virtual tokens")
    prefix_projection: bool = opt(False, "prefix: reparametrise the prefix through an MLP; with it prefix "
                                         "tuning is the P-tuning v2 'deep prompt' setting")
    encoder_hidden_size: int = opt(128, "ptuning: hidden size of the prompt encoder; prefix: of the projection MLP")
    adapter_size: int = opt(64, "adapter: bottleneck width of each adapter")
    adapter_placement: Literal["houlsby", "pfeiffer"] = opt(
        "houlsby", "adapter: houlsby = after attention and after MLP; pfeiffer = after MLP only")
    adapter_activation: Literal["relu", "gelu", "silu"] = opt("relu", "adapter: non-linearity in the bottleneck")
    qat_bits: Literal[8, 4] = opt(8, "qat: integer bits of the fake-quantized Linear weights")
    qat_group_size: int = opt(32, "qat: weights per quantization group (0 = one scale per output channel)")

    def check(self) -> None:
        if self.r < 1:
            raise ConfigError(f"method.r must be >= 1, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"method.dropout must be in [0, 1), got {self.dropout}")
        if self.num_virtual_tokens < 1:
            raise ConfigError(f"method.num_virtual_tokens must be >= 1, got {self.num_virtual_tokens}")
        if self.adapter_size < 1:
            raise ConfigError(f"method.adapter_size must be >= 1, got {self.adapter_size}")
        if self.freeze_last_n < 0:
            raise ConfigError(f"method.freeze_last_n must be >= 0, got {self.freeze_last_n}")
        if self.qat_group_size < 0:
            raise ConfigError(f"method.qat_group_size must be >= 0 (0 = per channel), got {self.qat_group_size}")


class Method(Protocol):
    name: str
    merges: bool  # can be folded into a plain model

    def apply(self, model: Any, cfg: MethodConfig, task: str) -> Any: ...

    def save(self, model: Any, out_dir: Path, base_path: str | None = None) -> None: ...

    def merge(self, model: Any) -> Any: ...


# ------------------------------------------------------------------------------------ entry points
def get_method(name: str) -> Method:
    return METHODS.get(name)()


def apply_method(model: Any, cfg: MethodConfig, task: str = "causal-lm") -> Any:
    """The trainable model for ``cfg.name``; new task heads always train."""
    return get_method(cfg.name).apply(model, cfg, task)


def save_trained(model: Any, cfg: MethodConfig, out_dir: str | Path, tokenizer: Any = None,
                 base_path: str | Path | None = None, task: str | None = None) -> Path:
    """Write what ``cfg.name`` trained, the tokenizer and ``lmwright.json`` into ``out_dir``.

    ``base_path`` is the local folder of the weights the method was applied to; adapter folders need
    it to load (it is written into ``adapter_config.json`` and ``lmwright.json``).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    base = str(Path(base_path).resolve()) if base_path is not None else None
    get_method(cfg.name).save(model, out, base)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    config = getattr(model, "config", None)
    meta = {"method": cfg.name, "task": task or _task_of(model), "base": base,
            "num_labels": getattr(config, "num_labels", None),
            "quantize": _quantize_of(model), "quantize_embeddings": _embeddings_quantized(model),
            # the attention kernel it trained with: the base reloads with it (Gemma-2 has no SDPA)
            "attn_implementation": getattr(config, "_attn_implementation", None)}
    if meta["task"] in ("classification", "reward") and getattr(config, "id2label", None):
        meta["id2label"] = {str(k): v for k, v in config.id2label.items()}
    (out / META_FILE).write_text(json.dumps(meta, indent=2), encoding="utf-8")
    return out


def merge_trained(model: Any, cfg: MethodConfig) -> Any:
    """A plain transformers model with the method folded in, or ConfigError if the maths forbids it."""
    m = get_method(cfg.name)
    if not m.merges:
        raise ConfigError(f"method.name={cfg.name} cannot be merged into the base weights ({_NO_MERGE[cfg.name]}); "
                          "export it as an adapter folder, or train with lora, dora or ia3")
    return m.merge(model)


_NO_MERGE = {
    "prefix": "its virtual key/values are extra attention inputs, not a weight change",
    "ptuning": "its virtual tokens are extra inputs produced by a prompt encoder, not a weight change",
    "prompt": "its soft prompt is extra input embeddings, not a weight change",
    "adapter": "a bottleneck with a non-linearity is not a linear map, so it has no equivalent weight",
}


def trainable_report(model: Any) -> dict[str, float]:
    from lmwright.models.load import count_parameters

    trainable, total = count_parameters(model)
    return {"trainable": trainable, "total": total, "trainable_pct": 100.0 * trainable / max(total, 1)}


@contextlib.contextmanager
def disabled(model: Any) -> Iterator[Any]:
    """Run the base model under an adapter (peft or our bottleneck): for A/B checks and reference logits."""
    if getattr(model, "lmwright_adapter", None) is not None:
        from lmwright.methods.adapter import disabled as adapter_disabled

        with adapter_disabled(model):
            yield model
        return
    if not hasattr(model, "peft_config"):
        raise ConfigError("disabled() needs an adapter model (a peft method or method.name=adapter)")
    if not model.peft_config[model.active_adapter].is_prompt_learning:
        with model.disable_adapter():
            yield model
        return
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


# ------------------------------------------------------------------------------------ model helpers
def head_module_names(model: Any, task: str) -> list[str]:
    """Top-level names of the task head a classification/reward model adds (it starts random)."""
    if task not in ("classification", "reward"):
        return []
    inner = _unwrap(model)
    return [n for n, _ in inner.named_children() if n in HEAD_NAMES]


def _unwrap(model: Any) -> Any:
    """The transformers model under a peft wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def model_family(model_or_config: Any) -> str:
    """Family key used by COMPAT and the adapter hooks (see ``FAMILIES``), or the model_type if unknown."""
    config = getattr(model_or_config, "config", model_or_config)
    mt = getattr(config, "model_type", "")
    return _FAMILY_OF.get(mt, mt)


# family key -> what it covers; the COMPAT table and docs/methods.md are per family
FAMILIES: dict[str, str] = {
    "llama": "Llama 1-3 (LlamaForCausalLM), incl. Llama-3 rope scaling, tied or untied embeddings",
    "mistral": "Mistral (sliding-window attention)",
    "qwen2": "Qwen2, Qwen2.5 (q/k/v bias)",
    "qwen3": "Qwen3 (q/k norm)",
    "gemma": "Gemma (1)",
    "gemma2": "Gemma-2 (logit soft-capping, alternating sliding/full attention; eager attention only)",
    "gemma3": "Gemma-3 text (Gemma3ForCausalLM with Gemma3TextConfig)",
    "phi3": "Phi-3 (fused qkv_proj and gate_up_proj)",
    "gpt2": "GPT-2 (Conv1D layers)",
    "bert": "BERT, RoBERTa (encoders)",
    "t5": "T5 (encoder-decoder)",
    "bart": "BART (encoder-decoder)",
}
# model_type -> family; model types not listed (e.g. gemma3, the multimodal Gemma3ForConditionalGeneration)
# are their own, unsupported family
_FAMILY_OF = {**{f: f for f in FAMILIES if f != "gemma3"}, "gemma3_text": "gemma3", "roberta": "bert",
              "gemma3": "gemma3-multimodal"}


def linear_module_names(model: Any) -> list[str]:
    """Distinct last-name components of the model's Linear (and GPT-2 Conv1D) layers, head excluded."""
    import torch

    names: set[str] = set()
    for full, mod in _unwrap(model).named_modules():
        if isinstance(mod, torch.nn.Linear) or type(mod).__name__ == "Conv1D":
            last = full.rsplit(".", 1)[-1]
            if last not in HEAD_NAMES and last != "lm_head":
                names.add(last)
    return sorted(names)


def _task_of(model: Any) -> str:
    return _task_from_arch(type(_unwrap(model)).__name__)


def _task_from_arch(a: str) -> str:
    if a.endswith("ForSequenceClassification"):
        return "classification"
    if a.endswith("ForMaskedLM"):
        return "masked-lm"
    if a.endswith("ForConditionalGeneration"):
        return "seq2seq"
    if a.endswith("LMHeadModel"):  # GPT2LMHeadModel and kin: causal LMs whose name ends in "Model"
        return "causal-lm"
    if a.endswith("Model"):
        return "embedding"
    return "causal-lm"


def _quantize_of(model: Any) -> str | None:
    qc = getattr(getattr(_unwrap(model), "config", None), "quantization_config", None)
    if qc is None:
        return None
    qc = qc if isinstance(qc, dict) else qc.to_dict()
    if qc.get("load_in_4bit"):
        return qc.get("bnb_4bit_quant_type", "nf4")
    if qc.get("load_in_8bit"):
        return "int8"
    return None


def _embeddings_quantized(model: Any) -> bool:
    """Whether the input embedding is a bitsandbytes 4-bit module (model.quantize_embeddings)."""
    get = getattr(_unwrap(model), "get_input_embeddings", None)
    return callable(get) and type(get()).__name__ == "Embedding4bit"


def quantized_base_memory(model: Any) -> int:
    """Bytes held by the base weights (adapter parameters excluded), counting 4-bit packing and scales.

    Why: QLoRA's point is the base memory; ``numel`` of a packed 4-bit tensor already counts bytes,
    and the quantization scales (absmax, nested scales) are real memory too.
    """
    seen: set[int] = set()
    total = 0

    def add(t: Any) -> None:
        nonlocal total
        if t is None or id(t) in seen:
            return
        seen.add(id(t))
        total += t.numel() * t.element_size()

    inner = _unwrap(model)
    for name, p in inner.named_parameters():
        if _is_adapter_param(name):
            continue
        add(p)
        qs = getattr(p, "quant_state", None)
        if qs is not None:
            add(getattr(qs, "absmax", None))
            add(getattr(qs, "code", None))
            nested = getattr(qs, "state2", None)
            if nested is not None:
                add(getattr(nested, "absmax", None))
                add(getattr(nested, "code", None))
        add(getattr(p, "SCB", None))  # int8 row scales
    for name, b in inner.named_buffers():
        if not _is_adapter_param(name):
            add(b)
    return total


def _is_adapter_param(name: str) -> bool:
    return any(k in name for k in ("lora_", "ia3_", "modules_to_save", "prompt_encoder", "adapter_attn",
                                   "adapter_mlp"))


# ------------------------------------------------------------------------------------ compatibility
_FLOAT = frozenset({"float32", "bfloat16", "float16"})
_KBIT = frozenset({"nf4", "fp4", "int8"})
_ALL_TASKS = frozenset(TASKS)
_ALL_FAMILIES = frozenset(FAMILIES)
_PROMPT_TASKS = frozenset({"causal-lm", "classification", "seq2seq", "reward"})
_NO_ADAPTER_SITES = "its blocks add cross-attention, where lmwright's bottleneck adapter has no placement"

# method -> what it works with. "refused": family -> why not (check_compat says it; docs/methods.md shows it).
# Every supported (family, method) cell of the decoder families and BERT is run through the contract
# matrix of tests/methods/test_contract.py; T5 through the smoke test of tests/methods/test_families.py.
COMPAT: dict[str, dict[str, Any]] = {
    "full": {"tasks": _ALL_TASKS, "precision": _FLOAT, "merges": True,
             "note": "every weight trains; quantized weights cannot take gradient steps"},
    "freeze": {"tasks": _ALL_TASKS, "precision": _FLOAT, "merges": True,
               "note": "last method.freeze_last_n blocks + method.trainable_modules + task head"},
    "lora": {"tasks": _ALL_TASKS, "precision": _FLOAT | _KBIT, "merges": True,
             "note": "model.quantize=nf4 makes it QLoRA; merge dequantizes the base first"},
    "dora": {"tasks": _ALL_TASKS, "precision": _FLOAT | _KBIT, "merges": True,
             "note": "LoRA with a learned magnitude per output (peft use_dora)"},
    "ia3": {"tasks": _ALL_TASKS, "precision": _FLOAT, "merges": True,
            "note": "learned rescaling vectors; peft default targets per family (Phi-3: qkv_proj, down_proj)"},
    "prefix": {"tasks": _PROMPT_TASKS, "precision": _FLOAT, "merges": False,
               "note": "not with gradient checkpointing; prefix_projection=true is P-tuning v2"},
    "ptuning": {"tasks": _PROMPT_TASKS, "precision": _FLOAT, "merges": False,
                "note": "virtual tokens from an MLP prompt encoder (P-tuning v1)"},
    "prompt": {"tasks": _PROMPT_TASKS, "precision": _FLOAT, "merges": False,
               "note": "soft prompt embeddings only"},
    "adapter": {"tasks": _ALL_TASKS - {"seq2seq"}, "precision": _FLOAT, "merges": False,
                "refused": {"t5": _NO_ADAPTER_SITES, "bart": _NO_ADAPTER_SITES},
                "note": "lmwright's bottleneck adapter (Houlsby/Pfeiffer)"},
    "qat": {"tasks": _ALL_TASKS, "precision": _FLOAT, "merges": True,
            "refused": {"gpt2": "its Conv1D layers are not nn.Linear, the only layers torchao fake-quantizes"},
            "note": "fake-quantized nn.Linear weights (int8/int4, torchao)"},
}
for _c in COMPAT.values():
    _c.setdefault("refused", {})
    _c["families"] = _ALL_FAMILIES - set(_c["refused"])


def compat_markdown() -> str:
    """The methods x tasks/families/precision table for the docs, generated from the registry."""
    rows = ["| method | tasks | families | precision | merges | note |", "|---|---|---|---|---|---|"]
    for name in METHODS.names():
        c = COMPAT.get(name)
        if c is None:
            rows.append(f"| `{name}` | ? | ? | ? | ? | not in COMPAT |")
            continue
        tasks = ", ".join(t for t in TASKS if t in c["tasks"])
        fams = "all" if c["families"] == _ALL_FAMILIES else "all but " + ", ".join(sorted(c["refused"]))
        prec = ", ".join(p for p in ("float32", "bfloat16", "float16", "nf4", "fp4", "int8") if p in c["precision"])
        rows.append(f"| `{name}` | {tasks} | {fams} | {prec} | {'yes' if c['merges'] else 'no'} | {c['note']} |")
    return "\n".join(rows)


def family_matrix_markdown(checked: dict[tuple[str, str], str] | None = None) -> str:
    """The family x method table (``qlora`` = lora on a model.quantize=nf4 base), with the reasons of refusals.

    ``checked`` maps (family, method) to the test that exercises the cell; supported cells without a
    test are marked as such (the table claims no more than the tests show).
    """
    checked = checked or {}
    methods = [*METHODS.names(), "qlora"]
    rows = ["| family | " + " | ".join(f"`{m}`" for m in methods) + " |", "|---" * (len(methods) + 1) + "|"]
    reasons: dict[tuple[str, str], list[str]] = {}  # (method, why) -> families, in table order
    for fam in FAMILIES:
        for m in methods:
            why = COMPAT["lora" if m == "qlora" else m]["refused"].get(fam)
            if why is not None:
                reasons.setdefault((m, why), []).append(fam)
    keys = list(reasons)
    for fam in FAMILIES:
        cells = []
        for m in methods:
            why = COMPAT["lora" if m == "qlora" else m]["refused"].get(fam)
            cells.append(f"no [{keys.index((m, why)) + 1}]" if why is not None
                         else checked.get((fam, m), "yes (untested)"))
        rows.append(f"| {fam} | " + " | ".join(cells) + " |")
    notes = [f"- [{i}] `{m}` on {', '.join(reasons[(m, why)])}: {why}" for i, (m, why) in enumerate(keys, 1)]
    return "\n".join(rows + [""] + notes)


def check_compat(method_cfg: MethodConfig, model_cfg: Any, task: str,
                 gradient_checkpointing: bool = False) -> None:
    """Fail at ``lmwright validate`` time, naming the option to change, when the combination cannot work."""
    if method_cfg.name not in METHODS:
        METHODS.get(method_cfg.name)  # raises with the closest valid name
    c = COMPAT[method_cfg.name]
    name = method_cfg.name
    if task not in c["tasks"]:
        ok = ", ".join(t for t in TASKS if t in c["tasks"])
        raise ConfigError(f"method.name={name} does not support the {task} task (it supports {ok}); "
                          f"pick another method.name, e.g. lora")
    quantize = getattr(model_cfg, "quantize", "none")
    if quantize != "none":
        if quantize not in c["precision"]:
            raise ConfigError(f"model.quantize={quantize} needs a method that trains beside frozen quantized "
                              f"weights (lora or dora; QLoRA = lora + nf4); method.name={name} cannot. "
                              f"Set model.quantize=none or method.name=lora")
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise ConfigError(f"model.quantize={quantize} (QLoRA) needs bitsandbytes: pip install "
                              "'lmwright[quant]', or set model.quantize=none") from None
    if name == "qat":
        try:
            import torchao  # noqa: F401
        except ImportError:
            raise ConfigError("method.name=qat needs torchao: pip install 'lmwright[quant]'") from None
    if gradient_checkpointing and name == "prefix":
        raise ConfigError("method.name=prefix does not work with gradient checkpointing (the prefix is passed "
                          "as a key/value cache, which checkpointed blocks drop); set "
                          "model.gradient_checkpointing=false or use method.name=ptuning or lora")
    meta = _meta_model(model_cfg, task)
    if meta is None:
        return
    family = model_family(meta)
    if family in c["refused"]:
        raise ConfigError(f"method.name={name} does not work on the {family} model family: {c['refused'][family]}; "
                          f"pick another method.name (e.g. lora)")
    if family not in c["families"]:
        raise ConfigError(f"method.name={name} is not tested on the {family} model family ({type(meta).__name__}); "
                          f"lmwright supports {', '.join(sorted(c['families']))}: pick another model.name")
    attn = getattr(model_cfg, "attn_implementation", None)
    if attn == "sdpa" and not getattr(type(meta), "_supports_sdpa", True):
        raise ConfigError(f"model.attn_implementation=sdpa: {type(meta).__name__} ({family}) has no SDPA attention in "
                          f"this transformers version; set model.attn_implementation=eager")
    targets = normalize_targets(method_cfg.targets)
    if name in ("lora", "dora", "ia3") and isinstance(targets, list):
        check_targets(meta, targets, name, task, where=getattr(model_cfg, "name", "the model"))
    if name == "freeze":
        n_blocks = len(find_blocks(meta))
        if method_cfg.freeze_last_n > n_blocks:
            raise ConfigError(f"method.freeze_last_n={method_cfg.freeze_last_n} but the model has {n_blocks} "
                              f"blocks; set method.freeze_last_n <= {n_blocks}")


def check_targets(model: Any, targets: list[str], method: str, task: str, where: str = "the model") -> None:
    """The one decision on a ``method.targets`` list, made by ``check_compat`` (on the meta-device model, at
    ``lmwright validate``) and by the peft methods' ``apply`` (on the real model, before ``get_peft_model``).

    peft matches a target by a module's name or a dotted suffix of its path (``mlp.down_proj``) and then
    fails on any matched module it cannot adapt (a block such as ``mlp``, a norm, the rotary embedding), or
    finds nothing when the target names only the task head (it trains in full: ``modules_to_save``). So a
    target must match at least one module outside the head, and every such module must be a layer type
    ``method`` adapts (:func:`_adaptable`).
    """
    inner = _unwrap(model)
    heads = set(head_module_names(model, task))
    missing, head_only, wrong = [], [], {}
    for t in targets:
        found = [(n, m) for n, m in inner.named_modules() if n and (n == t or n.endswith("." + t))]
        body = [m for n, m in found if n.split(".", 1)[0] not in heads]
        if not found:
            missing.append(t)
        elif not body:
            head_only.append(t)
        elif any(not _adaptable(m, method) for m in body):
            wrong[t] = type(next(m for m in body if not _adaptable(m, method))).__name__
    have = f"its linear modules are: {', '.join(linear_module_names(model))} (or use method.targets=all-linear)"
    if missing:
        raise ConfigError(f"method.targets {missing} not found in {where}; {have}")
    if head_only:
        raise ConfigError(f"method.targets {head_only} name only the task head of {where} ({', '.join(sorted(heads))}), "
                          f"which trains in full beside the adapter; target the body's layers: {have}")
    if wrong:
        kinds = ", ".join(f"{t} is a {k}" for t, k in wrong.items())
        raise ConfigError(f"method.targets {list(wrong)} name modules of {where} that {method} cannot adapt ({kinds}; "
                          f"it adapts {_ADAPTABLE_DOC[method]}); {have}")


_ADAPTABLE_DOC = {"lora": "Linear, Conv1D, Conv and Embedding layers", "dora": "Linear, Conv1D, Conv and Embedding layers",
                  "ia3": "Linear, Conv1D and Conv2d layers"}


def _adaptable(module: Any, method: str) -> bool:
    """Whether peft (0.21) has a ``method`` layer for ``module``'s type: what its dispatchers accept."""
    import torch

    if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) or type(module).__name__ == "Conv1D":
        return True
    if method in ("lora", "dora"):
        return isinstance(module, (torch.nn.Embedding, torch.nn.Conv1d, torch.nn.Conv3d, torch.nn.MultiheadAttention))
    return False


def normalize_targets(targets: str | list[str]) -> str | list[str]:
    """'auto' | 'all-linear' | list of module names (a comma string or a one-element list unwraps)."""
    if isinstance(targets, list) and len(targets) == 1:
        targets = targets[0]
    if isinstance(targets, str):
        if targets in ("auto", "all-linear"):
            return targets
        return [t.strip() for t in targets.split(",") if t.strip()]
    return list(targets)


def _meta_model(model_cfg: Any, task: str) -> Any:
    """The architecture on the meta device (no memory, no weights) to check names and sizes; None if unknown."""
    import torch

    if model_cfg is None:
        return None
    try:
        from lmwright.models.presets import _TASK_CLASSES, build_model

        with torch.device("meta"):
            if model_cfg.is_preset():
                extra = {"num_labels": 2} if task == "classification" else {}
                return build_model(replace(model_cfg, quantize="none"), task=task, vocab_size=64, **extra)
            import transformers as tf

            config = tf.AutoConfig.from_pretrained(str(model_cfg.name), local_files_only=True)
            return getattr(tf, _TASK_CLASSES[task]).from_config(config)
    except (ConfigError, OSError, ValueError, KeyError):
        return None


def find_blocks(model: Any) -> list[Any]:
    """The transformer blocks in forward order (decoder blocks last for encoder-decoders).

    Why: freeze and adapter work on "the N-th block" across llama, gpt2, bert, t5 and bart without a
    per-architecture attribute path: the blocks are the longest ``ModuleList``s of same-class modules.
    """
    import torch

    lists = []
    for name, mod in _unwrap(model).named_modules():
        same_class = isinstance(mod, torch.nn.ModuleList) and len(mod) > 0 and len({type(m) for m in mod}) == 1
        if same_class and any(isinstance(s, torch.nn.Linear) or type(s).__name__ == "Conv1D"
                              for s in mod[0].modules()):
            lists.append((name, mod))
    # keep only outermost lists (t5 blocks contain a 'layer' ModuleList of sub-layers)
    outer = [(n, m) for n, m in lists if not any(n != o and n.startswith(o + ".") for o, _ in lists)]
    blocks: list[Any] = []
    for _, m in outer:  # named_modules order: encoder before decoder
        blocks.extend(m)
    return blocks


# ------------------------------------------------------------------------------------ loading
def load_trained(path: str | Path, task: str | None = None, **kwargs: Any) -> tuple[Any, Any]:
    """(model, tokenizer) for inference from a run, checkpoint, plain HF folder or any method's folder."""
    from lmwright.models.load import load_model, load_tokenizer, resolve_model_path

    p = resolve_model_path(path)
    meta = read_meta(p)
    task = task or trained_task(p)
    base = meta.get("base")
    if task in ("classification", "reward") and meta.get("num_labels") and "num_labels" not in kwargs:
        kwargs["num_labels"] = meta["num_labels"]
        if meta.get("id2label"):
            kwargs["id2label"] = {int(k): v for k, v in meta["id2label"].items()}
            kwargs["label2id"] = {v: int(k) for k, v in meta["id2label"].items()}
    if meta.get("attn_implementation") and "attn_implementation" not in kwargs:
        kwargs["attn_implementation"] = meta["attn_implementation"]
    if (p / "adapter_config.json").exists():
        from peft import PeftModel

        from lmwright.models.load import check_safetensors

        check_safetensors(p)  # peft would fall back to a pickled adapter_model.bin

        base = base or json.loads((p / "adapter_config.json").read_text())["base_model_name_or_path"]
        model = _load_base(base, task, meta.get("quantize"), meta.get("quantize_embeddings", False), **kwargs)
        model = PeftModel.from_pretrained(model, str(p), is_trainable=False)
        peft_type = getattr(model.peft_config.get("default"), "peft_type", None)
        if peft_type == "PREFIX_TUNING":
            from lmwright.methods.peft_methods import accept_past_key_values

            model = accept_past_key_values(model)
        if peft_type == "LORA":
            from lmwright.methods.peft_methods import lean_lora_layers

            model = lean_lora_layers(model)  # the forward training ran: same numbers when evaluated or served
    elif (p / "bottleneck_adapter.json").exists():
        from lmwright.methods.adapter import load_adapter

        base = base or json.loads((p / "bottleneck_adapter.json").read_text()).get("base")
        model = load_adapter(_load_base(base, task, None, **kwargs), p)
    else:
        model = load_model(p, task=task, **kwargs)
    tok_dir = next((d for d in (p, p.parent / "tokenizer", Path(base) if base else None)
                    if d is not None and (d / "tokenizer_config.json").exists()), p)
    tokenizer = load_tokenizer(tok_dir)
    model.eval()
    return model, tokenizer


def _load_base(base: str | None, task: str, quantize: str | None, quantize_embeddings: bool = False,
               **kwargs: Any) -> Any:
    from lmwright.models.load import load_model

    if not base or not Path(base).exists():
        raise ConfigError(f"the adapter's base model folder '{base}' does not exist; pass the folder the "
                          f"adapter was trained on (lmwright.json 'base')")
    if quantize:
        from lmwright.methods.peft_methods import disable_bnb_cpu_repack
        from lmwright.models.presets import ModelConfig

        attn = kwargs.pop("attn_implementation", None) or ModelConfig.attn_implementation
        model = load_model(base, task=task, model_cfg=ModelConfig(name=base, quantize=quantize, attn_implementation=attn,
                                                                  quantize_embeddings=quantize_embeddings), **kwargs)
        return disable_bnb_cpu_repack(model)
    return load_model(base, task=task, **kwargs)


def trained_task(path: str | Path) -> str:
    """The task a model folder was trained for: its ``lmwright.json`` says (an adapter folder has nothing
    else to say it), else the architecture in its ``config.json``. ``load_trained`` and ``lmwright.load``
    both ask here."""
    from lmwright.models.load import resolve_model_path

    p = resolve_model_path(path)
    return str(read_meta(p).get("task") or _guess_task(p))


def _guess_task(p: Path) -> str:
    cfg_file = p / "config.json"
    if cfg_file.exists():
        archs = json.loads(cfg_file.read_text()).get("architectures") or [""]
        return _task_from_arch(archs[0])
    return "causal-lm"

"""Method plugin contract, the registry, the compatibility table and loading of trained folders.

A method is one file in this package that registers a class in ``METHODS`` (see :class:`Method`): its
own options dataclass, what it works with (:class:`Compat`), and the hooks every other part of
lmwright asks instead of naming methods: ``apply`` turns a freshly built/loaded model into the model
the engine trains, ``save`` writes only what it trained, ``merge`` (where the maths allows) folds it
back into a plain model, ``reads``/``load`` rebuild a saved folder, ``owns``/``disable`` switch the
trained part off. Every folder a method writes also gets ``lmwright.json`` ({method, task, base, ...})
so that ``load_trained`` can rebuild the model for inference without the run's config.

The user-facing ``method:`` config section stays one flat dataclass (``method.r``, ``method.alpha``,
...): :func:`build_method_config` makes it from the union of the plugins' options (``lmwright.methods``
does, once every plugin is registered), and each plugin receives only its own keys.
"""

from __future__ import annotations

import contextlib
import dataclasses
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, ClassVar, Protocol

from lmwright.config import ConfigError, opt
from lmwright.models.attention import saved_name
from lmwright.models.introspect import (
    FAMILIES,
    TASK_CLASSES,
    model_family,
    task_of_model,
    trained_task,
    unwrap,
)
from lmwright.models.meta import read_meta, write_meta
from lmwright.registry import Registry

METHODS = Registry("method", package="lmwright.methods")

TASKS = ("causal-lm", "classification", "masked-lm", "seq2seq", "embedding", "reward")
# the heads that a task adds on top of a pretrained body; they always train (they start random)
HEAD_NAMES = ("score", "classifier", "classification_head", "qa_outputs")


# ------------------------------------------------------------------------------------ the plugin contract
@dataclass(frozen=True)
class Compat:
    """What a method works with: ``check_compat`` enforces it, docs/methods.md shows it."""

    tasks: frozenset[str]
    precision: frozenset[str]  # float dtypes and model.quantize values its base may have
    note: str  # one line for the docs table
    refused: dict[str, str] = field(default_factory=dict)  # family -> why not

    @property
    def families(self) -> frozenset[str]:
        return frozenset(FAMILIES) - set(self.refused)


FLOAT = frozenset({"float32", "bfloat16", "float16"})
KBIT = frozenset({"nf4", "fp4", "int8"})
ALL_TASKS = frozenset(TASKS)
PROMPT_TASKS = frozenset({"causal-lm", "classification", "seq2seq", "reward"})


@dataclass
class CommonOptions:
    """The keys every method section has; a plugin's ``Options`` may list ``modules_to_save`` to receive it."""

    name: str = opt("full", "fine-tuning method")  # the default method; the help lists the registered ones
    modules_to_save: list[str] = opt(  # noqa: RUF009 (opt gives lists a default_factory)
        [], "modules trained in full beside the adapter (a new task head is added automatically), e.g. [lm_head]")


@typing.runtime_checkable
class Method(Protocol):
    """A fine-tuning method. A plugin is a class with these attributes, registered with
    ``@METHODS.register(name)`` in its own module of ``lmwright.methods``; nothing else names it."""

    name: str
    Options: ClassVar[type]  # dataclass of its own keys of the flat ``method:`` section (with help); ``check()`` validates
    compat: Compat
    merges: bool  # can be folded into a plain model (else ``no_merge_reason`` says why not)
    no_merge_reason: str
    trains_all: bool  # every weight trains and final/ is a plain model (no base folder, no frozen inputs)
    virtual_tokens: bool  # feeds extra input positions (such rows cannot be packed)
    param_markers: tuple[str, ...]  # substrings of the names of the parameters it adds (not base memory)
    presets: dict[str, dict[str, str]]  # other names users know it by, e.g. qlora -> {model.quantize: nf4}
    recommended: bool  # the method "pick another method.name" hints suggest first

    def check_config(self, opts: Any, model_cfg: Any, task: str, gradient_checkpointing: bool) -> None: ...

    def check_model(self, opts: Any, meta_model: Any, task: str, where: str) -> None: ...

    def apply(self, model: Any, opts: Any, task: str) -> Any: ...

    def save(self, model: Any, out_dir: Path, base_path: str | None = None) -> None: ...

    def merge(self, model: Any) -> Any: ...

    def reads(self, folder: Path) -> int: ...  # 2: a folder this method wrote, 1: one it can load, 0: neither

    def base_of(self, folder: Path) -> str | None: ...  # the base folder its own files name

    def load(self, folder: Path, load_base: Callable[[], Any]) -> Any: ...

    def owns(self, model: Any) -> bool: ...  # the model carries this method's (switchable) trained part

    def disable(self, model: Any) -> contextlib.AbstractContextManager[Any]: ...


class PlainModelMethod:
    """Defaults of the hooks for a method whose result is a plain model folder (``full``, ``freeze``, ``qat``):
    it merges trivially, adds no parameters and no virtual tokens, and has no adapter to switch off."""

    merges = True
    no_merge_reason = ""
    trains_all = False
    virtual_tokens = False
    param_markers: tuple[str, ...] = ()
    presets: ClassVar[dict[str, dict[str, str]]] = {}
    recommended = False

    def check_config(self, opts: Any, model_cfg: Any, task: str, gradient_checkpointing: bool) -> None:
        pass

    def check_model(self, opts: Any, meta_model: Any, task: str, where: str) -> None:
        pass

    def save(self, model: Any, out_dir: Path, base_path: str | None = None) -> None:
        model.save_pretrained(str(out_dir), safe_serialization=True)

    def merge(self, model: Any) -> Any:
        return model

    def reads(self, folder: Path) -> int:
        return 0  # a plain model folder: load_trained loads it as one

    def base_of(self, folder: Path) -> str | None:
        return None

    def load(self, folder: Path, load_base: Callable[[], Any]) -> Any:
        raise ConfigError(f"{folder} is a plain model folder: load it with lmwright.methods.load_trained")

    def owns(self, model: Any) -> bool:
        return False

    def disable(self, model: Any) -> contextlib.AbstractContextManager[Any]:
        raise ConfigError(f"method.name={getattr(self, 'name', '?')} trains the model's own weights: "
                          "there is no adapter to disable")


def build_method_config(registry: Registry = METHODS) -> type:
    """The flat ``MethodConfig`` dataclass: :class:`CommonOptions` + the union of every plugin's ``Options``.

    A key several plugins declare (``dropout``, ``targets``, ...) must have one type and default; its help
    names each owner. ``check()`` runs every plugin's own ``check`` on its keys.
    """
    merged: dict[str, tuple[Any, dataclasses.Field, list[str]]] = {}
    for f in fields(CommonOptions):
        merged[f.name] = (typing.get_type_hints(CommonOptions)[f.name], f, [])
    for name, cls in registry.items():
        hints = typing.get_type_hints(cls.Options)
        for f in fields(cls.Options):
            if f.name not in merged:
                merged[f.name] = (hints[f.name], f, [])
            tp, first, owners = merged[f.name]
            if first in fields(CommonOptions):
                continue
            if tp != hints[f.name] or _default(first) != _default(f):
                raise TypeError(f"method {name}: option {f.name} ({hints[f.name]}, default {_default(f)!r}) differs from "
                                f"the one another method declares ({tp}, default {_default(first)!r})")
            owners.append((name, f.metadata.get("help", "")))
    specs = []
    for key, (tp, f, owners) in merged.items():
        helps: dict[str, list[str]] = {}
        for owner, text in owners:
            helps.setdefault(text, []).append(owner)
        text = "; ".join(f"{'/'.join(o)}: {h}" for h, o in helps.items()) if owners else f.metadata.get("help", "")
        if key == "name":
            presets = "; ".join(f"{p} = {name} + " + " + ".join(f"{k}={v}" for k, v in keys.items())
                                for name, cls in registry.items() for p, keys in cls.presets.items())
            text = f"{text}: {', '.join(registry.names())}" + (f" ({presets})" if presets else "")
        specs.append((key, tp, opt(factory=f.default_factory, help=text) if f.default is dataclasses.MISSING
                      else opt(f.default, text)))
    def check(self: Any) -> None:
        for _, plugin in registry.items():
            options_check = getattr(plugin.Options, "check", None)
            if options_check is not None:
                options_check(options_of(plugin, self))

    cls = dataclasses.make_dataclass("MethodConfig", specs, namespace={"check": check})
    cls.__module__ = "lmwright.methods"
    cls.__doc__ = "The ``method:`` section: the method's name and the options of every method (flat keys)."
    return cls


def _default(f: dataclasses.Field) -> Any:
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]


def options_of(method: Any, cfg: Any) -> Any:
    """``method``'s own options dataclass filled from the flat ``method:`` section ``cfg``."""
    return method.Options(**{f.name: getattr(cfg, f.name) for f in fields(method.Options)})


# ------------------------------------------------------------------------------------ entry points
def get_method(name: str) -> Method:
    return METHODS.get(name)()


def apply_method(model: Any, cfg: Any, task: str = "causal-lm") -> Any:
    """The trainable model for ``cfg.name``; new task heads always train."""
    m = get_method(cfg.name)
    return m.apply(model, options_of(m, cfg), task)


def trains_all(cfg: Any) -> bool:
    """Whether ``cfg.name`` trains every weight and writes a plain model (nothing to freeze, no base folder)."""
    return get_method(cfg.name).trains_all


def plain_method() -> str:
    """The method a plain model folder counts as (lmwright.json "method" of a pretrained or exported model):
    the one that trains every weight."""
    return next(name for name, cls in METHODS.items() if cls.trains_all)


def uses_virtual_tokens(cfg: Any) -> bool:
    """Whether ``cfg.name`` feeds virtual tokens before the input (its rows cannot be packed)."""
    return get_method(cfg.name).virtual_tokens


def save_trained(model: Any, cfg: Any, out_dir: str | Path, tokenizer: Any = None,
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
    meta = {"method": cfg.name, "task": task or task_of_model(model), "base": base,
            "num_labels": getattr(config, "num_labels", None),
            "quantize": _quantize_of(model), "quantize_embeddings": _embeddings_quantized(model),
            # the attention kernel it trained with: the base reloads with it (Gemma-2 has no SDPA)
            "attn_implementation": saved_name(getattr(config, "_attn_implementation", None))}
    write_meta(out, meta, config=config)  # + id2label of a classification/reward head
    return out


def mergeable_names() -> str:
    """'a, b or c': the methods that merge into a plain model (for error messages)."""
    names = [n for n, cls in METHODS.items() if cls.merges]
    return ", ".join(names[:-1]) + " or " + names[-1]


def no_merge_message(name: str) -> str:
    return (f"method.name={name} cannot be merged into the base weights ({get_method(name).no_merge_reason}); "
            f"export it as an adapter folder, or train with {mergeable_names()}")


def merge_trained(model: Any, cfg: Any) -> Any:
    """A plain transformers model with the method folded in, or ConfigError if the maths forbids it."""
    m = get_method(cfg.name)
    if not m.merges:
        raise ConfigError(no_merge_message(cfg.name))
    return m.merge(model)


def trainable_report(model: Any) -> dict[str, float]:
    from lmwright.models.load import count_parameters

    trainable, total = count_parameters(model)
    return {"trainable": trainable, "total": total, "trainable_pct": 100.0 * trainable / max(total, 1)}


def method_of_model(model: Any) -> Method | None:
    """The registered method whose switchable trained part ``model`` carries (an adapter), or None."""
    return next((m for _, cls in METHODS.items() if (m := cls()).owns(model)), None)


@contextlib.contextmanager
def disabled(model: Any) -> Iterator[Any]:
    """Run the base model under an adapter (any method that ``owns`` it): for A/B checks and reference logits."""
    m = method_of_model(model)
    if m is None:
        raise ConfigError("disabled() needs a model with an adapter method applied (one whose trained part can "
                          "be switched off)")
    with m.disable(model):
        yield model


# ------------------------------------------------------------------------------------ model helpers
def head_module_names(model: Any, task: str) -> list[str]:
    """Top-level names of the task head a classification/reward model adds (it starts random)."""
    if task not in ("classification", "reward"):
        return []
    inner = unwrap(model)
    return [n for n, _ in inner.named_children() if n in HEAD_NAMES]


def linear_module_names(model: Any) -> list[str]:
    """Distinct last-name components of the model's Linear (and GPT-2 Conv1D) layers, head excluded."""
    import torch

    names: set[str] = set()
    for full, mod in unwrap(model).named_modules():
        if isinstance(mod, torch.nn.Linear) or type(mod).__name__ == "Conv1D":
            last = full.rsplit(".", 1)[-1]
            if last not in HEAD_NAMES and last != "lm_head":
                names.add(last)
    return sorted(names)


def _quantize_of(model: Any) -> str | None:
    qc = getattr(getattr(unwrap(model), "config", None), "quantization_config", None)
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
    get = getattr(unwrap(model), "get_input_embeddings", None)
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

    inner = unwrap(model)
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
    return any(k in name for _, cls in METHODS.items() for k in cls.param_markers)


# ------------------------------------------------------------------------------------ compatibility
def compat_table() -> dict[str, dict[str, Any]]:
    """method -> {tasks, precision, merges, note, refused, families}, from the plugins' ``compat``."""
    return {name: {"tasks": cls.compat.tasks, "precision": cls.compat.precision, "merges": cls.merges,
                   "note": cls.compat.note, "refused": dict(cls.compat.refused), "families": cls.compat.families}
            for name, cls in METHODS.items()}


def compat_markdown() -> str:
    """The methods x tasks/families/precision table for the docs, generated from the registry."""
    rows = ["| method | tasks | families | precision | merges | note |", "|---|---|---|---|---|---|"]
    for name, c in compat_table().items():
        tasks = ", ".join(t for t in TASKS if t in c["tasks"])
        fams = "all" if c["families"] == frozenset(FAMILIES) else "all but " + ", ".join(sorted(c["refused"]))
        prec = ", ".join(p for p in ("float32", "bfloat16", "float16", "nf4", "fp4", "int8") if p in c["precision"])
        rows.append(f"| `{name}` | {tasks} | {fams} | {prec} | {'yes' if c['merges'] else 'no'} | {c['note']} |")
    return "\n".join(rows)


def preset_names() -> dict[str, tuple[str, dict[str, str]]]:
    """preset name (e.g. qlora) -> (its method, the other config keys it sets), from the plugins' ``presets``."""
    return {p: (name, keys) for name, cls in METHODS.items() for p, keys in cls.presets.items()}


def family_matrix_markdown(checked: dict[tuple[str, str], str] | None = None) -> str:
    """The family x method table (plus the methods' presets, e.g. qlora), with the reasons of refusals.

    ``checked`` maps (family, method) to the test that exercises the cell; supported cells without a
    test are marked as such (the table claims no more than the tests show).
    """
    checked = checked or {}
    table, presets = compat_table(), preset_names()
    methods = [*METHODS.names(), *presets]

    def refused(m: str, fam: str) -> str | None:
        return table[presets[m][0] if m in presets else m]["refused"].get(fam)

    rows = ["| family | " + " | ".join(f"`{m}`" for m in methods) + " |", "|---" * (len(methods) + 1) + "|"]
    reasons: dict[tuple[str, str], list[str]] = {}  # (method, why) -> families, in table order
    for fam in FAMILIES:
        for m in methods:
            why = refused(m, fam)
            if why is not None:
                reasons.setdefault((m, why), []).append(fam)
    keys = list(reasons)
    for fam in FAMILIES:
        cells = []
        for m in methods:
            why = refused(m, fam)
            cells.append(f"no [{keys.index((m, why)) + 1}]" if why is not None
                         else checked.get((fam, m), "yes (untested)"))
        rows.append(f"| {fam} | " + " | ".join(cells) + " |")
    notes = [f"- [{i}] `{m}` on {', '.join(reasons[(m, why)])}: {why}" for i, (m, why) in enumerate(keys, 1)]
    return "\n".join(rows + [""] + notes)


def _quantize_methods() -> str:
    return " or ".join(n for n, cls in METHODS.items() if KBIT & cls.compat.precision)


def check_compat(method_cfg: Any, model_cfg: Any, task: str, gradient_checkpointing: bool = False) -> None:
    """Fail at ``lmwright validate`` time, naming the option to change, when the combination cannot work."""
    name = method_cfg.name
    m = get_method(name)  # raises with the closest valid name
    c = m.compat
    if task not in c.tasks:
        ok = ", ".join(t for t in TASKS if t in c.tasks)
        raise ConfigError(f"method.name={name} does not support the {task} task (it supports {ok}); "
                          f"pick another method.name, e.g. {_an_alternative(task=task)}")
    opts = options_of(m, method_cfg)
    quantize = getattr(model_cfg, "quantize", "none")
    if quantize != "none":
        if quantize not in c.precision:
            raise ConfigError(f"model.quantize={quantize} needs a method that trains beside frozen quantized "
                              f"weights ({_quantize_methods()}); method.name={name} cannot. "
                              f"Set model.quantize=none or method.name={_an_alternative(precision=quantize)}")
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise ConfigError(f"model.quantize={quantize} needs bitsandbytes: pip install "
                              "'lmwright[quant]', or set model.quantize=none") from None
    m.check_config(opts, model_cfg, task, gradient_checkpointing)
    meta = _meta_model(model_cfg, task)
    if meta is None:
        return
    family = model_family(meta)
    if family in c.refused:
        raise ConfigError(f"method.name={name} does not work on the {family} model family: {c.refused[family]}; "
                          f"pick another method.name (e.g. {_an_alternative(family=family)})")
    if family not in c.families:
        raise ConfigError(f"method.name={name} is not tested on the {family} model family ({type(meta).__name__}); "
                          f"lmwright supports {', '.join(sorted(c.families))}: pick another model.name")
    attn = getattr(model_cfg, "attn_implementation", None)
    if attn == "sdpa" and not getattr(type(meta), "_supports_sdpa", True):
        raise ConfigError(f"model.attn_implementation=sdpa: {type(meta).__name__} ({family}) has no SDPA attention in "
                          f"this transformers version; set model.attn_implementation=eager")
    m.check_model(opts, meta, task, getattr(model_cfg, "name", "the model"))


def _an_alternative(task: str | None = None, precision: str | None = None, family: str | None = None) -> str:
    """A method that supports what the chosen one does not, for "pick another method" hints: a
    ``recommended`` one first, then the one with the most tasks, families and precisions."""
    def score(cls: Any) -> tuple[bool, int]:
        c = cls.compat
        return cls.recommended, len(c.families) + len(c.tasks) + len(c.precision)

    ok = [(n, cls) for n, cls in METHODS.items() if (task is None or task in cls.compat.tasks)
          and (precision is None or precision in cls.compat.precision)
          and (family is None or family not in cls.compat.refused)]
    return max(ok, key=lambda nc: score(nc[1]))[0] if ok else "another"


def _meta_model(model_cfg: Any, task: str) -> Any:
    """The architecture on the meta device (no memory, no weights) to check names and sizes; None if unknown."""
    import torch

    if model_cfg is None:
        return None
    try:
        from lmwright.models.presets import build_model

        with torch.device("meta"):
            if model_cfg.is_preset():
                extra = {"num_labels": 2} if task == "classification" else {}
                return build_model(replace(model_cfg, quantize="none"), task=task, vocab_size=64, **extra)
            import transformers as tf

            config = tf.AutoConfig.from_pretrained(str(model_cfg.name), local_files_only=True)
            return getattr(tf, TASK_CLASSES[task]).from_config(config)
    except (ConfigError, OSError, ValueError, KeyError):
        return None


def find_blocks(model: Any) -> list[Any]:
    """The transformer blocks in forward order (decoder blocks last for encoder-decoders).

    Why: freeze and adapter work on "the N-th block" across llama, gpt2, bert, t5 and bart without a
    per-architecture attribute path: the blocks are the longest ``ModuleList``s of same-class modules.
    """
    import torch

    lists = []
    for name, mod in unwrap(model).named_modules():
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
    if meta.get("attn_implementation") and "attn_implementation" not in kwargs:  # (folders saved before saved_name)
        kwargs["attn_implementation"] = saved_name(meta["attn_implementation"])
    m = folder_method(p)
    if m is not None:
        base = base or m.base_of(p)
        model = m.load(p, lambda: _load_base(base, task, meta.get("quantize"), meta.get("quantize_embeddings", False),
                                             **kwargs))
    else:
        model = load_model(p, task=task, **kwargs)
    tok_dir = next((d for d in (p, p.parent / "tokenizer", Path(base) if base else None)
                    if d is not None and (d / "tokenizer_config.json").exists()), p)
    tokenizer = load_tokenizer(tok_dir)
    model.eval()
    return model, tokenizer


def folder_method(folder: str | Path) -> Method | None:
    """The registered method that reads ``folder`` (its own files, JSON only: nothing is loaded), or None for
    a plain model folder. A folder the method wrote beats one it can merely load."""
    p = Path(folder)
    best = max(((cls().reads(p), name) for name, cls in METHODS.items()), default=(0, ""))
    return get_method(best[1]) if best[0] > 0 else None


def _load_base(base: str | None, task: str, quantize: str | None, quantize_embeddings: bool = False,
               **kwargs: Any) -> Any:
    from lmwright.models.load import load_model

    if not base or not Path(base).exists():
        raise ConfigError(f"the adapter's base model folder '{base}' does not exist; pass the folder the "
                          f"adapter was trained on (lmwright.json 'base')")
    if quantize:
        from lmwright.models.presets import ModelConfig

        attn = kwargs.pop("attn_implementation", None) or ModelConfig.attn_implementation
        model = load_model(base, task=task, model_cfg=ModelConfig(name=base, quantize=quantize, attn_implementation=attn,
                                                                  quantize_embeddings=quantize_embeddings), **kwargs)
        return model
    return load_model(base, task=task, **kwargs)

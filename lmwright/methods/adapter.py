"""``adapter``: lmwright's own bottleneck adapters (Houlsby et al. 2019, Pfeiffer et al. 2020).

peft has no bottleneck adapter and the ``adapters`` package pins transformers 4.x, so this is one
small module. Each adapter is ``x + up(dropout(act(down(x))))`` with ``up`` zero-initialised, so the
adapted model starts exactly equal to the base. It is attached as a child ``bottleneck`` of the
sub-layer whose output it adapts, and called from a forward hook on that sub-layer: the hook is a
module-level function that finds the adapter on the module, so ``deepcopy`` and ``state_dict`` work.

Placement (before each residual add): Houlsby = after self-attention and after the MLP; Pfeiffer =
after the MLP only. The adapter is non-linear, so it cannot be merged into the base weights.
Saved as ``bottleneck_adapter.safetensors`` (adapter + task-head weights) + ``bottleneck_adapter.json``.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

from lmwright.config import ConfigError, opt
from lmwright.methods.base import (
    ALL_TASKS,
    FLOAT,
    METHODS,
    Compat,
    find_blocks,
    head_module_names,
)
from lmwright.models.introspect import model_family

WEIGHTS = "bottleneck_adapter.safetensors"
CONFIG = "bottleneck_adapter.json"

# family -> (attention output module, MLP output module), relative to a block
SITES = {
    **{f: ("self_attn", "mlp") for f in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "phi3")},
    "gpt2": ("attn", "mlp"),
    "bert": ("attention.output.dense", "output.dense"),  # before BertSelfOutput/BertOutput's residual + norm
}


def _bottleneck_cls() -> type:
    import torch
    from torch import nn

    class Bottleneck(nn.Module):
        """Down-project, non-linearity, up-project (zero-init), residual."""

        def __init__(self, hidden: int, size: int, activation: str, dropout: float):
            super().__init__()
            self.down = nn.Linear(hidden, size)
            self.act = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}[activation]()
            self.dropout = nn.Dropout(dropout)
            self.up = nn.Linear(size, hidden)
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)
            self.enabled = True

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if not self.enabled:
                return x
            h = self.up(self.dropout(self.act(self.down(x.to(self.down.weight.dtype)))))
            return x + h.to(x.dtype)

    return Bottleneck


def _hook(module: Any, args: Any, output: Any) -> Any:
    adapter = module.bottleneck
    if isinstance(output, tuple):
        return (adapter(output[0]),) + output[1:]
    return adapter(output)


def insert_adapters(model: Any, size: int, placement: str = "houlsby", activation: str = "relu",
                    dropout: float = 0.0) -> list[str]:
    """Attach bottleneck adapters to every block; returns the adapted module paths."""
    family = model_family(model)
    if family not in SITES:
        raise ConfigError(f"method.name=adapter supports the {', '.join(SITES)} families, not {family}; "
                          "use method.name=lora for this model")
    attn, mlp = SITES[family]
    rel = (attn, mlp) if placement == "houlsby" else (mlp,)
    hidden = model.config.hidden_size
    cls = _bottleneck_cls()
    ref = next(model.parameters())
    sites = []
    names = {id(m): n for n, m in model.named_modules()}
    for block in find_blocks(model):
        for r in rel:
            target = block.get_submodule(r)
            if hasattr(target, "bottleneck"):
                raise ConfigError("the model already has bottleneck adapters")
            target.add_module("bottleneck", cls(hidden, size, activation, dropout).to(ref.device))
            target.register_forward_hook(_hook)
            sites.append(names[id(target)])
    return sites


@contextlib.contextmanager
def disabled(model: Any) -> Iterator[Any]:
    """Run the base model: adapters bypassed and task heads back at their initial weights (like peft)."""
    import torch

    adapters = [m for n, m in model.named_modules() if n.endswith(".bottleneck")]
    init = getattr(model, "_lmwright_head_init", {})
    params = dict(model.named_parameters())
    saved = {k: params[k].detach().clone() for k in init}

    def switch(enabled: bool, head: dict) -> None:
        for a in adapters:
            a.enabled = enabled
        with torch.no_grad():
            for k, v in head.items():
                params[k].copy_(v)

    try:
        switch(False, init)
        yield model
    finally:
        switch(True, saved)


def _saved_names(model: Any) -> list[str]:
    cfg = model.lmwright_adapter
    prefixes = tuple(h + "." for h in cfg["train_modules"])
    return [n for n, _ in model.named_parameters() if ".bottleneck." in n or n.startswith(prefixes)]


_NO_SITES = "its blocks add cross-attention, where lmwright's bottleneck adapter has no placement"


@dataclass
class AdapterOptions:
    adapter_size: int = opt(64, "bottleneck width of each adapter")
    adapter_placement: Literal["houlsby", "pfeiffer"] = opt(
        "houlsby", "houlsby = after attention and after MLP; pfeiffer = after MLP only")
    adapter_activation: Literal["relu", "gelu", "silu"] = opt("relu", "non-linearity in the bottleneck")
    dropout: float = opt(0.0, "dropout inside the bottleneck")
    modules_to_save: list[str] = opt([], "")  # noqa: RUF009 (a common key: help in CommonOptions)

    def check(self) -> None:
        if self.adapter_size < 1:
            raise ConfigError(f"method.adapter_size must be >= 1, got {self.adapter_size}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"method.dropout must be in [0, 1), got {self.dropout}")


@METHODS.register("adapter")
class Adapter:
    name = "adapter"
    Options = AdapterOptions
    compat = Compat(ALL_TASKS - {"seq2seq"}, FLOAT, "lmwright's bottleneck adapter (Houlsby/Pfeiffer)",
                    refused={"t5": _NO_SITES, "bart": _NO_SITES})
    merges = False
    no_merge_reason = "a bottleneck with a non-linearity is not a linear map, so it has no equivalent weight"
    trains_all = False
    virtual_tokens = False
    param_markers = (".bottleneck.",)
    presets: ClassVar[dict[str, dict[str, str]]] = {}
    recommended = False

    def check_config(self, opts: AdapterOptions, model_cfg: Any, task: str, gradient_checkpointing: bool) -> None:
        pass

    def check_model(self, opts: AdapterOptions, meta_model: Any, task: str, where: str) -> None:
        pass

    def reads(self, folder: Path) -> int:
        return 2 if (folder / CONFIG).exists() else 0

    def base_of(self, folder: Path) -> str | None:
        return json.loads((folder / CONFIG).read_text()).get("base")

    def load(self, folder: Path, load_base: Callable[[], Any]) -> Any:
        return load_adapter(load_base(), folder)

    def owns(self, model: Any) -> bool:
        return getattr(model, "lmwright_adapter", None) is not None

    def disable(self, model: Any) -> contextlib.AbstractContextManager[Any]:
        return disabled(model)

    def apply(self, model: Any, cfg: AdapterOptions, task: str) -> Any:
        model.requires_grad_(False)
        train_modules = sorted(set(head_module_names(model, task) + list(cfg.modules_to_save)))
        # the head's starting weights, so that disabled() reproduces the base model exactly
        model._lmwright_head_init = {n: p.detach().clone() for n, p in model.named_parameters()
                                     if n.startswith(tuple(h + "." for h in train_modules))}
        sites = insert_adapters(model, cfg.adapter_size, cfg.adapter_placement, cfg.adapter_activation,
                                cfg.dropout)
        for m in train_modules:
            model.get_submodule(m).requires_grad_(True)
        model.lmwright_adapter = {"size": cfg.adapter_size, "placement": cfg.adapter_placement,
                                      "activation": cfg.adapter_activation, "dropout": cfg.dropout,
                                      "train_modules": train_modules, "sites": sites, "task": task}
        return model

    def save(self, model: Any, out_dir: Path, base_path: str | None = None) -> None:
        from safetensors.torch import save_file

        params = dict(model.named_parameters())
        tensors = {n: params[n].detach().contiguous().cpu() for n in _saved_names(model)}
        save_file(tensors, str(out_dir / WEIGHTS), metadata={"format": "pt"})
        meta = dict(model.lmwright_adapter, base=base_path)
        (out_dir / CONFIG).write_text(json.dumps(meta, indent=2), encoding="utf-8")

    def merge(self, model: Any) -> Any:
        raise ConfigError(f"method.name={self.name} cannot be merged: {self.no_merge_reason}; export the adapter "
                          "folder instead")


def load_adapter(model: Any, folder: str | Path) -> Any:
    """Attach the adapters saved in ``folder`` to a freshly loaded base ``model``."""
    from safetensors.torch import load_file

    folder = Path(folder)
    meta = json.loads((folder / CONFIG).read_text())
    insert_adapters(model, meta["size"], meta["placement"], meta["activation"], meta["dropout"])
    state = load_file(str(folder / WEIGHTS))
    _missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected:
        raise ConfigError(f"{folder / WEIGHTS} has weights the base model lacks: {unexpected[:5]}; "
                          "is this the base the adapter was trained on?")
    model.lmwright_adapter = meta
    return model

"""``qat``: quantization-aware training with torchao (fake-quantized int8/int4 Linear weights).

During training every ``nn.Linear`` (task heads and ``lm_head`` excluded: they stay float, as in
deployment) runs with weights rounded to ``method.qat_bits`` integers per group, with a
straight-through gradient, so the float weights learn to survive quantization. ``merge`` swaps the
fake-quantized layers back to plain ``nn.Linear`` (the float weights: what ``save`` writes, a plain
HF folder); ``quantize_for_eval`` / ``convert`` produce the real quantized model (int8 or unpacked
int4 weight-only, both of which run on CPU) so a stage can report quantized accuracy beside float.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from lmwright.config import ConfigError, opt
from lmwright.methods.base import (
    ALL_TASKS,
    FLOAT,
    HEAD_NAMES,
    METHODS,
    Compat,
    PlainModelMethod,
    head_module_names,
)

REPORT = "qat.json"


def _base_config(bits: int, group_size: int) -> Any:
    import torch
    from torchao.quantization import IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerAxis, PerGroup

    if bits not in (8, 4):
        raise ConfigError(f"method.qat_bits must be 8 or 4, got {bits}")
    granularity = PerGroup(group_size) if group_size else PerAxis(0)
    # unpacked int4 (one int4 value per int8 byte): the packed Int4WeightOnlyConfig needs a CUDA kernel
    return IntxWeightOnlyConfig(weight_dtype=torch.int8 if bits == 8 else torch.int4, granularity=granularity)


def _filter(skip: list[str], group_size: int):
    import torch

    def fn(module: Any, fqn: str) -> bool:
        if not isinstance(module, torch.nn.Linear):
            return False
        if fqn.split(".")[0] in skip or fqn.rsplit(".", 1)[-1] in skip:
            return False
        return not group_size or module.in_features % group_size == 0

    return fn


def _settings(model: Any) -> dict[str, Any]:
    return getattr(model, "lmwright_qat", None) or {"bits": 8, "group_size": 32, "skip": ["lm_head", *HEAD_NAMES]}


def fake_quantized_layers(model: Any) -> int:
    from torchao.quantization.qat import FakeQuantizedLinear

    return sum(isinstance(m, FakeQuantizedLinear) for m in model.modules())


@dataclass
class QATOptions:
    qat_bits: Literal[8, 4] = opt(8, "integer bits of the fake-quantized Linear weights")
    qat_group_size: int = opt(32, "weights per quantization group (0 = one scale per output channel)")
    modules_to_save: list[str] = opt([], "")  # noqa: RUF009 (a common key: help in CommonOptions)

    def check(self) -> None:
        if self.qat_group_size < 0:
            raise ConfigError(f"method.qat_group_size must be >= 0 (0 = per channel), got {self.qat_group_size}")


@METHODS.register("qat")
class QAT(PlainModelMethod):
    name = "qat"
    Options = QATOptions
    compat = Compat(ALL_TASKS, FLOAT, "fake-quantized nn.Linear weights (int8/int4, torchao)",
                    refused={"gpt2": "its Conv1D layers are not nn.Linear, the only layers torchao fake-quantizes"})

    def check_config(self, opts: QATOptions, model_cfg: Any, task: str, gradient_checkpointing: bool) -> None:
        try:
            import torchao  # noqa: F401
        except ImportError:
            raise ConfigError(f"method.name={self.name} needs torchao: pip install 'lmwright[quant]'") from None

    def apply(self, model: Any, cfg: QATOptions, task: str) -> Any:
        from torchao.quantization import quantize_
        from torchao.quantization.qat import QATConfig

        skip = ["lm_head"] + head_module_names(model, task) + list(cfg.modules_to_save)
        model.requires_grad_(True)
        quantize_(model, QATConfig(_base_config(cfg.qat_bits, cfg.qat_group_size), step="prepare"),
                  filter_fn=_filter(skip, cfg.qat_group_size))
        n = fake_quantized_layers(model)
        if n == 0:
            raise ConfigError(f"method.name=qat found no nn.Linear to fake-quantize (GPT-2 uses Conv1D; or "
                              f"method.qat_group_size={cfg.qat_group_size} divides no layer's input size)")
        model.lmwright_qat = {"bits": cfg.qat_bits, "group_size": cfg.qat_group_size, "skip": skip, "layers": n}
        return model

    def save(self, model: Any, out_dir: Path, base_path: str | None = None) -> None:
        settings = _settings(model)
        plain = self.merge(copy.deepcopy(model))
        plain.save_pretrained(str(out_dir), safe_serialization=True)
        (out_dir / REPORT).write_text(json.dumps(settings, indent=2), encoding="utf-8")

    def merge(self, model: Any) -> Any:
        """The float model: fake-quantized layers swapped back to ``nn.Linear`` (in place)."""
        from torchao.quantization import quantize_
        from torchao.quantization.qat import FakeQuantizedLinear, QATConfig

        quantize_(model, QATConfig(step="convert"), filter_fn=lambda m, _: isinstance(m, FakeQuantizedLinear))
        return model


def convert(model: Any) -> Any:
    """The real quantized model (int weights + scales) from a QAT-prepared model (in place)."""
    from torchao.quantization import quantize_
    from torchao.quantization.qat import FakeQuantizedLinear, QATConfig

    s = _settings(model)
    quantize_(model, QATConfig(_base_config(s["bits"], s["group_size"]), step="convert"),
              filter_fn=lambda m, _: isinstance(m, FakeQuantizedLinear))
    return model


def quantize_for_eval(model: Any, bits: int | None = None, group_size: int | None = None,
                      folder: str | Path | None = None) -> Any:
    """A quantized *copy* of ``model`` for evaluation beside the float one.

    Works on a QAT-prepared model (uses its settings) and on a plain float model, e.g. one loaded
    from a qat run folder (settings from ``folder``/qat.json, else the arguments, else int8/32).
    """
    from torchao.quantization import quantize_

    q = copy.deepcopy(model)
    if getattr(q, "lmwright_qat", None) and fake_quantized_layers(q):
        return convert(q)
    s = _settings(q)
    if folder is not None and (Path(folder) / REPORT).exists():
        s = json.loads((Path(folder) / REPORT).read_text())
    bits = bits or s["bits"]
    group_size = s["group_size"] if group_size is None else group_size
    quantize_(q, _base_config(bits, group_size), filter_fn=_filter(s["skip"], group_size))
    return q

"""Linear layers whose weight is held in oneDNN's packed (blocked) layout, for serving bf16 weights on CPUs.

``F.linear`` over a plain ``(out, in)`` bf16 weight makes oneDNN read the weight in its strided layout on every
call; reordered once into oneDNN's own blocked layout (``torch.ops.mkldnn._reorder_linear_weight``, what
``torch.compile``'s CPU freezing pass does) and called through ``torch.ops.mkldnn._linear_pointwise``, the same
product runs much faster at the row counts of decoding, with bit-identical results (same bf16 inputs, fp32
accumulation). Measured on an AMD EPYC with avx512_bf16 and no AMX, 1 thread, one pass over SmolLM2-135M's
linear layers: 1 row 35.5 -> 23.4 ms, 4 rows 38.6 -> 20.1, 16 rows 53.4 -> 32.9, 64 rows 112 -> 93, 256 rows
349 -> 332.

The packed weight is an opaque mkldnn tensor, so it is kept outside the module's parameters and state dict
(serving never saves or converts a prepared model); ``weight`` gives a dense copy for code that inspects
it. Whether packing works here (a CPU build with oneDNN bf16 support) is checked once on a small product
against ``F.linear``; where it does not, layers stay plain ``nn.Linear``.

Calls of up to :data:`FEW_ROWS` rows (one decode step of 1-3 streams) go instead through lmwright's own kernel
(:mod:`lmwright.models.cpu_kernels`, AVX-512 CPUs) over a second copy of the weight in that kernel's blocked
layout: it streams the weight at memory speed where oneDNN does not (same CPU, SmolLM2-135M's linears, 1 thread:
16.0 / 17.4 / 16.1 ms at 1 / 2 / 3 rows against the packed product's 21.3 / 23.0 / 17.8; 26 vs 17 at 4). The
price is that copy: bf16 weights are held twice (4 bytes per weight, like fp32). Its sums are fp32 like oneDNN's,
in another order, so results may differ from ``F.linear`` in the last bf16 bit.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from lmwright.models import cpu_kernels

PACK_ROWS = 16  # the batch size the layout is chosen for (any row count works; decode batches are small)
FEW_ROWS = 3  # rows up to which lmwright's bf16 kernel is faster than the packed product (measured above)


def pack_weight(w: torch.Tensor) -> torch.Tensor:
    """``w`` (out, in) reordered into oneDNN's blocked layout (an mkldnn tensor)."""
    return torch.ops.mkldnn._reorder_linear_weight(w.detach().contiguous(), PACK_ROWS)


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, w, bias)`` with ``w`` given packed (:func:`pack_weight`); ``x`` of any leading shape."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


@functools.cache
def packing_works(dtype: torch.dtype = torch.bfloat16) -> bool:
    """True where packed ``dtype`` linears run on this CPU and equal ``F.linear`` on a small product."""
    try:
        if not torch.backends.mkldnn.is_available():
            return False
        if dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return False
        g = torch.Generator().manual_seed(0)
        w = torch.randn(48, 64, generator=g).to(dtype)
        x = torch.randn(3, 5, 64, generator=g).to(dtype)
        b = torch.randn(48, generator=g).to(dtype)
        y = packed_linear(x, pack_weight(w), b)
        return bool(y.shape == (3, 5, 48) and torch.allclose(y.float(), F.linear(x, w, b).float(), rtol=1e-2,
                                                                 atol=1e-2))
    except Exception:  # noqa: BLE001 - any failure means: not usable here
        return False


class PackedLinear(nn.Module):
    """``y = x @ w.T + bias`` with ``w`` packed once (see the module docstring)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, few_rows_kernel: bool = True):
        """``few_rows_kernel=False``: no blocked copy for lmwright's kernel (a caller that never sends few rows)."""
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(weight.dtype), requires_grad=False)
        self._may_pack = True  # False after unpack(): conversions keep it dense
        self._few_rows_kernel = few_rows_kernel
        self._set(weight.detach())

    def _set(self, w: torch.Tensor, pack: bool = True) -> None:
        """Hold ``w`` packed where that works (bf16 on a CPU), else dense (after a conversion, see ``_apply``);
        packed, also blocked for lmwright's few-rows kernel where that runs."""
        self.dtype = w.dtype
        self._blocked = None
        if pack and w.device.type == "cpu" and w.dtype == torch.bfloat16 and packing_works(torch.bfloat16):
            self._packed, self._dense = pack_weight(w), None
            if self._few_rows_kernel and cpu_kernels.usable(w):
                self._blocked = cpu_kernels.block_rows(w)
        else:
            self._packed, self._dense = None, w

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> PackedLinear:
        return cls(linear.weight, linear.bias)

    @property
    def weight(self) -> torch.Tensor:
        """The weight, dense (a copy where it is held packed; the forward uses the packed one)."""
        return self._packed.to_dense() if self._packed is not None else self._dense

    def unpack(self) -> bool:
        """Hold the weight dense from now on (for ``torch.compile``, whose inductor cannot lower the packed op).
        True where it was packed."""
        self._may_pack = False
        if self._packed is None:
            return False
        self._set(self.weight, pack=False)
        return True

    def _apply(self, fn, recurse: bool = True):
        """``.float()``, ``.to(...)``, ``.cuda()`` convert the weight too (packed only while bf16 on a CPU)."""
        if self._packed is None:
            self._set(fn(self._dense), pack=self._may_pack)
        elif (p := fn(torch.empty(0, dtype=self.dtype))).dtype != self.dtype or p.device.type != "cpu":
            self._set(fn(self.weight), pack=self._may_pack)  # else the weight is unchanged: it stays packed
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        kernel = f", lmwright's kernel up to {FEW_ROWS} rows" if self._blocked is not None else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"{str(self.dtype).replace('torch.', '')}{', oneDNN packed' if self._packed is not None else ''}"
                f"{kernel}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != self.dtype:
            x = x.to(self.dtype)
        if self._blocked is not None and x.numel() <= FEW_ROWS * self.in_features:
            y = cpu_kernels.matmul(x, self._blocked)
            return y if self.bias is None else y + self.bias
        if self._packed is None:
            return F.linear(x, self._dense, self.bias)
        return packed_linear(x, self._packed, self.bias)


def untie_head(model) -> None:
    """Give a head tied to the input embedding its own weight, and say so in the config (so no later
    ``tie_weights()`` ties them again)."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if emb is None or head is None or head.weight is not emb.weight:
        return
    head.weight = nn.Parameter(emb.weight.detach().clone(), requires_grad=False)
    for cfg in (getattr(model, "config", None), getattr(getattr(model, "config", None), "text_config", None)):
        if cfg is not None and hasattr(cfg, "tie_word_embeddings"):
            cfg.tie_word_embeddings = False


def pack_linears(model) -> int:
    """Replace every plain ``nn.Linear`` of a bf16 ``model`` on the CPU by a :class:`PackedLinear` (in place; a
    head tied to the input embedding is untied first). Layers inside peft adapters (their base layer and
    low-rank weights) stay as they are. Returns how many layers were packed (0 where packing does not work)."""
    params = list(model.parameters())
    if not params or params[0].device.type != "cpu" or not packing_works(torch.bfloat16):
        return 0
    # peft layers (LoRA ...) read their base layer's and their own weights in their forward: left alone
    in_peft = {id(m) for layer in model.modules() if hasattr(layer, "base_layer") for m in layer.modules()}
    targets = []
    for module in model.modules():
        for name, child in module.named_children():
            if type(child) is nn.Linear and id(child) not in in_peft and child.weight.dtype == torch.bfloat16:
                targets.append((module, name, child))
    if not targets:
        return 0
    untie_head(model)
    with torch.no_grad():
        for parent, name, _ in targets:
            child = getattr(parent, name)  # the head may have a new weight after untie_head
            setattr(parent, name, PackedLinear.from_linear(child))
    return len(targets)


def unpack_linears(model) -> int:
    """Hold every packed weight of ``model`` (:class:`PackedLinear`, int8's packed bf16 copy and blocked int8
    weight) in its plain layout again: what ``torch.compile`` needs (its CPU inductor fails to lower
    ``mkldnn._linear_pointwise``, torch 2.13, and cannot trace lmwright's own kernel). The bf16 products stay
    bit-identical. Returns how many layers changed."""
    return sum(1 for m in list(model.modules()) if callable(getattr(m, "unpack", None)) and m.unpack())

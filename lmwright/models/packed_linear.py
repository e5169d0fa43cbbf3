"""Linear layers whose weight is held in a layout made for the product, for serving bf16 weights on CPUs: lmwright's
kernel's tiles where it runs (AVX-512), else oneDNN's packed (blocked) layout.

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

Where lmwright's bf16 kernel runs (:mod:`lmwright.models.cpu_kernels`, AVX-512 CPUs), the weight is held in that
kernel's tiles instead, and every call goes through it: each weight line feeds 16 rows, so a decode step of up to 16
streams costs ~1.5x one step of one stream, and it streams the weight at memory speed at 1 row (same CPU, SmolLM2-135M's
linears, 1 thread: 1 row 18.8 vs the packed product's 25.9 ms, 16 rows 27-34 vs 37-52; from 64 rows on as fast as
it at 1 thread, 4-10% slower at 2). One layout per weight: bf16 weights are held once (2 bytes per weight). Its sums
are fp32 like oneDNN's, in another order, so results may differ from ``F.linear`` in the last bf16 bit; a row's
result does not depend on the rows it is batched with.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from lmwright.models import cpu_kernels

PACK_ROWS = 16  # the batch size the layout is chosen for (any row count works; decode batches are small)
# how each PackedLinear.layout holds the weight, in words (the module's repr and the serving weights note)
HELD = {"tiles": "held in tiles for lmwright's bf16 kernel", "onednn": "packed for oneDNN", "dense": "dense"}


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
    """``y = x @ w.T + bias`` with ``w`` held in the fastest layout here (see the module docstring): lmwright's
    kernel's tiles, else oneDNN's packed layout, else dense (``layout`` says which)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(weight.dtype), requires_grad=False)
        self._may_pack = True  # False after unpack(): conversions keep it dense
        self._set(weight.detach())

    def _set(self, w: torch.Tensor, pack: bool = True) -> None:
        """Hold ``w`` in the kernel's tiles or packed where that works (bf16 on a CPU), else dense (after a
        conversion, see ``_apply``)."""
        self.dtype = w.dtype
        self._tiled = self._packed = self._dense = None
        cpu_bf16 = pack and w.device.type == "cpu" and w.dtype == torch.bfloat16
        if cpu_bf16 and cpu_kernels.usable(w):
            self._tiled = cpu_kernels.tiles(w)
        elif cpu_bf16 and packing_works(torch.bfloat16):
            self._packed = pack_weight(w)
        else:
            self._dense = w

    @property
    def layout(self) -> str:
        """``tiles`` (lmwright's bf16 kernel), ``onednn`` (packed) or ``dense``."""
        return "tiles" if self._tiled is not None else "onednn" if self._packed is not None else "dense"

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> PackedLinear:
        return cls(linear.weight, linear.bias)

    @property
    def weight(self) -> torch.Tensor:
        """The weight, dense (a copy where it is held tiled or packed; the forward uses that layout)."""
        if self._tiled is not None:
            return cpu_kernels.untile(self._tiled, self.out_features, self.in_features)
        return self._packed.to_dense() if self._packed is not None else self._dense

    def unpack(self) -> bool:
        """Hold the weight dense from now on (for ``torch.compile``, whose inductor can lower neither the packed op
        nor lmwright's kernel). True where it was tiled or packed."""
        self._may_pack = False
        if self._dense is not None:
            return False
        self._set(self.weight, pack=False)
        return True

    def _apply(self, fn, recurse: bool = True):
        """``.float()``, ``.to(...)``, ``.cuda()`` convert the weight too (tiled or packed only while bf16 on a
        CPU)."""
        if self._dense is not None:
            self._set(fn(self._dense), pack=self._may_pack)
        elif (p := fn(torch.empty(0, dtype=self.dtype))).dtype != self.dtype or p.device.type != "cpu":
            self._set(fn(self.weight), pack=self._may_pack)  # else the weight is unchanged: it stays as it is held
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"{str(self.dtype).replace('torch.', '')}, {HELD[self.layout]}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != self.dtype:
            x = x.to(self.dtype)
        if self._tiled is not None:
            y = cpu_kernels.matmul(x, self._tiled, self.out_features)
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
    if not params or params[0].device.type != "cpu":
        return 0
    if cpu_kernels.kernels() is None and not packing_works(torch.bfloat16):
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
    bit-identical where they were oneDNN's, within the last bf16 bit where they were lmwright's kernel's. Returns how
    many layers changed."""
    return sum(1 for m in list(model.modules()) if callable(getattr(m, "unpack", None)) and m.unpack())

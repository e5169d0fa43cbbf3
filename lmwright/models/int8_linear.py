"""Weight-only int8 linear layers for serving on CPUs (``lmwright serve --weights int8``).

Each ``nn.Linear`` (the output head included) is replaced by :class:`Int8Linear`: the weight is quantized per
output channel, symmetric (``w ~= q * scale``, ``q`` int8 in -127..127, one bf16 scale per row). With torch's
kernels (CPUs without lmwright's int8 kernel, below; ``torch.compile``) activations are bf16. A batch-1 decode step
is weight-bandwidth bound, and the int8 weight is a quarter of the fp32 bytes, so calls with few rows go through
``torch._weight_int8pack_mm`` (int8 weights, bf16 activations). With many rows (prefill, large batches) that kernel
is slower than a bf16 GEMM (measured on an AMD EPYC with avx512_bf16 and no AMX, 1 thread, over SmolLM2-135M's
linear shapes: int8 19 ms vs bf16 37 ms at 1 row, equal at ~8 rows, 78 vs 56 ms at 16 rows), so those calls use a
bf16 GEMM over the dequantized copy of the same quantized weight, built once; where oneDNN can hold that copy in
its packed layout, or lmwright's bf16 kernel its tiles (:mod:`lmwright.models.packed_linear`), the bf16 product is
faster still (packed: 20 ms at 3-4 rows, 34 ms at 16), and the int8 kernel then serves only calls of 1 or 2 rows. Both paths compute with the same int8 values;
they differ only where the bf16 copy rounds ``q * scale`` (one bf16 rounding per weight) and in the order of
accumulation.

Where lmwright's own int8 kernel runs (:func:`lmwright.models.cpu_kernels.q8_matmul`: CPUs with AVX512-VNNI,
compiled once), it serves **every** call, one decode row or a whole prompt: the weight is held only in that
kernel's tiled layout (``int8_layout == "tiles"``; :meth:`Int8Linear.int8_weight` gives the plain one), with no
bf16 copy (a third of the memory the two paths above hold). It quantizes each activation row to int8 per block of 32
inputs (as llama.cpp's q8_0 does) and multiplies with ``vpdpbusd``, exact int32 sums per block. Measured on the
same CPU and shapes, 1 thread, against packed bf16 in the same run: 8.7 vs 24.6 ms at 1 row
(``_weight_int8pack_mm`` 21.0), 18.7 vs 36.1 ms at 16 rows, 208 vs 364 ms at 256 rows. Every row is computed on
its own, in the same order whatever else is in the call: a stream's answer does not depend on how many others the
server batches with it. Greedy top-1 agreement with the fp32 model (SmolLM2-135M, 940 teacher-forced answer
tokens of alpaca en + zh): 95.9% (95.5% decoding row by row) against 96.7% with torch's kernels.

The answers change slightly against the fp32 model (that is why int8 is opt-in). Embeddings stay as they
are; a head tied to the input embedding is untied first (the embedding keeps its own weight for lookups).
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from lmwright.config import ConfigError
from lmwright.models import cpu_kernels
from lmwright.models.packed_linear import PackedLinear, untie_head

# rows (tokens in the call) up to which the int8 kernel is used; above it the bf16 GEMM is faster (see above)
INT8_MAX_ROWS = 6
# the same with the bf16 weight packed (lmwright.models.packed_linear), measured on the same CPU and shapes:
# int8 19.1 / 24.3 / 26.7 / 28.2 ms vs packed bf16 21.8 / 26.3 / 20.7 / 19.9 ms at 1 / 2 / 3 / 4 rows
INT8_MAX_ROWS_PACKED = 2


def quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 (N, K), scale bf16 (N,)): symmetric per-row quantization of ``w`` (N, K) against the bf16
    scale that is stored (so ``|w - q * scale| <= scale / 2`` up to the clamp at +-127)."""
    w = w.detach().float()
    amax = w.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax)).to(torch.bfloat16)
    q = torch.round(w / scale.float()[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def dequantize_weight(q: torch.Tensor, scale: torch.Tensor, dtype=torch.bfloat16) -> torch.Tensor:
    return (q.float() * scale.float()[:, None]).to(dtype)


@functools.cache
def _check_kernel(device_type: str) -> None:
    """Fail with a clear error where this torch has no working ``_weight_int8pack_mm`` on the device."""
    fn = getattr(torch, "_weight_int8pack_mm", None)
    if fn is None:
        raise ConfigError(f"weights=int8 needs torch._weight_int8pack_mm, which torch {torch.__version__} lacks: "
                          f"upgrade torch or use weights=bfloat16 / float32")
    try:
        x = torch.ones(2, 64, dtype=torch.bfloat16, device=device_type)
        q = torch.ones(8, 64, dtype=torch.int8, device=device_type)
        s = torch.ones(8, dtype=torch.bfloat16, device=device_type)
        y = fn(x, q, s)
        if y.shape != (2, 8) or float(y[0, 0]) != 64.0:
            raise RuntimeError(f"wrong result {y[0, 0].item()} (expected 64)")
    except Exception as e:  # noqa: BLE001 - any failure means: not usable here
        raise ConfigError(f"weights=int8: torch._weight_int8pack_mm does not work on {device_type} with torch "
                          f"{torch.__version__} ({type(e).__name__}: {e}); use weights=bfloat16 or float32") from None


class Int8Linear(nn.Module):
    """``y = x @ (q * scale).T + bias`` with int8 ``q`` (see the module docstring for the paths)."""

    int8_layout = "plain"  # "tiles" while lmwright's int8 kernel serves every call

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None,
                 max_int8_rows: int = INT8_MAX_ROWS):
        super().__init__()
        self.out_features, self.in_features = q.shape
        self._requested_max_rows = max_int8_rows
        self.register_buffer("weight_scale", scale.to(torch.bfloat16).contiguous())  # (N,)
        self.register_buffer("bias", None if bias is None else bias.detach().to(torch.bfloat16).contiguous())
        self.bf16: PackedLinear | None = None
        if cpu_kernels.q8_usable(q):  # every call through lmwright's int8 kernel, its layout, no bf16 copy
            self.register_buffer("weight_int8", cpu_kernels.q8_tiles(q))
            self.int8_layout = "tiles"
            self.max_int8_rows = None  # all rows
        else:
            self.register_buffer("weight_int8", q.contiguous())  # (N, K) int8
            self._torch_paths()

    def _torch_paths(self) -> None:
        """torch's int8 kernel for few rows, a bf16 copy of the same quantized weight for many: the copy is a
        PackedLinear, packed into oneDNN's layout where that works on this CPU (faster from 3 rows on than the
        int8 kernel, so that kernel then serves only 1-2 rows), else held dense."""
        self.weight_int8 = self.int8_weight()
        self.int8_layout = "plain"
        self.bf16 = PackedLinear(dequantize_weight(self.weight_int8, self.weight_scale), self.bias)
        self.max_int8_rows = self._requested_max_rows
        if self.bf16.layout != "dense":
            self.max_int8_rows = min(self._requested_max_rows, INT8_MAX_ROWS_PACKED)

    @classmethod
    def from_linear(cls, linear: nn.Linear, max_int8_rows: int = INT8_MAX_ROWS) -> Int8Linear:
        q, scale = quantize_weight(linear.weight)
        return cls(q, scale, linear.bias, max_int8_rows)

    @property
    def bf16_layout(self) -> str | None:
        """How the many-row path's bf16 copy is held (:attr:`PackedLinear.layout`), None where there is none."""
        return None if self.bf16 is None else self.bf16.layout

    @property
    def weight(self) -> torch.Tensor:
        """The bf16 weight ``q * scale``, for code that inspects a linear layer's weight (dtype, device, shape);
        a copy where it is held packed or only as int8."""
        return self.bf16.weight if self.bf16 is not None else dequantize_weight(self.int8_weight(), self.weight_scale)

    def int8_weight(self) -> torch.Tensor:
        """The int8 weight ``q`` (out, in) in the plain layout (a copy where it is held tiled)."""
        if self.int8_layout == "tiles":
            return cpu_kernels.q8_untile(self.weight_int8, self.out_features, self.in_features)
        return self.weight_int8

    def unpack(self) -> bool:
        """Plain layouts only (torch's int8 kernel, a dense bf16 copy): for ``torch.compile``, which can trace
        neither lmwright's kernel nor oneDNN's packed op. Same int8 values. True where something changed."""
        changed = self.int8_layout == "tiles"
        if changed:
            self._torch_paths()
        return self.bf16.unpack() or changed

    def _apply(self, fn, recurse: bool = True):
        out = super()._apply(fn, recurse)
        if self.int8_layout == "tiles" and self.weight_int8.device.type != "cpu":  # the kernel is for CPUs
            self._torch_paths()
        return out

    def extra_repr(self) -> str:
        paths = ("lmwright's int8 kernel for all rows" if self.int8_layout == "tiles" else
                 f"int8 kernel up to {self.max_int8_rows} rows, the bf16 copy beyond")
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"{paths}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.bfloat16:
            x = x.to(torch.bfloat16)
        if self.int8_layout == "tiles":
            y = cpu_kernels.q8_matmul(x, self.weight_int8, self.weight_scale)
            return y if self.bias is None else y + self.bias
        rows = x.numel() // self.in_features
        if rows > self.max_int8_rows:
            return self.bf16(x)
        y = torch._weight_int8pack_mm(x.reshape(rows, self.in_features), self.weight_int8, self.weight_scale)
        y = y.view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


def quantize_int8(model, max_int8_rows: int = INT8_MAX_ROWS):
    """Replace every plain ``nn.Linear`` of ``model`` by an :class:`Int8Linear` (in place; the head too, untied
    from the embedding first) and cast the rest of the model (embeddings, norms) to bf16. A peft adapter's
    own low-rank layers (``lora_A`` ...) stay as they are: only their base layer is quantized."""
    device = next(model.parameters()).device
    _check_kernel(device.type)
    untie_head(model)
    with torch.no_grad():
        targets = []
        for module in model.modules():
            for child_name, child in module.named_children():
                if type(child) is not nn.Linear:
                    continue
                if hasattr(module, "base_layer") and child_name != "base_layer":  # peft adapter weights
                    continue
                targets.append((module, child_name, child))
        for parent, child_name, child in targets:
            setattr(parent, child_name, Int8Linear.from_linear(child, max_int8_rows))
        model.to(torch.bfloat16)
    return model

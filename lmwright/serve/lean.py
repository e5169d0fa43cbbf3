"""A lean forward for Llama-architecture decoders (Llama, Mistral, Qwen2, Qwen3: ``LEAN_MODELS``) over a
preallocated slot KV cache (the engine's fast path).

The model's own modules do the work (embedding, RMSNorms, rotary embedding, q/k/v/o projections, MLP,
LM head), so LoRA layers, biases and rope scaling apply exactly as in ``model.forward``; what is left
out is the machinery around them: cache objects, mask builders, output dataclasses, logits for every
prompt position. Decoding rows live in slots 0..B-1 of one preallocated cache per layer,
``(max_seqs, kv_heads, capacity, head_dim)``; column = position (no left padding), each row attends to
its own columns ``<= position``. Prompts are prefilled packed: several requests (or chunks of a long
prompt), and the running batch's decode tokens with them (``step``), go through the projections and MLPs
as one sequence; attention runs per segment against that request's own prefill buffer (and per decode row
against its slot), so every prompt sees exactly what it would see alone.

Used only for models whose layers are Llama's as far as this goes, with SDPA attention and no short sliding
window (``lean_supported``); every other model is served through ``model.forward`` with a ``DynamicCache``.

Decode rows attend through lmwright's CPU kernel (``lmwright.models.cpu_kernels.decode_attention``: one call per
layer instead of SDPA over a mask), and so do the prompt rows of a step, every prompt on its own buffer
(``prefill_attention``: one call per layer instead of an SDPA, a mask and two copies per prompt; a 16-prompt
burst's step on SmolLM2 in bf16: 493 -> 428 ms at 1 thread, 293 -> 257 ms at 2), where it runs: an AVX-512 CPU,
and not under ``torch.compile``, which cannot trace it. There the slot cache is in the model's dtype (bf16 keys and
values held exactly, fp32 arithmetic); with SDPA it is in the attention's dtype.
"""

from __future__ import annotations

import bisect
import functools
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from lmwright.models import cpu_kernels
from lmwright.models.attention import FP32_NAME

# The decoders whose layers are Llama's as far as this module is concerned (q/k/v/o projections, with or without
# biases, Qwen3's RMSNorm of each query and key head before the rotary, RMSNorms, a gated MLP, the model's norm and
# rotary embedding): model type -> attention class.
LEAN_MODELS = {"llama": "LlamaAttention", "mistral": "MistralAttention", "qwen2": "Qwen2Attention",
               "qwen3": "Qwen3Attention"}


def _base(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def lean_supported(model) -> bool:
    """True for a (possibly peft-wrapped) Llama, Mistral, Qwen2 or Qwen3 causal LM (``LEAN_MODELS``) using SDPA
    attention, no extras, and full attention in every layer (a sliding window shorter than the context would hide
    columns this path attends to: Mistral-7B v0.1's 4096, Qwen2 with ``use_sliding_window``)."""
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover
        return False
    base = _base(model)
    cfg = getattr(base, "config", None)
    inner = getattr(base, "model", None)
    if not isinstance(base, PreTrainedModel) or cfg is None or inner is None:
        return False
    attention = LEAN_MODELS.get(getattr(cfg, "model_type", None))
    if attention is None or getattr(cfg, "_attn_implementation", None) not in ("sdpa", FP32_NAME):
        return False
    if getattr(cfg, "pretraining_tp", 1) != 1 or not hasattr(base, "lm_head"):
        return False
    layers = getattr(inner, "layers", None)
    if not layers or any(type(layer.self_attn).__name__ != attention for layer in layers):
        return False
    context = getattr(cfg, "max_position_embeddings", None) or 0
    for layer in layers:  # Qwen2: per layer (None in its full-attention layers); Mistral: the config's
        window = getattr(layer.self_attn, "sliding_window", getattr(cfg, "sliding_window", None))
        if window is not None and window < context:
            return False
    return True


@dataclass
class Segment:
    """Prompt tokens ``ids`` at positions ``start..start+len(ids)`` of the prefill buffer ``buf``."""

    buf: list[tuple[Any, Any]]  # per layer (keys, values), each (1, kv_heads, prompt_len, head_dim)
    start: int
    ids: list[int]


def common_prefix_len(a, b) -> int:
    """How many leading tokens ``a`` and ``b`` share."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def _no_autograd(fn):
    """Run ``fn`` under no_grad where autograd is on (the engine runs in inference mode, and costs nothing then): the
    prefill buffers and the slot cache are views of one tensor each, written in place."""
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        if not torch.is_grad_enabled():
            return fn(*args, **kwargs)
        with torch.no_grad():
            return fn(*args, **kwargs)
    return wrapped


class PrefillBuffer(list):
    """A prompt's prefill buffer: the list of per-layer (keys, values), each (1, kv heads, length, head dim), all
    views of ``whole`` (layers, 2, kv heads, length, head dim), so that it is copied in one go."""

    def __init__(self, whole):
        super().__init__((whole[i, 0][None], whole[i, 1][None]) for i in range(whole.shape[0]))
        self.whole = whole


class PrefixCache:
    """The KV of finished prompts, kept so that a later prompt starting with the same tokens copies those
    columns instead of computing them again (automatic prefix caching).

    Chat prompts share long prefixes: the chat template's default system prompt (SmolLM2, Qwen2.5), a
    deployment's own system prompt, the earlier turns of a conversation that comes back with one more
    message. A prompt's key/value at position ``p`` depends only on tokens ``0..p`` (causal attention), so
    the columns of a cached prompt are exactly what a new prompt with the same first tokens would compute;
    at least the last prompt token is always run, for its logits. Entries are whole prefill buffers
    (per layer ``(1, kv_heads, prompt_len, head_dim)``, never written after the prompt finished), least
    recently used first out once ``max_bytes`` or ``max_entries`` would be exceeded; a prompt that is a prefix of a
    cached one adds nothing, one that extends a cached one replaces it (so no key is a prefix of another).

    The keys are also kept sorted: the key sharing the longest prefix with a prompt is one of the two that the prompt
    falls between (a key sharing k tokens with it lies, in sorted order, no farther from it than any key sharing
    fewer), so a lookup is a binary search and two comparisons, not one comparison per entry (256 entries of SmolLM2
    chat prompts: 0.30 -> 0.004 ms alone; ~0.85 ms per prompt beside the HTTP thread in a 16-prompt burst, ~13 ms of
    its time to first token); likewise the one cached prompt that a new one extends is the key just before it.
    """

    def __init__(self, max_bytes: int, max_entries: int = 256):
        self.max_bytes = int(max_bytes)
        self.max_entries = max_entries
        self.entries: OrderedDict[tuple[int, ...], list[tuple[Any, Any]]] = OrderedDict()
        self._sorted: list[tuple[int, ...]] = []  # the keys of ``entries``, in order
        self.bytes = 0

    @staticmethod
    def _nbytes(buf: list[tuple[Any, Any]]) -> int:
        return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in buf)

    def _drop(self, key: tuple[int, ...]) -> None:
        self.bytes -= self._nbytes(self.entries.pop(key))
        del self._sorted[bisect.bisect_left(self._sorted, key)]

    def match(self, ids: list[int]) -> tuple[list[tuple[Any, Any]] | None, int]:
        """The cached buffer sharing the longest prefix with ``ids`` and how many of its columns to reuse
        (at most ``len(ids) - 1``), or (None, 0)."""
        key = tuple(ids)
        i = bisect.bisect_left(self._sorted, key)
        best, n = None, 0
        for near in self._sorted[max(0, i - 1):i + 1]:  # the keys just before and at (or after) the prompt
            m = common_prefix_len(near, key)
            if m > n:
                best, n = near, m
        n = min(n, len(ids) - 1)
        if best is None or n < 1:
            return None, 0
        self.entries.move_to_end(best)
        return self.entries[best], n

    def add(self, ids: list[int], buf: list[tuple[Any, Any]]) -> None:
        """Keep ``buf``, the finished prefill buffer of prompt ``ids``."""
        key = tuple(ids)
        size = self._nbytes(buf)
        if size > self.max_bytes:
            return
        i = bisect.bisect_left(self._sorted, key)
        if i < len(self._sorted) and self._sorted[i][:len(key)] == key:  # already covered by this (or a longer) prompt
            self.entries.move_to_end(self._sorted[i])
            return
        if i and key[:len(self._sorted[i - 1])] == self._sorted[i - 1]:  # extends a cached prompt: it covers it
            self._drop(self._sorted[i - 1])
            i -= 1
        self.entries[key] = buf
        self._sorted.insert(i, key)
        self.bytes += size
        while self.bytes > self.max_bytes or len(self.entries) > self.max_entries:
            self._drop(next(iter(self.entries)))


class LeanLlama:
    def __init__(self, model, max_seqs: int, max_context: int):
        base = _base(model)
        self.base, self.inner = base, base.model
        cfg = base.config
        self.layers = list(self.inner.layers)
        self.heads = cfg.num_attention_heads
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads
        self.gqa = bool(self.kv_heads != self.heads)
        self.max_seqs, self.max_context = max_seqs, max_context
        w = self.inner.embed_tokens.weight
        self.dtype, self.device = w.dtype, w.device
        # a bf16 model served on a CPU attends in fp32 (``lmwright.models.attention.FP32_NAME``, set on the model so
        # that its own forward and generate() do the same); prefill buffers hold the bf16 projections' values in fp32
        self.attn_dtype = torch.float32 if cfg._attn_implementation == FP32_NAME else self.dtype
        # The slot cache holds the model's own dtype where lmwright's decode-attention kernel runs: a bf16 model's
        # keys and values are bf16 numbers, so a bf16 cache holds them exactly (half the bytes that every decode
        # step reads) and the kernel attends in fp32 on it; else (SDPA) the cache is in the attention's dtype.
        self.capacity = 0
        self.k: list = []
        self.v: list = []
        self._decode = self._decode_step
        self.cache_dtype = self.dtype
        self.grow(min(256, max_context))
        self.attn_kernel = cpu_kernels.attention_usable(self.k[0], self.heads)  # grow() keeps the layout
        if not self.attn_kernel and self.cache_dtype != self.attn_dtype:
            self._set_cache_dtype(self.attn_dtype)

    # ------------------------------------------------------------------ cache
    def grow(self, need: int) -> None:
        """Make the slot cache hold ``need`` columns (doubling, capped at the model's context). Each of keys and
        values is one tensor (layers, rows, kv heads, columns, head dim); ``self.k[i]`` / ``self.v[i]`` are its
        layers (views), so copying a row or a prompt's columns is one copy for all layers."""
        if need <= self.capacity:
            return
        cap = max(need, min(self.max_context, max(64, 2 * self.capacity)))
        shape = (len(self.layers), self.max_seqs, self.kv_heads, cap, self.head_dim)
        k = torch.zeros(shape, dtype=self.cache_dtype, device=self.device)
        v = torch.zeros(shape, dtype=self.cache_dtype, device=self.device)
        if self.capacity:
            k[:, :, :, :self.capacity] = self._k
            v[:, :, :, :self.capacity] = self._v
        self._set_cache(k, v)
        self.capacity = cap

    def _set_cache(self, k, v) -> None:
        self._k, self._v = k, v
        self.k, self.v = [k[i] for i in range(k.shape[0])], [v[i] for i in range(v.shape[0])]

    def _set_cache_dtype(self, dtype) -> None:
        """Hold the slot cache in ``dtype`` from now on (its values converted)."""
        self.cache_dtype = dtype
        self._set_cache(self._k.to(dtype), self._v.to(dtype))

    def new_buffer(self, length: int) -> PrefillBuffer:
        """A prompt's prefill buffer: per layer (keys, values) of shape (1, kv heads, ``length``, head dim), views
        of one tensor (``whole``: layers, 2, kv heads, length, head dim)."""
        whole = torch.empty((len(self.layers), 2, self.kv_heads, length, self.head_dim), dtype=self.attn_dtype,
                            device=self.device)
        return PrefillBuffer(whole)

    def copy_prefix(self, src: PrefillBuffer, dst: PrefillBuffer, n: int) -> None:
        """Copy the first ``n`` columns of prefill buffer ``src`` into ``dst`` (a cached prompt's prefix): one copy
        (60 small ones took ~2 ms per prompt for SmolLM2, 30 ms of a 16-prompt burst's time to first token)."""
        dst.whole[:, :, :, :n] = src.whole[:, :, :, :n]

    def load_row(self, row: int, buf: PrefillBuffer, length: int) -> None:
        """Copy a finished prefill buffer into decode slot ``row``."""
        self.grow(length + 1)
        self._k[:, row, :, :length] = buf.whole[:, 0, :, :length]
        self._v[:, row, :, :length] = buf.whole[:, 1, :, :length]

    def move_row(self, src: int, dst: int, length: int) -> None:
        self._k[:, dst, :, :length] = self._k[:, src, :, :length]
        self._v[:, dst, :, :length] = self._v[:, src, :, :length]

    # ------------------------------------------------------------------ forward
    def _attn_in(self, layer, x, n_tokens: int, pos):
        """Norm, q/k/v projections and rotary for ``x`` (B, T, D) -> q (B, H, T, d), k, v (B, KV, T, d), in the
        model's dtype (each attention path takes them in its own)."""
        b, t = x.shape[0], n_tokens
        a = layer.self_attn
        h = layer.input_layernorm(x)
        q = a.q_proj(h).view(b, t, -1, self.head_dim)
        k = a.k_proj(h).view(b, t, -1, self.head_dim)
        if getattr(a, "q_norm", None) is not None:  # Qwen3: each head's query and key normalized, before the rotary
            q, k = a.q_norm(q), a.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = a.v_proj(h).view(b, t, -1, self.head_dim).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, *pos)
        return q, k, v

    def _attn_out(self, layer, x, o):
        """o_proj + residual, then the MLP block + residual."""
        b, t = x.shape[0], x.shape[1]
        x = x + layer.self_attn.o_proj(o.transpose(1, 2).reshape(b, t, -1).to(self.dtype))
        return x + layer.mlp(layer.post_attention_layernorm(x))

    def _logits(self, h):
        return self.base.lm_head(self.inner.norm(h))

    def compile(self) -> None:
        """torch.compile the decode step (inductor); warm it up for batch 1 and batch >= 2 (dynamic)."""
        self.attn_kernel = False  # dynamo cannot trace lmwright's kernel: SDPA, which inductor compiles
        self._set_cache_dtype(self.attn_dtype)
        self._decode = torch.compile(self._decode_step, dynamic=True)
        self.grow(64)
        for b in (1, 2)[:self.max_seqs]:  # the scratch writes land in columns no live row attends to
            self.decode(torch.zeros(b, dtype=torch.long, device=self.device),
                        torch.zeros(b, dtype=torch.long, device=self.device), 8)

    @_no_autograd
    def decode(self, tokens, positions, ncols: int):
        """One token for each of rows 0..B-1: ``tokens`` (B,), ``positions`` (B,) -> logits (B, V)."""
        return self._decode(tokens, positions, ncols, self.k, self.v)

    def _decode_attn(self, i: int, layer, q, k, v, rows, positions, ncols: int, mask, kc: list, vc: list):
        """Decode rows: write k, v (B, KV, 1, d) at each row's position; attend q (B, H, 1, d) to its columns.
        With the kernel, q, k, v come in the model's dtype (the kernel takes them in the cache's, attends in fp32)."""
        if self.attn_kernel:
            return cpu_kernels.decode_attention(q, k, v, kc[i], vc[i], positions, layer.self_attn.scaling)
        if q.dtype != self.attn_dtype:
            q, k, v = q.to(self.attn_dtype), k.to(self.attn_dtype), v.to(self.attn_dtype)
        b = q.shape[0]
        kc[i][rows, :, positions] = k[:, :, 0]
        vc[i][rows, :, positions] = v[:, :, 0]
        return F.scaled_dot_product_attention(q, kc[i][:b, :, :ncols], vc[i][:b, :, :ncols], attn_mask=mask,
                                              scale=layer.self_attn.scaling, enable_gqa=self.gqa)

    def _decode_mask(self, positions, ncols: int):
        if self.attn_kernel:  # the kernel attends to each row's columns <= position itself
            return None
        return (torch.arange(ncols, device=self.device)[None, :] <= positions[:, None])[:, None, None, :]

    def _decode_step(self, tokens, positions, ncols: int, kc: list, vc: list):
        b = tokens.shape[0]
        x = self.inner.embed_tokens(tokens[:, None])
        rope = self.inner.rotary_emb(x, positions[:, None])
        rows = torch.arange(b, device=self.device)
        mask = self._decode_mask(positions, ncols)
        for i, layer in enumerate(self.layers):
            q, k, v = self._attn_in(layer, x, 1, rope)
            x = self._attn_out(layer, x, self._decode_attn(i, layer, q, k, v, rows, positions, ncols, mask, kc, vc))
        return self._logits(x)[:, -1]

    def _step_attn_kernel(self, i: int, layer, q, k, v, b: int, rows, prompt_pos, positions, ncols: int):
        """A mixed step's attention through lmwright's kernels: the B decode rows on their slots, the prompt rows on
        their prompts' buffers (``rows``: this layer's addresses); (1, heads, B + T, d) in the attention's dtype, a
        view of (B + T, heads, d) memory (what ``_attn_out`` reshapes without a copy)."""
        def rows_first(t, lo, hi):  # (1, heads, rows, d) -> (rows, heads, d)
            return t[0, :, lo:hi].transpose(0, 1)

        scale = layer.self_attn.scaling
        n = q.shape[2]
        pre = cpu_kernels.prefill_attention(*(rows_first(t, b, n).to(self.attn_dtype) for t in (q, k, v)), rows,
                                            prompt_pos, scale)
        if b:
            od = self._decode_attn(i, layer, *(rows_first(t, 0, b)[:, :, None] for t in (q, k, v)), None, positions,
                                   ncols, None, self.k, self.v)  # (B, heads, 1, d)
            pre = torch.cat([od[:, :, 0].to(self.attn_dtype), pre])
        return pre[None].transpose(1, 2)

    def prefill(self, segments: list[Segment]):
        """Run the segments packed as one sequence; logits (N, V) at each segment's last token."""
        return self.step(None, None, 0, segments)[1]

    @_no_autograd
    def step(self, tokens, positions, ncols: int, segments: list[Segment]):
        """Decode rows 0..B-1 (``tokens`` may be None) and prefill ``segments`` in one pass over the weights.

        The B decode tokens and the prompt tokens go through the projections and MLPs as one sequence;
        attention is the decode step's for the first B, each segment's own for the rest.
        Returns (decode logits (B, V) or None, prefill logits (N, V) at each segment's last token).
        """
        b = 0 if tokens is None else tokens.shape[0]
        ids = [t for s in segments for t in s.ids]
        pos = [s.start + j for s in segments for j in range(len(s.ids))]
        all_ids = torch.tensor(ids, device=self.device)
        all_pos = torch.tensor(pos, device=self.device)
        if b:
            all_ids, all_pos = torch.cat([tokens, all_ids]), torch.cat([positions, all_pos])
            rows, mask = torch.arange(b, device=self.device), self._decode_mask(positions, ncols)
        x = self.inner.embed_tokens(all_ids[None])
        rope = self.inner.rotary_emb(x, all_pos[None])
        offsets, masks, o = [], [], b
        for s in segments:
            offsets.append(o)
            o += len(s.ids)
        if self.attn_kernel:  # every prompt row through one kernel call per layer, on its prompt's own buffer
            prompt_rows, layer_step = cpu_kernels.prefill_rows([s.buf.whole for s in segments],
                                                               [len(s.ids) for s in segments])
            prompt_pos = all_pos[b:]
        else:
            for s in segments:
                # a later chunk (after earlier chunks or a cached prefix): its queries see those columns and
                # themselves, causally; the same mask in every layer, made once
                n, end = len(s.ids), s.start + len(s.ids)
                masks.append(None if s.start == 0 else torch.arange(end, device=self.device)[None, :]
                             <= (s.start + torch.arange(n, device=self.device))[:, None])
        for i, layer in enumerate(self.layers):
            q, k, v = self._attn_in(layer, x, len(all_ids), rope)  # (1, heads, B + T, d)
            if self.attn_kernel:
                x = self._attn_out(layer, x, self._step_attn_kernel(i, layer, q, k, v, b, prompt_rows + i * layer_step,
                                                                    prompt_pos, positions, ncols))
                continue
            outs = []
            if b:  # the decode rows, in the decode step's (B, heads, 1, d) layout and back
                od = self._decode_attn(i, layer, q[0, :, :b].transpose(0, 1)[:, :, None],
                                       k[0, :, :b].transpose(0, 1)[:, :, None],
                                       v[0, :, :b].transpose(0, 1)[:, :, None], rows, positions, ncols, mask,
                                       self.k, self.v)
                outs.append(od[:, :, 0].transpose(0, 1)[None].to(self.attn_dtype))
            # the prompt tokens' queries, keys and values in the attention's dtype: one conversion per layer
            qa, ka, va = (t[:, :, b:].to(self.attn_dtype) for t in (q, k, v))
            for s, off, smask in zip(segments, offsets, masks):
                n, end, off = len(s.ids), s.start + len(s.ids), off - b
                kb, vb = s.buf[i]
                kb[:, :, s.start:end] = ka[:, :, off:off + n]
                vb[:, :, s.start:end] = va[:, :, off:off + n]
                outs.append(F.scaled_dot_product_attention(
                    qa[:, :, off:off + n], kb[:, :, :end], vb[:, :, :end], attn_mask=smask, is_causal=smask is None,
                    scale=layer.self_attn.scaling, enable_gqa=self.gqa))
            # one concatenation in the attention's dtype; _attn_out converts to the model's once
            x = self._attn_out(layer, x, outs[0] if len(outs) == 1 else torch.cat(outs, dim=2))
        last = torch.tensor(list(range(b)) + [off + len(s.ids) - 1 for s, off in zip(segments, offsets)],
                            device=self.device)
        logits = self._logits(x[0, last][:, None])[:, -1]
        return (logits[:b] if b else None), logits[b:]

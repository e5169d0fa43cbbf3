"""``gguf``: one ``model.gguf`` for llama.cpp (Llama-family causal LMs; f32, f16 or q8_0).

Written with the ``gguf`` package's ``GGUFWriter``; names and layout follow llama.cpp's
``convert_hf_to_gguf.py`` (``LlamaModel``): ``token_embd``, ``blk.N.attn_q`` ... ``output``, and the
q/k projection rows permuted from Hugging Face's rotate-half RoPE layout to llama.cpp's interleaved
one (``permute`` below, identical to the converter's ``LlamaModel.permute``). A tied output head is
not written: llama.cpp falls back to ``token_embd`` when ``output.weight`` is missing.

Types: ``f32`` everything; ``f16`` / ``q8_0`` quantize 2-D weights and keep 1-D norms in f32 (as the
converter does); a row length not divisible by the q8_0 block (32) falls back to f16.

RoPE: default, ``linear`` (``llama.rope.scaling.*`` keys) and Llama-3's ``llama3``, written as the
converter does: a ``rope_freqs`` tensor of per-frequency divisors (``lmwright.models.gguf_import``
reads it back into rope parameters).

Tokenizer: gpt2-style byte-level BPE (``tokenizer.ggml.model = gpt2``, tokens, merges, token types,
bos/eos/pad/unk ids, add_bos, the chat template). ``tokenizer.ggml.pre`` names llama.cpp's split for
the tokenizer's pre-tokenizer (:func:`pre_tokenizer_name`: ``gpt-2`` for plain ByteLevel, ``smollm``
for digits-one-by-one + ByteLevel, ``llama-bpe``/``qwen2``/... for a Split regex transformers knows).
Other tokenizer models and pre-tokenizers are refused up front.

Parity: every tensor is read back with ``GGUFReader``, dequantized, un-permuted and compared with the
source weight; the read-back weights are also loaded into the transformers model to compare logits
with the source. Where llama-cpp-python (``llama_cpp``) is installed, llama.cpp itself loads the file
and computes logits on the same prompts (f32 KV cache): held to the float tolerance for f32 files,
reported as information for f16/q8_0 (llama.cpp rounds the activations of those matmuls too).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lmwright.export import EXPORTERS, ExportError, Source
from lmwright.export.parity import Check, ParityReport, compare_outputs, model_output, tolerance

GGUF_FILE = "model.gguf"
ROPE_FREQS = "rope_freqs.weight"  # llama3 rope scaling: per-frequency divisors (not a transformers weight)
TYPES = ("f32", "f16", "q8_0")
# max |diff| of a read-back weight, relative to the tensor's max |w|: f16 has an 11-bit mantissa
# (rel. error <= 2^-11); q8_0 rounds to amax/127 per block of 32 (error <= half a step) with an f16 scale
WEIGHT_RTOL = {"f32": 0.0, "f16": 2.0 ** -11, "q8_0": 0.5 / 127 + 2.0 ** -11}
REQUIRED_KEYS = ("general.architecture", "general.name", "general.file_type", "llama.context_length",
                 "llama.embedding_length", "llama.block_count", "llama.feed_forward_length",
                 "llama.attention.head_count", "llama.attention.head_count_kv", "llama.rope.freq_base",
                 "llama.rope.dimension_count", "llama.attention.layer_norm_rms_epsilon", "llama.vocab_size",
                 "tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
                 "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                 "tokenizer.ggml.padding_token_id", "tokenizer.ggml.add_bos_token", "tokenizer.chat_template")

_LAYER_MAP = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight", "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight", "self_attn.o_proj.bias": "attn_output.bias",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_TOP_MAP = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
            "lm_head.weight": "output.weight"}


def gguf_name(hf_name: str) -> str | None:
    """llama.cpp's name for a transformers Llama tensor (None: not stored, e.g. rotary buffers)."""
    if hf_name in _TOP_MAP:
        return _TOP_MAP[hf_name]
    parts = hf_name.split(".")
    if len(parts) > 3 and parts[0] == "model" and parts[1] == "layers":
        rest = ".".join(parts[3:])
        if rest in _LAYER_MAP:
            return f"blk.{parts[2]}.{_LAYER_MAP[rest]}"
    return None


def hf_name(gguf_tensor: str) -> str:
    inverse = {v: k for k, v in _TOP_MAP.items()}
    if gguf_tensor in inverse:
        return inverse[gguf_tensor]
    _, n, rest = gguf_tensor.split(".", 2)
    return f"model.layers.{n}.{ {v: k for k, v in _LAYER_MAP.items()}[rest] }"


def permute(w: Any, n_head: int, n_head_kv: int | None = None) -> Any:
    """convert_hf_to_gguf.py ``LlamaModel.permute``: rotate-half row order -> interleaved pairs."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute(w: Any, n_head: int, n_head_kv: int | None = None) -> Any:
    """Inverse of :func:`permute`."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _heads(config: Any) -> tuple[int, int]:
    return config.num_attention_heads, getattr(config, "num_key_value_heads", None) or config.num_attention_heads


def _rope_theta(config: Any) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    return float(params.get("rope_theta") or getattr(config, "rope_theta", None) or 10000.0)


def _rope_scaling(config: Any) -> dict[str, Any]:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    return dict(params)


def llama3_rope_freqs(config: Any) -> Any:
    """The ``rope_freqs`` tensor (float32, head_dim/2) for llama3 rope scaling, or None for other ropes."""
    import numpy as np

    from lmwright.models.gguf_import import llama3_rope_factors

    s = _rope_scaling(config)
    if s.get("rope_type", s.get("type")) != "llama3":
        return None
    n_head, _ = _heads(config)
    dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
    return np.asarray(llama3_rope_factors(_rope_theta(config), dim, float(s.get("factor", 8.0)),
                                          float(s.get("low_freq_factor", 1.0)), float(s.get("high_freq_factor", 4.0)),
                                          int(s.get("original_max_position_embeddings", 8192))), dtype=np.float32)


def _tokenizer_json(tok_dir: Path) -> dict[str, Any]:
    f = tok_dir / "tokenizer.json"
    if not f.exists():
        raise ExportError(f"gguf export needs a fast tokenizer (tokenizer.json) in {tok_dir}")
    return json.loads(f.read_text(encoding="utf-8"))


# llama.cpp's names first where transformers knows several for one regex
_PREFERRED_PRE = ("llama-bpe", "qwen2", "tekken", "gpt-4o", "qwen35")


def pre_tokenizer_name(tj: dict[str, Any]) -> str | None:
    """llama.cpp's ``tokenizer.ggml.pre`` for a byte-level tokenizer.json, or None if it has no equivalent."""
    pre = tj.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in parts]
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits") and parts[1].get("use_regex", True):
        return "smollm"  # llama.cpp: each digit alone, then GPT-2's regex (same split as starcoder/refact)
    if (kinds == ["Split", "ByteLevel"] and not parts[1].get("use_regex", True)
            and str(parts[0].get("behavior", "")).lower() == "isolated" and not parts[0].get("invert")):
        from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

        regex = (parts[0].get("pattern") or {}).get("Regex")
        names = [n for n, r in GGUF_PRE_TOKENIZER_SPLITS.items() if r == regex]
        return next((n for n in _PREFERRED_PRE if n in names), names[0] if names else None)
    return None


def _check_tokenizer(tj: dict[str, Any], where: Path) -> None:
    model_type = (tj.get("model") or {}).get("type")
    pre = tj.get("pre_tokenizer") or {}
    if model_type != "BPE" or "ByteLevel" not in json.dumps(pre):
        raise ExportError(f"gguf export writes gpt2-style byte-level BPE tokenizers; the tokenizer in {where} is "
                          f"{model_type or 'unknown'} (pre-tokenizer {pre.get('type')}). "
                          "Train a bpe tokenizer (`lmwright data tokenizer --type bpe`) or export --format hf/onnx")
    if pre_tokenizer_name(tj) is None:
        raise ExportError(f"the byte-level tokenizer in {where} splits text with a pre-tokenizer llama.cpp has no name "
                          f"for ({json.dumps(pre)[:200]}); llama.cpp would tokenize differently. Export it with "
                          "--format hf or onnx")


def vocab_metadata(tok: Any, vocab_size: int) -> dict[str, Any]:
    """tokens (by id, padded to the model's vocab size), token types and merges from tokenizer.json."""
    import gguf

    tj = json.loads(tok.backend_tokenizer.to_str())
    vocab: dict[str, int] = dict(tj["model"]["vocab"])
    added = {a["content"]: a for a in tj.get("added_tokens", [])}
    for a in added.values():
        vocab.setdefault(a["content"], a["id"])
    by_id = {i: t for t, i in vocab.items()}
    tokens, types = [], []
    for i in range(vocab_size):
        t = by_id.get(i)
        if t is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif t in added:
            tokens.append(t)
            types.append(gguf.TokenType.CONTROL if added[t].get("special") else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(t)
            types.append(gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"].get("merges", [])]
    return {"tokens": tokens, "types": types, "merges": merges}


def _quantize(name: str, w: Any, gtype: str) -> tuple[Any, Any]:
    """(array to write, raw GGML type or None for float arrays) for one tensor."""
    import gguf
    import numpy as np

    w = np.ascontiguousarray(w.astype(np.float32))
    if w.ndim < 2 or gtype == "f32":
        return w, None
    if gtype == "q8_0" and w.shape[-1] % 32 == 0:
        return gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0
    return w.astype(np.float16), None


def write_gguf(src: Source, path: Path, gtype: str) -> None:
    import gguf

    model, tok, cfg = src.model, src.tokenizer, src.model.config
    n_head, n_kv = _heads(cfg)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_head
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name(src.path.parent.name if src.path.name == "final" else src.path.name)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_rope_freq_base(_rope_theta(cfg))
    w.add_rope_dimension_count(head_dim)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    scaling = _rope_scaling(cfg)
    if scaling.get("rope_type", "default") == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(scaling["factor"]))
    rope_freqs = llama3_rope_freqs(cfg)
    if rope_freqs is not None:
        w.add_tensor(ROPE_FREQS, rope_freqs)
    w.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                     "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[gtype])
    if gtype == "q8_0":
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    v = vocab_metadata(tok, cfg.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre_tokenizer_name(json.loads(tok.backend_tokenizer.to_str())) or "gpt-2")
    w.add_token_list(v["tokens"])
    w.add_token_types(v["types"])
    w.add_token_merges(v["merges"])
    for setter, tid in ((w.add_bos_token_id, tok.bos_token_id), (w.add_eos_token_id, tok.eos_token_id),
                        (w.add_pad_token_id, tok.pad_token_id), (w.add_unk_token_id, tok.unk_token_id)):
        if tid is not None:
            setter(int(tid))
    bos = tok.bos_token_id
    w.add_add_bos_token(bos is not None and tok("a")["input_ids"][:1] == [bos])
    w.add_add_eos_token(False)
    from lmwright.data.chat import stop_token_ids

    eot = [i for i in stop_token_ids(tok) if i != tok.eos_token_id]
    if eot:  # <|im_end|> ends a chat turn: llama.cpp stops on end-of-turn as well as on eos
        w.add_eot_token_id(int(eot[0]))
    if tok.chat_template:
        w.add_chat_template(tok.chat_template)
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    for name, t in model.state_dict().items():
        g = gguf_name(name)
        if g is None or (tied and name == "lm_head.weight"):
            continue
        a = t.detach().float().cpu().numpy()
        if name.endswith(("q_proj.weight", "q_proj.bias")):
            a = permute(a, n_head, n_head)
        elif name.endswith(("k_proj.weight", "k_proj.bias")):
            a = permute(a, n_head, n_kv)
        data, raw = _quantize(g, a, gtype)
        w.add_tensor(g, data, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def read_gguf(path: Path) -> tuple[dict[str, Any], dict[str, tuple[Any, str]]]:
    """(metadata {key: python value}, {gguf tensor name: (float32 array in numpy layout, type name)})."""
    import gguf
    import numpy as np

    r = gguf.GGUFReader(str(path))
    meta: dict[str, Any] = {}
    for key, f in r.fields.items():
        try:
            meta[key] = f.contents()
        except Exception:  # noqa: BLE001 - an odd field type must not hide the tensors
            meta[key] = None
    tensors = {}
    for t in r.tensors:
        shape = tuple(int(d) for d in reversed(t.shape))  # GGUF lists dims innermost first
        arr = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).astype(np.float32).reshape(shape)
        tensors[t.name] = (arr, t.tensor_type.name.lower())
    return meta, tensors


@EXPORTERS.register("gguf")
class GGUFExporter:
    name = "gguf"
    suffix = ".gguf"

    def check(self, source_path: Path, meta: dict[str, Any], config: dict[str, Any], opts: dict[str, Any]) -> None:
        try:
            import gguf  # noqa: F401
        except ImportError:
            raise ExportError("gguf export needs the gguf package: pip install 'lmwright[export]'") from None
        gtype = opts.get("gguf_type", "f16")
        if gtype not in TYPES:
            raise ExportError(f"--gguf-type {gtype} is not supported; choose one of {', '.join(TYPES)}")
        mt = config.get("model_type")
        if config.get("is_encoder_decoder") or meta["task"] == "seq2seq":
            raise ExportError(f"{source_path} is an encoder-decoder ({mt}); GGUF export writes Llama-family "
                              "decoder-only causal LMs. Export it with --format hf (or onnx for encoders)")
        if mt != "llama" or meta["task"] != "causal-lm":
            raise ExportError(f"GGUF export writes Llama-family causal LMs; {source_path} is a {mt} {meta['task']} "
                              "model. Export it with --format hf or onnx")
        rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
        if rope.get("rope_type", rope.get("type", "default")) not in ("default", "linear", "llama3"):
            raise ExportError(f"GGUF export supports default, linear and llama3 RoPE; {source_path} uses "
                              f"'{rope.get('rope_type')}'. Export it with --format hf")
        base = Path(meta.get("base_dir", source_path))
        tok_dir = next((d for d in (source_path, source_path.parent / "tokenizer", base)
                        if (d / "tokenizer_config.json").exists()), source_path)
        _check_tokenizer(_tokenizer_json(tok_dir), tok_dir)

    def write(self, src: Source, out_dir: Path, opts: dict[str, Any]) -> None:
        write_gguf(src, out_dir / GGUF_FILE, opts.get("gguf_type", "f16"))

    def parity(self, src: Source, out_dir: Path, opts: dict[str, Any]) -> ParityReport:
        import numpy as np
        import torch

        gtype = opts.get("gguf_type", "f16")
        meta, tensors = read_gguf(out_dir / GGUF_FILE)
        report = ParityReport(f"gguf {gtype}")
        missing = [k for k in REQUIRED_KEYS if meta.get(k) is None]
        report.checks.append(Check("metadata keys", float(len(missing)), 0.0))
        if missing:
            report.notes.append(f"missing metadata: {', '.join(missing)}")
        cfg = src.model.config
        n_head, n_kv = _heads(cfg)
        state = {k: v.detach().float().cpu().numpy() for k, v in src.model.state_dict().items()}
        worst, worst_name, restored = 0.0, "", {}
        rope_freqs = llama3_rope_freqs(cfg)
        for g, (arr, _ttype) in tensors.items():
            if g == ROPE_FREQS:
                want = rope_freqs if rope_freqs is not None else np.zeros(0, np.float32)
                err = float(np.abs(arr - want).max()) if arr.shape == want.shape else float("inf")
                report.checks.append(Check("rope_freqs (llama3)", err, 1e-6))
                continue
            name = hf_name(g)
            if name.endswith(("q_proj.weight", "q_proj.bias")):
                arr = unpermute(arr, n_head, n_head)
            elif name.endswith(("k_proj.weight", "k_proj.bias")):
                arr = unpermute(arr, n_head, n_kv)
            want = state[name]
            rtol = WEIGHT_RTOL["f32" if want.ndim < 2 else gtype]
            err = float(np.abs(arr - want).max()) / max(float(np.abs(want).max()), 1e-12)
            if want.ndim >= 2 and err >= worst:
                worst, worst_name = err, name
            if err > rtol * 1.0001 + 1e-7:
                report.checks.append(Check(f"weight {name} (relative)", err, rtol))
            restored[name] = torch.from_numpy(arr.copy())
        expected = {gguf_name(k) for k in state if gguf_name(k) and not (cfg.tie_word_embeddings and k == "lm_head.weight")}
        expected |= {ROPE_FREQS} if rope_freqs is not None else set()
        report.checks.append(Check("tensors written", float(len(expected ^ set(tensors))), 0.0))
        report.notes.append(f"{len(tensors)} tensors read back with GGUFReader; worst relative weight error "
                            f"{worst:.3g} ({worst_name}); allowed {WEIGHT_RTOL[gtype]:.3g} for {gtype} matrices")
        # logits of the transformers model carrying the read-back weights (gate only for lossless f32)
        import copy

        clone = copy.deepcopy(src.model)
        clone.load_state_dict(restored, strict=False)
        ref = src.reference
        got = [model_output(clone.eval(), i, ref.task) for i in ref.prompt_ids]
        tol = tolerance(ref, "gguf", opts.get("atol"))
        report.checks.append(compare_outputs(ref, got, tol, name="logits (read-back weights)", gate=gtype == "f32"))
        try:
            lc = llama_cpp_logits(out_dir / GGUF_FILE, ref.prompt_ids)
        except Exception as e:  # noqa: BLE001 - llama.cpp refusing the file is the finding
            report.checks.append(Check("llama.cpp loads the file", 1.0, 0.0))
            report.notes.append(f"llama.cpp (llama-cpp-python) could not run the file: {type(e).__name__}: {e}")
        else:
            if lc is None:
                report.notes.append("llama.cpp itself not run (llama-cpp-python is not installed)")
            else:
                report.checks.append(compare_outputs(ref, lc, tol, name="logits (llama.cpp)", gate=gtype == "f32"))
            if lc is not None and gtype != "f32":  # not gated: the rounding below is llama.cpp's design
                report.notes.append("llama.cpp logits are information for f16/q8_0: they carry the weight rounding, "
                                    "and llama.cpp rounds the activations of those matmuls too")
        report.hint = "The GGUF tensors do not match the model; report this with the run folder."
        return report


def llama_cpp_logits(path: Path, prompts: list[list[int]], threads: int | None = None) -> list[Any] | None:
    """llama.cpp's logits (T, V) for each prompt, from the GGUF file itself; None without llama-cpp-python."""
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    import os

    import numpy as np

    n_ctx = max((len(p) for p in prompts), default=1) + 8
    threads = threads or max(1, min(4, os.cpu_count() or 1))
    # an f32 KV cache (type 0): llama.cpp's default f16 cache alone moves SmolLM2-135M's logits by 2.6e-2
    llm = Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, logits_all=True, n_threads=threads,
                type_k=0, type_v=0, verbose=False)
    out = []
    try:
        for ids in prompts:
            llm.reset()
            llm.eval(list(ids))
            out.append(np.array(llm.scores[: len(ids)], dtype=np.float32))
    finally:
        if hasattr(llm, "close"):
            llm.close()
    return out

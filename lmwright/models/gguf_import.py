"""GGUF files in: a ``.gguf`` file becomes a plain Hugging Face folder (safetensors, dequantized).

transformers 5.x loads GGUF files itself (``from_pretrained(folder, gguf_file=...)``, needs the
``gguf`` package): weights are dequantized, the config is rebuilt from the metadata, the tokenizer
and chat template come from ``tokenizer.*`` keys. What it leaves out, and this module adds:

- a model that can be saved: a GGUF-loaded model refuses ``save_pretrained`` while its
  quantization config is attached, so it is loaded with ``GgufConfig(dequantize=True)`` (dense
  weights for every architecture, also the ones transformers could keep packed) and the config is
  removed (``HfQuantizer.remove_quantization_config``);
- the llama.cpp pre-tokenizer: transformers rebuilds a few split regexes (llama3, qwen2, ...) but not
  the "digits one by one, then GPT-2's regex" family (``smollm``, ``starcoder``, ``refact`` ...):
  those get ``Digits(individual_digits=True)`` before ``ByteLevel``, as llama.cpp splits them;
- RoPE scaling of Llama-family files, which transformers does not rebuild: ``linear`` from
  ``<arch>.rope.scaling.*`` and Llama-3's ``llama3`` from the ``rope_freqs`` tensor (its parameters
  are recovered by fitting llama.cpp's formula; a file that fits no setting is imported with a
  warning);
- ``generation_config.json`` that stops on the chat end-of-turn token as well as on eos.

:func:`import_gguf` writes such a folder where the user says (``lmwright models import``).
:func:`cached_import` is what ``model.name=<file>.gguf`` uses everywhere else: the folder is written
once under ``<cache>/gguf/<sha256 of the file>-v<IMPORT_VERSION>/`` (``<cache>`` is
``$LMWRIGHT_CACHE``, else ``$XDG_CACHE_HOME/lmwright``, else ``~/.cache/lmwright``) and reused by every
later stage; the file's digest is remembered per (path, size, mtime) so a reuse does not rehash it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from lmwright.config import ConfigError

GGUF_MAGIC = b"GGUF"
IMPORT_FILE = "gguf_import.json"  # provenance of an imported folder: source file, digest, what was restored
IMPORT_VERSION = 1  # part of the cache key: bump when the import writes something different
# llama.cpp pre-tokenizers that split every digit on its own, then apply GPT-2's regex
# (llama-vocab.cpp: STARCODER, REFACT, COMMAND_R, SMOLLM, CODESHELL, EXAONE, MINERVA)
DIGIT_SPLIT_PRE = ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b")
_ARCH_RENAMES = {"qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe", "gpt-oss": "gpt_oss", "minimax-m2": "minimax_m2"}


def _log(msg: str) -> None:
    from lmwright.utils.logging import get_logger

    get_logger("lmwright.models").info(msg)


# ----------------------------------------------------------------------------------------- finding
def is_gguf_file(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


def find_gguf(path: Path) -> Path | None:
    """The GGUF file ``path`` names: the file itself, or the only ``*.gguf`` in a folder that is not a
    model, run or adapter folder. None: ``path`` is not about a GGUF file."""
    if path.is_file():
        if is_gguf_file(path):
            return path
        if path.suffix.lower() == ".gguf":
            raise ConfigError(f"{path} is not a GGUF file (a GGUF file starts with the bytes 'GGUF'; this one "
                              f"starts with {_head(path)!r}): re-download or re-export it")
        return None
    if not path.is_dir() or any((path / f).exists() for f in ("config.json", "run.json", "adapter_config.json")):
        return None
    files = sorted(f for f in path.glob("*.gguf") if f.is_file())
    if len(files) > 1:
        raise ConfigError(f"{path} holds {len(files)} GGUF files ({', '.join(f.name for f in files)}): name the "
                          f"one you mean, e.g. model.name={files[0]}")
    return find_gguf(files[0]) if files else None


def _head(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(8)


def read_metadata(path: Path) -> tuple[dict[str, Any], tuple[str, ...]]:
    """(metadata, tensor names) without reading tensor data; string arrays (tokens) come back as counts."""
    from transformers.integrations.gguf.reader import read_gguf_metadata

    try:
        return read_gguf_metadata(str(path))
    except Exception as e:  # noqa: BLE001 - a truncated or corrupt file fails in many ways
        raise ConfigError(f"cannot read the GGUF metadata of {path}: {type(e).__name__}: {e}. The file may be "
                          "truncated or corrupt: re-download or re-export it") from None


def supported_architectures() -> set[str]:
    """GGUF architectures this transformers can build a model from (its legacy loader and its new one)."""
    from transformers.integrations.gguf.gguf_conversion_mapping import GGUF_ARCHS
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    return (set(GGUF_SUPPORTED_ARCHITECTURES) - {"general", "tokenizer"}) | set(GGUF_ARCHS)


def check_gguf(path: Path) -> tuple[dict[str, Any], tuple[str, ...]]:
    """Fail early, before any weight is read: not a GGUF, an architecture or tokenizer transformers
    cannot build, no gguf package."""
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise ConfigError("loading a GGUF file needs the gguf package: pip install 'lmwright[export]' "
                          "(or pip install gguf)") from None
    if not path.is_file():
        raise ConfigError(f"GGUF file not found: {path}")
    if not is_gguf_file(path):
        raise ConfigError(f"{path} is not a GGUF file (it starts with {_head(path)!r}, a GGUF file with 'GGUF')")
    meta, names = read_metadata(path)
    arch = str(meta.get("general.architecture", "?"))
    supported = supported_architectures()
    if arch not in supported and _ARCH_RENAMES.get(arch, arch.replace("-", "_")) not in supported:
        import transformers

        raise ConfigError(f"{path}: transformers {transformers.__version__} cannot load GGUF architecture '{arch}' "
                          f"(it loads {', '.join(sorted(supported))}). Use the model's original Hugging Face "
                          "folder (safetensors) instead, or a newer transformers")
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_TOKENIZER_TYPES

    tok_model = meta.get("tokenizer.ggml.model")
    if tok_model is None:
        raise ConfigError(f"{path} has no tokenizer (no tokenizer.ggml.model key); lmwright needs one to train "
                          "or serve the model. Use the model's Hugging Face folder, or a GGUF that embeds it")
    if tok_model not in GGUF_TOKENIZER_TYPES:
        raise ConfigError(f"{path}: transformers cannot build a '{tok_model}' tokenizer from a GGUF file "
                          f"(it builds {', '.join(sorted(GGUF_TOKENIZER_TYPES))})")
    return meta, names


# ---------------------------------------------------------------------------------------- importing
def import_gguf(src: str | Path, out: str | Path, dtype: str = "float32", overwrite: bool = False,
                log=_log) -> dict[str, Any]:
    """Write ``src`` (a .gguf file) as a Hugging Face folder at ``out``; return a summary dict.

    The folder is written into a temporary sibling and renamed into place, so a failed import leaves
    nothing behind.
    """
    src, out = Path(src), Path(out)
    if out.exists() and not (out.is_dir() and not any(out.iterdir())) and not overwrite:
        raise ConfigError(f"output {out} already exists; pass --overwrite to replace it, or choose another --out")
    found = find_gguf(src) if src.exists() else None
    if found is None:
        raise ConfigError(f"GGUF file not found: {src}" if not src.exists() else
                          f"{src} is not a GGUF file or a folder holding one")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        summary = _convert(found, tmp, dtype, log)
        _umask_mode(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    summary["out"] = str(out)
    return summary


def _umask_mode(folder: Path) -> None:
    """mkdtemp makes 0700 folders (and some writers 0600 files): give them the user's usual modes."""
    mask = os.umask(0)
    os.umask(mask)
    folder.chmod(0o777 & ~mask)
    for f in folder.iterdir():
        if f.is_file():
            f.chmod(0o666 & ~mask)


@contextlib.contextmanager
def shared_gguf_readers():
    """Within the block, every ``gguf.GGUFReader`` of one file is parsed once and shared.

    transformers parses the whole file again for the config, the tokenizer and the weights (three times per
    import); gguf's reader is pure Python over the metadata, ~3.3 s per parse of SmolLM2's 49,152-token
    vocabulary on one CPU core (import 26 s -> 19 s with one parse). The readers are read-only memory maps, so
    sharing them changes nothing they return; they are dropped when the block ends.
    """
    import gguf

    real = gguf.GGUFReader
    cache: dict[tuple[str, str], Any] = {}

    class Shared(real):  # a subclass: isinstance checks against gguf.GGUFReader still hold
        def __new__(cls, path, mode="r"):
            key = (os.path.realpath(os.fspath(path)), mode)
            if key not in cache:
                cache[key] = super().__new__(cls)
                cache[key]._lmwright_parsed = False
            return cache[key]

        def __init__(self, path, mode="r"):
            if not self._lmwright_parsed:
                super().__init__(path, mode)
                self._lmwright_parsed = True

    gguf.GGUFReader = Shared
    try:
        yield
    finally:
        gguf.GGUFReader = real


def _convert(path: Path, out: Path, dtype: str, log, checked: tuple | None = None) -> dict[str, Any]:
    """Load ``path`` with transformers, fix what it leaves out, save into ``out``; ``checked``: check_gguf's answer."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    from lmwright.utils.logging import quiet_transformers

    meta, names = checked or check_gguf(path)
    t0 = time.time()
    arch = meta["general.architecture"]
    log(f"reading {path.name} ({path.stat().st_size / 2**20:.0f} MiB, {arch}); dequantizing to {dtype}")
    quiet_transformers()
    kw = dict(gguf_file=path.name, local_files_only=True)
    try:
        with shared_gguf_readers():
            tok = AutoTokenizer.from_pretrained(str(path.parent), **kw)
            model = AutoModelForCausalLM.from_pretrained(str(path.parent), dtype=torch.float32,
                                                         trust_remote_code=False,
                                                         quantization_config=GgufConfig(dequantize=True), **kw)
    except (ValueError, KeyError, OSError) as e:
        raise ConfigError(f"transformers {transformers.__version__} could not load {path} as a causal LM: "
                          f"{type(e).__name__}: {e}") from None
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:  # the weights are dense already; what is left is the config that blocks saving
        quantizer.remove_quantization_config(model)
    warnings: list[str] = []
    pre = fix_pre_tokenizer(tok, meta.get("tokenizer.ggml.pre"), warnings)
    if getattr(model.config, "max_position_embeddings", None):
        tok.model_max_length = int(model.config.max_position_embeddings)
    rope = restore_rope_scaling(model, path, meta, names, warnings)
    if dtype != "float32":
        model = model.to({"bfloat16": torch.bfloat16, "float16": torch.float16}[dtype])
    model.generation_config = generation_config(tok, meta)
    model.eval()
    model.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))
    dropped = drop_foreign_tokens(out, int(meta.get("tokenizer.ggml.tokens") or 0))
    if dropped:
        log(f"dropped token(s) the GGUF vocabulary does not have, added by transformers' GPT-2 defaults: {dropped}")
    for w in warnings:
        log(f"warning: {w}")
    summary = {
        "source": str(path.resolve()), "architecture": arch, "name": meta.get("general.name"),
        "model_type": model.config.model_type, "tensor_types": _tensor_types(path),
        "params": sum(p.numel() for p in model.parameters()), "layers": model.config.num_hidden_layers,
        "hidden_size": model.config.hidden_size, "vocab_size": model.config.vocab_size,
        "context_length": getattr(model.config, "max_position_embeddings", None),
        "tie_word_embeddings": bool(getattr(model.config, "tie_word_embeddings", False)),
        "rope": rope, "tokenizer": {"model": meta.get("tokenizer.ggml.model"), "pre": pre, "size": len(tok) - len(dropped),
                                    "bos": tok.bos_token, "eos": tok.eos_token, "pad": tok.pad_token,
                                    "unk": tok.unk_token, "add_bos": bool(meta.get("tokenizer.ggml.add_bos_token"))},
        "chat_template": bool(tok.chat_template), "stop_token_ids": model.generation_config.eos_token_id,
        "dtype": dtype, "warnings": warnings, "transformers": transformers.__version__,
        "import_version": IMPORT_VERSION, "seconds": round(time.time() - t0, 1),
    }
    (out / IMPORT_FILE).write_text(json.dumps(summary, indent=2, default=str), encoding="utf-8")
    return summary


def drop_foreign_tokens(folder: Path, n_tokens: int) -> list[str]:
    """Remove added tokens past the file's vocabulary from the saved tokenizer.json.

    transformers builds byte-level GGUF tokenizers as ``GPT2Tokenizer``, whose default
    ``<|endoftext|>`` is appended when the vocabulary has no such token: an id the model has no
    embedding row for. (Seen with transformers 5.24; harmless to keep once it no longer happens.)
    """
    f = folder / "tokenizer.json"
    if n_tokens <= 0 or not f.is_file():
        return []
    tj = json.loads(f.read_text(encoding="utf-8"))
    extra = [a for a in tj.get("added_tokens", []) if a["id"] >= n_tokens]
    if extra:
        tj["added_tokens"] = [a for a in tj["added_tokens"] if a["id"] < n_tokens]
        f.write_text(json.dumps(tj, ensure_ascii=False, indent=2), encoding="utf-8")
    return [a["content"] for a in extra]


def _tensor_types(path: Path) -> dict[str, int]:
    from collections import Counter

    from transformers.integrations.gguf.reader import GgufHeader

    try:
        import gguf

        names = {int(t): t.name for t in gguf.GGMLQuantizationType}
        types = GgufHeader.from_file(str(path)).ggml_types.values()
        return dict(Counter(names.get(int(t), str(t)) for t in types).most_common())
    except Exception:  # noqa: BLE001 - informative only
        return {}


def fix_pre_tokenizer(tok, pre: str | None, warnings: list[str]) -> str | None:
    """Give a byte-level tokenizer llama.cpp's split for ``tokenizer.ggml.pre`` where transformers does not."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    if pre is None or pre in GGUF_PRE_TOKENIZER_SPLITS or pre in ("default", "gpt-2", "gpt2"):
        return pre
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None and pre in DIGIT_SPLIT_PRE:
        from tokenizers import pre_tokenizers

        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)])
        return pre
    warnings.append(f"tokenizer.ggml.pre is '{pre}', a llama.cpp pre-tokenizer transformers does not rebuild: text "
                    "is split with GPT-2's regex, which may give other tokens than llama.cpp for some inputs")
    return pre


def restore_rope_scaling(model, path: Path, meta: dict[str, Any], names: tuple[str, ...],
                         warnings: list[str]) -> dict[str, Any] | None:
    """Put back the RoPE scaling a llama-family GGUF states (transformers drops it); None if it has none."""
    arch = meta.get("general.architecture")
    cfg = model.config
    current = dict(getattr(cfg, "rope_parameters", None) or {})
    theta = current.get("rope_theta") or meta.get(f"{arch}.rope.freq_base") or 10000.0
    kind = meta.get(f"{arch}.rope.scaling.type")
    factor = meta.get(f"{arch}.rope.scaling.factor")
    scaling: dict[str, Any] | None = None
    if current.get("rope_type", "default") not in ("default", None):
        return current  # transformers rebuilt it itself (e.g. gpt-oss)
    if "rope_freqs.weight" in names:
        fitted = fit_llama3_rope(_read_tensor(path, "rope_freqs.weight"), float(theta), _head_dim(cfg))
        if fitted is None:
            warnings.append("the file has Llama-3 style rope_freqs that match no llama3 rope setting lmwright "
                            "recognises: imported without RoPE scaling, so logits differ from llama.cpp's")
        else:
            scaling = {"rope_type": "llama3", **fitted}
    elif kind == "linear" and factor and float(factor) != 1.0:
        scaling = {"rope_type": "linear", "factor": float(factor)}
    elif kind not in (None, "none") and factor and float(factor) != 1.0:
        warnings.append(f"{arch}.rope.scaling.type is '{kind}' (factor {factor}), which lmwright does not restore: "
                        "imported without RoPE scaling, so long-context logits differ from llama.cpp's")
    if scaling is None:
        return None
    if arch not in ("llama", "mistral", "deci"):
        warnings.append(f"the file states {scaling['rope_type']} RoPE scaling, which lmwright restores for llama-family "
                        f"files only: imported without it, so logits differ from llama.cpp's")
        return None
    cfg.rope_parameters = {"rope_theta": float(theta), **scaling}
    _reset_rotary(model)
    return cfg.rope_parameters


def _head_dim(cfg) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def _reset_rotary(model) -> None:
    """Rebuild the rotary embedding from the updated config (its inverse frequencies are a buffer)."""
    base = getattr(model, "model", model)
    rotary = getattr(base, "rotary_emb", None)
    if rotary is not None:
        base.rotary_emb = type(rotary)(config=model.config).to(next(model.parameters()).device)


def _read_tensor(path: Path, name: str):
    import gguf
    import numpy as np

    r = gguf.GGUFReader(str(path))
    t = next(t for t in r.tensors if t.name == name)
    return gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).astype("float64").reshape(-1)


def llama3_rope_factors(theta: float, dim: int, factor: float, low: float, high: float, old_ctx: int) -> list[float]:
    """llama.cpp's ``rope_freqs`` for Llama-3 rope scaling (convert_hf_to_gguf.py, LlamaModel)."""
    out = []
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    for i in range(0, dim, 2):
        freq = 1.0 / (theta ** (i / dim))
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return out


def fit_llama3_rope(freqs, theta: float, dim: int) -> dict[str, Any] | None:
    """The llama3 rope parameters that reproduce ``freqs`` (the file's rope_freqs), or None.

    ``factor`` is the largest value; the original context and the low/high frequency factors are
    searched over the values published models use (Llama 3.1/3.2/3.3: 8192, 1, 4 with factor 8 or 32).
    """
    import numpy as np

    freqs = np.asarray(freqs, dtype=np.float64)
    if freqs.size != dim // 2 or not np.all(np.isfinite(freqs)):
        return None
    factor = float(freqs.max())
    for old_ctx in (8192, 4096, 2048, 16384, 32768, 65536, 131072):
        for low in (1.0, 0.5, 2.0, 4.0):
            for high in (4.0, 2.0, 8.0, 16.0, 32.0):
                if high <= low:
                    continue
                want = np.asarray(llama3_rope_factors(theta, dim, factor, low, high, old_ctx))
                if np.allclose(want, freqs, rtol=1e-4, atol=1e-6):
                    return {"factor": factor, "low_freq_factor": low, "high_freq_factor": high,
                            "original_max_position_embeddings": old_ctx}
    return None


def generation_config(tok, meta: dict[str, Any]):
    """bos/pad and every id that ends a turn: eos, the file's end-of-turn/end-of-generation ids, <|im_end|>."""
    from transformers import GenerationConfig

    from lmwright.data.chat import stop_token_ids

    stops = list(stop_token_ids(tok))
    extra = [meta.get("tokenizer.ggml.eos_token_id"), meta.get("tokenizer.ggml.eot_token_id")]
    eog = meta.get("tokenizer.ggml.eog_token_ids")
    extra += list(eog) if isinstance(eog, list) else []
    for i in extra:
        if isinstance(i, int) and i not in stops:
            stops.append(i)
    return GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=stops if len(stops) != 1 else stops[0],
                            pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else (stops or [None])[0])


# ------------------------------------------------------------------------------------------ caching
def cache_dir() -> Path:
    from lmwright.utils.files import cache_dir as lmwright_cache

    return lmwright_cache("gguf")


def file_digest(path: Path) -> str:
    """sha256 of the whole file, remembered per (real path, size, mtime) under the cache's index/."""
    st = path.stat()
    stat_key = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:32]
    index = cache_dir() / "index" / stat_key
    if index.is_file():
        digest = index.read_text(encoding="utf-8").strip()
        if len(digest) == 64:
            return digest
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    digest = h.hexdigest()
    index.parent.mkdir(parents=True, exist_ok=True)
    tmp = index.with_name(f".{stat_key}.{os.getpid()}")
    tmp.write_text(digest, encoding="utf-8")
    os.replace(tmp, index)
    return digest


_RESOLVED: dict[tuple[str, int, int], Path] = {}  # in-process: (path, size, mtime) -> converted folder


def cached_import(path: Path, log=_log) -> Path:
    """The Hugging Face folder converted from the GGUF file ``path``: from the cache, or converted now."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key in _RESOLVED and (_RESOLVED[key] / IMPORT_FILE).is_file():
        return _RESOLVED[key]
    target = cache_dir() / f"{file_digest(path)[:32]}-v{IMPORT_VERSION}"
    if (target / IMPORT_FILE).is_file():
        log(f"model {path}: using its Hugging Face conversion cached at {target}")
    else:
        checked = check_gguf(path)
        log(f"model {path} is a GGUF file: converting it once to a Hugging Face folder at {target} (later runs "
            "reuse it; `lmwright models import` writes one where you choose)")
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            _convert(path, tmp, "float32", log, checked)
            _umask_mode(tmp)
            try:
                os.rename(tmp, target)
            except OSError:  # another process finished the same conversion first: keep theirs
                if not (target / IMPORT_FILE).is_file():
                    raise
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    _RESOLVED[key] = target
    return target

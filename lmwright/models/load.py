"""Resolve and load local models: a run folder, a checkpoint folder, a Hugging Face folder or a GGUF file.

Nothing is ever downloaded (``local_files_only=True``). Adapter folders (peft or lmwright's own
methods) are loaded by ``lmwright.methods.load_trained``, one layer up. A ``.gguf`` file (or a folder
holding exactly one and no config.json) resolves to a Hugging Face folder converted from it once and
cached (:mod:`lmwright.models.gguf_import`), so everything that takes a folder takes a GGUF file too.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

from lmwright.config import ConfigError
from lmwright.models.introspect import TASK_CLASSES

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


def resolve_model_path(path: str | Path) -> Path:
    """A run folder -> its ``final/`` (or newest checkpoint's model); a GGUF file -> its converted
    Hugging Face folder (cached); other folders unchanged."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"model folder not found: {p}")
    gguf_dir = _gguf_folder(p)
    if gguf_dir is not None:
        return gguf_dir
    if p.is_file():
        raise ConfigError(f"{p} is a file: a model is a folder (run, checkpoint, Hugging Face or adapter) or a "
                          ".gguf file")
    if (p / "run.json").exists() and not (p / "config.json").exists():
        if (p / "final").is_dir():
            return p / "final"
        ckpts = sorted((p / "checkpoints").glob("step-*"), key=lambda c: int(c.name.split("-")[1])) \
            if (p / "checkpoints").is_dir() else []
        if ckpts:
            return ckpts[-1] / "model"
        raise ConfigError(f"run folder {p} has no final/ model and no checkpoints yet")
    if (p / "model").is_dir() and (p / "trainer_state.json").exists():  # a checkpoint folder
        return p / "model"
    return p


def _gguf_folder(p: Path) -> Path | None:
    """The converted folder if ``p`` is a GGUF file or a folder holding exactly one (else None)."""
    from lmwright.models.gguf_import import cached_import, find_gguf

    found = find_gguf(p)
    return cached_import(found) if found is not None else None


def load_tokenizer(path: str | Path):
    """A tokenizer folder, or the tokenizer embedded in a GGUF file (with its chat template)."""
    from transformers import AutoTokenizer

    p = Path(path)
    if not p.exists():
        raise ConfigError(f"tokenizer folder not found: {p}")
    if p.is_file() or not (p / "tokenizer_config.json").exists():
        p = _gguf_folder(p) or p
    try:
        return AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot load a tokenizer from {p}: {e}") from None


def read_config(path: Path) -> dict:
    f = path / "config.json"
    if not f.exists():
        raise ConfigError(f"{path} has no config.json: not a Hugging Face model folder")
    return json.loads(f.read_text(encoding="utf-8"))


def check_safetensors(path: Path) -> None:
    """A folder whose weights are pickled ``.bin`` files only: say how to convert it (pickle can run code)."""
    if any(path.glob("*.safetensors")) or any(path.glob("*.safetensors.index.json")):
        return
    pickled = sorted(f.name for pattern in ("*.bin", "*.pt", "*.pth", "*.ckpt") for f in path.glob(pattern))
    if pickled:
        how = ("`from peft import PeftModel; PeftModel.from_pretrained(BASE_MODEL, FOLDER).save_pretrained(FOLDER, "
               "safe_serialization=True)`" if (path / "adapter_config.json").exists() else
               "`from transformers import AutoModel; AutoModel.from_pretrained(FOLDER)"
               ".save_pretrained(FOLDER, safe_serialization=True)` (use the AutoModelFor... class of the task)")
        raise ConfigError(
            f"{path} holds pickled weights only ({', '.join(pickled[:3])}): lmwright loads safetensors only, "
            f"because loading a pickle can run arbitrary code. If you trust the folder, convert it once in Python: "
            f"{how}, then load it again")


# from_pretrained keywords that would load remote code or pickled weights, or reach the network:
# model.overrides are architecture settings, never loader switches
FORBIDDEN_OVERRIDES = ("trust_remote_code", "use_safetensors", "local_files_only", "from_tf", "from_flax",
                       "code_revision", "revision", "weights_only", "gguf_file", "subfolder")


def check_overrides(overrides: dict | None) -> None:
    """Refuse model.overrides keys that switch the loader's safety off (remote code, pickle, downloads)."""
    for key in overrides or {}:
        if str(key) in FORBIDDEN_OVERRIDES:
            raise ConfigError(f"model.overrides.{key} is not allowed: lmwright never runs a model's remote code "
                              "and loads safetensors weights only, from local folders. Remove it; overrides are "
                              "for architecture settings such as {num_hidden_layers: 4}")


def resolve_dtype(name: str):
    import torch

    if name == "auto":
        from lmwright.utils.hardware import preferred_dtype

        return preferred_dtype()
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def load_model(path: str | Path, task: str = "causal-lm", model_cfg=None, **extra):
    """Load a plain Hugging Face model folder for ``task`` (no remote code, safetensors only)."""
    import transformers as tf

    p = resolve_model_path(path)
    read_config(p)
    check_safetensors(p)
    auto = getattr(tf, TASK_CLASSES[task])
    kwargs = dict(extra)
    if model_cfg is not None:
        kwargs["attn_implementation"] = model_cfg.attn_implementation
        kwargs["dtype"] = resolve_dtype(model_cfg.dtype)
        if model_cfg.overrides:
            check_overrides(model_cfg.overrides)  # also here: a ModelConfig built in code skips check()
            kwargs.update(model_cfg.overrides)
        if model_cfg.quantize != "none":
            kwargs["quantization_config"] = bnb_config(model_cfg)
    check_overrides(extra)
    # set last so that nothing above can switch them off
    kwargs.update(local_files_only=True, trust_remote_code=False, use_safetensors=True)
    try:
        model = auto.from_pretrained(str(p), **kwargs)
    except (ValueError, OSError) as e:
        raise ConfigError(f"cannot load {p} as {task}: {e}") from None
    if model_cfg is not None and getattr(model_cfg, "quantize_embeddings", False):
        quantize_embeddings(model, model_cfg)
    return model


def quantize_embeddings(model, model_cfg):
    """Replace the input embedding and the output head by bitsandbytes 4-bit modules (in place).

    Why: bitsandbytes quantizes the Linear layers of the blocks only; on small models the vocabulary
    matrix is a large share of the base (llama-20m: 3.1M of 20.4M parameters), which keeps 4-bit
    loads at 0.37x fp16. The embedding's (V, h) weight and the head's (V, h) weight are quantized
    the same way (64-value blocks over the row-major data), so a tied pair shares one 4-bit tensor.
    """
    import bitsandbytes as bnb
    import torch

    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if not isinstance(emb, torch.nn.Embedding):
        raise ConfigError(f"model.quantize_embeddings: {type(emb).__name__} is not a plain embedding")
    dtype = emb.weight.dtype
    tied = head is not None and head.weight is emb.weight

    def four_bit(w):
        return bnb.nn.Params4bit(w.detach(), requires_grad=False, quant_type=model_cfg.quantize,
                                 compress_statistics=model_cfg.double_quant)._quantize("cpu").to(w.device)

    weight = four_bit(emb.weight)
    q_emb = _embedding4bit_class()(emb.num_embeddings, emb.embedding_dim, dtype=dtype, quant_type=model_cfg.quantize)
    q_emb.weight = weight
    q_emb.padding_idx = emb.padding_idx
    model.set_input_embeddings(q_emb)
    if isinstance(head, torch.nn.Linear):
        q_head = bnb.nn.Linear4bit(head.in_features, head.out_features, bias=head.bias is not None,
                                   compute_dtype=bnb_config(model_cfg).bnb_4bit_compute_dtype,
                                   quant_type=model_cfg.quantize)
        q_head.weight = weight if tied else four_bit(head.weight)
        if head.bias is not None:
            q_head.bias = head.bias
        # a CPU repack of the shared tensor for the bf16 kernel would corrupt the embedding's view of it
        q_head.support_avx512bf16_for_cpu = False
        model.set_output_embeddings(q_head)
    return model


@functools.cache
def _embedding4bit_class():
    """bitsandbytes' Embedding4bit that can be part of a state dict (peft reads the whole one to pick
    the adapter's keys); its 4-bit tensor and scales are written as Linear4bit writes them."""
    import bitsandbytes as bnb
    import torch

    class Embedding4bit(bnb.nn.Embedding4bit):
        def forward(self, input):  # noqa: A002 - nn.Embedding's name
            # bitsandbytes 0.50 dequantizes only the looked-up rows, indexing the absmax scales per row;
            # with double quantisation those scales are themselves quantized in 256-value blocks, which
            # row indexing misaligns (outputs ~0.2 off on llama-20m): dequantize the whole matrix instead
            w = bnb.functional.dequantize_4bit(self.weight.data, self.weight.quant_state)
            return torch.nn.functional.embedding(input, w, self.padding_idx).to(self.dtype)

        def _save_to_state_dict(self, destination, prefix, keep_vars):
            torch.nn.Module._save_to_state_dict(self, destination, prefix, keep_vars)
            for k, v in self.weight.quant_state.as_dict(packed=True).items():
                destination[prefix + "weight." + k] = v if keep_vars else v.detach()

    return Embedding4bit


def bnb_config(model_cfg):
    """bitsandbytes quantization config for ``model.quantize`` (nf4/fp4 4-bit or int8)."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ConfigError("model.quantize needs bitsandbytes: pip install 'lmwright[quant]'") from None
    import torch
    from transformers import BitsAndBytesConfig

    if model_cfg.quantize == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    compute = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=model_cfg.quantize,
                              bnb_4bit_use_double_quant=model_cfg.double_quant,
                              bnb_4bit_compute_dtype=compute)


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = trainable = 0
    for p in model.parameters():
        n = p.numel()
        if hasattr(p, "quant_state") or p.__class__.__name__ == "Params4bit":
            n *= 2  # packed 4-bit: two values per byte element
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total

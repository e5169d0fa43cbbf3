"""``onnx``: ``model.onnx`` + tokenizer + ``onnx_config.json``, runnable with onnxruntime.

Causal LMs are exported with an explicit KV cache: the graph takes ``input_ids``, ``attention_mask``
(past + new tokens), ``position_ids`` and ``past_key_values.{i}.key/value`` as flat inputs and
returns ``logits`` and ``present.{i}.key/value``. Why a wrapper: transformers 5 passes the cache as a
``DynamicCache`` object, which ``torch.onnx.export(dynamo=True)`` cannot take as a graph input; the
wrapper rebuilds the cache from plain tensors inside ``forward``, so the exported graph has only
tensor inputs/outputs (the layout ``optimum`` uses, which we cannot depend on: it pins
transformers 4.x). A first step passes past tensors of length 0.

Encoders and classifiers are exported as ``input_ids, attention_mask -> logits`` (or
``last_hidden_state`` for embedding models). Encoder-decoders are not supported here (export hf).
Attention is switched to the ``eager`` kernel for the export: the legacy TorchScript exporter fails
on this stack and dynamo traces eager attention cleanly (design.md, known facts).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lmwright.export import EXPORTERS, ExportError, Source
from lmwright.export.parity import GREEDY_PROMPTS, ParityReport, compare_greedy, compare_outputs, tolerance

MODEL_FILE = "model.onnx"
CONFIG_FILE = "onnx_config.json"
OPSET = 18


def kv_shape(config: Any) -> tuple[int, int, int]:
    """(layers, kv heads, head dim) of a decoder config (llama, gpt2, mistral, qwen, ...)."""
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    layers = cfg.num_hidden_layers
    heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return layers, kv, head_dim


def _kv_wrapper(model: Any) -> Any:
    import torch
    from transformers import DynamicCache

    layers = kv_shape(model.config)[0]

    class CausalLMWithFlatCache(torch.nn.Module):
        """``model`` with the KV cache as flat tensor inputs/outputs (see the module docstring)."""

        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, position_ids, *past):
            cache = DynamicCache(config=self.model.config)
            for i in range(layers):
                cache.update(past[2 * i], past[2 * i + 1], i)
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             past_key_values=cache, use_cache=True)
            flat = []
            for layer in out.past_key_values.layers:
                flat += [layer.keys, layer.values]
            return (out.logits, *flat)

    return CausalLMWithFlatCache().eval()


def _encoder_wrapper(model: Any, output: str) -> Any:
    import torch

    class EncoderOutput(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask):
            return getattr(self.model(input_ids=input_ids, attention_mask=attention_mask), output)

    return EncoderOutput().eval()


def _eager(model: Any) -> None:
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation("eager")
    else:  # pragma: no cover - older transformers
        model.config._attn_implementation = "eager"


def export_onnx(model: Any, task: str, path: Path) -> dict[str, Any]:
    """Trace ``model`` to ``path`` with dynamic batch/sequence/past axes; return the I/O description."""
    import torch
    from torch.export import Dim

    model = model.float().eval()
    _eager(model)
    batch, seq = Dim("batch"), Dim("sequence")
    if task == "causal-lm":
        layers, kv, head_dim = kv_shape(model.config)
        past_len, total = Dim("past_sequence"), Dim("total_sequence")
        names = [f"past_key_values.{i}.{k}" for i in range(layers) for k in ("key", "value")]
        b, t, p = 1, 3, 2  # sample sizes > 1 so that no axis is specialised to a constant
        args = (torch.ones(b, t, dtype=torch.long), torch.ones(b, t + p, dtype=torch.long),
                torch.arange(p, p + t).unsqueeze(0), *[torch.zeros(b, kv, p, head_dim) for _ in names])
        dyn = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: total},
               "position_ids": {0: batch, 1: seq}, "past": tuple({0: batch, 2: past_len} for _ in names)}
        inputs = ["input_ids", "attention_mask", "position_ids", *names]
        outputs = ["logits", *[n.replace("past_key_values", "present") for n in names]]
        wrapper = _kv_wrapper(model)
        desc = {"kind": "causal-lm-kv", "num_layers": layers, "num_kv_heads": kv, "head_dim": head_dim}
    else:
        output = "last_hidden_state" if task == "embedding" else "logits"
        args = (torch.ones(2, 5, dtype=torch.long), torch.ones(2, 5, dtype=torch.long))
        dyn = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}}
        inputs, outputs = ["input_ids", "attention_mask"], [output]
        wrapper = _encoder_wrapper(model, output)
        desc = {"kind": "encoder", "output": output}
    with torch.no_grad():
        program = torch.onnx.export(wrapper, args, dynamo=True, input_names=inputs, output_names=outputs,
                                    dynamic_shapes=dyn, opset_version=OPSET, verbose=False)
    program.save(str(path))
    return {**desc, "task": task, "inputs": inputs, "outputs": outputs, "opset": OPSET}


@EXPORTERS.register("onnx")
class OnnxExporter:
    name = "onnx"
    suffix = ""

    def check(self, source_path: Path, meta: dict[str, Any], config: dict[str, Any], opts: dict[str, Any]) -> None:
        for mod in ("onnx", "onnxruntime", "onnxscript"):
            try:
                __import__(mod)
            except ImportError:
                raise ExportError(f"onnx export needs {mod}: pip install 'lmwright[export]'") from None
        if meta["task"] == "seq2seq" or config.get("is_encoder_decoder"):
            raise ExportError(f"{source_path} is an encoder-decoder ({config.get('model_type')}); the onnx exporter "
                              "handles decoder-only LMs, encoders and classifiers. Export it with --format hf")
        if meta["task"] == "causal-lm" and "sliding_attention" in (config.get("layer_types") or []):
            # measured on Gemma-2/Gemma-3 (transformers 5.24, torch.onnx dynamo): the traced sliding-window
            # mask indexes past the window once a prompt is longer than it, and onnxruntime fails
            raise ExportError(f"{source_path} ({config.get('model_type')}) has sliding-window attention layers; "
                              "the onnx exporter cannot trace their cache and mask correctly. Export it with "
                              "--format hf")

    def write(self, src: Source, out_dir: Path, opts: dict[str, Any]) -> None:
        from lmwright.models.meta import LABEL_TASKS, id2label_json, write_generation_config

        desc = export_onnx(src.model, src.task, out_dir / MODEL_FILE)
        src.model.config.save_pretrained(str(out_dir))
        src.tokenizer.save_pretrained(str(out_dir))
        if src.task == "causal-lm":
            write_generation_config(src.tokenizer, out_dir, src.path)  # the same as the hf exporter's
        if src.task in LABEL_TASKS:
            desc["id2label"] = id2label_json(src.model.config)
        (out_dir / CONFIG_FILE).write_text(json.dumps(desc, indent=2), encoding="utf-8")

    def parity(self, src: Source, out_dir: Path, opts: dict[str, Any]) -> ParityReport:
        from lmwright.export.onnx_runtime import OnnxGenerator, OnnxModel

        ref = src.reference
        tol = tolerance(ref, "onnx", opts.get("atol"))
        if src.task == "causal-lm":
            gen = OnnxGenerator(out_dir)
            got = [gen.forward(ids) for ids in ref.prompt_ids]
            report = ParityReport("onnx", [compare_outputs(ref, got, tol)])
            runs = [gen.greedy_with_logits(p, len(ref.greedy[0][0])) for p in ref.prompt_ids[:GREEDY_PROMPTS]]
            report.checks.append(compare_greedy(ref, runs, tol))
        else:
            m = OnnxModel(out_dir)
            report = ParityReport("onnx", [compare_outputs(ref, [m.run(ids) for ids in ref.prompt_ids], tol)])
        report.notes.append(f"onnxruntime CPU, {len(ref.prompt_ids)} prompts; source precision {ref.precision}")
        report.hint = "The ONNX graph differs from the model; try a newer torch/onnxscript or export --format hf."
        return report

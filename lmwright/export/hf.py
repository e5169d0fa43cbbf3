"""``hf``: a plain Hugging Face folder (config, safetensors, tokenizer, generation_config).

Adapters are merged first (``lmwright.export.source.merge_model``), so the folder loads with
``AutoModelFor*.from_pretrained`` alone, without peft or lmwright. The generation config carries
the stop ids of the chat template (``<|im_end|>`` and eos) and the pad id, so ``generate`` on the
exported folder stops where the model was trained to stop.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lmwright.export import EXPORTERS, ExportError, Source
from lmwright.export.parity import ParityReport, torch_parity
from lmwright.models.meta import GENERATION_FILE, write_meta


def write_hf_folder(src: Source, out_dir: Path) -> None:
    """Model (safetensors), tokenizer with its chat template, generation config and lmwright.json."""
    from lmwright.utils.logging import quiet_transformers

    quiet_transformers()
    model, tok = src.model, src.tokenizer
    cfg = model.config
    if getattr(cfg, "pad_token_id", None) is None and tok.pad_token_id is not None:
        cfg.pad_token_id = tok.pad_token_id
    if getattr(cfg, "quantization_config", None) is not None:  # merged onto dequantized weights
        del cfg.quantization_config
    model.save_pretrained(str(out_dir), safe_serialization=True)
    tok.save_pretrained(str(out_dir))
    from lmwright.methods import plain_method

    # a causal LM keeps the run's sampling defaults; eos covers the chat stop tokens, pad is set
    write_meta(out_dir, {"task": src.task, "method": plain_method(), "base": None, "exported_from": str(src.path),
                         "merged_from": src.merged_from}, config=cfg, tokenizer=tok, generation_from=src.path)


def check_tokenizer(src: Source, out_dir: Path, report: ParityReport) -> None:
    """The exported tokenizer must encode the parity prompts (chat template included) identically."""
    from lmwright.export.parity import Check, parity_prompt_ids
    from lmwright.models.load import load_tokenizer

    tok = load_tokenizer(out_dir)
    same = parity_prompt_ids(tok) == parity_prompt_ids(src.tokenizer)
    report.checks.append(Check("tokenizer round-trip", 0.0 if same else 1.0, 0.0))


@EXPORTERS.register("hf")
class HFExporter:
    name = "hf"
    suffix = ""

    def check(self, source_path: Path, meta: dict[str, Any], config: dict[str, Any], opts: dict[str, Any]) -> None:
        if meta["task"] not in ("causal-lm", "masked-lm", "seq2seq", "classification", "reward", "embedding"):
            raise ExportError(f"hf export does not know task '{meta['task']}' (from {source_path}/lmwright.json)")

    def write(self, src: Source, out_dir: Path, opts: dict[str, Any]) -> None:
        write_hf_folder(src, out_dir)

    def parity(self, src: Source, out_dir: Path, opts: dict[str, Any]) -> ParityReport:
        from lmwright.models.load import load_model

        model = load_model(out_dir, task=src.task).eval()
        report = torch_parity(src, model, "hf", opts.get("atol"))
        check_tokenizer(src, out_dir, report)
        gc_file = out_dir / GENERATION_FILE
        if src.task == "causal-lm":
            eos = json.loads(gc_file.read_text()).get("eos_token_id")
            report.notes.append(f"generation_config eos_token_id={eos} pad_token_id={src.tokenizer.pad_token_id}")
        report.hint = "The merged weights differ from the adapter model: report this with the run folder."
        return report

"""Parity: does the exported artefact compute what the source model computes?

Run automatically after every export (``lmwright.export.export``) and printed. The reference is
taken from the *source* model before any adapter is merged, on a few fixed prompts (plain text and,
where the tokenizer has one, a chat-template prompt):

- ``logits``: the main output per prompt (LM logits, class logits, or hidden states for embedding
  models), compared as max |diff| with a tolerance scaled by the output's magnitude
  (``tol = atol * max(1, max|ref|)``: logits of a trained model are O(10), where a fixed 1e-4 would
  test float rounding of the magnitude rather than the export), plus argmax agreement;
- ``greedy``: for causal LMs, a few greedy steps decoded by the artefact's own loop (the ONNX KV
  cache loop) against the source's per-step logits and tokens;
- ``weights`` (GGUF): every tensor read back with ``gguf.GGUFReader``, dequantized and mapped back to
  the transformers name/layout, against the source weight, with the tolerance of its storage type.

A failed check fails the export; the report says by how much and what to do.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

PROMPTS = ("Once upon a time there was a little robot who", "The capital of France is", "1, 2, 3, 4, 5,")
CHAT = [{"role": "user", "content": "Tell me a short story about a cat."}]
MAX_PROMPT_TOKENS = 32
GREEDY_STEPS = 6
GREEDY_PROMPTS = 2

# absolute tolerance (before magnitude scaling) per artefact and source precision
ATOL = {"hf": 1e-4, "onnx": 1e-3, "gguf": 1e-4}
ATOL_LOW_PRECISION = 5e-2  # bf16/fp16 sources: rounding of the merge alone is ~1e-2
ATOL_QUANTIZED = 1e-2  # bitsandbytes bases: reference computed on quantized weights, artefact dequantized


@dataclass
class Check:
    name: str
    max_abs_diff: float
    tol: float
    agreement: float | None = None  # share of argmax (or greedy token) matches, when it applies
    gate: bool = True  # False: reported, never fails the export (e.g. logits of a q8_0 GGUF)

    @property
    def ok(self) -> bool:
        return not self.gate or self.max_abs_diff <= self.tol

    def line(self) -> str:
        agree = f", argmax agreement {self.agreement:.0%}" if self.agreement is not None else ""
        mark = "ok" if self.max_abs_diff <= self.tol else ("FAIL" if self.gate else "info")
        return f"  {self.name:<28} max|diff| {self.max_abs_diff:.3g} (tol {self.tol:.3g}){agree}  {mark}"


@dataclass
class ParityReport:
    format: str
    checks: list[Check] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    hint: str = ""

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(c.ok for c in self.checks)

    @property
    def failure(self) -> str:
        bad = [c for c in self.checks if not c.ok]
        if not self.checks:
            return "no parity check ran"
        return "; ".join(f"{c.name} max|diff| {c.max_abs_diff:.3g} > tol {c.tol:.3g}" for c in bad)

    def summary(self) -> str:
        head = f"parity [{self.format}]: {'PASSED' if self.ok else 'FAILED'}"
        return "\n".join([head, *(c.line() for c in self.checks), *(f"  note: {n}" for n in self.notes)])

    def to_dict(self) -> dict[str, Any]:
        return {"format": self.format, "ok": self.ok, "notes": self.notes,
                "checks": [{"name": c.name, "max_abs_diff": c.max_abs_diff, "tol": c.tol,
                            "agreement": c.agreement, "gate": c.gate} for c in self.checks]}


@dataclass
class Reference:
    """Source outputs on the parity prompts (numpy, float32), taken before merging."""

    task: str
    prompt_ids: list[list[int]]
    outputs: list[Any]  # per prompt: (T, V) logits, (num_labels,) class logits or (T, H) hidden states
    greedy: list[tuple[list[int], Any]]  # causal LMs: (new token ids, (steps, V) logits) per prompt
    decoder_start: int | None = None
    scale: float = 1.0  # max |output| over prompts, for the tolerance
    precision: str = "float32"  # float32 | low | quantized


def parity_prompt_ids(tokenizer) -> list[list[int]]:
    ids = [list(tokenizer(p)["input_ids"])[:MAX_PROMPT_TOKENS] for p in PROMPTS]
    if getattr(tokenizer, "chat_template", None):
        from lmwright.data.chat import render_prompt_ids

        try:
            ids.append(render_prompt_ids(tokenizer, CHAT)[:MAX_PROMPT_TOKENS])
        except Exception:  # noqa: BLE001 - a template that cannot render this is not a parity problem
            pass
    return [i for i in ids if i]


def model_output(model, ids: list[int], task: str, decoder_start: int | None = None):
    """The main output of ``model`` for one prompt, as float32 numpy (batch dim dropped)."""
    import torch

    x = torch.tensor([ids], dtype=torch.long)
    with torch.no_grad():
        if task == "seq2seq":
            dec = torch.tensor([[decoder_start or 0] + ids[:4]], dtype=torch.long)
            out = model(input_ids=x, attention_mask=torch.ones_like(x), decoder_input_ids=dec)
        else:
            out = model(input_ids=x, attention_mask=torch.ones_like(x))
    t = out.last_hidden_state if task == "embedding" else out.logits
    return t[0].float().numpy()


def greedy_steps(step: Callable[[list[int]], Any], prompt: list[int], n: int = GREEDY_STEPS
                 ) -> tuple[list[int], Any]:
    """Greedy decoding by recomputing the whole sequence each step: (new ids, (n, V) last logits)."""
    import numpy as np

    seq, new, logits = list(prompt), [], []
    for _ in range(n):
        last = step(seq)
        logits.append(last)
        tok = int(np.argmax(last))
        new.append(tok)
        seq.append(tok)
    return new, np.stack(logits)


def _precision(model) -> str:
    import torch

    cfg = getattr(model, "config", None)
    if getattr(cfg, "quantization_config", None) is not None or getattr(model, "is_loaded_in_4bit", False):
        return "quantized"
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(getattr(base, "config", None), "quantization_config", None) is not None:
        return "quantized"
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    return "low" if dtypes & {torch.bfloat16, torch.float16} else "float32"


def reference_outputs(src) -> Reference:
    """Outputs of ``src.model`` (the unmerged source) on the parity prompts."""
    import numpy as np

    model, task = src.model, src.task
    dec = getattr(getattr(model, "config", None), "decoder_start_token_id", None)
    ids = parity_prompt_ids(src.tokenizer)
    outs = [model_output(model, i, task, dec) for i in ids]
    greedy = []
    if task == "causal-lm":
        greedy = [greedy_steps(lambda s: model_output(model, s, task)[-1], p) for p in ids[:GREEDY_PROMPTS]]
    scale = max(float(np.abs(o).max()) for o in outs) if outs else 1.0
    return Reference(task=task, prompt_ids=ids, outputs=outs, greedy=greedy, decoder_start=dec, scale=scale,
                     precision=_precision(model))


def tolerance(ref: Reference, fmt: str, atol: float | None = None) -> float:
    """The max |diff| allowed for ``fmt``: an explicit ``atol`` wins, else by source precision."""
    base = atol if atol is not None else {"float32": ATOL.get(fmt, 1e-3), "low": ATOL_LOW_PRECISION,
                                          "quantized": ATOL_QUANTIZED}[ref.precision]
    return base * max(1.0, ref.scale)


def compare_outputs(ref: Reference, got: list[Any], tol: float, name: str = "logits", gate: bool = True) -> Check:
    """max |diff| over all prompts, and argmax agreement over the last axis (for logits)."""
    import numpy as np

    diff, agree, total = 0.0, 0, 0
    for r, g in zip(ref.outputs, got, strict=True):
        g = np.asarray(g, dtype=np.float32).reshape(r.shape)
        diff = max(diff, float(np.abs(r - g).max()))
        if ref.task != "embedding":
            agree += int((r.argmax(-1) == g.argmax(-1)).sum())
            total += int(np.asarray(r.argmax(-1)).size)
    return Check(name, diff, tol, agree / total if total else None, gate)


def compare_greedy(ref: Reference, runs: list[tuple[list[int], Any]], tol: float, name: str = "greedy (kv cache)"
                   ) -> Check:
    """Per-step logits of the artefact's decoding loop vs the source, up to the first token mismatch."""
    import numpy as np

    diff, agree, total = 0.0, 0, 0
    for (r_tok, r_log), (g_tok, g_log) in zip(ref.greedy, runs, strict=True):
        for k in range(min(len(r_tok), len(g_tok))):
            diff = max(diff, float(np.abs(r_log[k] - np.asarray(g_log[k], dtype=np.float32)).max()))
            total += 1
            if r_tok[k] != g_tok[k]:
                break  # after a different token the two continuations are not comparable
            agree += 1
        total += max(0, len(r_tok) - min(len(r_tok), len(g_tok)))
    return Check(name, diff, tol, agree / total if total else None)


def torch_parity(src, model, fmt: str, atol: float | None = None) -> ParityReport:
    """Parity of a transformers model loaded back from the artefact (the ``hf`` check)."""
    ref = src.reference
    tol = tolerance(ref, fmt, atol)
    got = [model_output(model, i, ref.task, ref.decoder_start) for i in ref.prompt_ids]
    report = ParityReport(fmt, [compare_outputs(ref, got, tol)])
    if ref.greedy:
        runs = [greedy_steps(lambda s: model_output(model, s, ref.task)[-1], p)
                for p in ref.prompt_ids[:GREEDY_PROMPTS]]
        report.checks.append(compare_greedy(ref, runs, tol, name="greedy"))
    report.notes.append(f"{len(ref.prompt_ids)} prompts; source precision {ref.precision}")
    return report

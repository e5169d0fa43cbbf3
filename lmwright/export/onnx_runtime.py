"""Run an ``onnx`` export with onnxruntime: a KV-cache decoding loop for causal LMs, plain runs for encoders.

``generate_onnx(model_dir, prompt, **params) -> str`` is what ``lmwright generate --engine onnx``
calls. The loop feeds the whole prompt once, then one token per step with the ``present.*`` outputs
of the previous step as ``past_key_values.*`` inputs, so each step costs one token, not the whole
sequence. Tokens are picked by the same sampling code as the built-in serving engine
(``lmwright.engine.sampling.sample_next``), on the session's numpy logits viewed as a tensor.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lmwright.export.onnx_export import CONFIG_FILE, MODEL_FILE


def _session(model_dir: Path) -> Any:
    try:
        import onnxruntime as ort
    except ImportError:
        raise RuntimeError("running an ONNX export needs onnxruntime: pip install 'lmwright[export]'") from None
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(model_dir / MODEL_FILE), opts, providers=["CPUExecutionProvider"])


def _load(model_dir: str | Path) -> tuple[Path, dict[str, Any]]:
    d = Path(model_dir)
    if not (d / MODEL_FILE).exists() or not (d / CONFIG_FILE).exists():
        raise FileNotFoundError(f"{d} is not an lmwright onnx export (no {MODEL_FILE} / {CONFIG_FILE}); "
                                "create one with `lmwright export --format onnx`")
    return d, json.loads((d / CONFIG_FILE).read_text(encoding="utf-8"))


class OnnxModel:
    """An exported encoder/classifier: ``run(ids) -> (T, H) hidden states or (num_labels,) logits``."""

    def __init__(self, model_dir: str | Path):
        self.dir, self.desc = _load(model_dir)
        self.session = _session(self.dir)

    def run_batch(self, input_ids: Any, attention_mask: Any) -> Any:
        import numpy as np

        feeds = {"input_ids": np.asarray(input_ids, dtype=np.int64),
                 "attention_mask": np.asarray(attention_mask, dtype=np.int64)}
        return self.session.run(None, feeds)[0]

    def run(self, ids: list[int]) -> Any:
        import numpy as np

        x = np.asarray([ids], dtype=np.int64)
        return self.run_batch(x, np.ones_like(x))[0]


class OnnxGenerator:
    """Greedy/sampling generation from a causal-LM onnx export, with the KV cache as graph I/O."""

    def __init__(self, model_dir: str | Path):
        self.dir, self.desc = _load(model_dir)
        if self.desc.get("kind") != "causal-lm-kv":
            raise ValueError(f"{self.dir} holds a {self.desc.get('task')} model, not a causal LM: nothing to generate")
        self.session = _session(self.dir)
        self.layers = int(self.desc["num_layers"])
        self.kv_heads = int(self.desc["num_kv_heads"])
        self.head_dim = int(self.desc["head_dim"])
        self._tokenizer = None

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(str(self.dir), local_files_only=True)
        return self._tokenizer

    def empty_past(self, batch: int = 1) -> list[Any]:
        import numpy as np

        return [np.zeros((batch, self.kv_heads, 0, self.head_dim), dtype=np.float32) for _ in range(2 * self.layers)]

    def step(self, ids: list[int], past: list[Any], past_len: int) -> tuple[Any, list[Any]]:
        """Feed ``ids`` after ``past_len`` cached tokens: ((T, V) logits, the new cache)."""
        import numpy as np

        t = len(ids)
        feeds = {"input_ids": np.asarray([ids], dtype=np.int64),
                 "attention_mask": np.ones((1, past_len + t), dtype=np.int64),
                 "position_ids": np.arange(past_len, past_len + t, dtype=np.int64)[None, :]}
        names = self.desc["inputs"][3:]
        feeds.update(dict(zip(names, past, strict=True)))
        logits, *present = self.session.run(None, feeds)
        return logits[0], present

    def forward(self, ids: list[int]) -> Any:
        """(T, V) logits of a whole sequence in one call (empty cache)."""
        return self.step(ids, self.empty_past(), 0)[0]

    def generate_ids(self, prompt_ids: list[int], max_tokens: int = 64, temperature: float = 0.0, top_k: int = 0,
                     top_p: float = 1.0, seed: int | None = None, stop_token_ids: list[int] | None = None,
                     return_logits: bool = False) -> tuple[list[int], list[Any]]:
        """New token ids (stop token excluded) and, with ``return_logits``, each step's logits."""
        from lmwright.engine.sampling import SamplingParams, make_generator

        sampling = SamplingParams(max_tokens=max(max_tokens, 1), temperature=temperature, top_k=top_k, top_p=top_p,
                                  seed=seed)
        rng = make_generator(seed)
        stops = set(self.stop_ids() if stop_token_ids is None else stop_token_ids)
        logits, past = self.step(list(prompt_ids), self.empty_past(), 0)
        n_past = len(prompt_ids)
        new: list[int] = []
        seen: list[Any] = []
        for _ in range(max_tokens):
            last = logits[-1]
            if return_logits:
                seen.append(last)
            tok = pick_token(last, sampling, rng)
            if tok in stops:
                break
            new.append(tok)
            logits, past = self.step([tok], past, n_past)
            n_past += 1
        return new, seen

    def greedy_with_logits(self, prompt_ids: list[int], n: int) -> tuple[list[int], Any]:
        """``n`` greedy tokens (no stop) and their (n, V) logits: what parity compares step by step."""
        import numpy as np

        new, seen = self.generate_ids(prompt_ids, max_tokens=n, stop_token_ids=[], return_logits=True)
        return new, np.stack(seen)

    def stop_ids(self) -> list[int]:
        gc = self.dir / "generation_config.json"
        eos = json.loads(gc.read_text()).get("eos_token_id") if gc.exists() else self.tokenizer.eos_token_id
        return [eos] if isinstance(eos, int) else list(eos or [])

    def prompt_ids(self, prompt: str | list[dict], chat: bool = False) -> list[int]:
        if isinstance(prompt, list) or chat:
            from lmwright.data.chat import render_prompt_ids

            messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
            return render_prompt_ids(self.tokenizer, messages)
        return list(self.tokenizer(prompt)["input_ids"])

    def generate(self, prompt: str | list[dict], chat: bool = False, **params: Any) -> str:
        ids, _ = self.generate_ids(self.prompt_ids(prompt, chat), **_params(params))
        return self.tokenizer.decode(ids, skip_special_tokens=True)


def _params(params: dict[str, Any]) -> dict[str, Any]:
    """Accept the serving names (max_tokens) and transformers' (max_new_tokens, do_sample)."""
    p = dict(params)
    if "max_new_tokens" in p:
        p["max_tokens"] = p.pop("max_new_tokens")
    if p.pop("do_sample", True) is False:
        p["temperature"] = 0.0
    allowed = {"max_tokens", "temperature", "top_k", "top_p", "seed", "stop_token_ids"}
    unknown = sorted(set(p) - allowed)
    if unknown:
        raise ValueError(f"onnx generation does not support {', '.join(unknown)}; supported: {', '.join(sorted(allowed))}")
    return p


def pick_token(logits: Any, params: Any, generator: Any) -> int:
    """One token from a numpy row of logits with the serving engine's sampler (one home for sampling)."""
    import torch

    from lmwright.engine.sampling import sample_next

    return sample_next(torch.from_numpy(logits), params, generator).token_id


_CACHE: dict[str, OnnxGenerator] = {}


def generate_onnx(model_dir: str | Path, prompt: str | list[dict], **params: Any) -> str:
    """Generate text from an onnx export (sessions are cached per folder). ``chat=True`` renders a string
    prompt as one user turn with the chat template; a list of messages always is."""
    key = str(Path(model_dir).resolve())
    if key not in _CACHE:
        _CACHE[key] = OnnxGenerator(model_dir)
    return _CACHE[key].generate(prompt, **params)

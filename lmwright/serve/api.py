"""The Python API: ``lmwright.load(path)`` -> an object that generates, chats, embeds or classifies.

The same guardrails, chat template and sampling code as the server, so a reply from the Python API
equals the server's reply for the same request and seed.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path
from typing import Any

from lmwright.config import ConfigError
from lmwright.engine.sampling import GenerationResult, SamplingParams, generate
from lmwright.serve.guardrails import Guardrails, load_guardrails

GENERATIVE = ("causal-lm",)
ENCODERS = ("embedding", "masked-lm")


def sampling_params(**params: Any) -> SamplingParams:
    """SamplingParams from keyword arguments; unknown names fail with a suggestion."""
    from lmwright.registry import suggest

    names = [f.name for f in fields(SamplingParams)]
    aliases = {"max_new_tokens": "max_tokens"}
    kw = {}
    for k, v in params.items():
        k = aliases.get(k, k)
        if k not in names:
            raise ConfigError(f"unknown generation parameter '{k}'.{suggest(k, names)} Valid: {', '.join(names)}")
        kw[k] = list(v) if k == "stop" and isinstance(v, (list, tuple)) else ([v] if k == "stop" and v else v)
    if kw.get("stop") is None:
        kw.pop("stop", None)
    p = SamplingParams(**kw)
    p.check()
    return p


class _Cancelled(Exception):
    pass


class LoadedModel:
    """A model ready for inference: what a run folder can do depends on its task."""

    def __init__(self, model, tokenizer, task: str, path: str | Path = "", guardrails: Guardrails | None = None,
                 name: str | None = None, pooling: str = "mean"):
        self.model, self.tokenizer, self.task = model, tokenizer, task
        self.pooling = pooling  # how embed() pools: what the folder was trained with (load() reads it)
        self.path = str(path)
        self.name = name or (Path(path).name if path else "model")
        self.guardrails = guardrails or Guardrails()
        self._engine = None
        self._lock = threading.Lock()
        self.weights_note = ""  # what load(weights=...) did to the weights (the log line)

    def __repr__(self) -> str:
        return f"LoadedModel(name={self.name!r}, task={self.task!r}, path={self.path!r})"

    def _need(self, tasks: tuple[str, ...], what: str) -> None:
        if self.task not in tasks:
            raise ConfigError(f"{what} needs a {' or '.join(tasks)} model; {self.name} is a {self.task} model")

    @property
    def max_context(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 2048) or 2048)

    # ---------------------------------------------------------------- generation
    def engine(self, **kw: Any):
        """The batching engine over this model (created on first use, shared afterwards)."""
        self._need(GENERATIVE, "serving")
        with self._lock:
            if self._engine is None:
                from lmwright.serve.engine import LocalEngine

                self._engine = LocalEngine(self.model, self.tokenizer, name=self.name, **kw)
            return self._engine

    def prompt_ids(self, prompt: str) -> list[int]:
        return list(self.tokenizer(prompt)["input_ids"])

    def chat_ids(self, messages: list[dict]) -> list[int]:
        from lmwright.data.chat import render_prompt_ids

        return render_prompt_ids(self.tokenizer, messages)

    def _run(self, ids: list[int], params: SamplingParams) -> GenerationResult:
        return generate(self.model, self.tokenizer, ids, params)

    def _guarded(self, ids: list[int], params: SamplingParams) -> str:
        g = self.guardrails
        if not g.active_output:
            return self._run(ids, params).text
        seeds = iter(range(1000))

        def produce() -> str:  # a retry must not repeat the same seeded sample
            k = next(seeds)
            p = params if k == 0 or params.seed is None else sampling_params(**{**params.__dict__,
                                                                                 "seed": params.seed + k})
            return self._run(ids, p).text

        return g.generate_checked(produce).text

    def generate(self, prompt: str, **params: Any) -> str:
        """Continue ``prompt`` (raw text, no chat template)."""
        self._need(GENERATIVE, "generate()")
        v = self.guardrails.check_input(prompt)
        if v.refused:
            return self.guardrails.refusal
        p = sampling_params(**params)
        p.stop = self.guardrails.stop_strings(p.stop)
        return self._guarded(self.prompt_ids(v.text), p)

    def _messages(self, messages: list[dict] | str, system: str | None = None) -> list[dict]:
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        if system:
            messages = [{"role": "system", "content": system}] + list(messages)
        return list(messages)

    def chat(self, messages: list[dict] | str, system: str | None = None, **params: Any) -> str:
        """The assistant's reply to a conversation (a string is one user message)."""
        self._need(GENERATIVE, "chat()")
        msgs, v = self.guardrails.check_messages(self._messages(messages, system))
        if v.refused:
            return self.guardrails.refusal
        p = sampling_params(**params)
        p.stop = self.guardrails.stop_strings(p.stop)
        return self._guarded(self.chat_ids(msgs), p)

    def stream_chat(self, messages: list[dict] | str, system: str | None = None, **params: Any) -> Iterator[str]:
        """Like :meth:`chat`, yielding text as it is produced (stop iterating to cancel)."""
        self._need(GENERATIVE, "stream_chat()")
        msgs, v = self.guardrails.check_messages(self._messages(messages, system))
        if v.refused:
            yield self.guardrails.refusal
            return
        p = sampling_params(**params)
        p.stop = self.guardrails.stop_strings(p.stop)
        yield from self.stream_ids(self.chat_ids(msgs), p)

    def stream(self, prompt: str, **params: Any) -> Iterator[str]:
        """Like :meth:`generate`, yielding text as it is produced."""
        self._need(GENERATIVE, "stream()")
        v = self.guardrails.check_input(prompt)
        if v.refused:
            yield self.guardrails.refusal
            return
        p = sampling_params(**params)
        p.stop = self.guardrails.stop_strings(p.stop)
        yield from self.stream_ids(self.prompt_ids(v.text), p)

    def stream_ids(self, ids: list[int], params: SamplingParams) -> Iterator[str]:
        """Stream from token ids with output guardrails; generation runs in a worker thread."""
        q: queue.Queue = queue.Queue()
        stop = threading.Event()

        def on_text(delta: str) -> None:
            if stop.is_set():
                raise _Cancelled
            q.put(delta)

        def work() -> None:
            try:
                generate(self.model, self.tokenizer, ids, params, on_text=on_text)
            except _Cancelled:
                pass
            except Exception as e:  # noqa: BLE001 - handed to the consumer
                q.put(e)
            q.put(None)

        guard = self.guardrails.stream_filter()
        t = threading.Thread(target=work, daemon=True)
        t.start()
        try:
            while (item := q.get()) is not None:
                if isinstance(item, Exception):
                    raise item
                if out := guard.push(item):
                    yield out
            if tail := guard.finish():
                yield tail
        finally:
            stop.set()

    # ---------------------------------------------------------------- encoders
    def embed(self, texts: list[str] | str) -> list[list[float]]:
        """Unit-length sentence vectors of the last hidden state, pooled as the model was trained
        (``self.pooling``: mean over real tokens, or the first token; ``lmwright.models.pooling``)."""
        self._need(ENCODERS + GENERATIVE, "embed()")
        import torch

        from lmwright.models.pooling import sentence_vectors

        single = isinstance(texts, str)
        batch = [texts] if single else list(texts)
        enc = self.tokenizer(batch, padding=True, truncation=True, max_length=self.max_context,
                             return_tensors="pt", return_token_type_ids=False)
        with torch.inference_mode():
            pooled = sentence_vectors(self.model, enc["input_ids"], enc["attention_mask"], self.pooling)  # (B, D)
        return pooled.tolist()

    def count_tokens(self, texts: list[str]) -> int:
        return sum(len(self.tokenizer(t)["input_ids"]) for t in texts)

    def classify(self, texts: list[str] | str) -> list[dict[str, Any]]:
        """Label and probability per text (reward models: the scalar score)."""
        self._need(("classification", "reward"), "classify()")
        import torch

        batch = [texts] if isinstance(texts, str) else list(texts)
        enc = self.tokenizer(batch, padding=True, truncation=True, max_length=self.max_context,
                             return_tensors="pt", return_token_type_ids=False)
        with torch.inference_mode():
            logits = self.model(**enc).logits.float()  # (B, C)
        if logits.shape[-1] == 1:
            return [{"score": float(s)} for s in logits[:, 0]]
        probs = torch.softmax(logits, dim=-1)
        id2label = getattr(self.model.config, "id2label", {}) or {}
        out = []
        for row in probs:
            k = int(row.argmax())
            out.append({"label": id2label.get(k, str(k)), "score": float(row[k]),
                        "scores": {id2label.get(i, str(i)): float(p) for i, p in enumerate(row)}})
        return out

    def close(self) -> None:
        if self._engine is not None:
            self._engine.shutdown(drain_timeout_s=0)
            self._engine = None


def load(path: str | Path, guardrails: Guardrails | str | Path | None = None, task: str | None = None,
         name: str | None = None, weights: str | None = None, max_seqs: int = 8, **kwargs: Any) -> LoadedModel:
    """Load a run folder, checkpoint, Hugging Face folder or adapter folder for inference, as its
    ``lmwright.json`` says it was trained (``load_trained``: the loader every command uses).

    ``weights``: ``float32`` | ``bfloat16`` | ``int8`` (weight-only, changes answers slightly) | ``auto`` (bf16 where a
    cached probe shows it faster on this CPU, for generative models; see ``lmwright.models.weights``); None keeps
    the weights as loaded. ``max_seqs``: the batch ``auto`` probes besides 1 row (the server's max_seqs).
    """
    from lmwright.methods.base import load_trained
    from lmwright.models.introspect import trained_task
    from lmwright.models.load import resolve_model_path
    from lmwright.models.pooling import read_pooling
    from lmwright.models.weights import check_weights, prepare_weights

    if weights is not None:
        check_weights(weights)  # before loading the weights
    task = task or trained_task(path)
    model, tokenizer = load_trained(path, task=task, **kwargs)
    note = prepare_weights(model, None if weights == "auto" and task not in GENERATIVE else weights, max_seqs)
    if tokenizer.pad_token_id is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token  # batching encoders needs a pad token
    g = guardrails if isinstance(guardrails, Guardrails) else load_guardrails(guardrails)
    lm = LoadedModel(model, tokenizer, task, path, g, name=name or _default_name(Path(path)),
                     pooling=read_pooling(resolve_model_path(path)))
    lm.weights_note = note
    return lm


def _default_name(p: Path) -> str:
    p = p.resolve()
    return p.parent.name if p.name in ("final", "model") else p.name

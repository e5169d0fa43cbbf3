"""Sampling and decoding shared by everything that generates: the CLI, the Python API and the engines.

One home for the maths of choosing the next token (temperature, top-k, top-p, repetition penalty,
seeded generators), for turning token ids into text incrementally (UTF-8 safe: a character split
across byte-level tokens is held back until complete) and for stop strings (text that could be the
start of a stop string is held back, so a stop string never leaks into a stream).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

from lmwright.config import ConfigError, opt

MIN_TEMPERATURE = 1e-3  # below it logits / temperature can overflow float32 (use 0 for greedy)
REPETITION_PENALTY_RANGE = (1e-2, 100.0)  # beyond it penalised logits can overflow float32
SEED_RANGE = (-(2**63), 2**63 - 1)  # torch.long, as vLLM; seed + choice index still fits torch's generator
MAX_STOP_CHARS = 256


@dataclass
class SamplingParams:
    """How to pick tokens for one request. ``temperature=0`` means greedy (argmax)."""

    max_tokens: int = opt(128, "maximum number of new tokens")
    temperature: float = opt(1.0, "softmax temperature; 0 = greedy")
    top_k: int = opt(0, "keep only the k most likely tokens; 0 = off")
    top_p: float = opt(1.0, "nucleus sampling: keep the smallest set with this much probability; 1 = off")
    repetition_penalty: float = opt(1.0, "CTRL-style penalty (>1 discourages tokens already in the sequence)")
    seed: int | None = opt(None, "seed of this request's torch.Generator; None = random")
    stop: list[str] = opt([], "stop strings: generation ends before the first occurrence")
    stop_token_ids: list[int] | None = opt(None, "token ids that end generation; None = the tokenizer's eos/<|im_end|>")
    logprobs: bool = opt(False, "return the log-probability of each generated token")
    top_logprobs: int = opt(0, "also return this many most likely alternatives per position")
    n: int = opt(1, "number of independent choices")
    timeout_s: float | None = opt(None, "per-request time limit in seconds")

    def check(self) -> None:
        for name in ("temperature", "top_p", "repetition_penalty", "timeout_s"):
            v = getattr(self, name)
            if v is not None and not math.isfinite(v):
                raise ConfigError(f"{name} must be a finite number, got {v}")
        if self.max_tokens < 1:
            raise ConfigError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0, got {self.temperature}")
        if 0 < self.temperature < MIN_TEMPERATURE:  # logits / T overflow to inf: no distribution left
            raise ConfigError(f"temperature must be 0 (greedy) or >= {MIN_TEMPERATURE}, got {self.temperature}")
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if not REPETITION_PENALTY_RANGE[0] <= self.repetition_penalty <= REPETITION_PENALTY_RANGE[1]:
            lo, hi = REPETITION_PENALTY_RANGE
            raise ConfigError(f"repetition_penalty must be in [{lo}, {hi}] (1 = off), got {self.repetition_penalty}")
        if self.seed is not None and not SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]:
            raise ConfigError(f"seed must be a 64-bit signed integer in [{SEED_RANGE[0]}, {SEED_RANGE[1]}], "
                              f"got {self.seed}")
        if self.timeout_s is not None and self.timeout_s <= 0:
            raise ConfigError(f"timeout_s must be > 0 seconds, got {self.timeout_s}")
        if not 0 <= self.top_logprobs <= 20:
            raise ConfigError(f"top_logprobs must be in [0, 20], got {self.top_logprobs}")
        if self.n < 1:
            raise ConfigError(f"n must be >= 1, got {self.n}")
        if any(not s for s in self.stop):
            raise ConfigError("stop strings must be non-empty")
        if any(len(s) > MAX_STOP_CHARS for s in self.stop):
            raise ConfigError(f"stop strings must be at most {MAX_STOP_CHARS} characters each")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


def make_generator(seed: int | None, device: Any = "cpu"):
    """A private torch.Generator per request, so concurrent requests cannot disturb each other's seeds."""
    import torch

    g = torch.Generator(device=device)
    if seed is None:
        g.seed()
    else:
        g.manual_seed(int(seed))
    return g


def process_logits(logits, params: SamplingParams, prev_ids=None):
    """Apply repetition penalty, temperature, top-k and top-p to one row of logits ``(V,)``."""
    import torch

    logits = logits.float()
    if params.repetition_penalty != 1.0 and prev_ids is not None and len(prev_ids):
        idx = torch.as_tensor(list(set(prev_ids)), dtype=torch.long, device=logits.device)
        picked = logits[idx]
        logits = logits.clone()
        logits[idx] = torch.where(picked > 0, picked / params.repetition_penalty,
                                  picked * params.repetition_penalty)
    if params.greedy:
        return logits
    logits = logits / params.temperature
    if params.top_k > 0 and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the mass *before* it already reaches top_p (the first token always stays)
        drop = (torch.cumsum(probs, dim=-1) - probs) >= params.top_p
        drop[0] = False  # a top_p below float32's smallest number (5e-324) compares as 0 and would drop it too
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(0, order, sorted_logits)
    return logits


@dataclass
class TokenChoice:
    token_id: int
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None


def draw(probs, generator=None) -> int:
    """One index drawn from the categorical distribution ``probs`` ``(V,)``: inverse CDF on one uniform number.

    ``torch.multinomial`` draws one exponential number per entry (the exponential-race trick): ~1 ms per row
    over a 49,152-word vocabulary on a CPU core, which was most of the serving engine's per-step sampling
    time at 16 streams. A float64 cumulative sum and one search take ~0.1 ms and draw from the same
    distribution; an entry of probability 0 is never drawn. Non-finite probabilities (NaN or inf logits)
    raise, as ``torch.multinomial`` did.
    """
    import torch

    cdf = torch.cumsum(probs, dim=0, dtype=torch.float64)
    total = cdf[-1]
    if not bool(torch.isfinite(total)) or not float(total) > 0:
        raise RuntimeError(f"cannot sample: the probabilities are not finite or sum to {float(total)}")
    u = torch.rand((), generator=generator, dtype=torch.float64, device=probs.device)
    return min(int(torch.searchsorted(cdf, u * total, right=True)), probs.shape[0] - 1)


def _plain_temperature(params: SamplingParams) -> bool:
    """Sampling at a temperature and nothing else (no top-k/top-p cut, no penalty, no log-probabilities)."""
    return (not params.greedy and params.top_k <= 0 and params.top_p >= 1.0 and params.repetition_penalty == 1.0
            and not (params.logprobs or params.top_logprobs))


def sample_next(logits, params: SamplingParams, generator=None, prev_ids=None) -> TokenChoice:
    """Pick the next token from one row of raw logits ``(V,)``.

    Log-probabilities are those of the model's raw distribution (before temperature/top-k/top-p),
    which is what OpenAI-compatible servers report.
    """
    import torch

    from lmwright.models import cpu_kernels

    if _plain_temperature(params) and cpu_kernels.sampling_usable(logits):
        # lmwright's sampling kernel: the same inverse-CDF draw on one uniform number, in one pass over the row
        u = float(torch.rand((), generator=generator, dtype=torch.float64))
        token = cpu_kernels.sample_row(logits, params.temperature, u)
        if token < 0:
            raise RuntimeError("cannot sample: the logits are not finite")
        return TokenChoice(token)
    processed = process_logits(logits, params, prev_ids)
    if params.greedy:
        token = int(torch.argmax(processed))
    else:
        token = draw(torch.softmax(processed, dim=-1), generator)
    if not (params.logprobs or params.top_logprobs):
        return TokenChoice(token)
    logp = torch.log_softmax(logits.float(), dim=-1)
    top = None
    if params.top_logprobs:
        v, i = torch.topk(logp, params.top_logprobs)
        top = [(int(a), float(b)) for a, b in zip(i, v)]
    return TokenChoice(token, float(logp[token]), top)


class IncrementalDetokenizer:
    """Token ids in, text deltas out; never emits half of a multi-byte character.

    Decodes a short window (``prefix_offset:``) and compares it with the text already produced for
    the same window, the way TGI and vLLM do, so the cost per token stays constant. A window that ends
    in U+FFFD is an incomplete UTF-8 sequence: wait for the next token.
    """

    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip, clean_up_tokenization_spaces=False)

    def add(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        prefix_text = self._decode(self.ids[self.prefix_offset:self.read_offset])
        new_text = self._decode(self.ids[self.prefix_offset:])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            delta = new_text[len(prefix_text):]
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            return delta
        return ""

    def flush(self) -> str:
        """Whatever is still held back at the end (an incomplete character decodes as U+FFFD)."""
        prefix_text = self._decode(self.ids[self.prefix_offset:self.read_offset])
        new_text = self._decode(self.ids[self.prefix_offset:])
        self.prefix_offset = self.read_offset = len(self.ids)
        return new_text[len(prefix_text):] if len(new_text) > len(prefix_text) else ""


class StopStringFilter:
    """Holds back text that may begin a stop string; reports when one is complete.

    ``push(delta)`` returns ``(text safe to emit, stopped)``. Once stopped, the text is cut before
    the stop string and nothing more is emitted.
    """

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.stopped = False

    def push(self, delta: str) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        if not self.stops:
            return delta, False
        self.pending += delta
        hits = [(self.pending.find(s), s) for s in self.stops if s in self.pending]
        if hits:
            cut = min(h[0] for h in hits)
            out, self.pending, self.stopped = self.pending[:cut], "", True
            return out, True
        hold = 0
        for s in self.stops:  # longest suffix of pending that is a proper prefix of a stop string
            for k in range(min(len(s) - 1, len(self.pending)), 0, -1):
                if self.pending.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        out = self.pending[:len(self.pending) - hold] if hold else self.pending
        self.pending = self.pending[len(out):]
        return out, False

    def flush(self) -> str:
        out, self.pending = ("" if self.stopped else self.pending), ""
        return out


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" | "length"
    prompt_tokens: int
    logprobs: list[TokenChoice] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


class SequenceState:
    """Per-sequence decoding state: detokeniser + stop strings + stop ids + length limit.

    Shared by :func:`generate` and the batching engine so both stop, cut and count identically.
    """

    def __init__(self, tokenizer, params: SamplingParams, stop_ids: list[int]):
        self.params = params
        self.stop_ids = set(stop_ids)
        self.detok = IncrementalDetokenizer(tokenizer)
        self.stops = StopStringFilter(list(params.stop))
        self.token_ids: list[int] = []
        self.text = ""
        self.finish_reason: str | None = None

    def add(self, token_id: int) -> str:
        """Record a sampled token; return the text it releases; sets ``finish_reason`` when done."""
        if token_id in self.stop_ids:
            self.finish_reason = "stop"
            return self._finish_text()
        self.token_ids.append(token_id)
        delta, stopped = self.stops.push(self.detok.add(token_id))
        if stopped:
            self.finish_reason = "stop"
        elif len(self.token_ids) >= self.params.max_tokens:
            self.finish_reason = "length"
            delta += self._finish_text()
        self.text += delta
        return delta

    def _finish_text(self) -> str:
        delta, stopped = self.stops.push(self.detok.flush())
        if not stopped:
            delta += self.stops.flush()
        self.text += delta
        return delta


def default_stop_ids(tokenizer) -> list[int]:
    from lmwright.data.chat import stop_token_ids

    return stop_token_ids(tokenizer)


def generate(model, tokenizer, prompt_ids: list[int], params: SamplingParams | None = None,
             on_text=None) -> GenerationResult:
    """Generate one completion for one prompt with a KV cache (no batching).

    ``on_text(delta)`` is called with each piece of text as soon as it is safe to show (streaming).
    """
    import torch
    from transformers import DynamicCache

    params = params or SamplingParams()
    params.check()
    if not prompt_ids:
        raise ConfigError("the prompt is empty")
    stop_ids = params.stop_token_ids if params.stop_token_ids is not None else default_stop_ids(tokenizer)
    device = next(model.parameters()).device
    gen = make_generator(params.seed, device)
    state = SequenceState(tokenizer, params, stop_ids)
    choices: list[TokenChoice] = []
    t0 = time.perf_counter()
    with torch.inference_mode():
        cache = DynamicCache()
        ids = torch.tensor([prompt_ids], device=device)
        pos = torch.arange(len(prompt_ids), device=device)[None]
        while True:
            out = model(input_ids=ids, position_ids=pos, past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            choice = sample_next(out.logits[0, -1], params, gen, list(prompt_ids) + state.token_ids)
            delta = state.add(choice.token_id)
            if choice.token_id not in state.stop_ids:
                choices.append(choice)
            if delta and on_text:
                on_text(delta)
            if state.finish_reason:
                break
            ids = torch.tensor([[choice.token_id]], device=device)
            pos = pos[:, -1:] + 1
    return GenerationResult(state.text, state.token_ids, state.finish_reason, len(prompt_ids),
                            choices if (params.logprobs or params.top_logprobs) else [],
                            time.perf_counter() - t0)


def generate_batch(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.0,
                   top_k: int = 0, batch_size: int = 16, seed: int | None = 0, stop_ids: list[int] | None = None
                   ) -> list[tuple[list[int], bool]]:
    """(new token ids without the stop token, finished) per prompt: ``model.generate`` on left-padded batches,
    greedy at ``temperature`` 0. The one batched generation of evaluation (SFT's held-out exact match, UPFT's
    prefixes, ``lmwright eval --task generation``, the lm-eval bridge, pretraining samples); ``batch_size=1``
    pads nothing, so each answer is exactly what a single request gets.

    ``stop_ids``: token ids that end an answer (default: the chat stop tokens, ``stop_token_ids``); ``seed``
    seeds torch before the first batch (None: leave the global generator alone). The model's train/eval mode is
    restored afterwards."""
    import torch

    from lmwright.data.packing import pad_batch
    from lmwright.methods.peft_methods import generate_uncached, is_prompt_learning

    stops = list(stop_ids) if stop_ids is not None else default_stop_ids(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stops[0] if stops else None)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    if seed is not None:
        torch.manual_seed(seed)
    if is_prompt_learning(model):  # peft's cached generate disagrees with their forward: see generate_uncached
        out = generate_uncached(model, prompts, max_new_tokens, stops, temperature)
        model.train(was_training)
        return out
    sampling = {"do_sample": True, "temperature": temperature, "top_k": top_k} if temperature > 0 \
        else {"do_sample": False}
    out: list[tuple[list[int], bool]] = []
    for s in range(0, len(prompts), batch_size):
        ids, mask = pad_batch(prompts[s:s + batch_size], 0 if pad is None else pad, side="left")  # (B, T) each
        with torch.no_grad():
            gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                 max_new_tokens=max_new_tokens, eos_token_id=stops or None, pad_token_id=pad,
                                 **sampling)
        for row in gen[:, ids.shape[1]:].tolist():
            end = next((j for j, t in enumerate(row) if t in stops), None)
            out.append((row[:end] if end is not None else row, end is not None))
    model.train(was_training)
    return out

"""``denoise``: sequence-to-sequence denoising on an encoder-decoder (T5, BART).

Two corruptions (``denoise.mode``), both applied in the collate function with torch's global RNG:

- ``span`` (T5): ``noise_density`` of the tokens, in spans of mean length ``mean_span_length``
  (T5's ``random_spans_noise_mask``), are replaced in the input by sentinels ``<extra_id_k>``; the
  target is ``<extra_id_0> span_0 <extra_id_1> span_1 ... </s>``. Needs sentinel tokens
  (``lmwright data tokenizer tokenizer.sentinels=32``).
- ``infill`` (BART): spans with Poisson(``poisson_lambda``) lengths covering ``mask_ratio`` of the
  tokens each become one ``<mask>``, optionally after shuffling the sentences
  (``permute_sentences``); the target is the original text.

The loss is the decoder's token cross-entropy on the target (teacher forcing). Evaluation adds the
exact reconstruction rate (``val_exact``): greedy decoding of a fixed set of corrupted validation
rows (a seeded generator, the same every evaluation) compared with their targets.
``final/`` loads with ``AutoModelForSeq2SeqLM``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch

from lmwright.config import ConfigError, opt
from lmwright.data import corruption
from lmwright.data.packing import pad_batch
from lmwright.objectives.base import IGNORE_INDEX, PRETRAIN_OBJECTIVES, LossOutput, token_cross_entropy


@dataclass
class DenoiseConfig:
    mode: Literal["span", "infill"] = opt("span", "span: T5 span corruption with sentinels; infill: BART text "
                                                  "infilling with <mask>")
    noise_density: float = opt(0.15, "span: share of tokens corrupted")
    mean_span_length: float = opt(3.0, "span: mean length of a corrupted span")
    mask_ratio: float = opt(0.3, "infill: share of tokens masked")
    poisson_lambda: float = opt(3.0, "infill: mean of the Poisson span-length distribution")
    permute_sentences: bool = opt(False, "infill: shuffle the sentences of the input before masking")
    eval_samples: int = opt(32, "validation rows decoded greedily for the exact reconstruction rate (0 = skip)")

    def check(self) -> None:
        if not 0.0 < self.noise_density < 1.0:
            raise ConfigError(f"denoise.noise_density = {self.noise_density} must be in (0, 1), e.g. 0.15")
        if self.mean_span_length < 1.0:
            raise ConfigError(f"denoise.mean_span_length = {self.mean_span_length} must be >= 1, e.g. 3")
        if not 0.0 <= self.mask_ratio < 1.0:
            raise ConfigError(f"denoise.mask_ratio = {self.mask_ratio} must be in [0, 1), e.g. 0.3")
        if self.poisson_lambda <= 0:
            raise ConfigError(f"denoise.poisson_lambda = {self.poisson_lambda} must be > 0, e.g. 3")


def sentinel_ids(tokenizer) -> list[int]:
    """Ids of ``<extra_id_0>``, ``<extra_id_1>``, ... present in the tokenizer, in order."""
    vocab = tokenizer.get_vocab()
    out = []
    while f"<extra_id_{len(out)}>" in vocab:
        out.append(vocab[f"<extra_id_{len(out)}>"])
    return out


@PRETRAIN_OBJECTIVES.register("denoise")
class Denoise:
    name = "denoise"
    task = "seq2seq"
    families = {"t5", "mt5", "umt5", "bart", "mbart", "pegasus", "longt5"}

    def __init__(self, cfg: DenoiseConfig | None = None):
        self.cfg = cfg or DenoiseConfig()

    def check(self, family: str | None, tokenizer) -> None:
        if family is not None and family not in self.families:
            raise ConfigError(f"objective=denoise needs an encoder-decoder model (t5-tiny or t5-small presets, or "
                              f"a local T5/BART folder), got a {family} model: change model.name, or use "
                              f"objective=mlm for encoders and objective=clm for decoder-only models")
        if tokenizer.pad_token_id is None:
            raise ConfigError("objective=denoise needs a tokenizer with a pad token (it starts the decoder)")
        if tokenizer.eos_token_id is None:
            raise ConfigError("objective=denoise needs a tokenizer with an eos token (it ends every target)")
        if self.cfg.mode == "span" and not sentinel_ids(tokenizer):
            raise ConfigError("denoise.mode=span needs sentinel tokens <extra_id_0>, <extra_id_1>, ... in the "
                              "tokenizer: train one with `lmwright data tokenizer tokenizer.sentinels=32`, or "
                              "use denoise.mode=infill (needs only <mask>)")
        if self.cfg.mode == "infill" and tokenizer.mask_token_id is None:
            raise ConfigError("denoise.mode=infill needs a tokenizer with a mask token (<mask>); use a tokenizer "
                              "from `lmwright data tokenizer`, or denoise.mode=span with sentinels")

    def build_dataset(self, texts: list[str], tokenizer, seq_len: int, packing: bool = True) -> list[dict]:
        from lmwright.data.packing import tokenize_documents

        eos = tokenizer.eos_token_id
        docs = [d[:-1] if d and d[-1] == eos else d for d in tokenize_documents(tokenizer, texts, add_eos=True)]
        if not packing:  # one document per row (eos is added after corruption)
            return [{"input_ids": d[:seq_len - 1]} for d in docs if len(d) > 2]
        flat = [t for d in docs for t in d + [eos]]
        step = seq_len - 1
        return [{"input_ids": flat[s:s + step]} for s in range(0, len(flat) - step // 2, step)]

    def collate(self, tokenizer, packing: bool = True):
        return DenoiseCollator(tokenizer, self.cfg)

    def loss(self, model, batch: dict) -> LossOutput:
        labels = batch["labels"]  # (B, L)
        base = getattr(model, "module", model)  # DDP does not forward attribute lookups
        base = getattr(base, "_orig_mod", base)  # nor does torch.compile's wrapper
        dec_in = base.prepare_decoder_input_ids_from_labels(labels=labels)  # (B, L): shifted right
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    decoder_input_ids=dec_in, use_cache=False)
        loss_sum, n = token_cross_entropy(out.logits, labels, shift=False)  # logits (B, L, V)
        return LossOutput(loss_sum=loss_sum, n_targets=n)

    def metrics_from_eval(self, metrics: dict[str, float]) -> dict[str, float]:
        if "val_loss" in metrics:
            return {"val_ppl": math.exp(min(metrics["val_loss"], 50.0))}
        return {}

    def extra_eval(self, model, val_ds, tokenizer) -> dict[str, float]:
        if not self.cfg.eval_samples or not val_ds:
            return {}
        gen = torch.Generator().manual_seed(1234)  # the same held-out corruptions every evaluation
        batch = DenoiseCollator(tokenizer, self.cfg)(list(val_ds[:self.cfg.eval_samples]), generator=gen)
        return {"val_exact": exact_reconstruction(model, batch, tokenizer)}


class DenoiseCollator:
    def __init__(self, tokenizer, cfg: DenoiseConfig):
        self.cfg = cfg
        self.pad_id, self.eos_id, self.mask_id = tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.mask_token_id
        self.sentinels = sentinel_ids(tokenizer)
        self.special = corruption.special_table(tokenizer)
        self.sentence_end = corruption.sentence_end_table(tokenizer) if cfg.permute_sentences else None

    def corrupt(self, ids: list[int], generator: torch.Generator | None = None) -> tuple[list[int], list[int]]:
        c = self.cfg
        if c.mode == "span":
            noise = corruption.random_spans_noise_mask(len(ids), c.noise_density, c.mean_span_length,
                                                       max_spans=len(self.sentinels), generator=generator)
            return corruption.spans_to_sentinels(ids, noise, self.sentinels, self.eos_id)
        src = ids
        if self.sentence_end is not None:
            src = corruption.permute_sentences(ids, self.sentence_end[torch.tensor(ids, dtype=torch.long)], generator)
        protected = self.special[torch.tensor(src, dtype=torch.long)]  # (T,) bos/eos stay
        inputs = corruption.text_infilling(src, self.mask_id, c.mask_ratio, c.poisson_lambda, protected, generator)
        return inputs + [self.eos_id], list(ids) + [self.eos_id]

    def __call__(self, rows: list[dict], generator: torch.Generator | None = None) -> dict[str, Any]:
        pairs = [self.corrupt(list(r["input_ids"]), generator) for r in rows]
        ids, mask = pad_batch([p[0] for p in pairs], self.pad_id)  # (B, S)
        labels, lmask = pad_batch([p[1] for p in pairs], self.pad_id)  # (B, L)
        labels = labels.masked_fill(lmask == 0, IGNORE_INDEX)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels, "num_tokens": int(mask.sum())}


@torch.no_grad()
def exact_reconstruction(model, batch: dict, tokenizer) -> float:
    """Share of rows whose greedy decoding equals the target exactly (up to and including eos)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    labels = batch["labels"]
    gen = model.generate(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                         max_new_tokens=labels.shape[1] + 1, do_sample=False, num_beams=1,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    gen = gen[:, 1:].cpu()  # drop the decoder start token
    hits = 0
    for g, t in zip(gen.tolist(), labels.tolist()):
        target = [x for x in t if x != IGNORE_INDEX]
        hits += int(g[:len(target)] == target)
    model.train(was_training)
    return hits / max(len(labels), 1)

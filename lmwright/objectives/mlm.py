"""``mlm``: masked language modelling (BERT-style) on an encoder.

Masking is dynamic: :func:`lmwright.data.corruption.mlm_mask` runs in the collate function, so
every epoch sees new masks, drawn from torch's global RNG (exact resume). With ``packing`` the
documents are concatenated (separated by ``</s>``) and cut into full rows, RoBERTa's FULL-SENTENCES
layout: attention may cross a document boundary, as in RoBERTa. Without packing each document is
one (truncated, padded) row.

Evaluation adds masked-token accuracy (``val_acc``) and pseudo-perplexity (``val_pppl``): every
position of a few validation sequences is masked in turn and scored (Salazar et al., 2020).
``final/`` loads with ``AutoModelForMaskedLM``; try it with ``lmwright fill-mask --model RUN``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import torch

from lmwright.config import ConfigError, opt
from lmwright.data import corruption
from lmwright.data.packing import pad_batch
from lmwright.objectives.base import IGNORE_INDEX, PRETRAIN_OBJECTIVES, LossOutput, token_cross_entropy


@dataclass
class MLMConfig:
    probability: float = opt(0.15, "share of tokens (or words) selected for prediction")
    mask_frac: float = opt(0.8, "of the selected tokens: share replaced by <mask>")
    random_frac: float = opt(0.1, "of the selected tokens: share replaced by a random token (the rest is kept)")
    whole_word: bool = opt(False, "select whole words (all their sub-word tokens together)")
    pppl_sequences: int = opt(8, "validation sequences scored for pseudo-perplexity (0 = skip)")
    pppl_max_tokens: int = opt(64, "score at most this many tokens of each pseudo-perplexity sequence")

    def check(self) -> None:
        if not 0.0 < self.probability < 1.0:
            raise ConfigError(f"mlm.probability = {self.probability} must be in (0, 1), e.g. 0.15")
        if self.mask_frac < 0 or self.random_frac < 0 or self.mask_frac + self.random_frac > 1.0:
            raise ConfigError(f"mlm.mask_frac + mlm.random_frac = {self.mask_frac + self.random_frac} must be "
                              f"<= 1 (and each >= 0), e.g. 0.8 and 0.1")


@PRETRAIN_OBJECTIVES.register("mlm")
class MaskedLM:
    name = "mlm"
    task = "masked-lm"
    families = {"bert", "roberta", "distilbert", "deberta", "deberta-v2", "electra", "xlm-roberta", "modernbert",
                "albert", "camembert"}

    def __init__(self, cfg: MLMConfig | None = None):
        self.cfg = cfg or MLMConfig()

    def check(self, family: str | None, tokenizer) -> None:
        if family is not None and family not in self.families:
            raise ConfigError(f"objective=mlm needs an encoder model (bert-tiny or bert-small presets, or a local "
                              f"BERT-like folder), got a {family} model: change model.name, or use objective=clm "
                              f"for decoder-only models and objective=denoise for encoder-decoders")
        if tokenizer.mask_token_id is None:
            raise ConfigError("objective=mlm needs a tokenizer with a mask token: train one with `lmwright data "
                              "tokenizer` (it adds <mask>) or set tokenizer=<folder with a mask token>")
        if tokenizer.pad_token_id is None:
            raise ConfigError("objective=mlm needs a tokenizer with a pad token: set tokenizer=<folder with <pad>>")

    def build_dataset(self, texts: list[str], tokenizer, seq_len: int, packing: bool = True) -> list[dict]:
        from lmwright.data.packing import tokenize_documents

        docs = tokenize_documents(tokenizer, texts, add_eos=True)
        if not packing:
            return [{"input_ids": d[:seq_len]} for d in docs if len(d) > 2]
        flat = [t for d in docs for t in d]
        return [{"input_ids": flat[s:s + seq_len]} for s in range(0, len(flat) - seq_len // 2, seq_len)]

    def collate(self, tokenizer, packing: bool = True):
        return MLMCollator(tokenizer, self.cfg)

    def loss(self, model, batch: dict) -> LossOutput:
        out = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"))
        logits, labels = out.logits, batch["labels"]  # (B, T, V), (B, T)
        loss_sum, n = token_cross_entropy(logits, labels, shift=False)
        correct = ((logits.argmax(-1) == labels) & (labels != IGNORE_INDEX)).sum()
        return LossOutput(loss_sum=loss_sum, n_targets=n, metrics={"acc": correct.float()})

    def metrics_from_eval(self, metrics: dict[str, float]) -> dict[str, float]:
        if "val_loss" in metrics:
            return {"val_ppl": math.exp(min(metrics["val_loss"], 50.0))}
        return {}

    def extra_eval(self, model, val_ds, tokenizer) -> dict[str, float]:
        if not self.cfg.pppl_sequences or not val_ds:
            return {}
        rows = [r["input_ids"][:self.cfg.pppl_max_tokens] for r in val_ds[:self.cfg.pppl_sequences]]
        return {"val_pppl": pseudo_perplexity(model, rows, tokenizer)}


class MLMCollator:
    """Pads rows and applies dynamic masking (a class, not a closure, so it pickles for workers)."""

    def __init__(self, tokenizer, cfg: MLMConfig):
        self.cfg = cfg
        self.pad_id = tokenizer.pad_token_id
        self.mask_id = tokenizer.mask_token_id
        self.vocab_size = len(tokenizer)
        self.special = corruption.special_table(tokenizer)
        self.word_starts = corruption.word_start_table(tokenizer) if cfg.whole_word else None

    def __call__(self, rows: list[dict], generator: torch.Generator | None = None) -> dict[str, Any]:
        ids, mask = pad_batch([r["input_ids"] for r in rows], self.pad_id)  # (B, T) each
        corrupted, labels = corruption.mlm_mask(ids, self.special, self.mask_id, self.vocab_size,
                                                self.cfg.probability, self.cfg.mask_frac, self.cfg.random_frac,
                                                self.word_starts, generator)
        return {"input_ids": corrupted, "attention_mask": mask, "labels": labels}


@torch.no_grad()
def pseudo_perplexity(model, rows: list[list[int]], tokenizer) -> float:
    """exp(-mean log p(token_i | all other tokens)), masking each non-special position in turn."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    special = corruption.special_table(tokenizer)
    nll, n = 0.0, 0
    for r in rows:
        ids = torch.tensor(r, dtype=torch.long)
        pos = (~special[ids]).nonzero().squeeze(1)  # (P,) scored positions
        if len(pos) == 0:
            continue
        batch = ids.unsqueeze(0).repeat(len(pos), 1)  # (P, T): one copy per masked position
        batch[torch.arange(len(pos)), pos] = tokenizer.mask_token_id
        logits = model(input_ids=batch.to(device)).logits  # (P, T, V)
        logp = torch.log_softmax(logits[torch.arange(len(pos)), pos.to(device)].float(), dim=-1)  # (P, V)
        nll -= float(logp.gather(1, ids[pos].unsqueeze(1).to(device)).sum())
        n += len(pos)
    model.train(was_training)
    return math.exp(min(nll / max(n, 1), 50.0))


@torch.no_grad()
def fill_mask(model, tokenizer, text: str, top_k: int = 5) -> list[list[tuple[str, float]]]:
    """Top-k (token, probability) for every mask in ``text``; the literal ``<mask>`` is read as the
    tokenizer's own mask token (``[MASK]`` for BERT tokenizers)."""
    if tokenizer.mask_token is None:
        raise ConfigError("this tokenizer has no mask token: fill-mask needs a masked-LM model and tokenizer")
    text = text.replace("<mask>", tokenizer.mask_token)
    probe = tokenizer("a " + tokenizer.mask_token, add_special_tokens=False)["input_ids"]
    if len(probe) > 2:  # byte-level BPE turns " <mask>" into a lone space token + <mask>: the
        text = re.sub(r"\s+" + re.escape(tokenizer.mask_token), tokenizer.mask_token, text)  # mask is "Ġword"
    enc = tokenizer(text, return_tensors="pt").to(next(model.parameters()).device)
    where = (enc["input_ids"][0] == tokenizer.mask_token_id).nonzero().squeeze(1)  # (M,)
    if len(where) == 0:
        raise ConfigError(f"no {tokenizer.mask_token} in the text: write <mask> where a word should be predicted")
    logits = model(**enc).logits[0, where]  # (M, V)
    probs = torch.softmax(logits.float(), dim=-1)
    top = probs.topk(top_k, dim=-1)
    return [[(tokenizer.decode([i]).strip(), float(p)) for i, p in zip(ti.tolist(), tp.tolist())]
            for ti, tp in zip(top.indices, top.values)]

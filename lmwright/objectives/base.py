"""The loss contract shared by every objective, and token-level cross-entropy (the one home of
label shifting and ignore-index masking)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported inside the functions: `lmwright --help` must not load it
    import torch

IGNORE_INDEX = -100


@dataclass
class LossOutput:
    """``loss_sum`` summed over ``n_targets`` target units; ``metrics`` are sums over the same units
    (the engine reports ``metrics[k] / n_targets``) unless listed in ``means`` (already means)."""

    loss_sum: torch.Tensor
    n_targets: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)
    means: dict[str, torch.Tensor] = field(default_factory=dict)


def keeps_output_dtype(objective) -> bool:
    """Whether ``objective`` (a function, or a ``functools.partial`` of one) takes the model's outputs in the
    autocast dtype: marked with :func:`output_dtype_kept`. The engine then skips accelerate's cast of every
    forward output to fp32 for it (``engine.loop``)."""
    return bool(getattr(objective, "keeps_output_dtype", False)
                or getattr(getattr(objective, "func", None), "keeps_output_dtype", False))


def output_dtype_kept(fn):
    """Mark a loss function as one that computes in fp32 from logits of any dtype (``token_cross_entropy``):
    under bf16 autocast its model outputs need no fp32 copy (the cast of a SmolLM2 step's ~800 x 49,152 logits
    and its backward cost ~0.2 s of a 4.6 s step on one CPU core, and the loss then read twice the bytes)."""
    fn.keeps_output_dtype = True
    return fn


def token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, shift: bool = True,
                        chunk_size: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of token NLLs, number of target tokens). ``labels`` use -100 for ignored positions.

    ``shift=True`` predicts token t+1 from position t (causal LMs). ``chunk_size`` > 0 computes the
    loss over row chunks so a float32 copy of the whole (B, T, V) logits never exists at once.

    On CPUs with lmwright's kernel (``models.cpu_kernels.CrossEntropySum``: AVX-512) the loss and its gradient
    are computed in one pass over the logits in their own dtype, without an fp32 copy or a saved log-softmax
    (~6x faster than torch's path for SmolLM2's 49,152-word head); the same sum, to fp32 rounding.
    """
    import torch
    import torch.nn.functional as F

    from lmwright.models import cpu_kernels

    if shift:
        logits = logits[:, :-1, :]
        labels = labels[:, 1:]
    V = logits.shape[-1]  # logits (B, T, V) with labels (B, T), or already flat: (N, V) with (N,)
    flat_logits = logits.reshape(-1, V)  # (B*T, V)
    flat_labels = labels.reshape(-1)  # (B*T,)
    valid = flat_labels != IGNORE_INDEX
    n = valid.sum()
    if cpu_kernels.cross_entropy_usable(flat_logits) and bool(
            ((flat_labels >= 0) & (flat_labels < V) | ~valid).all()):  # else F.cross_entropy names the bad label
        return cpu_kernels.CrossEntropySum.apply(flat_logits, flat_labels), n
    if chunk_size and flat_logits.shape[0] > chunk_size:
        total = flat_logits.new_zeros((), dtype=torch.float32)
        for s in range(0, flat_logits.shape[0], chunk_size):
            total = total + F.cross_entropy(flat_logits[s:s + chunk_size].float(), flat_labels[s:s + chunk_size],
                                            ignore_index=IGNORE_INDEX, reduction="sum")
        return total, n
    loss = F.cross_entropy(flat_logits.float(), flat_labels, ignore_index=IGNORE_INDEX, reduction="sum")
    return loss, n


def sequence_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence sum of log p(label) over non-ignored (shifted) positions, and their counts.

    Returns ((B,) summed log-probs, (B,) token counts). Used by DPO-family, PPO/GRPO and UPFT.
    """
    import torch

    logits = logits[:, :-1, :].float()  # (B, T-1, V)
    labels = labels[:, 1:]  # (B, T-1)
    mask = labels != IGNORE_INDEX
    safe = labels.masked_fill(~mask, 0)
    logp = torch.log_softmax(logits, dim=-1).gather(-1, safe.unsqueeze(-1)).squeeze(-1)  # (B, T-1)
    logp = logp * mask
    return logp.sum(-1), mask.sum(-1)


# ------------------------------------------------------------------------ pretraining objectives
from lmwright.registry import Registry

# A pretraining objective bundles what a self-supervised objective needs: the model task it trains,
# a check run at `lmwright validate` time, dataset construction from texts, a collate function
# (where random corruption happens, drawing from torch's global RNG so resume is exact), the loss,
# and extra evaluation. Registered by name (clm, mlm, denoise, contrastive) in this package.
PRETRAIN_OBJECTIVES = Registry("objective", package="lmwright.objectives")


@output_dtype_kept
def causal_lm_loss(model, batch: dict, chunk_size: int = 4096) -> LossOutput:
    """Next-token loss of a causal LM on a (packed or padded) batch; sum over target tokens.

    Only positions whose next token is a target go through the output head (``selected_logits``): an SFT row is
    mostly prompt, and a (T x vocabulary) logits tensor, its log-softmax and its gradient are the largest
    tensors of a step. Packed rows attend per sample (``models.attention.packed_kwargs``). Prompt-learning
    methods prepend virtual tokens: the logits of the last T positions are the rows' own."""
    import torch

    from lmwright.models.attention import packed_kwargs

    labels = batch["labels"]
    kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch.get("attention_mask"), "use_cache": False}
    if batch.get("position_ids") is not None:
        kwargs["position_ids"] = batch["position_ids"]
    kwargs.update(packed_kwargs(model, batch))
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    logits = selected_logits(model, kwargs, torch.nn.functional.pad(keep, (0, 1)))
    if logits is None:  # no output head to select at: the whole (B, T, V)
        T = labels.shape[1]
        return LossOutput(*token_cross_entropy(model(**kwargs).logits[:, -T:], labels, shift=True,
                                               chunk_size=chunk_size))
    return LossOutput(*token_cross_entropy(logits, targets[keep], shift=False, chunk_size=chunk_size))


def selected_logits(model, kwargs: dict, select) -> torch.Tensor | None:
    """``model(**kwargs)``'s logits at the positions where ``select`` (B, T) is true, as an (n, V) tensor, computed
    by running the output head on those positions only (a pre-hook on ``get_output_embeddings()``; whatever the
    model does to logits after its head, e.g. soft-capping, still runs). None where there is no head module to
    hook (the caller computes full logits) or the model is compiled (a hook would recompile it)."""
    import torch

    bare = getattr(model, "module", model)  # DDP
    get = getattr(bare, "get_output_embeddings", None)
    head = get() if get is not None and not hasattr(bare, "_orig_mod") else None
    if not isinstance(head, torch.nn.Module):
        return None

    def pick(_module, args):
        hidden, rest = args[0], args[1:]
        extra = hidden.shape[1] - select.shape[1]  # virtual tokens of prompt learning come first
        mask = select if extra == 0 else torch.nn.functional.pad(select, (extra, 0))
        return (hidden[mask],) + rest

    handle = head.register_forward_pre_hook(pick)
    try:
        return model(**kwargs).logits
    finally:
        handle.remove()

"""Held-out answers of prompt-learning adapters are the trained model's: every generated token is the argmax
of the adapter model's own forward (the one training used). peft 0.21's cached ``generate`` under
transformers 5.24 is not (prefix differed from the first new token, prompt/P-tuning from the second)."""

from __future__ import annotations

import pytest
import torch

from lmwright.methods import MethodConfig, apply_method


def _model(name: str, tokenizer):
    from lmwright.models import ModelConfig, build_model

    model = build_model(ModelConfig(name="llama-tiny", dtype="float32"), tokenizer=tokenizer, seed=0)
    model = apply_method(model, MethodConfig(name=name, num_virtual_tokens=4, encoder_hidden_size=16), "causal-lm")
    torch.manual_seed(1)
    for p in model.parameters():
        if p.requires_grad:  # trained-looking virtual tokens, not the near-zero start
            torch.nn.init.normal_(p, std=0.1)
    return model.eval()


def _forward_greedy(model, prompt: list[int], n: int) -> list[int]:
    seq = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(n):
            nxt = model(input_ids=seq, attention_mask=torch.ones_like(seq)).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
    return seq[0, len(prompt):].tolist()


@pytest.mark.parametrize("method", ["prefix", "prompt", "ptuning"])
def test_generate_batch_follows_the_adapter_forward(tokenizer, method):
    from lmwright.engine.sampling import generate_batch as generate

    model = _model(method, tokenizer)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(5, len(tokenizer), (int(n),), generator=g).tolist() for n in (6, 9, 4, 12, 7, 5)]
    got = generate(model, tokenizer, prompts, max_new_tokens=8)
    for p, (ids, finished) in zip(prompts, got):
        ref = _forward_greedy(model, p, 8)
        assert ids == ref[:len(ids)] and (finished or len(ids) == 8)


def test_eval_generation_follows_the_adapter_forward(tokenizer):
    from lmwright.eval.generation import generate_answers

    model = _model("prefix", tokenizer)
    p = list(range(5, 11))
    ref = _forward_greedy(model, p, 4)
    from lmwright.data.chat import stop_token_ids

    stops = stop_token_ids(tokenizer)
    ref = ref[:next((i for i, t in enumerate(ref) if t in stops), len(ref))]
    assert generate_answers(model, tokenizer, [p], max_new_tokens=4) == [tokenizer.decode(ref, skip_special_tokens=True)]


@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_peft_cached_generate_still_disagrees_with_the_forward(tokenizer, method):
    """Why generate_uncached exists: the logits peft's cached generate() samples from are not the forward's.
    When this fails, peft/transformers agree again: drop generate_uncached (methods/peft_methods.py)."""
    model = _model(method, tokenizer)
    x = torch.tensor([list(range(5, 11))])
    with torch.no_grad():
        g = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=3, do_sample=False,
                           eos_token_id=None, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
        worst = 0.0
        for k, scores in enumerate(g.scores):
            pre = g.sequences[:, :x.shape[1] + k]
            logits = model(input_ids=pre, attention_mask=torch.ones_like(pre)).logits[:, -1]
            worst = max(worst, (logits - scores).abs().max().item())
    assert worst > 1e-3

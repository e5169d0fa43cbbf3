"""``engine.sampling.generate_batch``: the one batched generation of evaluation. It gives the tokens the two
generators it replaced gave (SFT's left-padded batches, ``eval --task generation``'s one prompt at a time)."""

from __future__ import annotations

import torch

from lmwright.data.chat import stop_token_ids
from lmwright.engine.sampling import generate_batch


def _prompts(tokenizer, lengths=(6, 9, 4, 12, 7, 5)):
    g = torch.Generator().manual_seed(0)
    return [torch.randint(5, len(tokenizer), (n,), generator=g).tolist() for n in lengths]


def _old_sft_generate(model, tokenizer, prompts, max_new_tokens, temperature=0.0, batch_size=16, seed=0):
    """stages/sft.py's ``generate`` before it moved (the non-adapter path), verbatim."""
    stops = stop_token_ids(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    model.eval()
    torch.manual_seed(seed)
    out = []
    for s in range(0, len(prompts), batch_size):
        chunk = prompts[s:s + batch_size]
        T = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), T), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), T), dtype=torch.long)
        for i, p in enumerate(chunk):
            ids[i, T - len(p):] = torch.tensor(p)
            mask[i, T - len(p):] = 1
        sampling = {"do_sample": True, "temperature": temperature, "top_k": 0} if temperature > 0 \
            else {"do_sample": False}
        with torch.no_grad():
            gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                 eos_token_id=stops, pad_token_id=pad, **sampling)
        for row in gen[:, T:].tolist():
            end = next((j for j, t in enumerate(row) if t in stops), None)
            out.append((row[:end] if end is not None else row, end is not None))
    return out


def _old_eval_answers(model, tokenizer, prompts, max_new_tokens):
    """eval/generation.py's ``generate_answers`` before (one prompt at a time), verbatim."""
    stops = stop_token_ids(tokenizer)
    model.eval()
    out = []
    with torch.no_grad():
        for ids in prompts:
            x = torch.tensor([ids])
            gen = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens,
                                 do_sample=False, eos_token_id=stops, pad_token_id=tokenizer.pad_token_id)
            new = [t for t in gen[0, len(ids):].tolist() if t not in stops]
            out.append(tokenizer.decode(new, skip_special_tokens=True))
    return out


def test_same_tokens_as_sft_generate_greedy_and_sampled(tokenizer, tiny_llama):
    prompts = _prompts(tokenizer)
    for temperature in (0.0, 0.9):
        ref = _old_sft_generate(tiny_llama, tokenizer, prompts, 8, temperature, batch_size=4, seed=3)
        got = generate_batch(tiny_llama, tokenizer, prompts, 8, temperature, batch_size=4, seed=3)
        assert got == ref


def test_same_answers_as_eval_one_prompt_at_a_time(tokenizer, tiny_llama):
    from lmwright.eval.generation import generate_answers

    prompts = _prompts(tokenizer)
    assert generate_answers(tiny_llama, tokenizer, prompts, 8) == _old_eval_answers(tiny_llama, tokenizer, prompts, 8)


def test_restores_the_mode_and_leaves_the_generator_alone_without_a_seed(tokenizer, tiny_llama):
    tiny_llama.train()
    torch.manual_seed(7)
    expected = torch.rand(1)
    torch.manual_seed(7)
    generate_batch(tiny_llama, tokenizer, _prompts(tokenizer, (3,)), 2, batch_size=1, seed=None)
    assert tiny_llama.training
    assert torch.equal(torch.rand(1), expected)


def test_stop_ids_end_the_answer(tokenizer, tiny_llama):
    p = _prompts(tokenizer, (5,))
    [(free, _)] = generate_batch(tiny_llama, tokenizer, p, 6, stop_ids=[])
    assert len(free) == 6
    [(cut, finished)] = generate_batch(tiny_llama, tokenizer, p, 6, stop_ids=[free[2]])
    assert finished and cut == free[:free.index(free[2])]

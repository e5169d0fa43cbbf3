"""The official ``openai`` client against a real server: what users will actually run."""

from __future__ import annotations

import pytest

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def client(server):
    url, _ = server
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=30)


def test_list_models(client):
    ids = sorted(m.id for m in client.models.list())
    assert ids == ["embedder", "tiny"]


def test_chat_completion_usage_and_finish(client, lm):
    messages = [{"role": "user", "content": "Tell me a story."}]
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0)
    c = r.choices[0]
    assert c.message.role == "assistant"
    assert c.finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens == len(lm.chat_ids(messages))
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    # same request through the Python API: same text (same template, same sampling code)
    assert c.message.content == lm.chat(messages, max_tokens=12, temperature=0)
    if c.finish_reason == "length":
        assert r.usage.completion_tokens == 12


def test_streaming_chat_equals_non_streaming(client):
    kw = dict(model="tiny", messages=[{"role": "user", "content": "Hello there"}], max_tokens=20, temperature=0)
    full = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    finishes = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert text == full.choices[0].message.content
    assert finishes == [full.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert len([ch for ch in chunks if ch.choices and ch.choices[0].delta.content]) > 1  # really streamed


def test_n_choices_seeded(client):
    kw = dict(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=8, temperature=1.0, seed=7, n=3)
    a = client.chat.completions.create(**kw)
    b = client.chat.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert len({c.message.content for c in a.choices}) > 1  # choices differ from each other


def test_chat_logprobs(client):
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=5,
                                       temperature=0, logprobs=True, top_logprobs=3)
    lps = r.choices[0].logprobs.content
    assert len(lps) == r.usage.completion_tokens > 0
    for lp in lps:
        assert lp.logprob <= 0
        assert len(lp.top_logprobs) == 3
        # greedy: the chosen token is the most likely one
        assert abs(lp.top_logprobs[0].logprob - lp.logprob) < 1e-5


def test_completions(client):
    r = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=6, temperature=0)
    assert r.object == "text_completion"
    assert r.choices[0].finish_reason in ("stop", "length")
    s = list(client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=6, temperature=0,
                                       stream=True))
    assert "".join(c.choices[0].text for c in s) == r.choices[0].text


def test_embeddings(client, embedder):
    r = client.embeddings.create(model="embedder", input=["a cat", "a dog", "a cat"])
    vecs = [d.embedding for d in r.data]
    assert len(vecs) == 3 and len(vecs[0]) == embedder.model.config.hidden_size
    assert vecs[0] == pytest.approx(vecs[2], abs=1e-5)
    assert abs(sum(x * x for x in vecs[0]) - 1) < 1e-4
    assert r.usage.prompt_tokens == embedder.count_tokens(["a cat", "a dog", "a cat"])


def test_completions_n_logprobs_echo(client):
    r = client.completions.create(model="tiny", prompt="The dog", max_tokens=4, temperature=0.8, seed=3, n=2,
                                  logprobs=2, echo=True, stop=None)
    assert [c.index for c in r.choices] == [0, 1]
    for c in r.choices:
        assert c.text.startswith("The dog")
        lp = c.logprobs
        assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs)
        assert all(len(t) <= 2 for t in lp.top_logprobs)
    assert r.usage.completion_tokens == sum(len(c.logprobs.tokens) for c in r.choices)


def test_ignore_eos_extension_runs_to_max_tokens(client):
    """vLLM's ``ignore_eos`` extension (the load benchmark uses it): exactly max_tokens tokens, finish 'length'."""
    for seed in range(3):
        r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=40,
                                           temperature=1.5, seed=seed, extra_body={"ignore_eos": True})
        assert r.usage.completion_tokens == 40 and r.choices[0].finish_reason == "length"

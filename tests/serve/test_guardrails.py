"""Each guardrail rule, and the same rules applied by the Python API and the HTTP server."""

from __future__ import annotations

import httpx
import pytest

from lmwright.serve.guardrails import Guardrails, GuardrailsConfig, InputRules, OutputRules, validate_json

from .conftest import running_server


def G(**kw) -> Guardrails:
    return Guardrails(GuardrailsConfig(input=InputRules(**kw.pop("input", {})), output=OutputRules(**kw.pop("output",
                                                                                                         {}))))


def test_input_max_length_and_block_lists():
    g = G(input=dict(max_chars=10, block_keywords=["bomb"], block_patterns=[r"pass(word)?\s*="]))
    assert g.check_input("x" * 11).refused and g.counters["input_max_chars"] == 1
    assert g.check_input("a BOMB").refused and g.counters["input_block"] == 1
    assert g.check_input("password=1").refused and g.counters["input_block"] == 2
    assert not g.check_input("hello").refused


def test_pii_redaction():
    g = G(input=dict(redact_pii=True))
    v = g.check_input("mail jane.doe@example.com or call +1 (555) 123-4567 or 13812345678, in 2024")
    assert "[EMAIL]" in v.text and v.text.count("[PHONE]") == 2
    assert "example.com" not in v.text and "555" not in v.text
    assert "2024" in v.text  # a year is not a phone number
    assert g.counters == {"input_pii_email": 1, "input_pii_phone": 1}


def test_template_wraps_only_the_new_turn():
    g = G(input=dict(template="Be brief.\n{prompt}"))
    msgs, v = g.check_messages([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                                {"role": "user", "content": "c"}])
    assert not v.refused
    assert [m["content"] for m in msgs] == ["a", "b", "Be brief.\nc"]


def test_output_mask_refuse_and_length_cap():
    g = G(output=dict(block_keywords=["secret"], max_chars=20))
    v = g.check_output("the Secret code is 42, really long text")
    assert v.text == "the [REDACTED] code "[:20] and g.counters["output_block_mask"] == 1
    assert g.counters["output_max_chars"] == 1
    r = G(output=dict(block_patterns=[r"\d{4}"], block_action="refuse", refusal="no."))
    assert r.check_output("pin 1234").text == "no." and r.check_output("pin 1234").refused


def test_stream_guard_masks_across_chunk_boundaries():
    g = G(output=dict(block_keywords=["secret"]))
    s = g.stream_filter()
    out = "".join(s.push(c) for c in ["the sec", "ret is s", "ecret!", " ok"]) + s.finish()
    assert out == "the [REDACTED] is [REDACTED]! ok"
    assert "sec" not in out.replace("[REDACTED]", "")


def test_output_stop_strings_merge():
    g = G(output=dict(stop=["\n\n"]))
    assert g.stop_strings(["END"]) == ["END", "\n\n"]


def test_json_schema_validation_and_retry():
    schema = {"type": "object", "required": ["name"], "properties": {"name": {"type": "string"},
                                                                      "age": {"type": "integer", "minimum": 0}}}
    assert validate_json('{"name": "a", "age": 3}', schema) == ""
    assert "missing" in validate_json('{"age": 3}', schema) or "required" in validate_json('{"age": 3}', schema)
    assert validate_json('{"name": "a", "age": -1}', schema)
    assert validate_json("not json", schema)
    g = G(output=dict(json_schema=schema, json_retries=2))
    replies = iter(["oops", '{"nam": 1}', '{"name": "ok"}'])
    v = g.generate_checked(lambda: next(replies))
    assert v.valid and v.text == '{"name": "ok"}' and g.counters["output_json_retry"] == 2
    g2 = G(output=dict(json_schema=schema, json_retries=1))
    assert not g2.generate_checked(lambda: "never json").valid


def test_bad_config_is_refused():
    from lmwright.config import ConfigError

    with pytest.raises(ConfigError):
        G(output=dict(block_action="explode"))
    with pytest.raises(ConfigError):
        G(input=dict(template="no placeholder"))
    with pytest.raises(ConfigError):
        G(input=dict(block_patterns=["(unclosed"]))


def test_yaml_file_and_same_rules_in_api_and_server(tmp_path, lm):
    from lmwright.serve.guardrails import load_guardrails

    f = tmp_path / "g.yaml"
    f.write_text("input:\n  block_keywords: [forbidden]\n  refusal: Nope.\noutput:\n  max_chars: 5\n")
    g = load_guardrails(f)
    lm.guardrails, old = g, lm.guardrails
    try:
        assert lm.chat("this is forbidden") == "Nope."
        assert len(lm.chat("hello", max_tokens=20, temperature=0)) <= 5
        assert "".join(lm.stream_chat("tell me", max_tokens=20, temperature=0)) == lm.chat("tell me", max_tokens=20,
                                                                                           temperature=0)
        with running_server({"tiny": lm}, guardrails=g) as (url, _):
            r = httpx.post(url + "/v1/chat/completions", json={"model": "tiny", "max_tokens": 20, "messages": [
                {"role": "user", "content": "forbidden stuff"}]}, timeout=10).json()
            assert r["choices"][0]["message"]["content"] == "Nope."
            assert r["choices"][0]["finish_reason"] == "content_filter"
            r = httpx.post(url + "/v1/chat/completions", json={"model": "tiny", "max_tokens": 20, "temperature": 0,
                                                               "messages": [{"role": "user", "content": "hello"}]},
                           timeout=10).json()
            assert r["choices"][0]["message"]["content"] == lm.chat("hello", max_tokens=20, temperature=0)
            metrics = httpx.get(url + "/metrics").text
            assert 'lmwright_guardrail_firings_total{rule="input_block"}' in metrics
    finally:
        lm.guardrails = old

"""upft: prefix/full split of the sampled responses, the loss stops after k response tokens, both times
(upft sampling + training, and sft on the same prompts) land in run.json."""

from __future__ import annotations

import json

import pytest

from lmwright.config import ConfigError, load_config


@pytest.fixture
def base_dir(tmp_path, tokenizer):
    from lmwright.models import ModelConfig, build_model

    model = build_model(ModelConfig(name="llama-tiny"), task="causal-lm", tokenizer=tokenizer, seed=0)
    out = tmp_path / "base"
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return out


def _cfg(overrides: list[str]):
    from lmwright.stages.upft import UPFTConfig

    return load_config(UPFTConfig, overrides=overrides)


def test_options_are_checked():
    for bad, key in (("prefix_tokens=4", "prefix_tokens"), ("full_share=1.5", "full_share")):
        with pytest.raises(ConfigError, match=key):
            _cfg([bad])
    assert _cfg([]).prefix_tokens == 16 and _cfg([]).full_share == 0.1


def test_prompt_conversations_drop_answers():
    from lmwright.stages.upft import prompt_conversations

    recs = [{"system": "", "instruction": "Add.", "input": "1 + 2", "output": "3"}]
    assert prompt_conversations(recs, "alpaca", None) == [[{"role": "user", "content": "Add.\n1 + 2"}]]
    chat = [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                          {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]}]
    assert [m["content"] for m in prompt_conversations(chat, "messages", "S")[0]] == ["S", "a", "b", "c"]
    assert prompt_conversations([{"text": "Why?"}], "text", None) == [[{"role": "user", "content": "Why?"}]]


def test_upft_run_with_sft_timing(tmp_path, base_dir, tokenizer):
    from lmwright.data.chat import IM_END
    from lmwright.data.synthetic import instruction_task
    from lmwright.stages import sft
    from lmwright.stages.upft import run

    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in instruction_task(60, seed=1)))
    cfg = _cfg([f"model.name={base_dir}", "method.name=lora", f"data.path=[{data}]", "data.val_fraction=0.1",
                "prefix_tokens=8", "full_share=0.25", "max_new_tokens=16", "temperature=1.0", "seq_len=128",
                "train.max_steps=3", "train.micro_batch_size=4", "train.eval_every=0", "train.save_every=0",
                f"train.output_dir={tmp_path}/runs", "train.run_name=u", "train.progress=false",
                "eval_generate=3", "compare_sft=true"])
    d = run(cfg)
    sampled = [json.loads(line) for line in (d / "samples.jsonl").read_text().splitlines()]
    n_full = sum(s["full"] for s in sampled)
    assert n_full == round(0.25 * len(sampled)) and n_full > 0
    assert all(s["response_tokens"] <= 8 for s in sampled if not s["full"])
    assert all(s["messages"][-1]["role"] == "assistant" and s["messages"][-2]["role"] == "user" for s in sampled)
    # the loss of a prefix sample covers at most k tokens and no end-of-turn unless the answer had ended
    im_end = tokenizer.convert_tokens_to_ids(IM_END)
    unfinished = [s for s in sampled if not s["full"] and not s["finished"]]
    assert unfinished
    for s in unfinished:
        (ids, labels), = sft.encode(tokenizer, [s["messages"]], "last", 128, [8])[0]
        trained = [t for t in labels if t != -100]
        assert 0 < len(trained) <= 8 and im_end not in trained
    info = json.loads((d / "run.json").read_text())
    t = info["timing"]
    assert t["upft"]["sample_seconds"] > 0 and t["upft"]["train_seconds"] > 0
    assert t["sft"]["train_seconds"] > 0 and (tmp_path / "runs" / "u-sft" / "final").exists()
    assert t["upft"]["trained_tokens"] > 0 and t["sft"]["trained_tokens"] > 0
    assert (d / "final" / "adapter_config.json").exists()
    assert "upft vs sft" in (d / "report.html").read_text()

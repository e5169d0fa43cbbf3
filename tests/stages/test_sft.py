"""sft: the conversion and tokenisation path, train/serve token parity, validate-time errors, a fast
LoRA run from a local base folder and a padded prompt-tuning run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmwright.config import ConfigError, load_config


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def base_dir(tmp_path, tokenizer):
    """A tiny llama saved as a local Hugging Face folder (a base for methods that need one)."""
    from lmwright.models import ModelConfig, build_model

    model = build_model(ModelConfig(name="llama-tiny"), task="causal-lm", tokenizer=tokenizer, seed=0)
    out = tmp_path / "base"
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return out


def _cfg(overrides: list[str]):
    from lmwright.stages.sft import SFTConfig

    return load_config(SFTConfig, overrides=overrides)


def test_alpaca_to_messages():
    from lmwright.data.chat import alpaca_to_messages

    r = {"system": "", "instruction": "Add the two numbers.", "input": "2 + 3", "output": "5"}
    assert alpaca_to_messages(r) == [{"role": "user", "content": "Add the two numbers.\n2 + 3"},
                                     {"role": "assistant", "content": "5"}]
    assert alpaca_to_messages(r, "Be brief.")[0] == {"role": "system", "content": "Be brief."}
    own = dict(r, system="Own system.", input="")
    msgs = alpaca_to_messages(own, "Be brief.")
    assert msgs[0]["content"] == "Own system." and msgs[1]["content"] == "Add the two numbers."
    assert alpaca_to_messages(dict(r, output=""))[-1]["role"] == "user"  # a prompt to answer


def test_trained_tokens_equal_served_tokens(tokenizer):
    """The ids SFT trains on start with exactly what the server feeds, and the trained tokens that
    follow are the assistant's answer and its end-of-turn token."""
    from lmwright.data.chat import IM_END, render_prompt_ids
    from lmwright.stages.sft import conversations, encode

    recs = [{"messages": [{"role": "user", "content": "What is the capital of Norland?"},
                          {"role": "assistant", "content": "Oslo"},
                          {"role": "user", "content": "Write the word in capital letters.\nfox"},
                          {"role": "assistant", "content": "FOX"}]}]
    for train_on in ("assistant", "last"):
        convs = conversations(recs, "messages", system_prompt="You are a precise assistant.")
        assert convs[0][0]["role"] == "system"
        (ids, labels), = encode(tokenizer, convs, train_on, seq_len=512)[0]
        prompt = render_prompt_ids(tokenizer, convs[0][:-1])
        assert ids[:len(prompt)] == prompt
        trained_after = []
        for t, lab in zip(ids[len(prompt):], labels[len(prompt):]):
            if lab == -100:
                break
            assert t == lab
            trained_after.append(t)
        want = tokenizer("FOX", add_special_tokens=False)["input_ids"] + [tokenizer.convert_tokens_to_ids(IM_END)]
        assert trained_after == want
        assert all(lab == -100 for lab in labels[:len(prompt)][-3:])  # the prompt itself is not trained
        first_answer_trained = any(lab != -100 for lab in labels[:len(prompt)])
        assert first_answer_trained == (train_on == "assistant")


def test_keep_first_trained_and_truncation(tokenizer):
    from lmwright.stages.sft import encode

    conv = [[{"role": "user", "content": "Reverse the order of the words.\ncat dog fox"},
             {"role": "assistant", "content": "fox dog cat and a much longer tail of words to cut"}]]
    (full_ids, full_lab), = encode(tokenizer, conv, "last", 512)[0]
    (ids, lab), = encode(tokenizer, conv, "last", 512, keep_trained=[3])[0]
    assert sum(x != -100 for x in lab) == 3 and ids == full_ids[:len(ids)]
    assert sum(x != -100 for x in full_lab) > 3
    samples, stats = encode(tokenizer, conv, "last", 8)
    assert stats["dropped_no_target"] == 1 and not samples  # the answer was cut off entirely


def test_validate_errors_name_the_option(tmp_path, tokenizer_dir, base_dir):
    from lmwright.stages.sft import check

    data = _write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Hi", "output": "Hello"}] * 4)
    common = [f"tokenizer={tokenizer_dir}", f"data.path=[{data}]"]
    with pytest.raises(ConfigError, match="data.format"):
        check(_cfg(common + ["data.format=text"]))
    with pytest.raises(ConfigError, match="packing=false"):
        check(_cfg(common + [f"model.name={base_dir}", "method.name=prefix", "packing=true"]))
    with pytest.raises(ConfigError, match="model.name"):
        check(_cfg(common + ["model.name=bert-tiny"]))
    with pytest.raises(ConfigError, match="model.quantize"):
        check(_cfg(common + ["model.name=llama-tiny", "model.quantize=nf4", "method.name=lora"]))
    with pytest.raises(ConfigError, match="model.quantize"):
        check(_cfg(common + [f"model.name={base_dir}", "model.quantize=nf4", "method.name=full"]))
    with pytest.raises(ConfigError, match="prefix_tokens"):
        from lmwright.stages.upft import UPFTConfig

        load_config(UPFTConfig, overrides=["prefix_tokens=40"])
    ok = check(_cfg(common + [f"model.name={base_dir}", "method.name=lora"]))
    assert ok["tokenizer"].chat_template


def test_sft_lora_fast(tmp_path, base_dir):
    """LoRA from a local base folder: val loss drops, final/ is an adapter that loads to the same logits."""
    import torch

    from lmwright.data.synthetic import instruction_task
    from lmwright.methods import load_trained
    from lmwright.stages.sft import run

    data = _write_jsonl(tmp_path / "inst.jsonl", instruction_task(100, seed=3))
    cfg = _cfg([f"model.name={base_dir}", "method.name=lora", "method.r=8", f"data.path=[{data}]",
                "data.val_fraction=0.15", "seq_len=128", "train.max_steps=8", "train.micro_batch_size=8",
                "train.lr=3e-3", "train.warmup_steps=2", "train.eval_every=0", "train.save_every=0",
                f"train.output_dir={tmp_path}/runs", "train.run_name=lora", "train.progress=false",
                "eval_generate=4", "max_new_tokens=6", "samples=2"])
    d = run(cfg)
    info = json.loads((d / "run.json").read_text())
    assert info["after"]["val_loss"] < info["before"]["val_loss"] - 0.1
    assert 0 < info["trainable_pct"] < 50 and info["packing"] is True
    assert len(info["samples"]) == 2 and {"prompt", "reference", "before", "after"} <= set(info["samples"][0])
    final = d / "final"
    meta = json.loads((final / "lmwright.json").read_text())
    assert meta["method"] == "lora" and meta["task"] == "causal-lm" and meta["base"] == str(base_dir.resolve())
    assert json.loads((final / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base_dir.resolve())
    assert "exact_match" in (d / "report.html").read_text()
    model, tok = load_trained(final)
    ids = torch.tensor([tok("What is the capital of")["input_ids"]])
    base, _ = load_trained(base_dir)
    with torch.no_grad():
        assert not torch.allclose(model(input_ids=ids).logits, base(input_ids=ids).logits, atol=1e-4)


def test_sft_padded_prompt_tuning_runs(tmp_path, base_dir):
    """Virtual-token methods train on padded rows (their logits carry the virtual positions)."""
    from lmwright.data.synthetic import chat_task
    from lmwright.stages.sft import run

    data = _write_jsonl(tmp_path / "chat.jsonl", chat_task(60, seed=4))
    cfg = _cfg([f"model.name={base_dir}", "method.name=prompt", "method.num_virtual_tokens=4", f"data.path=[{data}]",
                "data.format=messages", "seq_len=256", "train.max_steps=4", "train.micro_batch_size=4",
                "train.lr=1e-2", "train.eval_every=0", "train.save_every=0", f"train.output_dir={tmp_path}/runs",
                "train.run_name=prompt", "train.progress=false", "eval_generate=2", "max_new_tokens=4"])
    d = run(cfg)
    info = json.loads((d / "run.json").read_text())
    assert info["packing"] is False and info["after"]["val_loss"] < info["before"]["val_loss"]
    assert (d / "final" / "adapter_config.json").exists()


@pytest.mark.parametrize("method", ["full", "lora"])
def test_exact_match_generates_under_the_training_precision(tokenizer, method):
    """Held-out answers are generated under the run's autocast whatever the method: a PeftModel's generate
    calls the inner model's forward, which the accelerator's autocast wrapper never sees, so LoRA runs used
    to answer in fp32 while their losses were measured in bf16 (and `lmwright eval` disagreed with run.json)."""
    import torch

    from lmwright.methods import MethodConfig, apply_method
    from lmwright.models import ModelConfig, build_model
    from lmwright.stages.sft import exact_match

    model = build_model(ModelConfig(name="llama-tiny"), tokenizer=tokenizer, seed=0)
    model = apply_method(model, MethodConfig(name=method), "causal-lm")
    seen: list[bool] = []
    inner = next(m for m in model.modules() if type(m).__name__ == "LlamaModel")
    inner.register_forward_hook(lambda *_: seen.append(torch.is_autocast_enabled("cpu")))
    convs = [[{"role": "user", "content": "2 + 2?"}, {"role": "assistant", "content": "4"}]]
    exact_match(model, tokenizer, convs, max_new_tokens=3, precision="bf16")
    assert seen and all(seen)
    seen.clear()
    exact_match(model, tokenizer, convs, max_new_tokens=3, precision="no")
    assert seen and not any(seen)


def test_exact_match_prompts_carry_the_conversation_tools(monkeypatch):
    """The held-out prompts of a tool-calling conversation are rendered with its tools, as training rendered
    them (slicing off the answer used to drop the Conversation's tools)."""
    from lmwright.data import chat
    from lmwright.stages import sft

    class Stop(Exception):
        pass

    seen = []

    def fake_render(tokenizer, messages, tools=None):
        seen.append(tools)
        raise Stop

    monkeypatch.setattr(chat, "render_prompt_ids", fake_render)
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    conv = sft.conversations([{"messages": [{"role": "user", "content": "Weather?"},
                                            {"role": "assistant", "content": "Sunny."}], "tools": tools}],
                             "messages")[0]
    with pytest.raises(Stop):
        sft.exact_match(__import__("torch").nn.Linear(1, 1), None, [conv], max_new_tokens=4)
    assert seen == [tools]


@pytest.mark.parametrize("overrides, frozen_dtype", [
    (["method.name=lora", "train.mixed_precision=bf16"], "bfloat16"),
    (["method.name=lora", "train.mixed_precision=bf16", "model.dtype=float32"], "float32"),  # asked for fp32
    (["method.name=lora", "train.mixed_precision=no"], "float32"),
    (["method.name=freeze", "train.mixed_precision=bf16"], "float32"),  # final/ saves the frozen layers too
])
def test_adapter_base_held_in_bf16_under_bf16_training(tmp_path, tokenizer, base_dir, overrides, frozen_dtype):
    import torch

    from lmwright.stages._sft import build_causal_model, sft_loss

    cfg = _cfg([f"model.name={base_dir}", *overrides])
    model, _ = build_causal_model(cfg, tokenizer, tmp_path)
    frozen = {str(p.dtype).removeprefix("torch.") for p in model.parameters() if not p.requires_grad}
    trained = {str(p.dtype).removeprefix("torch.") for p in model.parameters() if p.requires_grad}
    assert frozen == {frozen_dtype} and trained == {"float32"}
    ids = torch.randint(3, 200, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled="train.mixed_precision=bf16" in overrides):
        loss = sft_loss(model, {"input_ids": ids, "labels": ids.clone()}).loss_sum
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)


def test_sft_lora_bf16_final_loads_on_the_fp32_base(tmp_path, base_dir):
    """Trained against a bf16-held base, final/ is the fp32 adapter on the untouched fp32 base folder."""
    import torch

    from lmwright.data.synthetic import instruction_task
    from lmwright.methods import load_trained
    from lmwright.stages.sft import run

    data = _write_jsonl(tmp_path / "inst.jsonl", instruction_task(40, seed=3))
    cfg = _cfg([f"model.name={base_dir}", "method.name=lora", f"data.path=[{data}]", "data.val_fraction=0.2",
                "seq_len=96", "train.max_steps=3", "train.micro_batch_size=4", "train.mixed_precision=bf16",
                "train.eval_every=0", "train.save_every=0", f"train.output_dir={tmp_path}/runs", "train.run_name=b",
                "train.progress=false", "eval_generate=0", "samples=0"])
    final = run(cfg) / "final"
    model, _ = load_trained(final)
    assert {p.dtype for p in model.parameters()} == {torch.float32}

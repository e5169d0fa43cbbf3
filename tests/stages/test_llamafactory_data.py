"""Stages on the data users already have: ``train dpo`` on sharegpt preference pairs, ``train dpo loss=kto`` on
unpaired labelled replies (``data.format=kto``, real KTO: one loss term per reply, z0 from mismatched pairs),
``train sft`` on tool-call conversations (the tools reach the chat template) and on kto data (desirable replies).
The slow tests run each acceptance line on the real LLaMA-Factory demo files when ../shared/data has them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmwright.config import ConfigError
from tests.stages.conftest import stage_config, write_jsonl

LF = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "llamafactory"
needs_lf = pytest.mark.skipif(not (LF / "dataset_info.json").is_file(), reason="needs ../shared/data/llamafactory")

# ChatML that renders tool schemas (a system block) and tool calls (<tool_call>{json}</tool_call> in the
# assistant turn), with {% generation %} blocks: the kind of template Qwen2.5 ships, small.
TOOLS_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if tools %}{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] + '\\n\\n' }}{%- endif %}"
    "{{- 'Tools:' }}{%- for t in tools %}{{- '\\n' + (t | tojson) }}{%- endfor %}{{- '<|im_end|>\\n' }}"
    "{%- elif messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' and loop.first %}"
    "{%- elif message['role'] == 'assistant' %}{{- '<|im_start|>assistant\\n' }}"
    "{%- generation %}{{- message['content'] }}"
    "{%- for c in message.tool_calls or [] %}{{- '<tool_call>' + (c['function'] | tojson) + '</tool_call>' }}"
    "{%- endfor %}{{- '<|im_end|>' }}{%- endgeneration %}{{- '\\n' }}"
    "{%- else %}{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
TOOL = {"name": "get_weather", "description": "Weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


def glaive_like(n: int) -> list[dict]:
    cities = ["Oslo", "Rome", "Lima", "Kyiv", "Pune", "Nice"]
    return [{"conversations": [{"from": "human", "value": f"Weather in {c}?"},
                               {"from": "function_call", "value": json.dumps({"name": "get_weather",
                                                                               "arguments": {"city": c}})},
                               {"from": "observation", "value": json.dumps({"temp": i})},
                               {"from": "gpt", "value": f"It is {i} degrees in {c}."}],
             "tools": json.dumps([TOOL])} for i, c in ((i, cities[i % len(cities)]) for i in range(n))]


def _model_folder(out: Path, tokenizer) -> Path:
    from lmwright.models import ModelConfig, build_model
    from lmwright.stages.common import save_final

    save_final(build_model(ModelConfig(name="llama-tiny"), tokenizer=tokenizer, seed=0), tokenizer, out, "causal-lm")
    return out


@pytest.fixture(scope="module")
def tools_model(tmp_path_factory, tokenizer):
    """A random llama-tiny folder whose tokenizer's chat template renders tools and tool calls."""
    tok = type(tokenizer).from_pretrained(tokenizer.name_or_path)
    tok.chat_template = TOOLS_TEMPLATE
    return _model_folder(tmp_path_factory.mktemp("tools") / "model", tok)


@pytest.fixture(scope="module")
def base_model(tmp_path_factory, tokenizer):
    """A random llama-tiny folder with lmwright's ChatML (no tools support)."""
    return _model_folder(tmp_path_factory.mktemp("base") / "model", tokenizer)


def _train(stage: str, tmp_path: Path, model: Path, data: str, *overrides: str) -> tuple[Path, dict]:
    """A few steps of ``stage`` on ``data``; (run folder, run.json)."""
    from lmwright.stages import STAGES

    run_dir = STAGES.get(stage).run(stage_config(
        stage, f"model.name={model}", f"data.path=[{data}]", f"train.output_dir={tmp_path}", "train.eval_every=0",
        "data.val_fraction=0.1", *overrides))
    return run_dir, json.loads((run_dir / "run.json").read_text())


def kto_records(n_pairs: int) -> list[dict]:
    """Unpaired records from generated pairs: each prompt twice in a row (desirable, then undesirable)."""
    from lmwright.data.synthetic import preference_task

    out = []
    for r in preference_task(n_pairs, seed=5):
        out.append({"prompt": r["prompt"], "completion": r["chosen"], "label": True})
        out.append({"prompt": r["prompt"], "completion": r["rejected"], "label": False})
    return out


# ------------------------------------------------------------------------------------ dpo / kto: data and checks
def test_unpaired_items_pair_each_reply_with_a_reply_to_another_prompt(tokenizer):
    """z0's mismatched pair takes the reply of the next record whose prompt differs: with each prompt twice in a
    row, the neighbour would be a matched pair."""
    from lmwright.data import FORMATS
    from lmwright.stages._align import encode_reply
    from lmwright.stages.dpo import unpaired_items

    fmt = FORMATS.get("kto")
    recs = [fmt.canonicalize(r, "x:1") for r in kto_records(4)]
    cfg = stage_config("dpo", "loss=kto", "data.format=kto", "max_length=128")
    items, skipped = unpaired_items(recs, tokenizer, cfg)
    assert skipped == 0 and [it["desirable"] for it in items] == [1.0, 0.0] * 4
    for i, it in enumerate(items):
        assert it["reply"] == encode_reply(tokenizer, recs[i]["prompt"], recs[i]["completion"], 384, 128)
        j = (i + 2 - i % 2) % len(recs)  # the first record of the next prompt
        assert it["mismatch"] == encode_reply(tokenizer, recs[i]["prompt"], recs[j]["completion"], 384, 128)


def test_kto_balance_note():
    from lmwright.stages.dpo import kto_balance_note

    cfg = stage_config("dpo", "loss=kto", "data.format=kto")
    items = [{"desirable": 1.0}] * 30 + [{"desirable": 0.0}] * 10
    assert "[0.33, 0.44]" in kto_balance_note(items, cfg)  # trl's advice for 3x more desirable replies
    assert kto_balance_note(items[:10] + items[-10:], cfg) is None
    assert "no undesirable reply" in kto_balance_note(items[:10], cfg)


def test_kto_objective_scores_mismatched_pairs_without_gradient(tokenizer, tiny_llama):
    """Each reply's loss term is KTO's (desirable or undesirable) with z0 = the clamped batch mean of the
    mismatched pairs' log-ratios, and no gradient flows through z0."""
    import torch

    from lmwright.data import FORMATS
    from lmwright.objectives.base import sequence_logprobs
    from lmwright.objectives.preference import kto_kl_estimate, kto_loss
    from lmwright.stages._align import collate_pairs
    from lmwright.stages.dpo import make_objective, unpaired_items

    recs = [FORMATS.get("kto").canonicalize(r, "x:1") for r in kto_records(3)]
    cfg = stage_config("dpo", "loss=kto", "data.format=kto", "max_length=128", "beta=0.5")
    items, _ = unpaired_items(recs, tokenizer, cfg)
    for it in items:  # a reference that differs from the policy, so that z0 > 0 matters
        it["ref_a"], it["ref_b"] = -40.0, -60.0
    batch = collate_pairs(items, tokenizer.pad_token_id, keys=("reply", "mismatch"))
    out = make_objective(cfg, ref=None)(tiny_llama, batch)
    with torch.no_grad():
        logps, _ = sequence_logprobs(tiny_llama(input_ids=batch["input_ids"],
                                                attention_mask=batch["attention_mask"]).logits, batch["labels"])
    a, b = logps.chunk(2)
    z0 = kto_kl_estimate(b, batch["ref_b"])
    want = kto_loss(a, batch["ref_a"], batch["desirable"].bool(), z0, 0.5)
    assert torch.allclose(out.loss_sum, want.loss_sum, atol=1e-5) and out.means["kl"] == pytest.approx(float(z0))
    out.loss_sum.backward()  # only the replies' forward is in the graph
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in tiny_llama.parameters())


def test_checks_name_the_fix(tmp_path, tokenizer_dir):
    from lmwright.stages import STAGES

    data = write_jsonl(tmp_path / "kto.jsonl", kto_records(2))
    with pytest.raises(ConfigError, match="data.format=kto with loss=sigmoid.*set loss=kto"):
        STAGES.get("dpo").check(stage_config("dpo", f"tokenizer={tokenizer_dir}", f"data.path=[{data}]",
                                             "data.format=kto"))
    with pytest.raises(ConfigError, match="train dpo loss=kto data.format=kto"):
        STAGES.get("reward").check(stage_config("reward", f"tokenizer={tokenizer_dir}", f"data.path=[{data}]",
                                                "data.format=kto"))


def test_dpo_kto_on_unpaired_records_trains(tmp_path, base_model):
    """``train dpo loss=kto`` on kto records: one item per record, both classes, a finite loss and a z0 metric."""
    data = write_jsonl(tmp_path / "kto.jsonl", kto_records(40))
    run_dir, info = _train("dpo", tmp_path, base_model, str(data), "data.format=kto", "loss=kto", "max_length=64",
                           "train.max_steps=2", "train.micro_batch_size=4", "train.metric_for_best=val_loss")
    assert info["train_items"] + info["val_items"] >= 60 and info["skipped_records"] == 0  # (dedup drops a few)
    assert info["after"]["val_loss"] == info["after"]["val_loss"] and "val_kl" in info["after"]
    assert (run_dir / "final" / "model.safetensors").exists()


# ------------------------------------------------------------------------------------ sft
def test_sft_conversations_carry_tools_and_kto_gives_desirable_replies():
    from lmwright.data import FORMATS
    from lmwright.stages.sft import conversations

    recs = [FORMATS.get("messages").canonicalize(r, "x:1") for r in glaive_like(2)]
    convs = conversations(recs, "messages", system_prompt="Use tools.")
    assert convs[0].tools == [{"type": "function", "function": TOOL}]
    assert convs[0][0] == {"role": "system", "content": "Use tools."} and convs[0][2]["tool_calls"]
    kto = [FORMATS.get("kto").canonicalize(r, "x:1") for r in kto_records(2)]
    convs = conversations(kto, "kto")
    assert len(convs) == 2 and [c[-1] for c in convs] == [r["completion"][0] for r in kto if r["label"]]
    assert convs[0].tools is None


def test_sft_renders_the_tools_of_each_conversation(tools_model):
    """The tools of a record reach the chat template: the trained sample shows the schema, and the call is a
    trained (assistant) token run."""
    from transformers import AutoTokenizer

    from lmwright.data import FORMATS
    from lmwright.stages.sft import conversations, encode

    tok = AutoTokenizer.from_pretrained(str(tools_model))
    recs = [FORMATS.get("messages").canonicalize(r, "x:1") for r in glaive_like(1)]
    (ids, labels), = encode(tok, conversations(recs, "messages"), "assistant", 1024)[0]
    assert '"name": "get_weather", "description": "Weather of a city"' in tok.decode(ids)
    trained = tok.decode([t for t, lab in zip(ids, labels) if lab != -100])
    assert '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>' in trained
    assert "It is 0 degrees in Oslo." in trained


def test_sft_on_tools_without_template_support_says_so(tmp_path, base_model):
    """lmwright's own ChatML renders no tools: training on records with tools stops with a clear error."""
    from lmwright.stages.sft import run

    data = write_jsonl(tmp_path / "tools.jsonl", glaive_like(12))
    cfg = stage_config("sft", f"model.name={base_model}", f"data.path=[{data}]", "data.format=messages",
                       f"train.output_dir={tmp_path}", "train.max_steps=1", "eval_generate=0")
    with pytest.raises(ConfigError, match="does not support tools"):
        run(cfg)


# ------------------------------------------------------------------------------------ the acceptance lines
DPO_SMALL = ("train.max_steps=3", "train.micro_batch_size=4", "max_length=256", "max_prompt_tokens=192",
             "data.max_records=32")


@needs_lf
@pytest.mark.slow
def test_train_dpo_on_dpo_en_demo(tmp_path, base_model):
    run_dir, info = _train("dpo", tmp_path, base_model, str(LF / "dpo_en_demo.json"), *DPO_SMALL)
    assert info["train_items"] >= 8 and info["after"]["val_loss"] == info["after"]["val_loss"]
    assert (run_dir / "final" / "model.safetensors").exists()


@needs_lf
@pytest.mark.slow
def test_train_dpo_kto_on_kto_en_demo(tmp_path, base_model):
    run_dir, info = _train("dpo", tmp_path, base_model, f"{LF / 'dataset_info.json'}:kto_en_demo", *DPO_SMALL,
                           "data.format=kto", "loss=kto", "train.metric_for_best=val_loss")
    assert info["train_items"] >= 8 and "val_kl" in info["after"] and info["after"]["val_loss"] < 1
    assert (run_dir / "final" / "model.safetensors").exists()


@needs_lf
@pytest.mark.slow
def test_train_sft_on_glaive_toolcall(tmp_path, tools_model):
    run_dir, info = _train("sft", tmp_path, tools_model, str(LF / "glaive_toolcall_en_demo.json"),
                           "data.format=messages", "data.max_records=24", "seq_len=512", "train.max_steps=3",
                           "train.micro_batch_size=2", "eval_generate=2", "max_new_tokens=4")
    assert info["data"]["samples"] >= 10 and info["after"]["val_loss"] < info["before"]["val_loss"]
    assert (run_dir / "final" / "model.safetensors").exists()


@needs_lf
@pytest.mark.slow
def test_train_sft_on_kto_en_demo_desirable_replies(tmp_path, base_model):
    _, info = _train("sft", tmp_path, base_model, str(LF / "kto_en_demo.json"), "data.format=kto",
                     "data.max_records=24", "seq_len=256", "train.max_steps=2", "train.micro_batch_size=2",
                     "eval_generate=0")
    assert 0 < info["data"]["samples"] < 24  # desirable replies only

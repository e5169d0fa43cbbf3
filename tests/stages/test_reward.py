"""reward stage: bad input, a learnable rule (> 90% pairwise accuracy), the run as a reward function."""

from __future__ import annotations

import json

import pytest

from lmwright.config import ConfigError
from tests.stages.conftest import stage_config, write_jsonl


def test_reward_needs_preference_records(tmp_path, tokenizer_dir):
    from lmwright.stages.reward import check

    cfg = stage_config("reward", f"tokenizer={tokenizer_dir}", f"data.path=[{tmp_path}]", "data.format=alpaca")
    with pytest.raises(ConfigError, match="data.format=preference"):
        check(cfg)


def test_identical_and_empty_pairs_are_rejected(tmp_path):
    from lmwright.data import DataError, load_records
    from lmwright.data.config import DataConfig

    f = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Hi", "chosen": "a", "rejected": "a"}])
    with pytest.raises(DataError, match="identical to chosen"):
        load_records(DataConfig(path=[str(f)], format="preference"))
    f = write_jsonl(tmp_path / "q.jsonl", [{"prompt": "Hi", "chosen": "", "rejected": "b"},
                                           {"prompt": "Hi", "chosen": "a", "rejected": "b"}])
    train, val, manifest = load_records(DataConfig(path=[str(f)], format="preference", on_error="skip",
                                                   val_fraction=0))
    assert len(train) == 1


def test_long_prompts_are_skipped_and_counted(tokenizer):
    from lmwright.stages._align import encode_pairs

    recs = [{"prompt": "word " * 200, "chosen": "yes", "rejected": "no"}, {"prompt": "Hi", "chosen": "yes", "rejected": "no"}]
    cfg = stage_config("reward", "max_prompt_tokens=32", "max_length=64")
    items, skipped = encode_pairs(recs, tokenizer, cfg)
    assert (len(items), skipped) == (1, 1)
    cfg.skip_long = False
    with pytest.raises(ConfigError, match="max_prompt_tokens"):
        encode_pairs(recs, tokenizer, cfg)


@pytest.mark.slow
def test_reward_model_learns_rule_and_scores(tmp_path, sft_policy, capsys):
    """Chosen = the correct capital / the upper-cased word; rejected = a wrong capital / lower case."""
    from lmwright.cli import main
    from lmwright.data.synthetic import preference_task
    from lmwright.stages import STAGES

    recs = [r for r in preference_task(1200, seed=3) if r["prompt"].startswith(("What is", "Write"))]
    data = write_jsonl(tmp_path / "pref.jsonl", recs)
    cfg = stage_config("reward", f"model.name={sft_policy}", f"data.path=[{data}]", "data.val_fraction=0.15",
                       "data.clean.dedup=false", f"train.output_dir={tmp_path}", "train.run_name=rm",
                       "train.max_steps=120", "train.micro_batch_size=16", "train.lr=1e-3", "train.eval_every=40",
                       "margin=0.5")
    run_dir = STAGES.get("reward").run(cfg)
    info = json.loads((run_dir / "run.json").read_text())
    print("reward accuracy", info["before"]["val_accuracy"], "->", info["after"]["val_accuracy"])
    assert info["after"]["val_accuracy"] > 0.9
    assert main(["score", "--model", str(run_dir), "--prompt", "Write the word in capital letters.\nfox",
                 "--response", "FOX", "--response", "fox"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()[-2:]
    s_good, s_bad = (float(line.split("\t")[0]) for line in lines)
    assert s_good > s_bad

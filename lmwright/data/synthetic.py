"""Deterministic generators of small corpora for the demo, the tests and the benchmarks.

Nothing is downloaded or copied: every record is built here from word lists and templates with a
seeded ``random.Random``. The generated worlds have learnable structure (grammar, facts, simple
rules) so that training visibly works at tiny scale.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterator

ANIMALS = ["fox", "cat", "dog", "owl", "bear", "wolf", "horse", "rabbit", "mouse", "lion", "duck", "frog"]
COLORS = ["red", "blue", "green", "yellow", "black", "white", "brown", "grey"]
PLACES = ["river", "forest", "hill", "village", "garden", "lake", "market", "castle", "field", "bridge"]
VERBS = ["runs", "walks", "jumps", "sleeps", "sings", "hides", "swims", "waits", "looks", "dances"]
TIMES = ["in the morning", "at night", "after the rain", "before dinner", "every day", "in winter"]
NAMES = ["Anna", "Ben", "Clara", "David", "Emma", "Felix", "Grace", "Hugo", "Iris", "Jack", "Lena", "Max"]
FOODS = ["apples", "bread", "cheese", "soup", "berries", "fish", "rice", "cake"]
COUNTRIES = {
    "Norland": "Frostholm", "Sunmark": "Goldport", "Westria": "Bellhaven", "Ostavia": "Kirren",
    "Meridia": "Solace", "Valdor": "Ironreach", "Caldera": "Emberfall", "Lumen": "Brightwater",
    "Tarsis": "Duskmoor", "Aquila": "Windcrest", "Brevia": "Stonebrook", "Zephyr": "Cloudhaven",
}


def story_sentence(rng: random.Random) -> str:
    kind = rng.random()
    a, c, p, v, t = (rng.choice(ANIMALS), rng.choice(COLORS), rng.choice(PLACES), rng.choice(VERBS),
                     rng.choice(TIMES))
    if kind < 0.35:
        return f"The {c} {a} {v} to the {p} {t}."
    if kind < 0.55:
        n, f = rng.choice(NAMES), rng.choice(FOODS)
        return f"{n} likes {f}, so {n} goes to the {p} {t}."
    if kind < 0.75:
        country = rng.choice(list(COUNTRIES))
        return f"The capital of {country} is {COUNTRIES[country]}."
    if kind < 0.9:
        x, y = rng.randint(1, 9), rng.randint(1, 9)
        return f"{x} plus {y} is {x + y}."
    n1, n2 = rng.sample(NAMES, 2)
    return f"{n1} and {n2} meet at the {p} and talk about the {c} {a}."


def story_corpus(n_docs: int = 2000, seed: int = 0, sentences: tuple[int, int] = (2, 6)) -> list[str]:
    """``n_docs`` short documents of templated sentences (the demo's pretraining corpus)."""
    rng = random.Random(seed)
    return [" ".join(story_sentence(rng) for _ in range(rng.randint(*sentences))) for _ in range(n_docs)]


def chinese_corpus(n_docs: int = 50, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    subj = ["小猫", "小狗", "老师", "学生", "妈妈", "我们"]
    verb = ["喜欢", "看见", "想要", "找到"]
    obj = ["苹果", "大海", "花园", "书本", "月亮"]
    return [f"{rng.choice(subj)}{rng.choice(verb)}{rng.choice(obj)}。北京是中国的首都。" for _ in range(n_docs)]


# ----------------------------------------------------------------------------- instruction tasks
def _capital_record(rng: random.Random) -> dict:
    country = rng.choice(list(COUNTRIES))
    return {"instruction": f"What is the capital of {country}?", "input": "", "output": COUNTRIES[country]}


def instruction_task(n: int = 500, seed: int = 0) -> list[dict]:
    """Alpaca records with checkable answers: capitals, addition, reversing and upper-casing words."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        k = rng.random()
        if k < 0.3:
            out.append(_capital_record(rng))
        elif k < 0.6:
            x, y = rng.randint(0, 49), rng.randint(0, 49)
            out.append({"instruction": "Add the two numbers.", "input": f"{x} + {y}", "output": str(x + y)})
        elif k < 0.8:
            words = rng.sample(ANIMALS + COLORS, 3)
            out.append({"instruction": "Reverse the order of the words.", "input": " ".join(words),
                        "output": " ".join(reversed(words))})
        else:
            w = rng.choice(ANIMALS + PLACES)
            out.append({"instruction": "Write the word in capital letters.", "input": w, "output": w.upper()})
    return out


def chat_task(n: int = 200, seed: int = 0, turns: tuple[int, int] = (1, 3)) -> list[dict]:
    """Multi-turn ``messages`` records built from the instruction task, some with a system prompt."""
    rng = random.Random(seed)
    pool = instruction_task(n * turns[1], seed=seed + 1)
    out, i = [], 0
    for _ in range(n):
        msgs = []
        if rng.random() < 0.3:
            msgs.append({"role": "system", "content": "You are a precise assistant. Answer briefly."})
        for _ in range(rng.randint(*turns)):
            r = pool[i % len(pool)]
            i += 1
            q = r["instruction"] + (f"\n{r['input']}" if r["input"] else "")
            msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": r["output"]}]
        out.append({"messages": msgs})
    return out


# --------------------------------------------------------------------------- classification etc.
POS = ["wonderful", "great", "excellent", "lovely", "delightful", "superb", "fantastic", "pleasant", "brilliant"]
NEG = ["terrible", "awful", "boring", "dreadful", "poor", "disappointing", "horrible", "dull", "bad"]
THINGS = ["film", "book", "meal", "concert", "hotel", "game", "trip", "show", "album", "course"]


def sentiment_task(n: int = 400, seed: int = 0) -> list[dict]:
    """``classification`` records (label positive/negative) with some negation to make it non-trivial."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        label = rng.choice(["positive", "negative"])
        thing = rng.choice(THINGS)
        word = rng.choice(POS if label == "positive" else NEG)
        if rng.random() < 0.2:  # negation flips the surface word
            word = "not " + rng.choice(NEG if label == "positive" else POS)
        templ = rng.choice(["The {t} was {w}.", "I found the {t} {w}.", "What a {w} {t}!",
                            "Honestly, this {t} is {w}.", "My friends said the {t} felt {w}."])
        if word.startswith("not ") and "{w} {t}" in templ:
            templ = "The {t} was {w}."
        out.append({"text": templ.format(t=thing, w=word), "label": label})
    return out


# Preference rules: how a generated preference set picks its chosen reply, and the registered rule reward
# (lmwright/objectives/rewards.py) that judges a generation by the same rule.
POLITE_OPENERS = ["Sure!", "Of course!", "Happy to help:"]
CHATTER = ["Let me know if you need more.", "Hope this helps!", "Anything else I can do?"]
RULES = {
    "correct": {"name": "exact_answer"},  # the chosen reply is the correct answer, the rejected a wrong one
    "polite": {"name": "format", "pattern": "(" + "|".join(POLITE_OPENERS) + ") .+"},
    # polite: both replies correct; the chosen one opens politely, the rejected one is curt. (A polite closing
    # instead makes EOS the only difference, and DPO then teaches a small policy not to stop.)
    "polite_correct": {"name": "format", "pattern": "(" + "|".join(POLITE_OPENERS) + ") .+"},
    "concise": {"name": "format", "pattern": "(?!.*(" + "|".join(re.escape(c.split()[0] + " " + c.split()[1])
                                                                  for c in CHATTER) + ")).+"},
    # concise: both replies correct; the chosen one is the answer alone, the rejected one adds a chatty closing.
    # The answer is their shared prefix, whose log-probs cancel in the DPO loss: preferring the concise reply
    # teaches the policy to stop after the answer without touching the answer (the demo's rule).
    # polite_correct: the chosen reply is polite and correct; the rejected one is curt (and correct) in half of
    # the pairs and polite but wrong in the other half, so preference optimisation cannot buy politeness with
    # accuracy (with curt rejections only, a small policy's answers after the opener got worse). Judged polite.
}


def polite(answer: str, rng: random.Random) -> str:
    return f"{rng.choice(POLITE_OPENERS)} {answer}"


def chatty(answer: str, rng: random.Random) -> str:
    return f"{answer} {rng.choice(CHATTER)}"


def chatty_mix(records: list[dict], share: float = 0.5, seed: int = 0, match: str | None = None) -> list[dict]:
    """Alpaca records of which a ``share`` add a chatty closing after the answer (room for preference
    optimisation on the ``concise`` rule); with ``match``, only records whose instruction contains it, and always
    the same closing (a habit the SFT policy learns exactly, so exact match is not capped by a coin flip)."""
    rng = random.Random(seed)
    out = []
    for r in records:
        if match is None and rng.random() < share:
            r = {**r, "output": chatty(r["output"], rng)}
        elif match is not None and match in r["instruction"] and rng.random() < share:
            r = {**r, "output": f"{r['output']} {CHATTER[1]}"}
        out.append(r)
    return out


def polite_mix(records: list[dict], share: float = 0.5, seed: int = 0) -> list[dict]:
    """Alpaca records of which a ``share`` answer politely (an SFT set whose policy is polite ~``share`` of the
    time: room for preference optimisation on the ``polite`` rule)."""
    rng = random.Random(seed)
    return [{**r, "output": polite(r["output"], rng)} if rng.random() < share else r for r in records]


def preference_task(n: int = 300, seed: int = 0, source=None, rule: str = "correct") -> list[dict]:
    """``preference`` records whose rule (a key of ``RULES``) is learnable: ``correct`` (the chosen answer is the
    correct one, the rejected a plausible wrong one), ``polite`` (both correct, the chosen one opens politely) or
    ``polite_correct`` (the chosen one polite and correct, the rejected one curt or wrong).

    ``source(n, seed=...)`` gives the alpaca records to build pairs from (default ``instruction_task``)."""
    if rule not in RULES:
        raise ValueError(f"unknown preference rule '{rule}'; choose one of {', '.join(RULES)}")
    rng = random.Random(seed)
    out = []
    for r in (source or instruction_task)(n, seed=seed + 7):
        prompt = r["instruction"] + (f"\n{r['input']}" if r["input"] else "")
        if rule == "polite" or (rule == "polite_correct" and len(out) % 2 == 0):
            out.append({"prompt": prompt, "chosen": polite(r["output"], rng), "rejected": r["output"]})
        elif rule == "concise":
            out.append({"prompt": prompt, "chosen": r["output"], "rejected": chatty(r["output"], rng)})
        elif rule == "polite_correct":
            out.append({"prompt": prompt, "chosen": polite(r["output"], rng),
                        "rejected": polite(_wrong_answer(r, rng), rng)})
        else:
            out.append({"prompt": prompt, "chosen": r["output"], "rejected": _wrong_answer(r, rng)})
    return out


def _wrong_answer(r: dict, rng: random.Random) -> str:
    out = r["output"]
    if out.startswith("{"):  # json_task: the same format with one field wrong
        rec = json.loads(out)
        key = rng.choice(sorted(rec))
        pool = {"name": PEOPLE, "city": CITIES, "job": JOBS}.get(key, [rec[key] + "x"])
        rec[key] = rng.choice([w for w in pool if w != rec[key]] or [rec[key] + "x"])
        return json_record(rec["name"], rec["city"], rec["job"]) if set(rec) == {"name", "city", "job"} \
            else json.dumps(rec)
    if out.isdigit():
        return str(int(out) + rng.choice([-3, -2, -1, 1, 2, 3]) if int(out) > 3 else int(out) + 5)
    if out in COUNTRIES.values():
        return rng.choice([c for c in COUNTRIES.values() if c != out])
    if out.isupper():
        return out.lower()
    for pool in (NAMES, COLORS, ANIMALS, PLACES):
        if out in pool:
            return rng.choice([w for w in pool if w != out])
    words = out.split()
    rng.shuffle(words)
    alt = " ".join(words)
    return alt if alt != out else out + " " + rng.choice(ANIMALS)


PARA = [
    ("The {c} {a} {v} to the {p}.", "A {a} that is {c} {v} towards the {p}."),
    ("{n} likes {f}.", "{f} are something {n} enjoys."),
    ("The {a} {v} {t}.", "{t}, the {a} {v}."),
]


def paraphrase_pairs(n: int = 300, seed: int = 0) -> list[dict]:
    """``pairs`` records (anchor, positive) that are paraphrases of each other."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.choice(PARA)
        kw = dict(c=rng.choice(COLORS), a=rng.choice(ANIMALS), v=rng.choice(VERBS), p=rng.choice(PLACES),
                  n=rng.choice(NAMES), f=rng.choice(FOODS), t=rng.choice(TIMES))
        out.append({"anchor": a.format(**kw), "positive": b.format(**kw)})
    return out


def iter_texts(records: list[dict]) -> Iterator[str]:
    for r in records:
        for k in ("text", "instruction", "input", "output", "prompt", "chosen", "rejected", "anchor", "positive"):
            v = r.get(k)
            if isinstance(v, str) and v:
                yield v
        for m in r.get("messages", []) or []:
            yield m["content"]


def skills_task(n: int = 1200, seed: int = 0) -> list[dict]:
    """Alpaca records whose held-out prompts are new combinations of skills a small model can learn:
    reading a fact out of a sentence, recalling a capital (stated in ``story_corpus``), single-digit
    addition (also in ``story_corpus``), and copying. Used by the demo's SFT step."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        k = rng.random()
        if k < 0.25:
            name, food, place = rng.choice(NAMES), rng.choice(FOODS), rng.choice(PLACES)
            out.append({"instruction": "Who likes " + food + "?",
                        "input": f"{name} likes {food}, so {name} goes to the {place}.", "output": name})
        elif k < 0.45:
            c, a, v, p = rng.choice(COLORS), rng.choice(ANIMALS), rng.choice(VERBS), rng.choice(PLACES)
            q = rng.choice([("Which animal is it?", a), ("What colour is the animal?", c), ("Where does it go?", p)])
            out.append({"instruction": q[0], "input": f"The {c} {a} {v} to the {p}.", "output": q[1]})
        elif k < 0.65:
            out.append(_capital_record(rng))
        elif k < 0.85:
            x, y = rng.randint(1, 9), rng.randint(1, 9)
            out.append({"instruction": f"What is {x} plus {y}?", "input": "", "output": str(x + y)})
        else:
            words = " ".join(rng.sample(ANIMALS + COLORS + PLACES, 2))
            out.append({"instruction": "Repeat the words.", "input": words, "output": words})
    return out


CITIES = ["Lisbon", "Oslo", "Nairobi", "Lima", "Hanoi", "Dublin", "Quito", "Tunis", "Riga", "Perth", "Osaka",
          "Porto", "Accra", "Bergen", "Cusco", "Izmir", "Malmo", "Gdansk", "Bilbao", "Zagreb"]
JOBS = ["baker", "nurse", "pilot", "farmer", "teacher", "painter", "plumber", "chemist", "tailor", "driver",
        "gardener", "librarian", "dentist", "carpenter", "florist", "butcher"]
PEOPLE = NAMES + ["Omar", "Priya", "Sofia", "Tariq", "Yuki", "Zoe", "Nina", "Pablo", "Rosa", "Sami", "Wen", "Ada"]
_JSON_SENTENCES = ["{n} is a {j} who lives in {c}.", "{n} works as a {j} in {c}.",
                   "In {c}, {n} earns a living as a {j}.", "{n} moved to {c} and became a {j}.",
                   "The {j} {n} has a small flat in {c}."]


def json_record(name: str, city: str, job: str) -> str:
    """The fixed JSON answer of :func:`json_task` (key order and spacing are part of the format)."""
    return json.dumps({"name": name, "city": city, "job": job}, ensure_ascii=False)


def json_task(n: int = 600, seed: int = 0) -> list[dict]:
    """Alpaca records that answer in one fixed JSON format: read a person's name, city and job out of a
    sentence and reply with exactly ``{"name": ..., "city": ..., "job": ...}``. An instruct model can read
    the sentence but does not know the format (it adds prose, code fences or other keys): the real-model
    demo's task, learned by LoRA SFT in a few dozen steps."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        name, city, job = rng.choice(PEOPLE), rng.choice(CITIES), rng.choice(JOBS)
        out.append({"instruction": "Extract the person as JSON.",
                    "input": rng.choice(_JSON_SENTENCES).format(n=name, c=city, j=job),
                    "output": json_record(name, city, job)})
    return out

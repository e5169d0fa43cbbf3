"""Rule-based (verifiable) reward functions for ``ppo`` and ``grpo``, registered by name in ``REWARDS``.

A reward function is ``fn(completion, reference, **options) -> float``: ``completion`` is the generated
reply (special tokens removed, stripped), ``reference`` the record's reference answer (alpaca ``output``,
the last assistant turn of a ``messages`` record, ``chosen`` of a ``preference`` record; None for ``text``)
and ``options`` the keyword arguments given in the config (``reward.functions: [{name: format, pattern:
...}]``). Adding a reward is adding a decorated function here (or anywhere imported before the stage runs).
"""

from __future__ import annotations

import re
from collections.abc import Callable

from lmwright.registry import Registry

REWARDS = Registry("reward function")

RewardFn = Callable[..., float]


def _norm(s: str) -> str:
    return " ".join(s.strip().strip(".!").split()).lower()


@REWARDS.register("exact_answer")
def exact_answer(completion: str, reference: str | None, case_sensitive: bool = False) -> float:
    """1 if the completion equals the reference answer (whitespace and a final period ignored), else 0."""
    if reference is None:
        raise ValueError("exact_answer needs records with a reference answer (alpaca output, last assistant "
                         "turn, or preference chosen)")
    if case_sensitive:
        return float(" ".join(completion.split()) == " ".join(reference.split()))
    return float(_norm(completion) == _norm(reference))


@REWARDS.register("contains_answer")
def contains_answer(completion: str, reference: str | None) -> float:
    """1 if the reference answer appears in the completion as whole words, else 0."""
    if reference is None:
        raise ValueError("contains_answer needs records with a reference answer")
    return float(re.search(r"(?<!\w)" + re.escape(_norm(reference)) + r"(?!\w)", _norm(completion)) is not None)


@REWARDS.register("token_overlap")
def token_overlap(completion: str, reference: str | None) -> float:
    """F1 of the words of the completion against the reference (a dense, partial-credit reward)."""
    if reference is None:
        raise ValueError("token_overlap needs records with a reference answer")
    c, r = _norm(completion).split(), _norm(reference).split()
    if not c or not r:
        return 0.0
    common = sum(min(c.count(w), r.count(w)) for w in set(r))
    if common == 0:
        return 0.0
    p, rec = common / len(c), common / len(r)
    return 2 * p * rec / (p + rec)


@REWARDS.register("format")
def format_reward(completion: str, reference: str | None = None, pattern: str = r"^\S.*\S$|^\S$") -> float:
    """1 if the whole completion matches the regular expression ``pattern`` (re.fullmatch, DOTALL), else 0."""
    return float(re.fullmatch(pattern, completion, flags=re.DOTALL) is not None)


@REWARDS.register("length")
def length_reward(completion: str, reference: str | None = None, target: int = 20, unit: str = "chars") -> float:
    """``1 - |len - target| / target`` clipped at 0: 1 at exactly ``target`` characters (or ``unit: words``)."""
    n = len(completion.split()) if unit == "words" else len(completion)
    return max(0.0, 1.0 - abs(n - target) / max(target, 1))


def resolve(specs: list) -> list[tuple[RewardFn, float, dict]]:
    """``[name | {name, weight, **options}]`` -> [(fn, weight, options)]; unknown names fail with a suggestion."""
    out = []
    for spec in specs:
        if isinstance(spec, str):
            spec = {"name": spec}
        spec = dict(spec)
        name = spec.pop("name", None)
        if not name:
            raise ValueError(f"reward function entry {spec} has no name")
        weight = float(spec.pop("weight", 1.0))
        out.append((REWARDS.get(name), weight, spec))
    return out


def total_reward(fns: list[tuple[RewardFn, float, dict]], completion: str, reference: str | None) -> float:
    """Weighted sum of the rewards of ``fns`` for one completion."""
    return sum(w * fn(completion, reference, **opts) for fn, w, opts in fns)

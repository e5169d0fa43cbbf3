"""``lmwright generate``: one completion from a run, checkpoint or model folder, streamed to the terminal."""

from __future__ import annotations

import sys

from lmwright.cli._common import subparser


def add_sampling_args(p) -> None:
    """Sampling flags shared by `generate` and `chat` (names as in the OpenAI API)."""
    p.add_argument("--temperature", type=float, default=0.7, help="0 = greedy (default 0.7)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help=">1 discourages repeats")
    p.add_argument("--max-tokens", type=int, default=256, help="maximum new tokens")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    p.add_argument("--guardrails", metavar="FILE", help="YAML file of guardrail rules")


def sampling_kwargs(args) -> dict:
    return dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                repetition_penalty=args.repetition_penalty, max_tokens=args.max_tokens, stop=args.stop,
                seed=args.seed)


def register(sub) -> None:
    p = subparser(sub, "generate", "generate text from a model (raw prompt, or one chat turn with --chat)")
    p.add_argument("--model", required=True, help="run, checkpoint or model folder")
    p.add_argument("prompt", help="the prompt ('-' reads stdin)")
    p.add_argument("--chat", action="store_true", help="treat the prompt as a user message (chat template)")
    p.add_argument("--system", help="system message (with --chat)")
    add_sampling_args(p)
    p.set_defaults(func=run_generate)


def run_generate(args) -> int:
    from lmwright.serve.api import load

    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    m = load(args.model, guardrails=args.guardrails)
    kw = sampling_kwargs(args)
    if args.chat:
        pieces = m.stream_chat(prompt, system=args.system, **kw)
    else:
        sys.stdout.write(prompt)
        pieces = m.stream(prompt, **kw)
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0

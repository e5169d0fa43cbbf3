"""``lmwright chat``: a terminal chat with history and streaming; /reset, /system <text>, /exit."""

from __future__ import annotations

import sys

from lmwright.cli._common import subparser

HELP = "commands: /reset (forget the conversation), /system <text> (set the system message), /exit"


def register(sub) -> None:
    from lmwright.cli.generate import add_sampling_args

    p = subparser(sub, "chat", "chat with a model in the terminal (streaming, history)")
    p.add_argument("--model", required=True, help="run, checkpoint or model folder")
    p.add_argument("--system", help="initial system message")
    add_sampling_args(p)
    p.set_defaults(func=run_chat)


def chat_loop(model, kwargs: dict, system: str | None = None, read=input, write=sys.stdout.write) -> None:
    """The loop, separate from argument parsing so a test can drive it with canned input."""
    history: list[dict] = []
    write(f"chatting with {model.name}. {HELP}\n")
    while True:
        try:
            line = read("you> ")
        except EOFError:
            write("\n")
            return
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return
        if text == "/reset":
            history = []
            write("(conversation cleared)\n")
            continue
        if text.startswith("/system"):
            system = text[len("/system"):].strip() or None
            history = []
            write(f"(system message {'set' if system else 'cleared'}; conversation cleared)\n")
            continue
        if text.startswith("/"):
            write(f"unknown command {text.split()[0]}. {HELP}\n")
            continue
        history.append({"role": "user", "content": text})
        write("assistant> ")
        reply = ""
        for piece in model.stream_chat(history, system=system, **kwargs):
            reply += piece
            write(piece)
            if hasattr(sys.stdout, "flush"):
                sys.stdout.flush()
        write("\n")
        history.append({"role": "assistant", "content": reply})


def run_chat(args) -> int:
    from lmwright.cli.generate import sampling_kwargs
    from lmwright.serve.api import load

    m = load(args.model, guardrails=args.guardrails)
    chat_loop(m, sampling_kwargs(args), args.system)
    return 0

"""The serving code stays in small pieces (issue 14): no long functions, each response shape built once."""

from __future__ import annotations

import ast
from pathlib import Path

SERVE = Path(__file__).resolve().parents[2] / "lmwright" / "serve"
MAX_LINES = 120


def test_no_function_in_serve_is_longer_than_120_lines():
    long = []
    for path in sorted(SERVE.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_LINES:
                    long.append(f"{path.name}:{node.lineno} {node.name} is {n} lines")
    assert not long, f"functions longer than {MAX_LINES} lines (split them):\n" + "\n".join(long)


def test_chat_chunks_are_built_only_by_the_formatter():
    """'chat.completion.chunk' is written in serve/formats.py once (CHAT_CHUNK), and nowhere else in serve/:
    every streamed chat chunk (tokens, the role chunk, refusals, the usage chunk) goes through formats."""
    holders = {p.name: p.read_text(encoding="utf-8").count('"chat.completion.chunk"') for p in SERVE.glob("*.py")}
    assert {k: v for k, v in holders.items() if v} == {"formats.py": 1}
    from lmwright.serve import formats

    assert formats.CHAT_CHUNK == "chat.completion.chunk"
    for literal in ('"chat.completion"', '"text_completion"'):  # whole answers, completion chunks: formats only
        elsewhere = [p.name for p in SERVE.glob("*.py") if p.name != "formats.py" and literal in p.read_text()]
        assert not elsewhere, f"{literal} objects built outside formats.py: {elsewhere}"

"""`lmwright generate` and `lmwright chat` driven in-process."""

from __future__ import annotations


def test_generate_cli_matches_api(lm_dir, lm, capsys):
    from lmwright.cli import main

    assert main(["generate", "--model", str(lm_dir), "Once upon", "--max-tokens", "8", "--temperature", "0"]) == 0
    out = capsys.readouterr().out
    assert out == "Once upon" + lm.generate("Once upon", max_tokens=8, temperature=0) + "\n"


def test_chat_loop_history_and_commands(lm):
    from lmwright.cli.chat import chat_loop

    seen = []

    class Spy:
        name = "spy"

        def stream_chat(self, history, system=None, **kw):
            seen.append(([dict(m) for m in history], system))
            yield "ok"

    lines = iter(["hello", "again", "/reset", "/system be brief", "third", "/nope", "/exit", "never read"])
    out = []
    chat_loop(Spy(), {}, None, read=lambda _: next(lines), write=out.append)
    assert [len(h) for h, _ in seen] == [1, 3, 1]  # history grows, /reset clears it
    assert seen[1][0][1] == {"role": "assistant", "content": "ok"}
    assert seen[2][1] == "be brief"
    assert any("unknown command /nope" in o for o in out)

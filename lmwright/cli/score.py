"""``lmwright score --model RUN --prompt P --response R``: the reward a ``reward`` model gives a reply."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("score", help="score prompt/response pairs with a reward model",
                       description="Print the scalar reward of each --response to --prompt under a reward model "
                                   "(a `lmwright train reward` run, checkpoint or folder).")
    p.add_argument("--model", required=True, help="reward run folder, checkpoint or model folder")
    p.add_argument("--prompt", required=True, help="the user prompt")
    p.add_argument("--response", required=True, action="append", help="a reply to score (repeat to compare)")
    p.set_defaults(func=run_score)


def run_score(args) -> int:
    from lmwright.stages.reward import score

    for r, s in zip(args.response, score(args.model, args.prompt, args.response)):
        print(f"{s:+.4f}\t{r}")
    return 0

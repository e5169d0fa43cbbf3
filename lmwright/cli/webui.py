"""``lmwright webui``: a browser UI to chat with runs, inspect their metrics and start training stages."""

from __future__ import annotations

from lmwright.cli._common import subparser


def register(sub) -> None:
    p = subparser(sub, "webui", "browser UI: chat (side-by-side compare), runs and their metrics, train")
    p.add_argument("--runs", default="runs", help="folder holding run folders (default runs/)")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=7860, help="TCP port (default 7860)")
    p.add_argument("--guardrails", metavar="FILE", help="YAML file of guardrail rules")
    p.add_argument("--auth", metavar="USER:PASSWORD", help="require a login (needed when --host is not loopback)")
    p.set_defaults(func=run_webui)


def run_webui(args) -> int:
    from lmwright.config import ConfigError
    from lmwright.serve.guardrails import load_guardrails
    from lmwright.serve.http import LOOPBACK

    auth = None
    if args.auth:
        if ":" not in args.auth:
            raise ConfigError("--auth must look like user:password")
        auth = tuple(args.auth.split(":", 1))
    if args.host not in LOOPBACK and auth is None:
        raise ConfigError(f"binding {args.host} exposes the UI (which can start training jobs): set --auth")
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise ConfigError("the web UI needs gradio: pip install 'lmwright[webui]'") from None
    from lmwright.serve.webui import launch

    launch(args.runs, args.host, args.port, load_guardrails(args.guardrails), auth)
    return 0

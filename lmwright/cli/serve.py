"""``lmwright serve``: an OpenAI-compatible HTTP server for a run, checkpoint or model folder."""

from __future__ import annotations

import json

from lmwright.cli._common import add_config_args, subparser


def register(sub) -> None:
    from lmwright.models.weights import WEIGHTS
    from lmwright.serve.engine import ENGINES
    from lmwright.serve.http import ServeConfig

    p = subparser(sub, "serve", "serve a model over an OpenAI-compatible HTTP API (streaming, batching)",
                  ServeConfig)
    add_config_args(p)
    p.add_argument("--model", help="run, checkpoint or model folder (same as model=...)")
    p.add_argument("--name", help="model id in the API (default: the run folder's name)")
    p.add_argument("--host", help="interface to bind (default 127.0.0.1; others need an API key)")
    p.add_argument("--port", type=int, help="TCP port (default 8000)")
    p.add_argument("--api-key", help="require this bearer token (or env LMWRIGHT_API_KEY)")
    p.add_argument("--api-key-file", help="file holding the API key")
    p.add_argument("--guardrails", metavar="FILE", help="YAML file of guardrail rules")
    p.add_argument("--engine", choices=ENGINES.names(), help="serving engine (default builtin)")
    p.add_argument("--max-seqs", type=int, help="sequences decoded together")
    p.add_argument("--weights", choices=WEIGHTS,
                   help="weight precision (default auto: bf16 where a cached probe shows it faster here, else "
                        "fp32; int8 = weight-only, answers change slightly)")
    p.add_argument("--queue-size", type=int, help="requests allowed to wait; beyond -> 429")
    p.add_argument("--allowed-host", action="append", metavar="HOST",
                   help="without an API key: also accept this Host name (repeatable; '*' = any)")
    p.add_argument("--allowed-origin", action="append", metavar="ORIGIN",
                   help="without an API key: also accept this browser Origin, e.g. https://app.example "
                        "(repeatable; '*' = any)")
    p.set_defaults(func=run_serve)


def _overrides(args) -> list[str]:
    out = list(args.overrides)
    for flag, key in (("model", "model"), ("name", "name"), ("host", "host"), ("port", "port"),
                      ("api_key", "api_key"), ("api_key_file", "api_key_file"), ("guardrails", "guardrails"),
                      ("engine", "engine"), ("max_seqs", "max_seqs"), ("queue_size", "queue_size"),
                      ("weights", "weights")):
        v = getattr(args, flag, None)
        if v is not None:
            out.append(f"{key}={v}")
    for flag, key in (("allowed_host", "allowed_hosts"), ("allowed_origin", "allowed_origins")):
        if getattr(args, flag, None):
            out.append(f"{key}={json.dumps(getattr(args, flag))}")  # a JSON list is a YAML flow list
    return out


def run_serve(args) -> int:
    from lmwright.config import ConfigError, load_config
    from lmwright.serve.http import ServeConfig, create_app, resolve_api_key, serve

    cfg = load_config(ServeConfig, args.config, _overrides(args))
    if not cfg.model:
        raise ConfigError("lmwright serve needs --model RUN_OR_FOLDER")
    cfg.check()
    resolve_api_key(cfg)  # fail before loading weights when the server would be open to the network
    from lmwright.serve.engine import ENGINES

    target = ENGINES.get(cfg.engine).serve_target(cfg)
    name = cfg.name or getattr(target, "name", "model")
    print(f"serving {name} from {cfg.model} on http://{cfg.host}:{cfg.port}/v1 (engine {cfg.engine})", flush=True)
    serve(create_app({name: target}, cfg), cfg)
    return 0

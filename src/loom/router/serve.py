"""``loom router``: start (or connect to) engines and serve the router on uvicorn.

SIGTERM (or Ctrl-C) is graceful: the router stops accepting connections, lets requests in
flight finish (for up to ``shutdown_timeout_s``), stops the engines it started and exits 0.
"""

from __future__ import annotations

import secrets
import sys

import httpx

from loom.config import RouterConfig


def run_router(args: RouterConfig) -> int:
    """Start the engines (unless ``engine_urls`` names running ones) and serve until
    interrupted."""
    import uvicorn

    from loom.api.shutdown import exit_cleanly_on_sigterm
    from loom.models import resolve_model_dir
    from loom.models.tokenizer import Tokenizer
    from loom.router.app import create_router_app
    from loom.router.engines import start_engines
    from loom.router.strategies import StrategyRouter, make_strategy

    try:
        strategy = make_strategy(args.strategy, args.balance)
    except ValueError as e:
        print(f"loom: error: {e}", file=sys.stderr)
        return 2
    exit_cleanly_on_sigterm()  # the engines started here stop with the router
    procs = []
    urls = list(args.engine_urls)
    key = args.engine_api_key or (args.api_keys[0] if args.api_keys else None)
    if not urls:
        print(f"loom: starting {args.engines} engines ({args.model})", file=sys.stderr)
        extra = ["--kv-transport", args.kv_transport]
        if not args.prefix_cache:
            extra.append("--no-prefix-cache")
        # The engines' key, and a KV secret of their own (so their KV channel is
        # authenticated even without keys), in their environment.
        env = {"LOOM_API_KEY": key or "", "LOOM_KV_SECRET": secrets.token_hex(16)}
        procs = start_engines(args.engines, args.model, extra_args=extra, env=env)
        urls = [p.url for p in procs]
        for p in procs:
            print(f"loom: engine {p.url} on cores {p.cpus}", file=sys.stderr)
    try:
        auth = {"Authorization": f"Bearer {key}"} if key else {}
        models = httpx.get(urls[0] + "/v1/models", headers=auth, timeout=10)
        models.raise_for_status()
        model_name = models.json()["data"][0]["id"]
        tokenizer = Tokenizer.from_dir(resolve_model_dir(args.model))
        router = StrategyRouter(urls, strategy, api_key=key)
        app = create_router_app(router, tokenizer, model_name, args.api_keys,
                                args.health_interval_s)  # fmt: skip
        print(
            f"loom: router ({strategy.name}) on http://{args.host}:{args.port}/v1",
            file=sys.stderr,
            flush=True,
        )
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning",
                    timeout_graceful_shutdown=round(args.shutdown_timeout_s))  # fmt: skip
    finally:
        for p in procs:
            p.stop()
    return 0

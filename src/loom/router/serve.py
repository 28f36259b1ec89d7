"""``loom router``: start (or connect to) engines and serve the router on uvicorn."""

from __future__ import annotations

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
    if not urls:
        print(f"loom: starting {args.engines} engines ({args.model})", file=sys.stderr)
        extra = ["--kv-transport", args.kv_transport]
        if not args.prefix_cache:
            extra.append("--no-prefix-cache")
        procs = start_engines(args.engines, args.model, extra_args=extra)
        urls = [p.url for p in procs]
        for p in procs:
            print(f"loom: engine {p.url} on cores {p.cpus}", file=sys.stderr)
    try:
        model_name = httpx.get(urls[0] + "/v1/models", timeout=10).json()["data"][0]["id"]
        tokenizer = Tokenizer.from_dir(resolve_model_dir(args.model))
        app = create_router_app(StrategyRouter(urls, strategy), tokenizer, model_name)
        print(
            f"loom: router ({strategy.name}) on http://{args.host}:{args.port}/v1",
            file=sys.stderr,
            flush=True,
        )
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    finally:
        for p in procs:
            p.stop()
    return 0

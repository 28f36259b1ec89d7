"""``loom router``: start (or connect to) engines and serve the router on uvicorn.

Engines come from ``engine_urls`` (started by someone else), from a Ray cluster
(``ray``: each engine a Ray actor) or are started here as local processes.

SIGTERM (or Ctrl-C) is graceful: the router stops accepting connections, lets requests in
flight finish (for up to ``shutdown_timeout_s``), stops the engines it started and exits 0.
"""

from __future__ import annotations

import secrets
import sys

import httpx

from loom.config import RouterConfig
from loom.router.placement import LocalPlacement, Placement


def make_placement(args: RouterConfig, env: dict[str, str]) -> Placement:
    """Local processes, or Ray actors with ``ray`` (an error if Ray is not installed)."""
    extra = ["--kv-transport", args.kv_transport, "--dtype", args.dtype]
    if args.num_pages is not None:
        extra += ["--num-pages", str(args.num_pages)]
    if not args.prefix_cache:
        extra.append("--no-prefix-cache")
    if args.ray is None:
        return LocalPlacement(args.model, extra, env, max_restarts=args.max_restarts)
    try:
        from loom.router.ray_placement import RayPlacement
    except ImportError:
        raise SystemExit("loom: error: --ray needs Ray: pip install 'loom[ray]'") from None
    return RayPlacement(args.ray, args.model, extra, env, engine_cpus=args.engine_cpus,
                        spread=args.placement == "spread",
                        max_restarts=args.max_restarts)  # fmt: skip


def run_router(args: RouterConfig) -> int:
    """Start the engines (unless ``engine_urls`` names running ones) and serve until
    interrupted."""
    import uvicorn

    from loom.api.shutdown import exit_cleanly_on_sigterm
    from loom.errors import LoomError
    from loom.models import resolve_model_dir
    from loom.models.tokenizer import Tokenizer
    from loom.router.app import create_router_app
    from loom.router.manage import EngineManager
    from loom.router.strategies import StrategyRouter, make_strategy

    try:
        strategy = make_strategy(args.strategy, args.balance)
        # Here first: a model the router cannot read is an error before any engine starts
        # (a cluster's nodes need it at the same path).
        tokenizer = Tokenizer.from_dir(resolve_model_dir(args.model))
    except (ValueError, LoomError) as e:
        print(f"loom: error: {e}", file=sys.stderr)
        return 2
    exit_cleanly_on_sigterm()  # the engines started here stop with the router
    placement: Placement | None = None
    urls = list(args.engine_urls)
    key = args.engine_api_key or (args.api_keys[0] if args.api_keys else None)
    try:
        if not urls:
            where = f"on Ray ({args.ray})" if args.ray else "here"
            print(f"loom: starting {args.engines} engines ({args.model}) {where}",
                  file=sys.stderr, flush=True)  # fmt: skip
            # The engines' key, and a KV secret of their own (so their KV channel is
            # authenticated even without keys), in their environment.
            env = {"LOOM_API_KEY": key or "", "LOOM_KV_SECRET": secrets.token_hex(16)}
            placement = make_placement(args, env)
            exit_cleanly_on_sigterm()  # again: joining Ray installs a handler of its own
            try:
                urls = placement.start(args.engines)
            except Exception as e:  # an engine that exits, a cluster without room
                why = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
                print(f"loom: error: the engines did not start: {why}", file=sys.stderr)
                if args.ray is not None:
                    print("loom: (an engine's own output is in Ray's logs on its node, "
                          "/tmp/ray/session_latest/logs)", file=sys.stderr)  # fmt: skip
                return 1
            for u in urls:
                info = placement.describe(u)
                node = f" on node {info['node_ip']}" if "node_ip" in info else ""
                print(f"loom: engine {u}{node} on cores {info.get('cpus', [])}",
                      file=sys.stderr, flush=True)  # fmt: skip
        auth = {"Authorization": f"Bearer {key}"} if key else {}
        models = httpx.get(urls[0] + "/v1/models", headers=auth, timeout=10)
        models.raise_for_status()
        model_name = models.json()["data"][0]["id"]
        router = StrategyRouter(urls, strategy, api_key=key)
        manager = EngineManager(router, placement, args.max_engines, args.scale_queue)
        app = create_router_app(router, tokenizer, model_name, args.api_keys,
                                args.health_interval_s, manager, key)  # fmt: skip
        print(
            f"loom: router ({strategy.name}) on http://{args.host}:{args.port}/v1",
            file=sys.stderr,
            flush=True,
        )
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning",
                    timeout_graceful_shutdown=round(args.shutdown_timeout_s))  # fmt: skip
    finally:
        if placement is not None:
            placement.close()
    return 0

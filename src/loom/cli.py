"""The ``loom`` command line: ``serve | run | ps | kill | generate | build | new | model``."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from loom import __version__


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="tiny", help="HF model directory, or 'tiny' (default)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")


def _cmd_generate(args: argparse.Namespace) -> int:
    from loom.errors import LoomError
    from loom.llm import LLM
    from loom.sampling_params import SamplingParams

    try:
        params = SamplingParams(
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            min_p=args.min_p,
            seed=args.seed,
            stop=args.stop or [],
        )
        params.validate()
        llm = LLM(args.model, dtype=args.dtype, device=args.device)
        prompt = args.prompt
        if args.chat:
            prompt = llm.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
        for piece in llm.stream(prompt, params):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
    except LoomError as exc:
        print(f"loom: error: {exc}", file=sys.stderr)
        return 2
    return 0


def _cmd_make_tiny(args: argparse.Namespace) -> int:
    from loom.models.tiny import make_tiny_model

    path = make_tiny_model(args.out, seed=args.seed)
    print(f"wrote tiny model to {path}")
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from loom.errors import LoomError
    from loom.models import resolve_model_dir
    from loom.models.info import model_info

    try:
        info = model_info(resolve_model_dir(args.model_dir))
    except LoomError as exc:
        print(f"loom: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        width = max(len(k) for k in info)
        for key, value in info.items():
            shown = (
                f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else value
            )
            print(f"{key:<{width}}  {shown}")
    return 0


def _cmd_build(args: argparse.Namespace) -> int:
    import time
    from pathlib import Path

    from loom.sdk.build import BuildError, build_inferlet

    t0 = time.perf_counter()
    src = Path(args.app)
    out = Path(args.out) if args.out else (src.with_suffix(".wasm") if src.is_file()
                                           else src / "app.wasm")  # fmt: skip
    try:
        path = build_inferlet(
            src, out, progress=lambda m: print(f"loom build: {m}", file=sys.stderr)
        )
    except BuildError as exc:
        print(f"loom: error: {exc}", file=sys.stderr)
        return 2
    size = path.stat().st_size / 1e6
    print(f"wrote {path} ({size:.1f} MB) in {time.perf_counter() - t0:.2f} s")
    return 0


def _cmd_new(args: argparse.Namespace) -> int:
    from pathlib import Path

    from loom.sdk.scaffold import new_inferlet

    try:
        folder = new_inferlet(args.name, Path(args.dir))
    except (ValueError, FileExistsError) as exc:
        print(f"loom: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {folder / 'app.py'}; build it with: loom build {folder / 'app.py'}")
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from loom.config import SERVE_SECTIONS, ServeConfig, settings_of
    from loom.errors import LoomError

    overrides = {s.name: getattr(args, s.name) for c in SERVE_SECTIONS for s in settings_of(c)}
    try:
        config = ServeConfig.load(args.config, overrides)
    except (OSError, ValueError, TypeError) as exc:
        print(f"loom: error: {exc}", file=sys.stderr)
        return 2
    from loom.server.app import serve

    try:
        return serve(config)
    except LoomError as exc:
        print(f"loom: error: {exc}", file=sys.stderr)
        return 2


def _add_serve(sub: argparse._SubParsersAction) -> None:
    from loom.config import SERVE_SECTIONS, add_flags

    serve = sub.add_parser(
        "serve",
        help="serve a model: inferlets over WebSocket, the OpenAI API over HTTP",
        description="Start the engine, the inferlet runtime and the HTTP/WebSocket server. "
        "Every flag is also a key of the --config TOML file (flags win; --num-pages 64 is "
        "num_pages = 64 there).",
    )
    serve.add_argument("--config", help="TOML file with the same settings")
    add_flags(serve, *SERVE_SECTIONS)
    serve.set_defaults(func=_cmd_serve)


def _cmd_engine(args: argparse.Namespace) -> int:
    """A bare engine for a router: the whole server on one or a few cores, the engine in
    this process (no second process competing for the cores)."""
    import os

    if args.cpus:
        cpus = {int(c) for c in args.cpus.split(",")}
        os.sched_setaffinity(0, cpus)
    import torch

    torch.set_num_threads(args.threads or max(1, len(os.sched_getaffinity(0))))
    from loom.config import ServeConfig
    from loom.server.app import serve

    if os.environ.get("LOOM_EXIT_WITH_PARENT") == "1":
        from loom.router.engines import exit_with_parent

        exit_with_parent()
    # A router hands the engines it starts their secrets in the environment.
    keys = args.api_key or [k for k in [os.environ.get("LOOM_API_KEY")] if k]
    config = ServeConfig.of(
        model=args.model,
        host=args.host,
        port=args.port,
        worker="thread",
        num_pages=args.num_pages,
        dtype=args.dtype,
        device=args.device,
        reservation_ttl_s=args.reservation_ttl,
        kv_transport=args.kv_transport,
        prefix_cache=args.prefix_cache,
        api_keys=tuple(keys),
        kv_secret=args.kv_secret or os.environ.get("LOOM_KV_SECRET") or None,
        kv_peers=tuple(args.kv_peers or ()),
        kv_port=args.kv_port,
        # A wildcard bind is no address to send KV to: then the receiver stays on loopback.
        kv_host=args.kv_host or (args.host if args.host not in ("0.0.0.0", "::") else "127.0.0.1"),
        max_reserved_share=args.max_reserved_share,
    )
    return serve(config)


def _cmd_router(args: argparse.Namespace) -> int:
    from loom.config import RouterConfig, settings_of
    from loom.config.fields import build, merged, names
    from loom.router.serve import run_router

    given = {s.name: getattr(args, s.name) for s in settings_of(RouterConfig)}
    try:
        config = build(RouterConfig, merged(args.config, given, names(RouterConfig)))
    except (ValueError, TypeError, OSError) as exc:
        print(f"loom: error: {exc}", file=sys.stderr)
        return 2
    return run_router(config)


def _add_microserving(sub: argparse._SubParsersAction) -> None:
    engine = sub.add_parser("engine", help="a bare engine (OpenAI + microserving endpoints)")
    engine.add_argument("--model", default="tiny")
    engine.add_argument("--host", default="127.0.0.1")
    engine.add_argument("--port", type=int, default=8090)
    engine.add_argument("--cpus", help="pin to these cores, e.g. 0 or 0,1")
    engine.add_argument("--threads", type=int, help="torch threads (default: one per core)")
    engine.add_argument("--num-pages", type=int)
    engine.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    engine.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    engine.add_argument(
        "--reservation-ttl",
        type=float,
        default=60.0,
        help="seconds an unused KV reservation is kept (default 60)",
    )
    engine.add_argument(
        "--kv-transport",
        default="tcp",
        choices=["tcp", "shm", "gloo", "auto"],
        help="how KV is sent to other engines (shm: same host only; auto: shm to engines "
        "on this host, tcp to others)",
    )
    engine.add_argument(
        "--prefix-cache",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="reuse the KV of earlier prompts' pages (default on)",
    )
    engine.add_argument("--api-key", action="append", help="accept this API key (repeatable; "
                        "default: $LOOM_API_KEY)")  # fmt: skip
    engine.add_argument("--kv-secret", help="shared secret of the KV channel (default: "
                        "$LOOM_KV_SECRET, else the first API key)")  # fmt: skip
    engine.add_argument("--kv-peers", nargs="*", help="KV receivers (host:port) this engine "
                        "may send to, besides those a router registers")  # fmt: skip
    engine.add_argument("--kv-port", type=int, default=0, help="port of its KV receiver, "
                        "for other engines' --kv-peers (default: any free)")  # fmt: skip
    engine.add_argument("--kv-host", help="address of its KV receiver (default: --host)")
    engine.add_argument("--max-reserved-share", type=float, default=0.5, help="share of the "
                        "KV pool one client's reservations may hold (default 0.5)")  # fmt: skip
    engine.set_defaults(func=_cmd_engine)
    from loom.config import RouterConfig, add_flags

    router = sub.add_parser(
        "router",
        help="route OpenAI requests over engines with a microserving strategy",
        description="Start engines (here, or on a Ray cluster with --ray) and route over "
        "them. Every flag is also a key of the --config TOML file (flags win).",
    )
    router.add_argument("--config", help="TOML file with the same settings")
    add_flags(router, RouterConfig)
    router.set_defaults(func=_cmd_router)


def _add_client_commands(sub: argparse._SubParsersAction) -> None:
    from loom.client.commands import add_client_args, cmd_kill, cmd_ps, cmd_run

    run = sub.add_parser(
        "run",
        help="build if needed, upload and run an inferlet; stream its output",
        description="Messages go to stdout, logs to stderr; the exit status is 0 when the "
        "instance returns, 1 when it fails or is terminated.",
    )
    run.add_argument("app", help="app.py, a folder with app.py, app.c, app.zig, or a .wasm")
    add_client_args(run)
    run.add_argument("args", nargs="*", help="arguments for the inferlet (after --)")
    run.set_defaults(func=cmd_run)
    ps = sub.add_parser("ps", help="list running instances")
    add_client_args(ps)
    ps.set_defaults(func=cmd_ps)
    kill = sub.add_parser("kill", help="terminate instances")
    kill.add_argument("instance", nargs="+")
    add_client_args(kill)
    kill.set_defaults(func=cmd_kill)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loom", description="Loom: programmable LLM serving")
    parser.add_argument("--version", action="version", version=f"loom {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_serve(sub)
    _add_microserving(sub)
    _add_client_commands(sub)

    gen = sub.add_parser("generate", help="generate text offline and stream it to stdout")
    _add_engine_args(gen)
    gen.add_argument("prompt")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--min-p", type=float, default=0.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--stop", action="append", help="stop string (repeatable)")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    gen.set_defaults(func=_cmd_generate)

    build = sub.add_parser(
        "build", help="compile a Python inferlet (a .py file or a folder with app.py) to Wasm"
    )
    build.add_argument("app", help="app.py, or a folder with app.py and helper modules")
    build.add_argument("-o", "--out", help="output .wasm (default: next to the app)")
    build.set_defaults(func=_cmd_build)
    new = sub.add_parser("new", help="write a starter inferlet NAME/app.py")
    new.add_argument("name")
    new.add_argument("--dir", default=".", help="where to create it (default: here)")
    new.set_defaults(func=_cmd_new)
    model = sub.add_parser("model", help="make or inspect model directories")
    msub = model.add_subparsers(dest="model_command", required=True)
    tiny = msub.add_parser("make-tiny", help="write the deterministic tiny Llama model")
    tiny.add_argument("--out", required=True, help="directory to write")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(func=_cmd_make_tiny)
    info = msub.add_parser("info", help="print a model's config and parameter count")
    info.add_argument("model_dir", help="HF model directory, or 'tiny'")
    info.add_argument("--json", action="store_true", help="print JSON")
    info.set_defaults(func=_cmd_info)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Everything after `--` belongs to the inferlet (`loom run app.py --server U -- a b`);
    # argparse would otherwise refuse it once options followed the positionals.
    passthrough: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, passthrough = argv[:cut], argv[cut + 1 :]
    parser = build_parser()
    args = parser.parse_args(argv)
    if passthrough:
        if not hasattr(args, "args"):
            parser.error(f"'loom {args.command}' takes no arguments after --")
        args.args = [*args.args, *passthrough]
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())

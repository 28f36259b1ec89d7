"""``loom run``, ``loom ps`` and ``loom kill``: the client side of the command line."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from loom.client.client import Client, ClientError

DEFAULT_SERVER = "http://127.0.0.1:8080"


def add_client_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--server",
        default=os.environ.get("LOOM_SERVER", DEFAULT_SERVER),
        help=f"server URL (default: $LOOM_SERVER or {DEFAULT_SERVER})",
    )
    p.add_argument(
        "--api-key",
        default=os.environ.get("LOOM_API_KEY"),
        help="API key (default: $LOOM_API_KEY)",
    )


def _program_bytes(app: str) -> bytes:
    """A .wasm as is; anything else is built (cached by content hash)."""
    path = Path(app)
    if path.suffix == ".wasm":
        return path.read_bytes()
    from loom.sdk.build import build_inferlet

    def progress(msg: str) -> None:
        print(f"loom build: {msg}", file=sys.stderr)

    return build_inferlet(path, progress=progress).read_bytes()


async def _run(args: argparse.Namespace, wasm: bytes) -> int:
    async with await Client.connect(args.server, args.api_key) as client:
        digest = await client.upload(wasm)
        inst = await client.launch(digest, list(args.args))
        print(f"loom: launched {inst.id}", file=sys.stderr, flush=True)
        ends_with_newline = True
        try:
            async for event in inst.events():
                kind, data = event["event"], event["data"]
                if kind == "message":
                    text = str(data)
                    sys.stdout.write(text)
                    sys.stdout.flush()
                    if text:
                        ends_with_newline = text.endswith("\n")
                elif kind == "log":
                    print(f"[{data['level']}] {data['text']}", file=sys.stderr, flush=True)
        except asyncio.CancelledError:
            await inst.terminate()
            raise
        if not ends_with_newline:
            sys.stdout.write("\n")
        status = await inst.wait()
        if not status.ok:
            print(f"loom: instance {inst.id} {status.kind}: {status.error}", file=sys.stderr)
            return 1
        return 0


def cmd_run(args: argparse.Namespace) -> int:
    from loom.sdk.build import BuildError

    try:
        wasm = _program_bytes(args.app)
    except (BuildError, OSError) as e:
        print(f"loom: error: {e}", file=sys.stderr)
        return 2
    return _guard(lambda: _run(args, wasm))


async def _ps(args: argparse.Namespace) -> int:
    async with await Client.connect(args.server, args.api_key) as client:
        rows = await client.list()
    now = time.time()
    print(f"{'INSTANCE':<14}{'PROGRAM':<14}{'STATUS':<10}{'AGE':>8}  ARGS")
    for r in sorted(rows, key=lambda r: r["started_at"]):
        age = f"{now - r['started_at']:.0f}s"
        print(f"{r['id']:<14}{r['program'][:12]:<14}{r['status']:<10}{age:>8}  "
              f"{' '.join(r['args'])}")  # fmt: skip
    return 0


def cmd_ps(args: argparse.Namespace) -> int:
    return _guard(lambda: _ps(args))


async def _kill(args: argparse.Namespace) -> int:
    async with await Client.connect(args.server, args.api_key) as client:
        for iid in args.instance:
            await client.terminate(iid)
            print(f"terminated {iid}")
    return 0


def cmd_kill(args: argparse.Namespace) -> int:
    return _guard(lambda: _kill(args))


def _guard(make: Callable[[], Coroutine[Any, Any, int]]) -> int:
    """Run a client coroutine; errors become one line on stderr and a non-zero status."""
    try:
        return asyncio.run(make())
    except KeyboardInterrupt:
        return 130
    except ClientError as e:
        print(f"loom: error: {e}", file=sys.stderr)
        return 1
    except (OSError, ConnectionError) as e:
        print(f"loom: error: cannot reach the server: {e}", file=sys.stderr)
        return 2

"""The process worker: the engine in a child process, ops and results over pipes."""

from __future__ import annotations

import contextlib
import functools
import logging
import multiprocessing
import os
import pickle
import queue
import signal
import sys
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from loom.config import EngineConfig
from loom.engine.worker.cpu_placement import UNPINNED, CpuPlacement, pin_current_thread
from loom.engine.worker.pipe_reader import SpinningPipeReader
from loom.errors import LoomError, ModelLoadError

if TYPE_CHECKING:
    from multiprocessing.connection import Connection


from loom.engine.worker.base import _WorkerBase
from loom.engine.worker.executor import _OpRunner, _startup_error
from loom.engine.worker.ops import (
    _CLOSE_TIMEOUT_S,
    IDLE_SPIN_S,
    ChunkStep,
    EngineStatsSnapshot,
    ExecuteOp,
    RemoteTraceback,
    WorkerInfo,
    WorkerOp,
)
from loom.engine.worker.wire import (
    _CLOSE,
    _EXECUTE,
    _HEADER,
    _OP,
    _STATS,
    _decode_execute,
    _dumps,
    _encode_execute,
    _WirePickler,
    _write_message,
)

logger = logging.getLogger(__name__)

# ===== in a child process =====


@dataclass
class _Ready:
    info: WorkerInfo


@dataclass
class _StartupFailed:
    error: BaseException
    tb: str


@dataclass
class _OpDone:
    op_id: int
    result: object
    tb: str | None  # the child's traceback when ``result`` is an exception


@dataclass
class _StatsReply:
    req_id: int
    snapshot: EngineStatsSnapshot


class SubprocessWorker(_WorkerBase):
    """Runs the engine in a "spawn" child process; a reader thread here collects results.

    ``idle_spin_s``: after each op, while it waits for the next, the child polls its ops
    pipe for this long instead of sleeping, so that sending it a batch does not pay for
    waking it (``pipe_reader``). By default ``IDLE_SPIN_S`` when ``placement`` gives the
    engine cores of its own, else 0: a polling child on a core the runtime thread uses
    would take that thread's time.
    """

    def __init__(
        self,
        config: EngineConfig,
        on_ready: Callable[[], None] | None = None,
        *,
        threads: int | None = None,
        placement: CpuPlacement = UNPINNED,
        idle_spin_s: float | None = None,
    ) -> None:
        super().__init__(on_ready)
        if threads is not None and threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        if idle_spin_s is None:
            idle_spin_s = IDLE_SPIN_S if placement.engine else 0.0
        if idle_spin_s < 0:
            raise ValueError(f"idle_spin_s must be >= 0, got {idle_spin_s}")
        self.idle_spin_s = idle_spin_s
        ctx = multiprocessing.get_context("spawn")
        ops_r, ops_w = ctx.Pipe(duplex=False)
        res_r, res_w = ctx.Pipe(duplex=False)
        # daemon: if the runtime exits without close(), multiprocessing still ends the child.
        self._process = ctx.Process(
            target=_child_main,
            args=(config, ops_r, res_w, threads, placement.engine, idle_spin_s),
            name="loom-engine-worker",
            daemon=True,
        )
        self._process.start()
        # Process.join/is_alive from two threads at once can lose the exit status (both
        # call waitpid); the reader thread and close() take this lock around them.
        self._proc_lock = threading.Lock()
        # Drop our copies of the child's ends: then EOF on ``res_r`` means the child is gone,
        # and the child sees EOF on ``ops_r`` if this process dies.
        ops_r.close()
        res_w.close()
        self._ops_w, self._res_r = ops_w, res_r
        self._ops_fd = ops_w.fileno()
        self._pickler = _WirePickler()  # used under the send lock
        try:
            self.info = self._await_ready()
        except BaseException:
            self._stop_process(timeout=2.0)  # a failed child is exiting on its own
            ops_w.close()
            res_r.close()
            raise
        self._reader = threading.Thread(
            target=self._read_results,
            args=(placement.runtime_cores,),
            name="loom-engine-worker-reader",
            daemon=True,
        )
        self._reader.start()

    @property
    def pid(self) -> int | None:
        """The child's process id."""
        return self._process.pid

    def _await_ready(self) -> WorkerInfo:
        try:
            msg = self._res_r.recv()
        except (EOFError, OSError):
            self._process.join(timeout=5.0)
            raise ModelLoadError(
                f"engine worker exited during startup ({_describe_exit(self._process.exitcode)})"
            ) from None
        if isinstance(msg, _StartupFailed):
            msg.error.__cause__ = RemoteTraceback(msg.tb)
            raise _startup_error(msg.error)
        assert isinstance(msg, _Ready), f"unexpected startup message {type(msg).__name__}"
        return msg.info

    def _transmit_op(self, op_id: int, op: WorkerOp) -> BaseException | None:
        try:
            if isinstance(op, ExecuteOp) and not op.plans and not op.kv_sends:
                kind, payload = _EXECUTE, _encode_execute(op)
            else:
                kind, payload = _OP, self._pickler.dumps(op)
        except Exception as e:
            return e  # nothing was sent: the op fails on its own, the worker carries on
        self._send(kind, op_id, payload)
        return None

    def _transmit_stats(self, req_id: int) -> None:
        self._send(_STATS, req_id, b"")

    def _send(self, kind: bytes, ident: int, payload: bytes) -> None:
        # OSError: the child is gone. The reader thread sees the results pipe close and
        # fails every pending op and stats request, this one included. (Not
        # ``contextlib.suppress``: three Python calls per op on the runtime thread.)
        try:  # noqa: SIM105
            _write_message(self._ops_w, self._ops_fd, kind, ident, payload)
        except OSError:
            pass

    def _read_results(self, cores: frozenset[int] | None) -> None:
        """Reader thread: results -> ``_done`` (then ``on_ready``) until the child exits.
        ``cores``: where it runs (the runtime thread's core, which takes the results next)."""
        pin_current_thread(cores)
        reason: str | None = None
        try:
            while True:
                try:
                    msgs = [self._res_r.recv()]
                    # Everything already waiting goes out under one on_ready call.
                    while self._res_r.poll():
                        msgs.append(self._res_r.recv())
                except (EOFError, OSError):
                    break
                results: list[tuple[int, object | BaseException]] = []
                for msg in msgs:
                    if isinstance(msg, _OpDone):
                        if msg.tb is not None and isinstance(msg.result, BaseException):
                            msg.result.__cause__ = RemoteTraceback(msg.tb)
                        results.append((msg.op_id, msg.result))
                    elif isinstance(msg, _StatsReply):
                        self._stats_reply(msg.req_id, msg.snapshot)
                self._complete(results)
        except BaseException as e:
            # A message we cannot read: the protocol is broken, so stop the child rather
            # than leave ops hanging.
            reason = f"engine worker died: unreadable message ({type(e).__name__}: {e})"
            with self._proc_lock:
                self._process.kill()
            raise
        finally:
            if reason is None:
                with self._proc_lock:
                    self._process.join(timeout=5.0)
                if self._closed:
                    reason = "engine worker is closed"
                else:
                    reason = f"engine worker died ({_describe_exit(self._process.exitcode)})"
            self._fail(reason)

    def close(self) -> None:
        with self._send_lock:
            if self._closed:
                return
            self._closed = True
            # The child runs the ops already sent, then exits (OSError: it is already dead).
            with contextlib.suppress(OSError):
                self._ops_w.send_bytes(_HEADER.pack(_CLOSE, 0))
        self._stop_process(timeout=_CLOSE_TIMEOUT_S)
        if threading.current_thread() is not self._reader:  # close() from on_ready
            self._reader.join()
        self._ops_w.close()
        self._fail("engine worker is closed")  # no-op unless the reader failed to

    def _stop_process(self, timeout: float) -> None:
        with self._proc_lock:
            self._process.join(timeout)
            if self._process.is_alive():
                self._process.terminate()
                self._process.join(2.0)
            if self._process.is_alive():
                self._process.kill()
                self._process.join()


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "exit status unknown"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def _portable(e: BaseException) -> BaseException:
    """``e`` if it survives a pickle round trip, else a ``LoomError`` carrying its text.

    Checked in the child, so the parent's reader never meets an exception it cannot
    rebuild (e.g. a class whose ``__init__`` takes other arguments than ``args``).
    """
    try:
        pickle.loads(_dumps(e))
    except Exception:
        return LoomError(f"{type(e).__name__}: {e}")
    return e


def _child_main(
    config: EngineConfig,
    ops_r: Connection,
    res_w: Connection,
    threads: int | None = None,
    cores: frozenset[int] | None = None,
    idle_spin_s: float = 0.0,
) -> None:
    """The child process: load the engine, then serve ops until told to stop. ``cores``:
    where it runs (set first, so that torch's threads start there)."""
    pin_current_thread(cores)
    # Ctrl-C reaches the whole process group; the parent decides when the worker stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # tqdm's default lock (the loader's progress bar) is a multiprocessing lock, whose
    # semaphore the ``os._exit`` below would leave for the resource tracker to warn about.
    from tqdm import tqdm

    tqdm.set_lock(threading.RLock())
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    try:
        try:
            runner = _OpRunner(config)
        except BaseException as e:
            res_w.send_bytes(_dumps(_StartupFailed(_portable(e), traceback.format_exc())))
        else:
            res_w.send_bytes(_dumps(_Ready(runner.info)))
            _serve(runner, ops_r, res_w, idle_spin_s)
    except (BrokenPipeError, ConnectionResetError):
        pass  # the parent is gone: nobody to answer
    # Skip the interpreter's teardown: tearing torch down takes ~0.7 s, which close()
    # would wait for, and the child holds nothing that needs finalizing.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _send_progress(res_w: Connection, replies: _WirePickler, op_id: int, step: ChunkStep) -> None:
    res_w.send_bytes(replies.dumps(_OpDone(op_id, step, None)))


def _serve(runner: _OpRunner, ops_r: Connection, res_w: Connection, idle_spin_s: float) -> None:
    """Run ops and answer stats requests in arrival order until a close message (or EOF).

    A reader thread moves messages from the pipe into a queue as they come, so the pipe
    never fills while a long op runs and the parent's ``submit`` never waits on the engine.
    While this thread waits for work, the reader polls for ``idle_spin_s`` first.
    """
    inbox: queue.SimpleQueue[tuple[bytes, int, memoryview]] = queue.SimpleQueue()

    def deliver(data: bytes | None) -> None:
        if data is None:  # the parent is gone (or closed its end)
            inbox.put((_CLOSE, 0, memoryview(b"")))
            return
        kind, ident = _HEADER.unpack_from(data)
        inbox.put((kind, ident, memoryview(data)[_HEADER.size :]))

    reader = SpinningPipeReader(ops_r.fileno(), deliver, idle_spin_s)
    threading.Thread(target=reader.run, name="loom-engine-worker-ops", daemon=True).start()
    runner.pending = lambda: not inbox.empty()
    replies = _WirePickler()
    while True:
        if inbox.empty():
            reader.idle()
        kind, ident, payload = inbox.get()
        if kind == _CLOSE:
            return
        if kind == _STATS:
            res_w.send_bytes(replies.dumps(_StatsReply(ident, runner.stats())))
            continue
        tb: str | None = None
        runner.progress = functools.partial(_send_progress, res_w, replies, ident)
        try:
            op = _decode_execute(payload) if kind == _EXECUTE else pickle.loads(payload)
            result: object = runner.run(op)
        except Exception as e:
            result, tb = _portable(e), traceback.format_exc()
        try:
            reply = replies.dumps(_OpDone(ident, result, tb))
        except Exception as e:  # a result that cannot cross (it never should): its error
            reply = _dumps(_OpDone(ident, _portable(e), traceback.format_exc()))
        res_w.send_bytes(reply)

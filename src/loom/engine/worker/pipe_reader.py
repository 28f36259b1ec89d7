"""The engine worker's side of the ops pipe: framed messages in, spinning while idle.

Writing to a pipe whose reader sleeps costs the writer the reader's wake-up: on the 2-vCPU
test machine 7.7 µs per write against a reader sleeping in another process on the other
core, 1.7 µs against one that polls (`benchmarks/engine_idle_spin.py`); inside the
runtime's loop, 12-15 µs vs ~1.5. The runtime thread pays that on every batch it sends,
so while the engine waits for its next op, this reader polls the pipe for a short window
instead of sleeping; once a message arrives (the engine has work) or the window ends, it
sleeps in ``poll`` again and costs nothing. The window opens only when the last wait for
work fitted in it: with many guests the runtime's turn between batches takes longer
(~10 ms at 100 instances), and polling would be wasted.

The frames are those of ``multiprocessing.connection.Connection.send_bytes``: a 4-byte
big-endian length, or -1 and an 8-byte length for messages of 2 GiB or more.
"""

from __future__ import annotations

import contextlib
import os
import select
import struct
import time
from collections.abc import Callable

# A frame of a message under 2 GiB starts with its length, big-endian (what
# ``Connection.send_bytes`` writes before it; the worker's writer frames small ops itself).
FRAME_LENGTH = struct.Struct("!i")
_LONG_LENGTH = struct.Struct("!Q")
_READ_SIZE = 1 << 16  # a pipe's default capacity


class SpinningPipeReader:
    """Reads framed messages from ``fd`` on a thread of its own (``run``) and hands each
    to ``deliver`` as bytes, then ``None`` once the writer is gone.

    ``idle()`` (from the consuming thread, when it is about to wait for a message) starts
    a window of ``spin_s`` seconds in which the reader polls instead of sleeping, unless
    the previous wait (from ``idle()`` to the next message) took longer than that. The
    window ends at the next message: the consumer is busy then, and a spinning reader
    would take the core from it.
    """

    def __init__(self, fd: int, deliver: Callable[[bytes | None], None], spin_s: float) -> None:
        self._fd = fd
        self._deliver = deliver
        self._spin_s = spin_s
        self._spin_until = 0.0  # perf_counter time; 0 when not spinning
        self._sleeping = False  # the reader is (about to be) blocked in poll
        self._idle_at = 0.0  # when the consumer last went idle; 0 once a message came
        self._last_wait_s = 0.0  # from idle() to the next message, the last time
        # ``idle()`` writes a byte here to wake a sleeping reader, which then spins.
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(fd, False)
        os.set_blocking(self._wake_r, False)
        self._buf = bytearray()

    @property
    def sleeping(self) -> bool:
        """Whether the reader is (about to be) blocked in ``poll`` rather than polling."""
        return self._sleeping

    def idle(self) -> None:
        """The consumer waits for work: spin for the next ``spin_s`` seconds."""
        if self._spin_s <= 0:
            return
        self._idle_at = now = time.perf_counter()
        if self._last_wait_s > self._spin_s:
            return  # the last wait outlasted a window: this one likely will too
        self._spin_until = now + self._spin_s
        # Set before reading ``_sleeping``; the reader sets ``_sleeping`` before reading
        # ``_spin_until``: one of the two sees the other's write, so a reader about to
        # sleep is either woken here or does not sleep.
        if self._sleeping:
            os.write(self._wake_w, b"\0")

    def run(self) -> None:
        """Read until the writer closes its end (or the pipe fails), then deliver None."""
        fd, now = self._fd, time.perf_counter
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        try:
            while True:
                try:
                    chunk = os.read(fd, _READ_SIZE)
                except BlockingIOError:
                    if now() < self._spin_until:
                        continue
                    self._sleeping = True
                    if now() >= self._spin_until:  # (else ``idle()`` came in between)
                        poller.poll()
                        with contextlib.suppress(BlockingIOError):  # (a wake-up byte)
                            os.read(self._wake_r, _READ_SIZE)
                    self._sleeping = False
                    continue
                if not chunk:
                    break
                self._buf += chunk
                self._deliver_complete()
        except OSError:
            pass  # the pipe is gone: as at its end
        self._sleeping = False
        self._deliver(None)

    def close(self) -> None:
        """Close the wake-up pipe, once ``run`` has returned (``idle()`` may write to it
        until then)."""
        os.close(self._wake_r)
        os.close(self._wake_w)

    def _deliver_complete(self) -> None:
        buf = self._buf
        start = 0
        while True:
            head = FRAME_LENGTH.size
            if len(buf) - start < head:
                break
            (size,) = FRAME_LENGTH.unpack_from(buf, start)
            if size == -1:
                head += _LONG_LENGTH.size
                if len(buf) - start < head:
                    break
                (size,) = _LONG_LENGTH.unpack_from(buf, start + FRAME_LENGTH.size)
            end = start + head + size
            if len(buf) < end:
                break
            self._spin_until = 0.0  # the consumer has work now (set before it can idle)
            if self._idle_at:
                self._last_wait_s = time.perf_counter() - self._idle_at
                self._idle_at = 0.0
            with memoryview(buf) as view:  # one copy of the message, not two
                message = bytes(view[start + head : end])
            self._deliver(message)
            start = end
        if start:
            del buf[:start]

"""Microserving on the runtime: the engine side of ``prep_recv``, ``remote_send`` and
``start_generate`` (DESIGN §3).

- ``prep_recv``: match the prompt's full pages in the prefix cache, take pages for the
  rest of ``prompt[:end]``, and tell the engine worker's KV receiver which slots may be
  written under the request id. The pages sit in a guest-less instance until the
  matching ``start_generate`` or until the reservation expires, and count against the
  calling client's share of the pool (``max_reserved_share``).
- ``remote_send``: compute the KV of ``prompt[:end]`` (what the local prefix cache lacks)
  in an ordinary engine batch whose step ships ``prompt[begin:end]`` layer by layer to the
  receiver, a known peer (``register_peers``, ``kv_peers``) only; answer once the
  receiver confirmed every layer.
- ``start_generate``: turn the reservation into a completion whose KV already holds
  ``prompt[:begin]``: with one token left it is fed as the first decode step's input, with
  more the rest is prefilled here. A reservation whose transfer did not complete is never
  decoded.

Every method runs on the runtime thread (callers post through ``Runtime.call_soon``) and
answers through a callback that must not block.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from loom.engine.prefix_cache import chain_keys
from loom.engine.worker import (
    KVRecvStartOp,
    KVReleaseOp,
    KVReserveOp,
    KVSendCachedOp,
    KVSendSpec,
    KVStatusOp,
    KVTransferResult,
)
from loom.runtime.commands import ForwardCmd
from loom.runtime.completions import (
    CompletionRequest,
    _failed,
    new_host_instance,
    start_completion,
)
from loom.runtime.futures import HostFuture
from loom.runtime.instance import Instance
from loom.runtime.microserving_wire import (
    KnownPeers,
    MicroservingError,
    ReservationQuota,
    TransferCounters,
    check_prompt,
    encode_addr,
    resolve_window,
    send_window,
)

if TYPE_CHECKING:
    from loom.runtime.services import RuntimeServices

Reply = Callable[[Any], None]  # a dict on success, a MicroservingError otherwise


@dataclass(eq=False)
class Reservation:
    rid: str
    inst: Instance
    prompt: list[int]
    end: int
    matched: int
    pages: list[int]  # virtual ids covering prompt[:end]
    deadline: float
    ms: Microserving
    client: str = ""  # who reserved it: its pages count against that client's quota
    verified: bool = False  # the receiver confirmed every slot of every layer

    def on_end(self, error: str | None) -> None:  # the instance was killed or the runtime stopped
        self.ms.drop(self.rid, release_pages=False)


@dataclass(eq=False)
class _SendJob:
    rid: str
    reply: Reply
    done: bool = False

    def on_end(self, error: str | None) -> None:
        if not self.done:
            self.done = True
            self.reply(MicroservingError(503, f"remote_send ended: {error}", "aborted"))


class Microserving:
    def __init__(self, rt: RuntimeServices, reservation_ttl_s: float = 60.0) -> None:
        self.rt = rt
        self.ttl_s = reservation_ttl_s
        self.reservations: dict[str, Reservation] = {}
        self.sending: set[str] = set()
        self.recv_addr: str | None = None
        self.counters = TransferCounters()
        self.peers = KnownPeers()
        self.quota = ReservationQuota()

    # ----- the receiver and its peers -----

    def _start_receiver(self, then: Reply | None = None) -> None:
        """Start the worker's KV receiver (once: later ops answer its address)."""
        cfg = self.rt.config

        def started(result: Any) -> None:
            if not isinstance(result, BaseException):
                self.recv_addr = str(result)
            if then is not None:
                then(result)

        op = KVRecvStartOp(cfg.kv_secret, cfg.kv_port, cfg.kv_progress_timeout_s, cfg.kv_host)
        self.rt.submit_op(op, started)

    def register_peers(self, addresses: list[str], reply: Reply) -> None:
        """Add KV receivers ``remote_send`` may send to; answer this engine's own
        receiver's address and the peers it knows."""
        try:
            self.peers.add(addresses)
        except MicroservingError as e:
            reply(e)
            return

        def answer(result: Any) -> None:
            if isinstance(result, BaseException):
                reply(MicroservingError(500, f"cannot start the KV receiver: {result}", "internal"))
                return
            reply({"recv_engine": self.recv_addr, "peers": sorted(self.peers.registered)})

        self._start_receiver(answer)

    # ----- prep_recv -----

    def prep_recv(
        self, rid: str, prompt: list[int], end: int, reply: Reply, client: str = ""
    ) -> None:
        rt, ps = self.rt, self.rt.page_size
        try:
            self._check_prompt(prompt)
            end = resolve_window(end, len(prompt), "end")
            if rid in self.reservations or rid in rt.instances:
                raise MicroservingError(409, f"request id {rid!r} is already in use")
            share = rt.config.max_reserved_share
            self.quota.take(client, -(-end // ps), share, rt.pool.num_pages)
        except MicroservingError as e:
            reply(e)
            return
        taken = self._pages_for(prompt, end, reply)
        if taken is None:
            self.quota.give(client, -(-end // ps))
            return
        physical, matched = taken
        inst = new_host_instance(rt, f"recv-{rid}", None)
        pages = inst.pages.adopt(physical)
        deadline = time.monotonic() + self.ttl_s
        r = Reservation(rid, inst, list(prompt), end, matched, pages, deadline, self, client)
        inst.job = r
        self.reservations[rid] = r
        positions = list(range(matched, end))
        slots = [physical[p // ps] * ps + p % ps for p in positions]
        if self.recv_addr is None:
            self._start_receiver()

        def reserved(result: Any) -> None:
            if isinstance(result, BaseException):
                self.drop(rid)
                reply(MicroservingError(500, f"cannot reserve KV slots: {result}", "internal"))
                return
            reply({"kv_addr_info": encode_addr(slots), "prefix_matched_length": matched,
                   "recv_engine": self.recv_addr})  # fmt: skip

        rt.submit_op(KVReserveOp(rid, slots, positions, rt.pool.drain_fresh()), reserved)

    def _pages_for(self, prompt: list[int], end: int, reply: Reply) -> tuple[list[int], int] | None:
        """(physical pages covering ``prompt[:end]``, tokens the prefix cache supplied): the
        cache's full pages first, fresh ones for the rest; ``None`` after answering
        ``preempt`` when the pool is short."""
        rt, ps = self.rt, self.rt.page_size
        cached = rt.prefix_cache.match(chain_keys(prompt, ps, end // ps))
        need = -(-end // ps) - len(cached)
        if need > 0 and not rt.pool.can_allocate(need):
            rt.pool.free(cached)
            reply(MicroservingError(503, "out of KV pages; retry later", "preempt"))
            return None
        return cached + (rt.pool.allocate(need) if need > 0 else []), len(cached) * ps

    # ----- remote_send -----

    def remote_send(
        self, rid: str, prompt: list[int], begin: int, end: int, addr: str, dst: str, reply: Reply
    ) -> None:
        rt, ps = self.rt, self.rt.page_size
        try:
            self._check_prompt(prompt)
            begin, end, remote = send_window(len(prompt), begin, end, addr)
            dst = self.peers.check(dst, rt.config.kv_peers, self.recv_addr)
            if rid in self.sending:
                raise MicroservingError(409, f"request id {rid!r} is already sending")
        except MicroservingError as e:
            reply(e)
            return
        taken = self._pages_for(prompt, end, reply)
        if taken is None:
            return
        physical, matched = taken
        job = _SendJob(rid, reply)
        inst = new_host_instance(rt, f"send-{rid}-{rt.next_seq()}", job)
        pages = inst.pages.adopt(physical)
        local = [physical[p // ps] * ps + p % ps for p in range(begin, end)]
        cfg = rt.config
        spec = KVSendSpec(rid, dst, local, remote, cfg.kv_transport, cfg.kv_secret,
                          cfg.kv_progress_timeout_s)  # fmt: skip
        self.sending.add(rid)

        def finish(result: Any) -> None:
            self.sending.discard(rid)
            if job.done:
                return
            job.done = True
            if isinstance(result, BaseException) or result is None:
                err = result if result is not None else "no transfer result"
                self.counters.failed_sends += 1
                reply(MicroservingError(502, f"KV transfer failed: {err}", "transfer_failed"))
                rt.end_instance(inst, False, str(err))
                return
            t: KVTransferResult = result
            self.counters.count(t, end - begin)
            if not t.ok:
                reply(MicroservingError(502, f"KV transfer failed: {t.error}", "transfer_failed"))
                rt.end_instance(inst, False, t.error)
                return
            # The KV of prompt[:end] is computed here now: keep its full pages for later.
            full = end // ps
            rt.prefix_cache.insert(chain_keys(prompt, ps, full), physical[:full])
            reply({"bytes": t.bytes, "tokens": end - begin, "send_s": t.send_s,
                   "hidden_s": max(0.0, t.send_s - t.exposed_s),
                   "computed_tokens": end - matched})  # fmt: skip
            rt.end_instance(inst, True, None)

        if matched >= end:  # everything is cached here: send straight from the cache
            rt.submit_op(
                KVSendCachedOp([spec]),
                lambda res: finish(res[0] if isinstance(res, list) and res else res),
            )
            return
        future = HostFuture()
        last = end - ps * (len(pages) - 1)
        cmd = ForwardCmd(
            tokens=prompt[matched:end],
            positions=list(range(matched, end)),
            pages=pages,
            last_page_len=last,
            masks=None,
            outputs=[],
            future=future,
            kv_send=spec,
        )
        future.waiters.append(
            lambda: finish(cmd.kv_result if cmd.kv_result is not None else _future_error(future))
        )
        rt.enqueue(rt.new_queue(inst), cmd)

    # ----- start_generate -----

    def check_start(self, rid: str, prompt: list[int], begin: int, reply: Reply) -> None:
        """Validate a ``start_generate`` before any output is promised: window rules, and
        that a reservation's transfer completed (otherwise the reservation is dropped and
        the request is never decoded)."""
        rt = self.rt
        r = self.reservations.get(rid)
        try:
            self._check_prompt(prompt)
            begin = resolve_window(begin, len(prompt), "begin")
            if r is None:
                if begin != 0:
                    why = (
                        f"no reservation for request id {rid!r} (expired or never made with "
                        "prep_recv); only begin=0 works without one"
                    )
                    raise MicroservingError(404, why, "unknown_request")
            elif prompt[: r.end] != r.prompt[: r.end]:
                raise MicroservingError(400, "the prompt differs from the one given to prep_recv")
            elif begin > r.end:
                raise MicroservingError(
                    400, f"begin ({begin}) is past the reserved window end ({r.end})"
                )
        except MicroservingError as e:
            reply(e)
            return
        if r is None or r.verified or r.end == r.matched or begin <= r.matched:
            reply({})  # nothing to wait for: no transfer, or none needed below ``begin``
            return

        def checked(status: Any) -> None:
            if self.reservations.get(rid) is not r:
                reply(MicroservingError(404, f"the reservation {rid!r} is gone", "unknown_request"))
                return
            if isinstance(status, dict) and status.get("complete"):
                r.verified = True
                rt.submit_op(KVReleaseOp(rid), lambda _: None)  # late frames are refused now
                self.counters.received_requests += 1
                reply({})
                return
            why = status.get("error") if isinstance(status, dict) else None
            self.drop(rid)
            reply(
                MicroservingError(
                    409,
                    "the KV for this request never fully arrived "
                    f"({why or 'no data'}); not decoding",
                    "transfer_incomplete",
                )
            )

        rt.submit_op(KVStatusOp(rid), checked)

    def start_generate(self, rid: str, begin: int, req: CompletionRequest, handle_id: str) -> None:
        """After ``check_start``: resume ``rid``'s reservation (or, without one, run an
        ordinary completion); the result goes to ``req.on_done``."""
        rt = self.rt
        begin = begin + len(req.prompt) if begin < 0 else begin
        r = self._take(rid)
        if r is None:
            if begin != 0:
                req.on_done(_failed(req, f"no reservation for request id {rid!r}"))
                return
            start_completion(rt, rt.prefix_cache, handle_id, req)
            return
        if not (r.verified or r.end == r.matched or begin <= r.matched):
            req.on_done(_failed(req, "start_generate before check_start"))
            rt.end_instance(r.inst, False, "unchecked")
            return
        if not r.verified:  # resumed below the received window: refuse late frames
            rt.submit_op(KVReleaseOp(rid), lambda _: None)
        self._resume(r, min(begin, r.end), req, handle_id)

    def _resume(self, r: Reservation, begin: int, req: CompletionRequest, handle_id: str) -> None:
        rt, ps = self.rt, self.rt.page_size
        kv_len = begin
        keep = -(-kv_len // ps)
        # Pages past the resume point hold nothing the generation reads again.
        if len(r.pages) > keep:
            r.inst.pages.release(r.pages[keep:])
        del rt.instances[r.inst.id]
        r.inst.id = handle_id
        rt.instances[handle_id] = r.inst
        start_completion(
            rt, rt.prefix_cache, handle_id, req, prefilled=(r.inst, r.pages[:keep], kv_len)
        )

    # ----- expiry and aborts -----

    def abort(self, rid: str) -> bool:
        return self.drop(rid)

    def _take(self, rid: str) -> Reservation | None:
        """Take ``rid``'s reservation off the books (and its pages off its client's quota)."""
        r = self.reservations.pop(rid, None)
        if r is not None:
            self.quota.give(r.client, len(r.pages))
        return r

    def drop(self, rid: str, release_pages: bool = True) -> bool:
        r = self._take(rid)
        if r is None:
            return False
        self.rt.submit_op(KVReleaseOp(rid), lambda _: None)
        if release_pages:
            self.rt.end_instance(r.inst, False, "reservation dropped")
        return True

    def expire(self, now: float) -> None:
        for rid in [rid for rid, r in self.reservations.items() if r.deadline <= now]:
            self.counters.expired += 1
            self.drop(rid)

    def _check_prompt(self, prompt: list[int]) -> None:
        check_prompt(prompt, self.rt.max_model_len, self.rt.vocab_size)


def _future_error(future: HostFuture) -> Any:
    value = future.value
    return RuntimeError(getattr(value, "value", None) or "the forward pass failed")

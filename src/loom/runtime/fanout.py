"""Result fan-out: a returned batch's outputs go back to the commands that rode it.

A forward command's future resolves with its slice of the outputs (and a pass ahead
waiting on it gets its input token); a host-driven generation takes its token, or the
tokens the worker went on to generate in a chunk (``ChunkStep``: one step at a time, as
they are made), streams their text and, once it stops, resolves and gives back the pages
it took ahead and did not fill.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from loom.engine.worker import ChunkStep
from loom.runtime import context_cache
from loom.runtime.commands import CommandQueue, ForwardCmd, GenerateCmd
from loom.runtime.flight import Flight
from loom.runtime.guests import Guests
from loom.runtime.host.forward_pass import forward_output
from loom.runtime.instance import Instance
from loom.runtime.sampling_states import SamplingStates
from loom.runtime.services import RuntimeServices
from loom.runtime.wasm import ffi as wasm_ffi
from loom.runtime.wasm.ffi import HostCallError


class ResultFanout:
    """Hands a batch's results to its commands. ``nudge(flight)`` asks the worker to cut
    the flight's generation chunk short (a generation in it finished mid-chunk)."""

    def __init__(
        self,
        rt: RuntimeServices,
        guests: Guests,
        states: SamplingStates,
        nudge: Callable[[Flight], None],
    ) -> None:
        self.rt = rt
        self.guests = guests
        self.states = states
        self.nudge = nudge

    def complete(self, flight: Flight, result: Any) -> None:
        """The batch of ``flight`` returned ``result`` (its outputs, or an exception)."""
        stats = self.rt.stats
        failed = isinstance(result, BaseException)
        transfers: dict[str, Any] = {}
        if flight.kv_sends and not failed:
            result, sent = result
            transfers = {t.rid: t for t in sent}
        more: list[list[int]] = []
        if flight.plans and not failed:
            result, more = result
        stats.engine_passes += 1 + max(map(len, more), default=0)
        stats.pass_seqs += len(flight.parts) + sum(map(len, more))
        now = time.perf_counter()
        for k, (inst, q, cmd, a, b) in enumerate(flight.parts):
            if isinstance(cmd, ForwardCmd):
                if b > a and not failed and inst.alive:
                    inst.handle._note_tokens(now, 1)
                q.inflight -= 1
                cmd.flight = None
                if cmd.publish is not None:
                    context_cache.publish_forward(self.rt, cmd, not failed)
                if cmd.kv_send is not None:
                    cmd.kv_result = transfers.get(cmd.kv_send.rid)
                if failed:
                    q.failed = True
                    cmd.future.resolve(wasm_ffi.Err(f"forward pass failed: {result}"))
                else:
                    cmd.future.resolve(wasm_ffi.Ok(forward_output(cmd.outputs, result[a:b])))
                if cmd.then is not None:
                    fill_ahead(q, cmd, None if failed else result[a].token)
                continue
            task = cmd.task
            if not inst.alive:
                continue
            if failed:
                if task.finish_reason is None:
                    task.finish_reason = f"error: {result}"
            else:
                if not flight.step0_done:
                    self.take_tokens(inst, cmd, [result[a].token], result[a])
                if k in flight.plans:  # the tokens the worker went on to generate
                    made = more[flight.plans[k]]
                    stats.continued_tokens += len(made)
                    self.take_tokens(inst, cmd, made[flight.replayed.get(k, 0) :], None)
                    if task.finish_reason is None:
                        # A chunk cut short leaves pages taken ahead unfilled; the next
                        # step takes what it needs again.
                        self.trim_pages(inst, task)
            if task.finish_reason is not None:
                self.finish_generation(inst, q, cmd)

    def on_chunk_step(self, flight: Flight, step: ChunkStep) -> None:
        """One step of a generation chunk, while the worker goes on: its tokens stream out
        now. A generation that finishes here ends when the chunk returns (the worker may
        still write its pages), and the chunk is cut short for it."""
        finished = False
        if step.results is not None:  # the batch's own step
            flight.step0_done = True
            for inst, _, cmd, a, _ in flight.parts:
                if inst.alive and isinstance(cmd, GenerateCmd):
                    finished |= self.take_tokens(
                        inst, cmd, [step.results[a].token], step.results[a]
                    )
        elif step.tokens is not None:
            for k, j in flight.plans.items():
                tok = step.tokens[j]
                if tok is None:
                    continue
                flight.replayed[k] = flight.replayed.get(k, 0) + 1
                inst, _, cmd, _, _ = flight.parts[k]
                if inst.alive and isinstance(cmd, GenerateCmd):
                    finished |= self.take_tokens(inst, cmd, [tok], None)
        if finished:
            self.nudge(flight)

    def take_tokens(
        self, inst: Instance, cmd: GenerateCmd, tokens: Sequence[int | None], first: Any
    ) -> bool:
        """Feed a generation the tokens sampled for it (``first``: the result of the
        batch's own step, kept when it asked for logprobs); True when it finished here.
        Tokens after its end are dropped (their slots stay unused)."""
        task = cmd.task
        if task.finish_reason is not None:
            return False
        if task.cache_prompt is not None:  # its prompt's KV is written now
            context_cache.publish_generation(self.rt, inst, task)
        if first is not None and task.logprobs is not None:
            task.outputs.append(first)
        if tokens:
            inst.handle._note_tokens(time.perf_counter(), len(tokens))
        stats = self.rt.stats
        for tok in tokens:
            assert tok is not None
            stats.sampled_tokens += 1
            delta = task.on_token(tok)
            if task.on_delta is not None:
                # (With logprobs a generation is never continued by the worker: one token
                # per step, and ``first`` is its result.)
                task.on_delta(delta, tok, first)
            elif task.stream and delta:
                try:
                    self.guests.messaging.send_to_client(inst, delta)
                except HostCallError as e:
                    self.guests.kill(inst, str(e))
            if task.finish_reason is not None:
                return True
        return False

    def trim_pages(self, inst: Instance, task: Any) -> None:
        """Give back pages a finished generation took ahead and did not fill."""
        page_size = self.rt.page_size
        keep = max(1, -(-task.kv_len // page_size)) if task.pages else 0
        spare = task.pages[keep:]
        if spare:
            del task.pages[keep:]
            if inst.alive:
                inst.pages.release(spare)

    def finish_generation(self, inst: Instance, q: CommandQueue, cmd: GenerateCmd) -> None:
        task = cmd.task
        self.states.end(task)
        if q.peek() is cmd:
            q.pop()
        self.trim_pages(inst, task)
        reason = task.finish_reason or ""
        if reason.startswith("error"):  # the guest gets an exception, not a short text
            task.future.resolve(wasm_ffi.Err(f"generation failed: {reason.partition(': ')[2]}"))
        else:
            task.future.resolve(self._result(task))
        if task.on_finish is not None:
            task.on_finish(task)

    def _result(self, task: Any) -> Any:
        return wasm_ffi.Ok(
            (
                task.tokens,
                task.text,
                task.finish_reason,
                task.pages,
                task.last_page_len(self.rt.page_size),
                [o.logprob or 0.0 for o in task.outputs] if task.logprobs is not None else [],
            )
        )


def fill_ahead(q: CommandQueue, cmd: ForwardCmd, token: int | None) -> None:
    """``cmd`` returned: the pass ahead of it gets its input, the token ``cmd`` sampled;
    if ``cmd`` failed (no token), the pass ahead fails with it, never run."""
    ahead = cmd.then
    assert ahead is not None
    cmd.then = None
    ahead.ahead_of = None  # (links kept would hold every step of a long loop alive)
    if token is not None:
        ahead.tokens = [token]
        return
    if q.ahead is ahead:
        q.ahead = None
    if q.withdraw(ahead):
        ahead.future.resolve(wasm_ffi.Err("the pass before it failed"))

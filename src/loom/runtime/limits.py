"""Runtime settings: batching policy, per-instance limits, what happens when KV runs out."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

BatchPolicy = Literal["adaptive", "k", "t", "k_or_t"]
OutOfPagesPolicy = Literal["wait", "kill-newest"]


@dataclass
class RuntimeConfig:
    """How the inferlet runtime schedules, batches and limits instances."""

    # Batching: "adaptive" fires as soon as the engine is free with everything that
    # arrived meanwhile (work-conserving); "k" waits for `batch_k` forward commands, "t"
    # for `batch_t_ms` after the oldest arrived, "k_or_t" for whichever comes first.
    batch_policy: BatchPolicy = "adaptive"
    batch_k: int = 8
    batch_t_ms: float = 16.0
    max_batch_tokens: int = 8192

    # A batch of nothing but host-driven generations, while no guest can add work, lets
    # the engine worker continue them for up to this many tokens without a round trip per
    # token (0: one step per batch).
    generate_chunk: int = 16

    # A launch cohort (``launch_batch``) holds its members' forward work until all have
    # reached their first wait, or until none has for this long.
    cohort_hold_ms: float = 200.0

    # Per-instance limits.
    memory_limit_bytes: int = 256 << 20  # componentize-py guests start at ~12 MiB
    cpu_budget_s: float = 60.0  # guest CPU time on the runtime thread
    token_budget: int = 1 << 30  # tokens put through the model (inputs + generated)
    max_message_bytes: int = 1 << 20
    max_pending_messages: int = 10_000  # unread messages to the client / on a channel
    max_instances: int = 4096

    # Time slicing: a running guest yields to the others every `slice_ms`.
    slice_ms: float = 10.0

    # When KV pages run out: "wait" holds the allocating queue until pages are freed
    # (failing the inferlet after `page_wait_timeout_s`), "kill-newest" terminates the
    # newest instance (the requester itself when it is the newest).
    out_of_pages: OutOfPagesPolicy = "wait"
    page_wait_timeout_s: float = 30.0

    # Freeze the objects that exist when the runtime starts out of Python's garbage
    # collector (``gc.freeze``), so collections scan only what instances create.
    freeze_gc: bool = True

    # Microserving: a KV reservation (prep_recv) not taken up by start_generate within
    # this many seconds is dropped and its pages freed.
    reservation_ttl_s: float = 60.0
    # How this engine ships KV to others: "tcp" (any host), "shm" (shared memory, for
    # receivers on this host; the socket carries only frame names) or "gloo"
    # (torch.distributed send/recv; the socket carries only frame headers).
    kv_transport: str = "tcp"

    # Outgoing HTTP is allowed only to these hosts ("*" allows any); a request not answered
    # within `http_timeout_s` fails (the inferlet gets an error it can handle).
    http_allow_hosts: tuple[str, ...] = ()
    http_timeout_s: float = 30.0

    def validate(self) -> None:
        if self.batch_policy not in ("adaptive", "k", "t", "k_or_t"):
            raise ValueError(f"unknown batch policy {self.batch_policy!r}")
        if self.out_of_pages not in ("wait", "kill-newest"):
            raise ValueError(f"unknown out-of-pages policy {self.out_of_pages!r}")
        if self.kv_transport not in ("tcp", "shm", "gloo"):
            raise ValueError(f"kv_transport must be tcp, shm or gloo, got {self.kv_transport!r}")
        if self.http_timeout_s <= 0:
            raise ValueError(f"http_timeout_s must be > 0, got {self.http_timeout_s}")
        if self.cohort_hold_ms < 0:
            raise ValueError(f"cohort_hold_ms must be >= 0, got {self.cohort_hold_ms}")
        if self.batch_k < 1 or self.batch_t_ms < 0 or self.slice_ms <= 0:
            raise ValueError("batch_k must be >= 1, batch_t_ms >= 0 and slice_ms > 0")

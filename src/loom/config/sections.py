"""The configuration of every part, frozen and checked when made.

``EngineConfig`` (the model, its engine and KV cache), ``RuntimeConfig`` (the inferlet
runtime: batching, limits, out-of-pages policy), ``ServerConfig`` (``loom serve``'s
sockets, clients and engine placement) and ``RouterConfig`` (``loom router``).
``ServeConfig`` composes the first three for ``loom serve``. Every field is a setting
(``fields.setting``): one flag and one TOML key, with its help text.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from loom.config.fields import build, merged, names, setting

BatchPolicy = Literal["adaptive", "k", "t", "k_or_t"]
OutOfPagesPolicy = Literal["wait", "kill-newest"]
KVTransport = Literal["tcp", "shm", "gloo", "auto"]
DTYPES = ("float32", "bfloat16", "float16")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


@dataclass(frozen=True)
class EngineConfig:
    """The model and its engine: weights, device, KV cache, step budgets."""

    model: str = setting("tiny", "a Hugging Face model directory, or 'tiny' (embedded)")
    dtype: str = setting("float32", "weights and activations", choices=DTYPES)
    device: str = setting("cpu", "cpu, cuda or cuda:N")
    page_size: int = setting(16, "tokens per KV page")
    num_pages: int | None = setting(None, "KV pages (default: from kv_cache_memory_mb)")
    kv_cache_memory_mb: int = setting(256, "KV cache budget when num_pages is not given")
    max_num_batched_tokens: int = setting(2048, "tokens of one offline step (chunked prefill)")
    max_num_seqs: int = setting(256, "sequences the offline scheduler runs at once")
    max_model_len: int | None = setting(None, "context length (default: the model's)")
    enable_prefix_caching: bool = setting(
        True, "reuse the KV of earlier prompts' full pages", name="prefix_cache"
    )
    # One torch thread fewer for each core other processes keep busy (engine/cpu_threads.py):
    # losing a core then costs about a core's share instead of stalling every barrier.
    adapt_threads: bool = setting(True, "give up torch threads while other processes "
                                        "keep this engine's cores busy (CPU)")  # fmt: skip
    # Loom's CPU paged-attention kernel (kernels/cpu.py), compiled at first use;
    # off, or where it cannot be built, attention runs through torch's SDPA.
    cpu_attention_kernel: bool = setting(True, "attend with the paged-attention kernel "
                                               "built for this CPU (off: torch SDPA)")  # fmt: skip
    # A GPU decode step is launch-bound; replaying a captured graph issues it at once
    # (engine/decode_graphs.py). Captured per batch-size bucket at start-up.
    cuda_graphs: bool = setting(True, "replay decode steps from CUDA graphs (CUDA only)")
    cuda_graph_max_batch: int = setting(256, "largest decode batch a CUDA graph is "
                                             "captured for (larger ones run eagerly)")  # fmt: skip
    # Pads every pass to this wall time whatever its size, the way a launch-bound GPU
    # step behaves: passes and idle gaps then cost here what they would cost there.
    step_time_ms: float = setting(
        0.0, "benchmarks only: pad every engine pass to this wall time (0: off)",
        name="engine_step_ms",
    )  # fmt: skip

    def __post_init__(self) -> None:
        _require(self.page_size > 0 and (self.num_pages is None or self.num_pages > 0),
                 "page_size and num_pages must be positive")  # fmt: skip
        _require(self.max_num_batched_tokens > 0 and self.max_num_seqs > 0,
                 "max_num_batched_tokens and max_num_seqs must be positive")  # fmt: skip
        _require(self.kv_cache_memory_mb > 0, "kv_cache_memory_mb must be positive")
        _require(0 < self.cuda_graph_max_batch <= 4096,
                 f"cuda_graph_max_batch must be in 1..4096, got "
                 f"{self.cuda_graph_max_batch}")  # fmt: skip
        _require(0 <= self.step_time_ms < 60_000,
                 f"step_time_ms must be in [0, 60000), got {self.step_time_ms}")  # fmt: skip


@dataclass(frozen=True)
class RuntimeConfig:
    """The inferlet runtime: batching, per-instance limits, out-of-pages policy."""

    # "adaptive" fires as soon as the engine is free with everything that arrived
    # meanwhile (work-conserving); "k" waits for `batch_k` forward commands, "t" for
    # `batch_t_ms` after the oldest arrived, "k_or_t" for whichever comes first.
    batch_policy: BatchPolicy = setting("adaptive", "when a batch of forward work fires")
    batch_k: int = setting(8, "forward commands the k policies wait for")
    batch_t_ms: float = setting(16.0, "milliseconds the t policies wait")
    max_batch_tokens: int = setting(8192, "tokens in one engine batch")
    # A batch of nothing but host-driven generations, while no guest can add work, lets
    # the worker continue them for up to this many tokens without a round trip each.
    generate_chunk: int = setting(16, "steps the worker runs host generations alone (0: off)")
    # A launch cohort (``launch_batch``) holds its members' forward work until all have
    # reached their first wait, or until none has for this long.
    cohort_hold_ms: float = setting(200.0, "longest hold of a launch cohort's work")
    memory_limit_mb: int = setting(256, "memory cap per instance")  # guests start ~12 MiB
    # The first `pool_slots` instances alive at once take their memories, tables and
    # stacks from slots reserved at start and reused: a new instance finds the pages an
    # ended one of the same program wrote, instead of faulting each in (runtime/wasm/
    # engine.py says what it saves); the rest map their own. A slot once used keeps up to
    # `pool_resident_mb` resident, so the pool holds at most slots x that (512 MiB by
    # default).
    instance_pool: bool = setting(True, "take new instances from reused, pre-reserved slots")
    pool_slots: int = setting(32, "instances the pool holds at once")
    pool_resident_mb: int = setting(16, "MiB of a pooled slot's memory kept resident for "
                                        "the next instance")  # fmt: skip
    # What all instances together may add to the server process's resident memory; over
    # it, the instance that grew it most is ended.
    memory_budget_mb: int = setting(0, "memory budget of all instances together "
                                       "(0: half the memory available at start)")  # fmt: skip
    cpu_budget_s: float = setting(60.0, "guest CPU seconds per instance")
    token_budget: int = setting(1 << 30, "tokens an instance may put through the model")
    max_message_bytes: int = setting(1 << 20, "largest message, topic or store value")
    max_pending_messages: int = setting(10_000, "unread messages per reader (a client, an "
                                                "inferlet, a channel, a subscription)")  # fmt: skip
    max_pending_mb: int = setting(16, "MiB of unread messages per reader")
    max_subscriptions: int = setting(1024, "topic subscriptions per instance")
    store_quota_mb: int = setting(64, "MiB one program's keys and values in the store "
                                      "may take")  # fmt: skip
    max_instances: int = setting(4096, "inferlet instances running at once (completions "
                                       "of the OpenAI API are not counted)")  # fmt: skip
    # A client's instance and all it launches (children, detached ones, theirs) form a
    # tree: a fork bomb fills its tree, not the server.
    max_tree_instances: int = setting(64, "instances one launch and its descendants may "
                                          "run at once")  # fmt: skip
    # Off by default (one client may use the whole pool, as the out-of-pages policies
    # assume); on a server shared by clients that do not trust each other, 0.5 say.
    max_tree_page_share: float = setting(1.0, "share of the KV pool one launch and its "
                                              "descendants may hold")  # fmt: skip
    slice_ms: float = setting(10.0, "a running guest yields to the others this often")
    # Guests run side by side on this many threads (host calls still one at a time). Off
    # by default: on a 2-core VM it gained nothing (runtime/turns.py says why).
    guest_threads: int = setting(1, "threads running guests' turns (1: the runtime thread; "
                                    "0: half the cores, at most 8)")  # fmt: skip
    # Guests that run whole slices (spin) get at most this share of the runtime thread
    # while other instances live (see runtime/cpu_share.py).
    cpu_bound_share: float = setting(0.25, "share of the runtime thread CPU-bound guests "
                                           "get beside other instances")  # fmt: skip
    # An instance that waits on anything but its own engine work (a message, a channel, a
    # child) for this long is ended; 0: never.
    idle_timeout_s: float = setting(3600.0, "end an instance idle this long (0: never)")
    # "wait" holds the allocating queue until pages are freed (failing the inferlet after
    # `page_wait_timeout_s`); "kill-newest" ends the newest instance holding pages.
    out_of_pages: OutOfPagesPolicy = setting("wait", "what happens when KV pages run out")
    page_wait_timeout_s: float = setting(30.0, "longest wait for KV pages")
    max_export_share: float = setting(0.5, "share of the KV pool one program's persistent "
                                           "exports may hold")  # fmt: skip
    # Moves the objects alive at start (torch, compiled programs) out of the collector's
    # generations, so collections scan only what instances create.
    freeze_gc: bool = setting(True, "freeze start-up objects out of the garbage collector")
    reservation_ttl_s: float = setting(60.0, "microserving: unused KV reservations expire")
    # "shm": for receivers on this host, the socket carries only frame names; "gloo":
    # torch.distributed send/recv, the socket carries only frame headers; "auto": shm to
    # receivers on this host, tcp to the others.
    kv_transport: KVTransport = setting("tcp", "microserving: how KV goes to other engines")
    # The KV channel's shared secret: a receiver takes frames only from senders that prove
    # they hold it (HMAC of a per-connection nonce). None: the first API key, if any.
    kv_secret: str | None = setting(None, "microserving: shared secret of the KV channel "
                                          "(default: the first --api-key)")  # fmt: skip
    # remote_send goes only to these KV receivers, to those a router registered (POST
    # /microserving/peers) and to this engine's own.
    kv_peers: tuple[str, ...] = setting((), "microserving: KV receivers (host:port) this "
                                            "engine may send to", many=True)  # fmt: skip
    kv_port: int = setting(0, "microserving: port of this engine's KV receiver (0: any free)")
    # Other machines' engines reach the receiver at this address: a cluster's engines bind
    # it to their node's address (it takes only senders holding the KV secret).
    kv_host: str = setting("127.0.0.1", "microserving: address of this engine's KV receiver")
    kv_progress_timeout_s: float = setting(10.0, "microserving: fail a KV transfer that "
                                                 "moves no byte this long")  # fmt: skip
    # prep_recv reservations of one client (API key; address without keys) may hold at
    # most this share of the pool; more is refused with 429 until some end or expire.
    max_reserved_share: float = setting(0.5, "microserving: share of the KV pool one "
                                             "client's reservations may hold")  # fmt: skip
    http_allow_hosts: tuple[str, ...] = setting((), "hosts inferlets may call ('*': any)",
                                                many=True)  # fmt: skip
    http_timeout_s: float = setting(30.0, "inferlets' outgoing HTTP timeout")
    max_http_requests: int = setting(8, "HTTP requests one instance may have in flight")

    def __post_init__(self) -> None:
        self.validate()

    @property
    def memory_limit_bytes(self) -> int:
        return self.memory_limit_mb << 20

    def validate(self) -> None:
        _require(self.batch_policy in ("adaptive", "k", "t", "k_or_t"),
                 f"unknown batch policy {self.batch_policy!r}")  # fmt: skip
        _require(self.out_of_pages in ("wait", "kill-newest"),
                 f"unknown out-of-pages policy {self.out_of_pages!r}")  # fmt: skip
        _require(self.kv_transport in ("tcp", "shm", "gloo", "auto"),
                 "kv_transport must be tcp, shm, gloo or auto, "
                 f"got {self.kv_transport!r}")  # fmt: skip
        _require(self.http_timeout_s > 0, f"http_timeout_s must be > 0, got {self.http_timeout_s}")
        _require(self.cohort_hold_ms >= 0,
                 f"cohort_hold_ms must be >= 0, got {self.cohort_hold_ms}")  # fmt: skip
        _require(self.batch_k >= 1 and self.batch_t_ms >= 0 and self.slice_ms > 0,
                 "batch_k must be >= 1, batch_t_ms >= 0 and slice_ms > 0")  # fmt: skip
        _require(self.guest_threads >= 0, f"guest_threads must be >= 0, got {self.guest_threads}")
        _require(self.memory_limit_mb > 0 and self.max_instances > 0,
                 "memory_limit_mb and max_instances must be positive")  # fmt: skip
        _require(self.max_http_requests > 0, "max_http_requests must be positive")
        _require(self.idle_timeout_s >= 0, "idle_timeout_s must be >= 0")
        _require(self.store_quota_mb > 0, "store_quota_mb must be positive")
        _require(self.memory_budget_mb >= 0, "memory_budget_mb must be >= 0")
        _require(self.pool_resident_mb >= 0 and self.pool_slots > 0,
                 "pool_resident_mb must be >= 0 and pool_slots > 0")  # fmt: skip
        _require(self.max_pending_mb > 0 and self.max_subscriptions > 0,
                 "max_pending_mb and max_subscriptions must be positive")  # fmt: skip
        _require(0 <= self.max_export_share <= 1, "max_export_share must be in [0, 1]")
        _require(0 < self.cpu_bound_share <= 1, "cpu_bound_share must be in (0, 1]")
        _require(self.max_tree_instances > 0, "max_tree_instances must be positive")
        _require(0 < self.max_tree_page_share <= 1, "max_tree_page_share must be in (0, 1]")
        _require(0 < self.max_reserved_share <= 1, "max_reserved_share must be in (0, 1]")
        _require(self.kv_progress_timeout_s > 0, "kv_progress_timeout_s must be > 0")
        _require(0 <= self.kv_port < 65536, f"kv_port must be in 0..65535, got {self.kv_port}")


@dataclass(frozen=True)
class ServerConfig:
    """``loom serve``: where it listens, who may use it, where the engine runs."""

    # Only loopback by default: exposing a server is a decision.
    host: str = setting("127.0.0.1", "address to bind")
    port: int = setting(8080, "port")
    # WebSocket `auth` and HTTP `Authorization: Bearer`; none: no authentication.
    api_keys: tuple[str, ...] = setting((), "accept this API key (repeatable)", repeat=True)
    served_model_name: str | None = setting(None, "the model's name in the API "
                                                  "(default: its directory's name)")  # fmt: skip
    worker: Literal["process", "thread"] = setting("process", "the engine's own process, "
                                                   "or a thread (tests, debugging)")  # fmt: skip
    engine_threads: int | None = setting(None, "torch threads of a process worker "
                                                "(default: every core but one)")  # fmt: skip
    # The runtime thread on the first of this process's cores, the engine on the others,
    # polling for its next op for up to 2 ms after each one.
    pin_cpus: bool = setting(True, "runtime thread and engine worker on cores of their own")
    max_upload_mb: int = setting(64, "largest program a client may upload")
    program_dir: str | None = setting(None, "where uploaded programs are kept "
                                             "(default: <cache>/uploads)")  # fmt: skip
    event_backlog: int = setting(1000, "events kept per instance for late attachers")
    # Finished instances keep their backlogs too (the last 1000 of them), at most four
    # times this in all: a late attacher still gets the result.
    event_backlog_mb: int = setting(16, "MiB of events kept per instance for late attachers")
    client_outbox_mb: int = setting(64, "MiB of events a slow client may leave unread "
                                        "before it is disconnected")  # fmt: skip
    auth_failures_per_minute: int = setting(20, "failed API-key checks per client address "
                                                "before it is refused for a minute")  # fmt: skip
    metrics_public: bool = setting(False, "serve /metrics without the API key")

    def __post_init__(self) -> None:
        _require(0 <= self.port < 65536, f"port must be in 0..65535 (0: any free), got {self.port}")
        _require(self.worker in ("process", "thread"),
                 f"worker must be 'process' or 'thread', got {self.worker!r}")  # fmt: skip
        _require(self.max_upload_mb > 0 and self.event_backlog >= 0,
                 "max_upload_mb must be positive and event_backlog >= 0")  # fmt: skip
        _require(min(self.event_backlog_mb, self.client_outbox_mb,
                     self.auth_failures_per_minute) > 0,
                 "event_backlog_mb, client_outbox_mb and auth_failures_per_minute must be "
                 "positive")  # fmt: skip


@dataclass(frozen=True)
class RouterConfig:
    """``loom router``: the engines it routes over and how."""

    engines: int = setting(2, "local engines to start")
    engine_urls: tuple[str, ...] = setting((), "use this running engine instead (repeatable)",
                                           repeat=True)  # fmt: skip
    strategy: str = setting("pd", "dp, pd, balanced-pd, prefix-pd, migrate or dynamic")
    balance: float = setting(0.0, "share of the prompt the decode engine prefills "
                                  "(balanced-pd)")  # fmt: skip
    model: str = setting("tiny", "a Hugging Face model directory, or 'tiny' (embedded)")
    host: str = setting("127.0.0.1", "address to bind")
    port: int = setting(8080, "port")
    dtype: Literal["float32", "bfloat16", "float16"] = setting(
        "float32", "weights' dtype in the engines it starts"
    )
    num_pages: int | None = setting(None, "KV pages of each engine it starts (default: "
                                          "the engine's)")  # fmt: skip
    kv_transport: KVTransport = setting("auto", "KV transport of the engines it starts "
                                                "(auto: shm on one host, tcp across)")  # fmt: skip
    prefix_cache: bool = setting(True, "prefix caches of the engines it starts")
    # Clients send `Authorization: Bearer KEY`; none: no authentication. /health is open.
    api_keys: tuple[str, ...] = setting((), "accept this API key (repeatable)", repeat=True)
    # The engines it starts get this key (and a fresh KV secret of their own) through
    # their environment, not their command line, which every local user can read.
    engine_api_key: str | None = setting(None, "API key of the router's calls to engines "
                                               "(default: its first --api-key)")  # fmt: skip
    # Besides each /health request: a dead engine is out of the strategies' choices within
    # this long even when no request found it dead.
    health_interval_s: float = setting(2.0, "how often engines' /health is probed (0: never)")
    # SIGTERM: stop accepting, let requests in flight finish for up to this long, then stop
    # the engines it started and exit 0.
    shutdown_timeout_s: float = setting(60.0, "how long requests in flight may finish on "
                                              "SIGTERM")  # fmt: skip

    # Ray: engines are actors on a cluster (`--ray` alone: the cluster this machine is in,
    # or a new one here that stops with the router; `--ray HOST:PORT`: that cluster's).
    ray: str | None = setting(None, "place the engines on the Ray cluster at this address "
                                    "(alone: this machine's cluster, or a new one)",
                              const="local")  # fmt: skip
    placement: Literal["pack", "spread"] = setting("pack", "Ray: engines packed on few nodes "
                                                   "or spread over many")  # fmt: skip
    engine_cpus: float = setting(1.0, "Ray: CPUs each engine asks for (with no GPUs)")
    max_restarts: int = setting(3, "how often dead engines it started are restarted")
    # Scaling by queue length, off by default: one engine more while requests in flight per
    # engine stay above scale_queue, one fewer after a quiet while.
    max_engines: int = setting(0, "scale up to this many engines (0: no scaling)")
    scale_queue: float = setting(4.0, "requests in flight per engine that add one")

    def __post_init__(self) -> None:
        _require(0 < self.port < 65536, f"port must be in 1..65535, got {self.port}")
        _require(self.num_pages is None or self.num_pages > 0, "num_pages must be > 0")
        _require(self.engine_cpus > 0 and self.max_restarts >= 0 and self.scale_queue > 0,
                 "engine_cpus and scale_queue must be > 0, max_restarts >= 0")  # fmt: skip
        _require(self.ray is None or bool(self.ray.strip()), "ray: give an address or 'local'")
        _require(self.health_interval_s >= 0 and self.shutdown_timeout_s >= 0,
                 "health_interval_s and shutdown_timeout_s must be >= 0")  # fmt: skip
        _require(self.engines >= 1 or bool(self.engine_urls), "engines must be >= 1")
        _require(0.0 <= self.balance <= 1.0, f"balance must be in [0, 1], got {self.balance}")


SERVE_SECTIONS: tuple[type, ...] = (EngineConfig, RuntimeConfig, ServerConfig)


@dataclass(frozen=True)
class ServeConfig:
    """Everything ``loom serve`` runs with."""

    engine: EngineConfig = field(default_factory=EngineConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    server: ServerConfig = field(default_factory=ServerConfig)

    def __post_init__(self) -> None:
        # The KV channel's secret defaults to the API key: engines that share a key
        # authenticate each other's KV without a second secret to distribute.
        if self.runtime.kv_secret is None and self.server.api_keys:
            runtime = replace(self.runtime, kv_secret=self.server.api_keys[0])
            object.__setattr__(self, "runtime", runtime)

    @classmethod
    def of(cls, **settings: Any) -> ServeConfig:
        """From settings by name (``ServeConfig.of(model="tiny", port=0)``)."""
        unknown = sorted(set(settings) - set(names(*SERVE_SECTIONS)))
        _require(not unknown, f"unknown setting(s) {', '.join(unknown)}")
        return cls(*(build(section, settings) for section in SERVE_SECTIONS))

    @classmethod
    def load(cls, path: str | Path | None, overrides: Mapping[str, Any]) -> ServeConfig:
        """Defaults, then the TOML file (unknown keys are an error), then ``overrides``
        (the flags given; None values are ignored)."""
        return cls.of(**merged(path, overrides, names(*SERVE_SECTIONS)))

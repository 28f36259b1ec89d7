"""Settings of ``loom serve``. Each field is one CLI flag (``--num-pages``) and one key of
the TOML config file (``num_pages = 256``); a flag given on the command line wins over the
file, the file over the defaults."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from loom.config import EngineConfig
from loom.runtime.limits import RuntimeConfig


@dataclass
class ServeSettings:
    # Where to listen. Only loopback by default: exposing a server is a decision.
    host: str = "127.0.0.1"
    port: int = 8080
    # Clients must present one of these keys (WebSocket `auth`, HTTP `Authorization:
    # Bearer`); none: no authentication.
    api_keys: list[str] = field(default_factory=list)

    # The model and its engine.
    model: str = "tiny"
    # The name clients give as ``model`` (default: the model directory's name).
    served_model_name: str | None = None
    dtype: str = "float32"
    device: str = "cpu"
    num_pages: int | None = None
    kv_cache_memory_mb: int = 256
    max_model_len: int | None = None
    # Reuse the KV of earlier prompts' full pages (and report it to microserving routers
    # as `prefix_matched_length`); off: every prompt is computed from its first token.
    prefix_cache: bool = True
    worker: str = "process"  # the engine in its own process, or "thread" (tests, debugging)
    engine_threads: int | None = None  # torch threads of a process worker
    # A process worker on two cores or more: the runtime thread on the first of this
    # process's cores, the engine on the others, where it polls for its next op for up to
    # 2 ms after each one (off: both left to the scheduler, and the engine sleeps at once).
    pin_cpus: bool = True
    # Benchmarks only: every engine pass padded to this wall time (0: off), so that a
    # CPU server shows the passes and idle gaps a GPU would pay for.
    engine_step_ms: float = 0.0

    # The runtime.
    batch_policy: str = "adaptive"
    out_of_pages: str = "wait"
    max_instances: int = 4096
    cpu_budget_s: float = 60.0
    memory_limit_mb: int = 256
    http_allow_hosts: list[str] = field(default_factory=list)
    http_timeout_s: float = 30.0  # an inferlet's outgoing request fails after this long
    reservation_ttl_s: float = 60.0  # microserving: unused KV reservations expire
    kv_transport: str = "tcp"  # microserving: "tcp", "shm" (one host) or "gloo"

    # The client protocol.
    max_upload_mb: int = 64  # largest program a client may upload
    program_dir: str | None = None  # uploaded programs (default: <cache>/uploads)
    event_backlog: int = 1000  # events kept per instance for clients that attach late

    def engine_config(self) -> EngineConfig:
        return EngineConfig(
            model=self.model,
            dtype=self.dtype,
            device=self.device,
            num_pages=self.num_pages,
            kv_cache_memory_mb=self.kv_cache_memory_mb,
            max_model_len=self.max_model_len,
            enable_prefix_caching=self.prefix_cache,
            step_time_ms=self.engine_step_ms,
        )

    def runtime_config(self) -> RuntimeConfig:
        return RuntimeConfig(
            batch_policy=self.batch_policy,  # type: ignore[arg-type]
            out_of_pages=self.out_of_pages,  # type: ignore[arg-type]
            max_instances=self.max_instances,
            cpu_budget_s=self.cpu_budget_s,
            memory_limit_bytes=self.memory_limit_mb << 20,
            http_allow_hosts=tuple(self.http_allow_hosts),
            http_timeout_s=self.http_timeout_s,
            reservation_ttl_s=self.reservation_ttl_s,
            kv_transport=self.kv_transport,
        )

    def validate(self) -> None:
        if not 0 < self.port < 65536:
            raise ValueError(f"port must be in 1..65535, got {self.port}")
        if self.worker not in ("process", "thread"):
            raise ValueError(f"worker must be 'process' or 'thread', got {self.worker!r}")
        if self.max_upload_mb <= 0 or self.event_backlog < 0:
            raise ValueError("max_upload_mb must be positive and event_backlog >= 0")
        self.runtime_config().validate()


def field_names() -> list[str]:
    return [f.name for f in fields(ServeSettings)]


def load_settings(path: str | Path | None, overrides: dict[str, Any]) -> ServeSettings:
    """Defaults, then the TOML file (unknown keys are an error), then ``overrides`` (the
    flags given on the command line; None values are ignored)."""
    values: dict[str, Any] = {}
    known = set(field_names())
    if path is not None:
        with open(path, "rb") as f:
            data = tomllib.load(f)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{path}: unknown setting(s) {', '.join(unknown)}")
        values.update(data)
    values.update({k: v for k, v in overrides.items() if v is not None and k in known})
    settings = ServeSettings(**values)
    settings.validate()
    return settings

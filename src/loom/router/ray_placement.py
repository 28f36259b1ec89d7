"""Engines placed on a Ray cluster (``loom router --ray``): one Ray actor per engine, each
running a ``loom engine`` process on the node Ray chose, on that node's address.

An engine asks Ray for one GPU where the cluster has GPUs and ``engine_cpus`` CPUs
otherwise. The first engines are placed together in one placement group, packed onto as
few nodes as possible (a prefill/decode pair on one node: KV goes by shared memory) or
spread over nodes (``spread``). Engines sharing a node split its cores between them.

Ray restarts an actor that dies (``max_restarts``); the restarted actor starts a new
engine on a new port, which ``locate`` reports so the router follows it. The engine
process dies with its actor (``LOOM_EXIT_WITH_PARENT``), so a killed actor leaves no
engine serving behind it.
"""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from typing import Any

from loom.router.engines import EngineProcess, cpu_sets, spawn_engine, wait_ready

START_TIMEOUT_S = 300.0
LOCATE_TIMEOUT_S = 1.0


class EngineActor:
    """The body of an engine's Ray actor: its ``loom engine`` process and what the
    router needs to know of it. ``slot`` of ``slots``: its share of the node's cores
    (``slots`` 0: no pinning, as on a GPU)."""

    def __init__(self, model: str, args: list[str], env: dict[str, str], slot: int,
                 slots: int) -> None:  # fmt: skip
        import ray

        self.node_ip = ray.util.get_node_ip_address()
        self.node_id = ray.get_runtime_context().get_node_id()
        cpus = cpu_sets(slots)[slot] if slots > 0 else []
        env = {**env, "LOOM_EXIT_WITH_PARENT": "1"}
        self.engine: EngineProcess = spawn_engine(model, cpus, args, host=self.node_ip, env=env)
        # Ray runs its workers niced (15) to keep its own daemons responsive; an engine
        # serves, so it gets the ordinary priority back where the node allows it.
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, self.engine.proc.pid, 0)
        try:
            wait_ready(self.engine, time.monotonic() + START_TIMEOUT_S)
        except BaseException:
            self.engine.stop()
            raise

    def info(self) -> dict[str, Any]:
        return {
            "url": self.engine.url,
            "node_ip": self.node_ip,
            "node_id": self.node_id,
            "cpus": self.engine.cpus,
            "actor_pid": os.getpid(),
            "engine_pid": self.engine.proc.pid,
            "serving": self.engine.proc.poll() is None,
        }

    def stop(self) -> None:
        self.engine.stop()


class RayPlacement:
    """Engines as Ray actors. ``address``: the cluster's (``"local"``: the cluster this
    machine belongs to, or a new one here, stopped with the router)."""

    def __init__(
        self,
        address: str,
        model: str,
        extra_args: list[str] | None = None,
        env: dict[str, str] | None = None,
        engine_cpus: float = 1.0,
        spread: bool = False,
        max_restarts: int = 3,
    ) -> None:
        import ray

        if not ray.is_initialized():
            ray.init(address=None if address == "local" else address, namespace="loom",
                     include_dashboard=False, log_to_driver=False)  # fmt: skip
        self.model, self.args, self.env = model, list(extra_args or []), dict(env or {})
        self.spread, self.max_restarts = spread, max_restarts
        gpus = ray.cluster_resources().get("GPU", 0.0)
        # One GPU each where there are GPUs (the engine runs on its GPU; a core feeds it).
        self.resources = {"GPU": 1.0, "CPU": 1.0} if gpus >= 1 else {"CPU": float(engine_cpus)}
        if gpus >= 1:
            self.args += ["--device", "cuda"]  # Ray makes its GPU the actor's only one
        self.tag = uuid.uuid4().hex[:8]
        self.actors: dict[str, Any] = {}  # url -> actor handle
        self.infos: dict[str, dict[str, Any]] = {}  # url -> the actor's info
        self.groups: list[Any] = []
        self._count = 0

    def start(self, n: int) -> list[str]:
        """Place ``n`` engines in one placement group and wait until all serve."""
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        group = ray.util.placement_group([dict(self.resources)] * n,
                                         strategy="SPREAD" if self.spread else "PACK")  # fmt: skip
        self.groups.append(group)
        self._wait(group.ready(), f"{n} engines of {self.resources}")
        nodes = ray.util.placement_group_table(group)["bundles_to_node_id"]
        pinned = "GPU" not in self.resources
        handles = []
        for i in range(n):
            same = [j for j in range(n) if nodes[j] == nodes[i]]
            slot, slots = (same.index(i), len(same)) if pinned else (0, 0)
            strategy = PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=i)
            handles.append(self._actor(strategy, slot, slots))
        return [self._ready(h) for h in handles]

    def add(self) -> str:
        """One more engine wherever the cluster has room (on no one's cores in particular)."""
        return self._ready(self._actor(None, 0, 0))

    def remove(self, url: str) -> None:
        """Stop the engine at ``url`` and its actor (for good: no restart)."""
        import ray

        actor = self.actors.pop(url, None)
        self.infos.pop(url, None)
        if actor is None:
            raise ValueError(f"no engine {url} was placed here")
        with contextlib.suppress(Exception):  # it is being killed anyway
            ray.get(actor.stop.remote(), timeout=30)
        ray.kill(actor, no_restart=True)

    def locate(self, url: str) -> str | None:
        """Where the engine once at ``url`` serves now (Ray restarted its actor: a new
        port); ``None`` while it is starting or for good dead."""
        import ray

        actor = self.actors.get(url)
        if actor is None:
            return None
        try:
            info = ray.get(actor.info.remote(), timeout=LOCATE_TIMEOUT_S)
        except Exception:
            return None
        if not info["serving"]:
            return None
        new = str(info["url"])
        if new != url:
            self.actors[new] = self.actors.pop(url)
            self.infos.pop(url, None)
        self.infos[new] = info
        return new

    def describe(self, url: str) -> dict[str, Any]:
        return dict(self.infos.get(url, {}))

    def owns(self, url: str) -> bool:
        return url in self.actors

    def close(self) -> None:
        """Stop every engine and actor, free the placement groups, leave the cluster."""
        import ray

        for url in list(self.actors):
            self.remove(url)
        for group in self.groups:
            ray.util.remove_placement_group(group)
        ray.shutdown()

    # ----- helpers -----

    def _actor(self, strategy: Any, slot: int, slots: int) -> Any:
        import ray

        self._count += 1
        options: dict[str, Any] = {
            "name": f"loom-engine-{self.tag}-{self._count}",
            "max_restarts": self.max_restarts,
            "num_cpus": self.resources["CPU"],
            "num_gpus": self.resources.get("GPU", 0.0),
        }
        if strategy is not None:
            options["scheduling_strategy"] = strategy
        remote = ray.remote(EngineActor).options(**options)
        return remote.remote(self.model, self.args, self.env, slot, slots)

    def _ready(self, actor: Any) -> str:
        info = self._wait(actor.info.remote(), "an engine actor", actor)
        url = str(info["url"])
        self.actors[url], self.infos[url] = actor, info
        return url

    def _wait(self, ref: Any, what: str, actor: Any = None) -> Any:
        import ray

        try:
            return ray.get(ref, timeout=START_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            if actor is not None:
                ray.kill(actor, no_restart=True)
            have = ray.available_resources()
            raise RuntimeError(f"Ray could not place {what} in {START_TIMEOUT_S:g} s "
                               f"(the cluster has free: {have})") from None  # fmt: skip

"""``/admin/engines``: the engines behind a running router, listed, added and removed.

``GET`` lists them (where each runs, its load, the scaling policy); ``POST`` adds one:
``{"url": ...}`` routes to an engine started elsewhere, ``{}`` starts one where the
router's engines are placed (``{"count": n}``: n of them); ``DELETE ?url=...`` stops
sending it new requests, waits for those it has, and stops it if the router started it.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field

from loom.api.errors import ApiError
from loom.router.manage import EngineManager


class EngineAdd(BaseModel):
    model_config = ConfigDict(extra="forbid")
    url: str | None = Field(default=None, description="a running engine's URL")
    count: int = Field(default=1, ge=1, le=64, description="engines to start (without url)")


def admin_routes(manager: EngineManager, guard: list[Any]) -> APIRouter:
    routes = APIRouter(dependencies=guard)

    @routes.get("/admin/engines")
    async def list_engines() -> dict[str, Any]:
        return manager.describe()

    @routes.post("/admin/engines")
    async def add_engines(body: EngineAdd) -> dict[str, Any]:
        if body.url is not None and body.count != 1:
            raise ApiError(400, "give either 'url' or 'count'", param="count")
        added = []
        try:
            for _ in range(body.count):
                added.append((await manager.add(body.url)).url)
        except ValueError as e:
            raise ApiError(400, str(e), param="url") from None
        except Exception as e:  # the placement could not start one
            raise ApiError(503, f"cannot start an engine: {e}", kind="server_error") from None
        return {"added": added, **manager.describe()}

    @routes.delete("/admin/engines")
    async def remove_engine(url: str, drain_s: float = 60.0) -> dict[str, Any]:
        try:
            await manager.remove(url, drain_s)
        except KeyError:
            raise ApiError(404, f"no engine {url}", param="url", code="unknown_engine",
                           kind="not_found_error") from None  # fmt: skip
        except ValueError as e:
            raise ApiError(409, str(e), param="url") from None
        return {"removed": url, **manager.describe()}

    return routes

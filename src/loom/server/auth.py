"""API keys on HTTP routes: ``Authorization: Bearer KEY`` when the server has keys."""

from __future__ import annotations

from fastapi import Request

from loom.api.errors import ApiError


async def require_key(request: Request) -> None:
    state = request.app.state.loom
    if not state.config.server.api_keys:
        return
    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not state.check_key(key.strip()):
        raise ApiError(
            401,
            "missing or wrong API key (send 'Authorization: Bearer KEY')",
            code="invalid_api_key",
            kind="authentication_error",
        )

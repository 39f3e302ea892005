"""Server read routes (GET /v2.1/servers...): filled in by the read-API work (issue 5)."""

from __future__ import annotations

from fastpath.api.context import ApiContext
from fastpath.api.routes import RouteSpec


def routes(ctx: ApiContext) -> list[RouteSpec]:
    return []

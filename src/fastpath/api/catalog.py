"""Catalogue read routes (flavors, images, keypairs, limits, availability zones, quota sets):
filled in by the read-API work (issue 5)."""

from __future__ import annotations

from fastpath.api.context import ApiContext
from fastpath.api.routes import RouteSpec


def routes(ctx: ApiContext) -> list[RouteSpec]:
    return []

"""Catalogue read routes: flavors, images, keypairs, limits, availability zones, quota sets.

Each resource lives in its own module (``flavors``, ``images``, ``keypairs``, ``limits``,
``availability_zones``, ``quotas``) with the shape of its catalogue entry documented there;
``common`` holds what they share.  Every handler runs in exactly one store read transaction
(``common.read_route``).
"""

from __future__ import annotations

from fastpath.api import availability_zones, flavors, images, keypairs, limits
from fastpath.api.context import ApiContext
from fastpath.api.routes import RouteSpec


def routes(ctx: ApiContext) -> list[RouteSpec]:
    return [*flavors.routes(ctx), *limits.routes(ctx), *keypairs.routes(ctx),
            *availability_zones.routes(ctx), *images.routes(ctx)]

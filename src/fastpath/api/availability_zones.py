"""GET /os-availability-zone and /os-availability-zone/detail
(nova/api/openstack/compute/availability_zone.py).

The catalogue entry of a zone (``Catalog.AZS``, key = zone name), a msgpack map: ``name``
str, ``available`` bool (default True: a zone with a live compute service), ``hosts``
{host: {service binary: {"available": bool, "active": bool, "updated_at": microseconds
or None}}} (what the admin's detail view shows).  The zone named ``internal`` (Nova's
internal_service_availability_zone) is left out of the summary, as Nova does.
"""

from __future__ import annotations

from typing import Any

from fastpath.api import common as C
from fastpath.api import query as Q
from fastpath.api.context import ApiContext
from fastpath.api.routes import API_ROOT, RouteSpec
from fastpath.store.reader import Reader

INTERNAL_ZONE = "internal"


def _zones(r: Reader) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    zones = sorted(r.availability_zones(), key=lambda z: z["name"])
    up = [z for z in zones if z.get("available", True)]
    down = [z for z in zones if not z.get("available", True)]
    return up, down


def _hosts(z: dict[str, Any]) -> dict[str, Any]:
    return {
        host: {
            binary: {
                "available": bool(s.get("available", True)),
                "active": bool(s.get("active", True)),
                "updated_at": C.db_time(s.get("updated_at")),
            }
            for binary, s in services.items()
        }
        for host, services in (z.get("hosts") or {}).items()
    }


def routes(ctx: ApiContext) -> list[RouteSpec]:
    def index(req: Any, r: Reader) -> tuple[int, bytes]:
        Q.strict(req)
        up, down = _zones(r)
        info = [
            {"zoneName": z["name"], "zoneState": {"available": avail}, "hosts": None}
            for zs, avail in ((up, True), (down, False))
            for z in zs
            if z["name"] != INTERNAL_ZONE
        ]
        return 200, C.dumps({"availabilityZoneInfo": info})

    def detail(req: Any, r: Reader) -> tuple[int, bytes]:
        Q.strict(req)
        if not req.is_admin:
            raise C.forbidden("os_compute_api:os-availability-zone:detail")
        up, down = _zones(r)
        info = [{"zoneName": z["name"], "zoneState": {"available": True}, "hosts": _hosts(z)}
                for z in up]
        info += [{"zoneName": z["name"], "zoneState": {"available": False}, "hosts": None}
                 for z in down]
        return 200, C.dumps({"availabilityZoneInfo": info})

    base = API_ROOT + "/os-availability-zone"
    return [
        RouteSpec("GET", base, C.read_route(ctx, index)),
        RouteSpec("GET", base + "/detail", C.read_route(ctx, detail)),
    ]

"""GET /os-availability-zone[/detail] against Nova's samples; policy; one read
transaction per request."""

from __future__ import annotations

from typing import Any

from fastpath.store.changes import Catalog
from tests.unit.catalog_support import ADMIN_TOKEN, Server, call, fault, sample, seed

ZONES = {
    "internal": {"name": "internal", "hosts": {
        "conductor": {"nova-conductor": {"available": True, "active": True, "updated_at": None}},
        "scheduler": {"nova-scheduler": {"available": True, "active": True, "updated_at": None}},
    }},
    "nova": {"name": "nova", "hosts": {
        "compute": {"nova-compute": {"available": True, "active": True, "updated_at": None}},
    }},
}


def test_samples(make_server: Any) -> None:
    s: Server = make_server(extra_routes=False)
    assert call(s, "/v2.1/os-availability-zone").json() == {"availabilityZoneInfo": []}
    seed(s, Catalog.AZS, ZONES)
    for v in ("2.1", "latest"):
        r = call(s, "/v2.1/os-availability-zone", version=v)
        assert r.json() == sample("os-availability-zone/availability-zone-list-resp.json")
        r = call(s, "/v2.1/os-availability-zone/detail", ADMIN_TOKEN, v)
        assert r.json() == sample("os-availability-zone/availability-zone-detail-resp.json")
    msg = fault(call(s, "/v2.1/os-availability-zone/detail"), 403)
    assert msg == "Policy doesn't allow os_compute_api:os-availability-zone:detail to be performed."


def test_unavailable_and_query(make_server: Any) -> None:
    s: Server = make_server(extra_routes=False)
    seed(s, Catalog.AZS, {**ZONES, "az0": {"name": "az0", "available": False},
                          "az2": {"name": "az2", "hosts": {"h": {"nova-compute": {
                              "available": False, "active": True, "updated_at": 1399464373681238}}}}})
    info = call(s, "/v2.1/os-availability-zone").json()["availabilityZoneInfo"]
    assert [(z["zoneName"], z["zoneState"]["available"]) for z in info] == [
        ("az2", True), ("nova", True), ("az0", False)]
    info = call(s, "/v2.1/os-availability-zone/detail", ADMIN_TOKEN).json()["availabilityZoneInfo"]
    assert info[0]["hosts"] == {"h": {"nova-compute": {
        "available": False, "active": True, "updated_at": "2014-05-07T12:06:13.681238"}}}
    assert info[-1] == {"zoneName": "az0", "zoneState": {"available": False}, "hosts": None}
    assert call(s, "/v2.1/os-availability-zone?x=1", version="2.101").status == 200
    fault(call(s, "/v2.1/os-availability-zone?x=1", version="2.102"), 400)

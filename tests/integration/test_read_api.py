"""The server read API through a real ``fastpath serve`` (2 workers) on a data dir seeded
before it starts: show, list, detail, paging, sub-resources, and the store counters of
``/metrics`` -- exactly one read transaction and no write per request, summed over the
workers."""

from __future__ import annotations

import uuid as uuidlib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from fastpath.api import views
from fastpath.store import Batch, Store, Upsert
from fastpath.store.samples import EPOCH_2024, sample_record

PROJECT = "6f70656e737461636b20342065766572"
OTHER = "another-project"
TOKEN = {"X-Auth-Token": f"fake:{PROJECT}"}
ADMIN = {"X-Auth-Token": f"admin:{PROJECT}"}
N = 25


def _uuid(i: int) -> str:
    return str(uuidlib.UUID(int=(0xA1 << 120) + i))


def seed(data_dir: Path) -> list[dict[str, Any]]:
    """Fill the store in this process, then close it: the server opens it after."""
    recs = [sample_record(_uuid(i), 1, project_id=PROJECT, created_at=EPOCH_2024 + i * 1_000_000,
                          seed=i, name=f"vm-{i:02d}") for i in range(N)]
    recs += [sample_record(_uuid(100 + i), 1, project_id=OTHER, seed=100 + i) for i in range(3)]
    store = Store.open(data_dir, map_size=1 << 26)
    try:
        store.apply(Batch([Upsert(r["uuid"], 1, r) for r in recs]), render=views.render_server)
    finally:
        store.close()
    return recs


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from tests.integration.conftest import FastpathServer, free_port

    data = tmp_path_factory.mktemp("read") / "data"
    data.mkdir()
    recs = seed(data)
    server = FastpathServer(data_dir=data, port=free_port(), workers=2)
    server.start()
    try:
        yield server, recs
    finally:
        server.stop()


def store_txns(server: Any) -> tuple[float, float]:
    m = server.metrics()
    return m["fastpath_store_read_txn_total"], m["fastpath_store_write_txn_total"]


def budgeted(server: Any, path: str, headers: dict[str, str] | None = None) -> Any:
    """One GET; the workers' store counters moved by exactly one read and no write
    (/metrics itself reads shared memory only)."""
    before = store_txns(server)
    r = server.get(path, headers=headers or TOKEN)
    after = store_txns(server)
    assert (after[0] - before[0], after[1] - before[1]) == (1, 0), (path, r.status, r.body)
    return r


def test_show_list_detail(served: Any) -> None:
    server, recs = served
    mine = [r for r in recs if r["project_id"] == PROJECT]
    order = [r["uuid"] for r in sorted(mine, key=lambda r: r["created_at"], reverse=True)]
    r = budgeted(server, f"/v2.1/servers/{order[0]}")
    assert r.status == 200
    body = r.json()["server"]
    assert body["id"] == order[0] and body["status"] == "ACTIVE"
    base = f"http://127.0.0.1:{server.port}"
    assert {"rel": "self", "href": f"{base}/v2.1/servers/{order[0]}"} in body["links"]

    r = budgeted(server, "/v2.1/servers")
    assert [s["id"] for s in r.json()["servers"]] == order
    r = budgeted(server, "/v2.1/servers/detail", {**TOKEN, "OpenStack-API-Version": "compute latest"})
    assert [s["id"] for s in r.json()["servers"]] == order
    assert r.headers["openstack-api-version"] == "compute 2.104"

    # Paging through next links over real HTTP.
    seen: list[str] = []
    target = "/v2.1/servers/detail?limit=7"
    while target:
        r = budgeted(server, target)
        data = r.json()
        seen += [s["id"] for s in data["servers"]]
        links = data.get("servers_links")
        if links:
            u = urlsplit(links[0]["href"])
            assert f"{u.scheme}://{u.netloc}" == base
            target = f"{u.path}?{u.query}"
        else:
            target = ""
    assert seen == order


def test_errors_cost_one_read(served: Any) -> None:
    server, recs = served
    theirs = next(r["uuid"] for r in recs if r["project_id"] == OTHER)
    r = budgeted(server, f"/v2.1/servers/{theirs}")
    assert r.status == 404
    assert r.json() == {"itemNotFound": {"code": 404,
                                         "message": f"Instance {theirs} could not be found."}}
    r = budgeted(server, f"/v2.1/servers?marker={_uuid(999)}")
    assert r.status == 400
    assert r.json()["badRequest"]["message"] == f"marker [{_uuid(999)}] not found"
    r = budgeted(server, "/v2.1/servers?all_tenants=1")
    assert r.status == 403
    r = budgeted(server, "/v2.1/servers?limit=-1")
    assert r.status == 400


@pytest.mark.parametrize("suffix,status", [
    ("/ips", 200), ("/ips/private", 200), ("/ips/nope", 404), ("/metadata", 200),
    ("/metadata/role", 200), ("/metadata/nope", 404),
])
def test_sub_resources(served: Any, suffix: str, status: int) -> None:
    server, recs = served
    u = recs[0]["uuid"]
    r = budgeted(server, f"/v2.1/servers/{u}{suffix}")
    assert r.status == status, r.body


def test_tags(served: Any) -> None:
    server, recs = served
    u = recs[0]["uuid"]
    v = {**TOKEN, "OpenStack-API-Version": "compute 2.26"}
    assert budgeted(server, f"/v2.1/servers/{u}/tags", v).json() == {"tags": recs[0]["tags"]}
    assert budgeted(server, f"/v2.1/servers/{u}/tags/{recs[0]['tags'][0]}", v).status == 204
    assert budgeted(server, f"/v2.1/servers/{u}/tags/absent", v).status == 404
    assert budgeted(server, f"/v2.1/servers/{u}/tags").status == 404  # 2.1


def test_admin_all_tenants(served: Any) -> None:
    server, recs = served
    r = budgeted(server, "/v2.1/servers?all_tenants=1", ADMIN)
    assert sorted(s["id"] for s in r.json()["servers"]) == sorted(r["uuid"] for r in recs)


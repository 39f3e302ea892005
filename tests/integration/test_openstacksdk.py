"""A real client: openstacksdk lists and shows servers and flavors through
``openstack.connection.Connection`` against ``fastpath serve``, with no Keystone
(``auth_type: none`` and ``admin_token`` with a ``user:project`` token, plus
``compute_endpoint_override``)."""

from __future__ import annotations

import uuid as uuidlib
from pathlib import Path
from typing import Any

import pytest

from fastpath.api import views
from fastpath.store import Batch, Store, Upsert
from fastpath.store.changes import Catalog, CatalogPut
from fastpath.store.samples import EPOCH_2024, sample_record

openstack = pytest.importorskip("openstack")

PROJECT = "6f70656e737461636b20342065766572"
N = 7
FLAVORS = {
    "1": {"id": "1", "name": "m1.tiny", "vcpus": 1, "ram": 512, "disk": 1},
    "2": {"id": "2", "name": "m1.small", "vcpus": 1, "ram": 2048, "disk": 20},
}


def _uuid(i: int) -> str:
    return str(uuidlib.UUID(int=(0x05D6 << 112) + i))


def _seed(data_dir: Path) -> list[dict[str, Any]]:
    recs = [sample_record(_uuid(i), 1, project_id=PROJECT, created_at=EPOCH_2024 + i * 1_000_000,
                          seed=i, name=f"sdk-{i}") for i in range(N)]
    store = Store.open(data_dir, map_size=1 << 26)
    try:
        store.apply(
            Batch([Upsert(r["uuid"], 1, r) for r in recs],
                  catalog=[CatalogPut(Catalog.FLAVORS, k, v) for k, v in FLAVORS.items()]),
            render=views.render_server,
        )
    finally:
        store.close()
    return recs


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from tests.integration.conftest import FastpathServer, free_port

    data = tmp_path_factory.mktemp("sdk") / "data"
    data.mkdir()
    recs = _seed(data)
    # auth_type none sends the opaque token "notused": it maps to auth.default_project.
    server = FastpathServer(data_dir=data, port=free_port(), workers=2,
                            args=["--set", f"auth.default_project={PROJECT}"])
    server.start()
    try:
        yield server, recs
    finally:
        server.stop()


def _connection(server: Any, auth_type: str) -> Any:
    endpoint = f"{server.url}/v2.1"
    kwargs: dict[str, Any] = {"auth_type": auth_type, "compute_endpoint_override": endpoint}
    if auth_type == "admin_token":
        kwargs["auth"] = {"token": f"fake:{PROJECT}", "endpoint": endpoint}
    return openstack.connection.Connection(**kwargs)


@pytest.mark.parametrize("auth_type", ["admin_token", "none"])
def test_servers(served: Any, auth_type: str) -> None:
    server, recs = served
    conn = _connection(server, auth_type)
    listed = list(conn.compute.servers(paginated=True, limit=3))
    got = [s.id for s in listed]
    want = [r["uuid"] for r in sorted(recs, key=lambda r: r["created_at"], reverse=True)]
    assert got == want
    one = conn.compute.get_server(want[0])
    assert one.id == want[0]
    assert one.name == f"sdk-{N - 1}"
    assert one.status == "ACTIVE"
    assert one.flavor["original_name"] == "m1.small"  # 2.47+: the embedded flavor
    assert [s.id for s in conn.compute.servers(details=False)] == want


def test_flavors(served: Any) -> None:
    server, _ = served
    conn = _connection(server, "admin_token")
    flavors = {f.id: f for f in conn.compute.flavors()}
    assert set(flavors) == set(FLAVORS)
    assert flavors["2"].name == "m1.small"
    f = conn.compute.get_flavor("1")
    assert (f.name, f.vcpus, f.ram, f.disk) == ("m1.tiny", 1, 512, 1)

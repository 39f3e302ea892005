"""A real client drives a server's whole life through a real standalone ``fastpath serve``:
openstacksdk ``create_server`` + ``wait_for_server`` → ACTIVE, ``reboot_server``,
``stop_server``, ``start_server``, ``delete_server`` + ``wait_for_delete`` (issue 7).

Every step crosses every part: the API's one read + one group-committed write, the outbox,
the forwarder, a local cell's inbox and simulated driver, the cell's change feed, cellsync
and the store's views.  ``fastpath verify`` is clean at the end.
"""

from __future__ import annotations

import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from fastpath.seed import FLAVORS, IMAGES
from fastpath.store import Store

openstack = pytest.importorskip("openstack")

PROJECT = "5d3c0fa1a1b24c7c9b2f0e1d2c3b4a59"
WAIT = 60  # seconds: generous, the machine is shared


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from tests.integration.conftest import FastpathServer, free_port, seed_catalog, wait_until

    data = tmp_path_factory.mktemp("sdkcmd") / "data"
    data.mkdir()
    seed_catalog(data)
    server = FastpathServer(
        data_dir=data, port=free_port(), workers=2,
        args=["--set", f"auth.default_project={PROJECT}",
              "--set", "cell.build_delay=0.2", "--set", "cell.action_delay=0.1"],
    )
    server.start()
    try:
        # The scheduler spreads creates by the capacity the cells report: wait for both.
        def both_cells_reported() -> bool:
            store = Store.open(data)
            try:
                with store.read() as r:
                    return sum(1 for e in r.cells().values() if e.get("hosts")) == 2
            finally:
                store.close()

        wait_until(both_cells_reported, 60, "both cells' capacity in the store")
        yield server
    finally:
        server.stop()


def _connection(server: Any) -> Any:
    endpoint = f"{server.url}/v2.1"
    return openstack.connection.Connection(
        auth_type="admin_token", compute_endpoint_override=endpoint,
        auth={"token": f"sdk-user:{PROJECT}", "endpoint": endpoint},
    )


def _wait_status(conn: Any, server_id: str, status: str) -> Any:
    return conn.compute.wait_for_server(conn.compute.get_server(server_id), status=status,
                                        interval=0.1, wait=WAIT)


def _lifecycle(served: Any, name: str) -> str:
    """One server's whole life; returns its id."""
    conn = _connection(served)
    created = conn.compute.create_server(
        name=name, flavor_id=FLAVORS[0]["id"], image_id=IMAGES[0]["id"], networks="none",
    )
    assert created.admin_password  # the 202 carries adminPass
    first = conn.compute.get_server(created.id)
    assert first.status in ("BUILD", "ACTIVE")  # visible at once (read-your-writes)

    active = conn.compute.wait_for_server(first, status="ACTIVE", interval=0.1, wait=WAIT)
    assert active.name == name
    assert active.flavor["original_name"] == FLAVORS[0]["name"]
    assert active.host_id  # hostId: the cell placed it on a host

    conn.compute.reboot_server(created.id, "SOFT")
    shown = conn.compute.get_server(created.id)
    # The API's own write shows the reboot at once; the cell settles it later.
    assert shown.status in ("REBOOT", "ACTIVE")
    _wait_status(conn, created.id, "ACTIVE")

    conn.compute.stop_server(created.id)
    stopped = _wait_status(conn, created.id, "SHUTOFF")
    assert stopped.power_state == 4
    conn.compute.start_server(created.id)
    started = _wait_status(conn, created.id, "ACTIVE")
    assert started.task_state is None

    conn.compute.delete_server(started)
    conn.compute.wait_for_delete(started, interval=0.1, wait=WAIT)
    assert served.get(f"/v2.1/servers/{created.id}",
                      headers={"X-Auth-Token": f"sdk-user:{PROJECT}"}).status == 404
    return str(created.id)


def test_server_lifecycle(served: Any) -> None:
    _lifecycle(served, "sdk-life")


def test_lifecycles_in_parallel(served: Any) -> None:
    """Six clients, each through create → ACTIVE → reboot → stop → start → delete at once."""
    with ThreadPoolExecutor(6) as pool:
        ids = list(pool.map(lambda i: _lifecycle(served, f"sdk-par-{i}"), range(6)))
    assert len(set(ids)) == 6


def test_many_servers_across_cells(served: Any) -> None:
    conn = _connection(served)
    ids = [conn.compute.create_server(name=f"sdk-many-{i}", flavor_id=FLAVORS[0]["id"],
                                      image_id=IMAGES[0]["id"], networks="none").id
           for i in range(8)]
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        servers = [conn.compute.get_server(i) for i in ids]
        if all(s.status == "ACTIVE" for s in servers):
            break
        time.sleep(0.1)
    assert all(s.status == "ACTIVE" for s in servers), [s.status for s in servers]
    admin = openstack.connection.Connection(
        auth_type="admin_token", compute_endpoint_override=f"{served.url}/v2.1",
        auth={"token": f"admin:{PROJECT}", "endpoint": f"{served.url}/v2.1"},
    )
    hosts = [admin.compute.get_server(i).compute_host for i in ids]
    cells = {h.split("-compute-")[0] for h in hosts}
    assert len(cells) == 2, hosts  # scheduled over both local cells
    for s in servers:
        conn.compute.delete_server(s)
    for s in servers:
        conn.compute.wait_for_delete(s, interval=0.1, wait=WAIT)

    out = subprocess.run(
        [sys.executable, "-m", "fastpath", "verify", "--data-dir", str(served.data_dir)],
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.strip().splitlines()[-1].endswith(": 0 divergent")

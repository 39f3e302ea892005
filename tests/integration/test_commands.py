"""Durability of commands with a real ``fastpath serve``: every create acknowledged (202)
before a kill -9 of every fastpath process is in the store after a restart -- visible on
GET, its quota counted -- and its outbox entry exists exactly once; nothing half-written
(store invariants hold).  Also: group commit across the workers (fewer commits than
commands, /metrics store counters) under concurrent clients.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest

from fastpath.api import views
from fastpath.seed import FLAVORS, IMAGES, catalog
from fastpath.store import Batch, Store
from fastpath.store.changes import Catalog, CatalogPut
from tests.integration.conftest import FastpathServer, free_port, seed_catalog, wait_until

PROJECT = "7d3c0fa1a1b24c7c9b2f0e1d2c3b4a59"
TOKEN = f"user1:{PROJECT}"
KILL_AFTER = 300  # acknowledged creates before the kill (the load is still running)
CLIENTS = 6


def seed(data: Path) -> None:
    """Catalogue + one cell with capacity, straight into the store (no cells run here:
    the outbox keeps every command)."""
    hosts = {f"h{i}": {"vcpus": 10000, "ram_mb": 1 << 30, "disk_gb": 1 << 30, "vcpus_used": 0,
                       "ram_mb_used": 0, "disk_gb_used": 0, "status": "enabled",
                       "availability_zone": "nova"} for i in range(2)}
    store = Store.open(data, map_size=1 << 26)
    try:
        store.apply(Batch([], catalog=[*catalog(1),
                                        CatalogPut(Catalog.CELLS, "cell1", {"hosts": hosts})]),
                    render=views.render_server)
    finally:
        store.close()


def body() -> bytes:
    return json.dumps({"server": {"name": "durable", "flavorRef": FLAVORS[0]["id"],
                                  "imageRef": IMAGES[0]["id"], "networks": "none"}}).encode()


class Client(threading.Thread):
    """Creates servers on one keep-alive connection until stopped or the server dies."""

    def __init__(self, port: int, stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.stop_event = stop
        self.acked: list[str] = []
        self.refused: list[int] = []

    def run(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        payload = body()
        headers = {"X-Auth-Token": TOKEN, "Content-Type": "application/json",
                   "OpenStack-API-Version": "compute 2.37"}
        try:
            while not self.stop_event.is_set():
                conn.request("POST", "/v2.1/servers", payload, headers)
                r = conn.getresponse()
                data = r.read()
                if r.status == 202:
                    self.acked.append(json.loads(data)["server"]["id"])
                else:
                    self.refused.append(r.status)
        except (OSError, http.client.HTTPException):
            return  # the server was killed: whatever had no answer was not acknowledged
        finally:
            conn.close()


class Load:
    """``n`` clients creating servers until :meth:`stop`; the kill -9 tests stop them after
    killing the server (their requests in flight then fail: not acknowledged)."""

    def __init__(self, port: int, n: int) -> None:
        self.stop_event = threading.Event()
        self.clients = [Client(port, self.stop_event) for _ in range(n)]
        for c in self.clients:
            c.start()

    @property
    def acked(self) -> list[str]:
        return [u for c in self.clients for u in c.acked]

    def wait_acked(self, n: int, timeout: float) -> None:
        wait_until(lambda: sum(len(c.acked) for c in self.clients) >= n, timeout,
                   f"{n} acknowledged creates")

    def stop(self) -> list[str]:
        self.stop_event.set()
        for c in self.clients:
            c.join(15)
        assert all(s in (403, 503) for c in self.clients for s in c.refused), \
            [c.refused for c in self.clients]
        return self.acked


def kill_9(server: FastpathServer, pids: set[int]) -> None:
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    server.proc.wait(15)  # type: ignore[union-attr]


def outbox_by_server(data: Path) -> dict[str, int]:
    store = Store.open(data, map_size=1 << 26)
    try:
        with store.read() as r:
            counts: dict[str, int] = {}
            for _, v in r.dump()["outbox"]:
                e = msgpack.unpackb(v, raw=False)
                assert e["payload"]["action"] == "create" and e["cell"] == "cell1"
                counts[e["server"]] = counts.get(e["server"], 0) + 1
            assert r.check() == []
            assert r.quota_usage(PROJECT)["instances"] == r.count(b"servers")
        return counts
    finally:
        store.close()


@pytest.fixture
def api_only(tmp_path: Path) -> Iterator[tuple[Path, FastpathServer]]:
    """A seeded data dir and a 2-worker serve without sidecars on it (not started)."""
    data = tmp_path / "data"
    data.mkdir()
    seed(data)
    server = FastpathServer(data_dir=data, port=free_port(), workers=2, sidecars=False)
    try:
        yield data, server
    finally:
        server.stop()


def test_acknowledged_creates_survive_kill_9(api_only: tuple[Path, FastpathServer]) -> None:
    data, server = api_only
    server.start()
    pids = server.child_pids() | {server.pid}
    load = Load(server.port, CLIENTS)
    # Under load, kill -9 every fastpath process at once.
    load.wait_acked(KILL_AFTER, 60)
    kill_9(server, pids)
    acked = load.stop()
    assert len(acked) == len(set(acked)) >= KILL_AFTER

    # Every acknowledged create is in the store with exactly one outbox entry.
    counts = outbox_by_server(data)
    missing = [u for u in acked if counts.get(u) != 1]
    assert not missing, f"{len(missing)} of {len(acked)} acknowledged creates lost: {missing[:5]}"
    assert all(n == 1 for n in counts.values())  # never twice

    # After a restart they answer GET (BUILD: no cell has run them).
    server.start()
    for u in acked[:: max(1, len(acked) // 40)]:
        r = server.get(f"/v2.1/servers/{u}", {"X-Auth-Token": TOKEN})
        assert r.status == 200, (u, r.status, r.body)
        assert r.json()["server"]["status"] == "BUILD"


def test_concurrent_creates_share_commits_across_workers(
        api_only: tuple[Path, FastpathServer]) -> None:
    _, server = api_only
    server.start()
    before = server.metrics()
    load = Load(server.port, 16)
    load.wait_acked(400, 60)
    acked = len(load.stop())
    after = server.metrics()
    writes = after["fastpath_store_write_txn_total"] - before["fastpath_store_write_txn_total"]
    reads = after["fastpath_store_read_txn_total"] - before["fastpath_store_read_txn_total"]
    # One read per create (metrics answers read no transaction); grouped writes.
    assert reads == acked, (reads, acked)
    assert 0 < writes < acked, (writes, acked)



def cell_creates(data: Path) -> dict[str, int]:
    """Server uuid -> create rows in the inboxes of every cell (read-only)."""
    import sqlite3

    from fastpath.cell.registry import cell_names, cell_path

    out: dict[str, int] = {}
    for name in cell_names(str(data)):
        db = sqlite3.connect(f"file:{cell_path(str(data), name)}?mode=ro", uri=True, timeout=30)
        try:
            for uuid, payload in db.execute("SELECT instance_uuid, payload FROM inbox"):
                if json.loads(payload)["action"] == "create":
                    out[uuid] = out.get(uuid, 0) + 1
        finally:
            db.close()
    return out


def test_kill_9_during_creates_through_the_cells(tmp_path: Path) -> None:
    """A kill -9 storm: the whole standalone cloud (2 workers, 2 cells, cellsync, forwarder)
    is killed with kill -9 under create load, restarted, loaded and killed again, three
    times; after the last restart every acknowledged server reaches exactly one cell exactly
    once, becomes ACTIVE, and `fastpath verify` is clean."""
    import subprocess
    import sys

    data = tmp_path / "data"
    data.mkdir()
    seed_catalog(data)
    args = ["--set", "cell.build_delay=0.05", "--set", "cell.action_delay=0.05"]
    server = FastpathServer(data_dir=data, port=free_port(), workers=2, args=args)
    server.start()
    headers = {"X-Auth-Token": TOKEN}
    try:
        def cells_known() -> bool:
            with Store.open(data, map_size=1 << 26) as s, s.read() as r:
                return len(r.cells()) == 2
        acked: list[str] = []
        for storm in range(3):
            if storm:
                server.start()  # the same data dir: everything resumes where it was killed
            wait_until(cells_known, 60, "cellsync to bring both cells' capacity up")
            pids = server.child_pids() | {server.pid}
            load = Load(server.port, CLIENTS)
            load.wait_acked(60, 120)
            kill_9(server, pids)
            acked += load.stop()
        assert len(acked) == len(set(acked)) >= 180

        server.start()  # the same data dir: cells resume, the forwarder drains the outbox

        def all_active() -> bool:
            return all(
                server.get(f"/v2.1/servers/{u}", headers).json()["server"]["status"] == "ACTIVE"
                for u in acked)
        wait_until(all_active, 180, "every acknowledged server ACTIVE after the restart")
        creates = cell_creates(data)
        assert [u for u in acked if creates.get(u) != 1] == []
        assert all(n == 1 for n in creates.values())
        server.stop()
        cp = subprocess.run([sys.executable, "-m", "fastpath", "verify", "--data-dir", str(data)],
                            capture_output=True, text=True, timeout=300)
        assert cp.returncode == 0, cp.stdout[-2000:] + cp.stderr[-2000:]
        assert cp.stdout.splitlines()[-1].endswith(": 0 divergent")
    finally:
        server.stop()


def test_every_server_command_end_to_end(tmp_path: Path) -> None:
    """Each command through the whole standalone cloud: API (pending at once) -> outbox ->
    forwarder -> cell -> cellsync -> the cell's own fields settle it."""
    data = tmp_path / "data"
    data.mkdir()
    seed_catalog(data)
    args = ["--set", "cell.build_delay=0.05", "--set", "cell.action_delay=0.05"]
    server = FastpathServer(data_dir=data, port=free_port(), workers=2, args=args)
    server.start()
    admin = {"X-Auth-Token": f"admin:{PROJECT}", "OpenStack-API-Version": "compute 2.90"}

    def call(method: str, path: str, payload: Any = None) -> tuple[int, Any]:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        try:
            raw = None if payload is None else json.dumps(payload).encode()
            hs = dict(admin, **({"Content-Type": "application/json"} if raw else {}))
            conn.request(method, "/v2.1" + path, raw, hs)
            r = conn.getresponse()
            data = r.read()
            return r.status, (json.loads(data) if data else None)
        finally:
            conn.close()

    def server_of(uid: str) -> dict[str, Any]:
        status, body = call("GET", f"/servers/{uid}")
        assert status == 200, (status, body)
        return dict(body["server"])

    def settles(uid: str, **want: Any) -> dict[str, Any]:
        seen: dict[str, Any] = {}

        def ok() -> bool:
            seen.update(server_of(uid))
            return all(seen.get(k) == v for k, v in want.items())
        wait_until(ok, 60, lambda: f"{uid} to show {want} (shows {[seen.get(k) for k in want]})")
        return seen

    try:
        wait_until(lambda: call("POST", "/servers", {"server": {
            "name": "probe", "flavorRef": FLAVORS[0]["id"], "imageRef": IMAGES[0]["id"],
            "networks": "none"}})[0] == 202, 60, "a cell known to the API")
        status, body = call("POST", "/servers", {"server": {
            "name": "e2e", "flavorRef": FLAVORS[0]["id"], "imageRef": IMAGES[0]["id"],
            "networks": "none", "metadata": {"a": "1"}}})
        assert status == 202
        uid = body["server"]["id"]
        settles(uid, status="ACTIVE", **{"OS-EXT-STS:task_state": None})

        def act(payload: dict[str, Any], expect: int = 202) -> Any:
            status, body = call("POST", f"/servers/{uid}/action", payload)
            assert status == expect, (payload, status, body)
            return body

        act({"lock": {"locked_reason": "because"}})
        settles(uid, locked=True, locked_reason="because", status="ACTIVE")
        act({"unlock": None})
        settles(uid, locked=False)
        assert call("PUT", f"/servers/{uid}", {"server": {"name": "renamed"}})[0] == 200
        settles(uid, name="renamed")
        act({"os-stop": None})
        settles(uid, status="SHUTOFF")
        act({"os-start": None})
        settles(uid, status="ACTIVE")
        act({"pause": None})
        settles(uid, status="PAUSED")
        act({"unpause": None})
        settles(uid, status="ACTIVE")
        act({"suspend": None})
        settles(uid, status="SUSPENDED")
        act({"resume": None})
        settles(uid, status="ACTIVE")
        act({"reboot": {"type": "HARD"}})
        settles(uid, status="ACTIVE", **{"OS-EXT-STS:task_state": None})
        act({"resize": {"flavorRef": FLAVORS[1]["id"]}})
        v = settles(uid, status="VERIFY_RESIZE")
        assert v["flavor"]["original_name"] == FLAVORS[1]["name"]
        act({"confirmResize": None}, 204)
        settles(uid, status="ACTIVE")
        act({"rebuild": {"imageRef": IMAGES[1]["id"], "name": "rebuilt"}})
        v = settles(uid, status="ACTIVE", name="rebuilt")
        assert v["image"]["id"] == IMAGES[1]["id"]
        image_id = act({"createImage": {"name": "snap"}})["image_id"]
        settles(uid, status="ACTIVE", **{"OS-EXT-STS:task_state": None})
        assert call("GET", f"/images/{image_id}")[0] in (200, 404)  # the proxy API ends at 2.35
        assert call("DELETE", f"/servers/{uid}")[0] == 204
        wait_until(lambda: call("GET", f"/servers/{uid}")[0] == 404, 60, f"{uid} deleted")
    finally:
        server.stop()


def test_quota_holds_under_concurrent_creates_on_every_worker(
        api_only: tuple[Path, FastpathServer]) -> None:
    """16 clients over 2 worker processes race for a quota of 25 instances: exactly 25 are
    admitted (each command re-checks the usage inside its write transaction), the rest get
    Nova's 403, and the store counts 25."""
    data, server = api_only
    with Store.open(data, map_size=1 << 26) as store:
        store.apply(Batch(catalog=[CatalogPut(Catalog.QUOTA_LIMITS, PROJECT, {"instances": 25})]))
    server.start()
    results: list[tuple[int, str]] = []
    lock = threading.Lock()
    go = threading.Event()

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        headers = {"X-Auth-Token": TOKEN, "Content-Type": "application/json",
                   "OpenStack-API-Version": "compute 2.37"}
        go.wait(10)
        try:
            for _ in range(5):
                conn.request("POST", "/v2.1/servers", body(), headers)
                r = conn.getresponse()
                data = json.loads(r.read())
                with lock:
                    results.append((r.status, json.dumps(data)))
        finally:
            conn.close()

    try:
        server.distinct_pids(2)  # both workers answer
        threads = [threading.Thread(target=client) for _ in range(16)]
        for t in threads:
            t.start()
        go.set()
        for t in threads:
            t.join(60)
        statuses = sorted(s for s, _ in results)
        assert statuses == [202] * 25 + [403] * 55, statuses
        refusal = next(b for s, b in results if s == 403)
        assert "Quota exceeded for instances: Requested 1, but already used 25 of 25 instances" in refusal
    finally:
        server.stop()
    with Store.open(data, map_size=1 << 26) as s, s.read() as r:
        assert r.count(b"servers") == 25
        assert r.quota_usage(PROJECT)["instances"] == 25

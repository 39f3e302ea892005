"""The metadata, tags and catalogue write routes on a real ``fastpath serve`` (2 workers):

- the budget per route through ``/metrics``: each accepted write is one store read and one
  store write transaction, a refused one (bad body, policy, duplicate) no write at all;
- concurrent metadata merges from clients spread over both workers lose nothing (each
  command re-reads the server inside the write transaction);
- acknowledged keypairs survive kill -9 of every fastpath process.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import threading
from pathlib import Path
from typing import Any

from fastpath.api import views
from fastpath.store import Batch, Store, Upsert
from fastpath.store.changes import Catalog, CatalogPut
from fastpath.store.samples import sample_record
from tests.integration.conftest import FastpathServer, free_port, wait_until

PROJECT = "6f70656e737461636b20342065766572"
TOKEN = f"fake:{PROJECT}"
ADMIN = f"admin:{PROJECT}"
U = "3b0e2f6c-9a1d-4c55-8e2b-5d6f7a8b9c01"
PUB = ("ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAAAgQDx8nkQv/zgGgB4rMYmIf+6A4l6Rr+o/6lHBQdW5aYd44bd8"
       "JttDCE/F/pNRr0lRE+PiqSPO8nDPHw0010JeMH9gYgnnFlyY3/OcJ02RhIPyyxYpv9FhY+2YiUkpwFOcLImyrx"
       "EsYXpD/0d3ac30bNH6Sw9JD9UZHYcpSxsIbECHw== Generated-by-Nova")


def seed(data: Path) -> None:
    """One live server and generous limits, straight into the store (no cells run: the
    outbox keeps the commands)."""
    store = Store.open(data, map_size=1 << 26)
    try:
        rec = sample_record(U, seed=1)
        store.apply(Batch([Upsert(U, 1, rec)], catalog=[CatalogPut(
            Catalog.QUOTA_LIMITS, PROJECT, {"metadata_items": 10_000, "key_pairs": -1})]),
            render=views.render_server)
    finally:
        store.close()


def call(port: int, method: str, path: str, body: Any = None, token: str = TOKEN,
         version: str = "2.26", conn: http.client.HTTPConnection | None = None
         ) -> tuple[int, bytes]:
    own = conn is None
    c = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        raw = None if body is None else json.dumps(body).encode()
        c.request(method, path, raw, {"X-Auth-Token": token, "Content-Type": "application/json",
                                      "OpenStack-API-Version": f"compute {version}"})
        r = c.getresponse()
        return r.status, r.read()
    finally:
        if own:
            c.close()


def txns(server: FastpathServer) -> tuple[float, float]:
    m = server.metrics()
    return m["fastpath_store_read_txn_total"], m["fastpath_store_write_txn_total"]


def test_budget_per_route_on_metrics(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    seed(data)
    server = FastpathServer(data_dir=data, port=free_port(), workers=2, sidecars=False)
    server.start()
    port = server.port
    md = f"/v2.1/servers/{U}/metadata"
    tags = f"/v2.1/servers/{U}/tags"
    flavor = {"flavor": {"name": "f-int", "ram": 512, "vcpus": 1, "disk": 1, "id": "f-int"}}
    # (method, path, body, token, version, expected status, expected (reads, writes))
    steps: list[tuple[str, str, Any, str, str, int, tuple[int, int]]] = [
        ("POST", md, {"metadata": {"k": "v"}}, TOKEN, "2.26", 200, (1, 1)),
        ("PUT", md, {"metadata": {"k": "w"}}, TOKEN, "2.26", 200, (1, 1)),
        ("PUT", md + "/k", {"meta": {"k": "x"}}, TOKEN, "2.26", 200, (1, 1)),
        ("DELETE", md + "/k", None, TOKEN, "2.26", 204, (1, 1)),
        ("POST", md, {"metadata": {"k": 1}}, TOKEN, "2.26", 400, (0, 0)),
        ("DELETE", md + "/absent", None, TOKEN, "2.26", 404, (1, 0)),
        ("PUT", tags, {"tags": ["a"]}, TOKEN, "2.26", 200, (1, 1)),
        ("PUT", tags + "/b", None, TOKEN, "2.26", 201, (1, 1)),
        ("PUT", tags + "/b", None, TOKEN, "2.26", 204, (1, 0)),
        ("DELETE", tags + "/b", None, TOKEN, "2.26", 204, (1, 1)),
        ("DELETE", tags, None, TOKEN, "2.26", 204, (1, 1)),
        ("POST", "/v2.1/os-keypairs", {"keypair": {"name": "k1", "public_key": PUB}}, TOKEN,
         "2.92", 201, (1, 1)),
        ("POST", "/v2.1/os-keypairs", {"keypair": {"name": "k1", "public_key": PUB}}, TOKEN,
         "2.92", 409, (1, 0)),
        ("DELETE", "/v2.1/os-keypairs/k1", None, TOKEN, "2.92", 204, (1, 1)),
        ("POST", "/v2.1/flavors", flavor, TOKEN, "2.1", 403, (0, 0)),
        ("POST", "/v2.1/flavors", flavor, ADMIN, "2.1", 200, (1, 1)),
        ("POST", "/v2.1/flavors/f-int/os-extra_specs", {"extra_specs": {"a": "b"}}, ADMIN,
         "2.1", 200, (1, 1)),
        ("PUT", "/v2.1/flavors/f-int", {"flavor": {"description": "d"}}, ADMIN, "2.55", 200,
         (1, 1)),
        ("DELETE", "/v2.1/flavors/f-int", None, ADMIN, "2.1", 202, (1, 1)),
        ("PUT", f"/v2.1/os-quota-sets/{PROJECT}", {"quota_set": {"cores": 40}}, ADMIN, "2.57",
         200, (1, 1)),
        ("DELETE", f"/v2.1/os-quota-sets/{PROJECT}", None, ADMIN, "2.57", 202, (0, 1)),
    ]
    def flavor_ids() -> set[str]:
        r = server.get("/v2.1/flavors/detail", {"X-Auth-Token": TOKEN})
        return {f["id"] for f in r.json()["flavors"]}

    try:
        server.distinct_pids(2)
        for _ in range(8):  # every worker caches the (empty) answer
            assert flavor_ids() == set()
        for method, path, body, token, version, status, budget in steps:
            before = txns(server)
            got, text = call(port, method, path, body, token, version)
            after = txns(server)
            assert got == status, (method, path, got, text)
            spent = (round(after[0] - before[0]), round(after[1] - before[1]))
            assert spent == budget, (method, path, spent)
            if path == "/v2.1/flavors" and status == 200:
                # Each worker's cached flavor answers follow the generation bump.
                for _ in range(8):
                    assert flavor_ids() == {"f-int"}
        # The writes are visible to the next read, on any worker.
        r = server.get(f"/v2.1/servers/{U}/metadata", {"X-Auth-Token": TOKEN})
        assert "k" not in r.json()["metadata"]
    finally:
        server.stop()


def test_concurrent_merges_lose_nothing(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    seed(data)
    server = FastpathServer(data_dir=data, port=free_port(), workers=2, sidecars=False)
    server.start()
    errors: list[Any] = []

    def client(n: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        try:
            for i in range(25):
                status, text = call(server.port, "POST", f"/v2.1/servers/{U}/metadata",
                                    {"metadata": {f"c{n}-{i}": "v"}}, conn=conn)
                if status != 200:
                    errors.append((status, text))
        finally:
            conn.close()

    try:
        server.distinct_pids(2)
        threads = [threading.Thread(target=client, args=(n,)) for n in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert errors == []
        got = server.get(f"/v2.1/servers/{U}/metadata", {"X-Auth-Token": TOKEN}).json()
        keys = {k for k in got["metadata"] if k.startswith("c")}
        assert keys == {f"c{n}-{i}" for n in range(8) for i in range(25)}
    finally:
        server.stop()


def test_acknowledged_keypairs_survive_kill_9(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    seed(data)
    server = FastpathServer(data_dir=data, port=free_port(), workers=2, sidecars=False)
    server.start()
    acked: list[str] = []
    stop = threading.Event()

    def client(n: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        i = 0
        try:
            while not stop.is_set():
                name = f"kp-{n}-{i}"
                status, _ = call(server.port, "POST", "/v2.1/os-keypairs",
                                 {"keypair": {"name": name, "public_key": PUB}}, version="2.92",
                                 conn=conn)
                if status == 201:
                    acked.append(name)
                i += 1
        except (OSError, http.client.HTTPException):
            return  # killed: what had no answer was not acknowledged
        finally:
            conn.close()

    try:
        pids = server.child_pids() | {server.pid}
        threads = [threading.Thread(target=client, args=(n,), daemon=True) for n in range(4)]
        for t in threads:
            t.start()
        wait_until(lambda: len(acked) >= 200, 60, "200 acknowledged keypairs")
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        stop.set()
        for t in threads:
            t.join(15)
        assert server.proc is not None
        server.proc.wait(15)
        names = list(acked)
        store = Store.open(data, map_size=1 << 26)
        try:
            with store.read() as r:
                stored = {k["name"] for k in r.keypairs("fake")}
                assert r.check() == []
        finally:
            store.close()
        missing = [n for n in names if n not in stored]
        assert not missing, f"{len(missing)} of {len(names)} acknowledged keypairs lost"
    finally:
        server.stop()

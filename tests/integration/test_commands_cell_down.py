"""A cell stopped during command load and started again (issue 7): the API keeps answering
(every create a 202), the stopped cell's commands wait (BUILD, outbox or inbox), and once
the cell runs again every server settles, each command exactly once, ``fastpath verify``
clean.  Real processes: a standalone ``fastpath serve`` with its two cells, cellsync and
forwarder; the cell is frozen with SIGSTOP (so the master does not replace it) and thawed
with SIGCONT.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from fastpath.seed import FLAVORS, IMAGES
from fastpath.store import Store
from tests.integration.conftest import FastpathServer, free_port, seed_catalog, wait_until

PROJECT = "0c3e1f5a2b4d4c6e8f0a1b3c5d7e9f11"
TOKEN = f"user1:{PROJECT}"
CREATES = 40


def _request(port: int, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        headers = {"X-Auth-Token": TOKEN, "OpenStack-API-Version": "compute 2.90"}
        raw = None
        if body is not None:
            raw = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        conn.request(method, path, body=raw, headers=headers)
        r = conn.getresponse()
        data = r.read()
        return r.status, json.loads(data) if data else None
    finally:
        conn.close()


def _create(port: int, i: int) -> tuple[int, Any]:
    return _request(port, "POST", "/v2.1/servers", {"server": {
        "name": f"cell-down-{i}", "flavorRef": FLAVORS[0]["id"], "imageRef": IMAGES[0]["id"],
        "networks": "none"}})


def _statuses(port: int, ids: list[str]) -> dict[str, str]:
    out = {}
    for sid in ids:
        code, body = _request(port, "GET", f"/v2.1/servers/{sid}")
        out[sid] = body["server"]["status"] if code == 200 else str(code)
    return out


def test_a_stopped_cell_delays_its_commands_and_loses_none(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    seed_catalog(data)
    server = FastpathServer(data_dir=data, port=free_port(), workers=2, args=[
        "--set", "cell.build_delay=0.05", "--set", "cell.action_delay=0.05"])
    server.start()
    frozen: int | None = None
    try:
        def cells_ready() -> bool:
            return sum(1 for p in server.status() if p.get("role") == "cell" and p.get("ready")) == 2

        wait_until(cells_ready, 60, lambda: f"two ready cells in {server.status()}")
        # Both cells must have reported capacity, so that creates are spread over both.
        def capacity() -> bool:
            s = Store.open(data)
            try:
                with s.read() as r:
                    return len([c for c, e in r.cells().items() if e.get("hosts")]) == 2
            finally:
                s.close()

        wait_until(capacity, 60, lambda: "both cells' capacity in the store")
        cell1 = next(p for p in server.status() if p.get("role") == "cell" and p.get("name") == "cell1")
        frozen = int(cell1["pid"])
        os.kill(frozen, signal.SIGSTOP)

        # The API keeps answering while cell1 is stopped: every create is accepted.
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(lambda i: _create(server.port, i), range(CREATES)))
        assert [code for code, _ in results] == [202] * CREATES, results
        ids = [body["server"]["id"] for _, body in results]

        # The other cell's servers go ACTIVE; cell1's stay BUILD while it is stopped.
        def settled_except_stopped() -> bool:
            st = _statuses(server.port, ids)
            return "BUILD" in st.values() and all(v in ("ACTIVE", "BUILD") for v in st.values()) \
                and "ACTIVE" in st.values()

        wait_until(settled_except_stopped, 60, lambda: f"{_statuses(server.port, ids)}")
        time.sleep(0.5)  # a stopped cell stays stopped: nothing of it may move meanwhile
        building = [sid for sid, v in _statuses(server.port, ids).items() if v == "BUILD"]
        assert building, "cell1 got no server"
        metrics = server.metrics()
        queued = metrics.get("fastpath_outbox_depth", 0.0)
        inbox = sqlite3.connect(data / "cells" / "cell1.sqlite")
        try:
            waiting = inbox.execute("SELECT COUNT(*) FROM inbox WHERE state = 'new'").fetchone()[0]
        finally:
            inbox.close()
        # Each waiting create is either still in the outbox or in cell1's inbox, unexecuted.
        assert queued + waiting >= len(building), (queued, waiting, len(building))

        os.kill(frozen, signal.SIGCONT)
        frozen = None

        wait_until(lambda: set(_statuses(server.port, ids).values()) == {"ACTIVE"}, 90,
                   lambda: f"{_statuses(server.port, ids)}")
        wait_until(lambda: server.metrics().get("fastpath_outbox_depth", 1.0) == 0.0, 30,
                   lambda: "the outbox drained")
        # Every create ran exactly once, in one cell or the other.
        seen: dict[str, int] = {}
        for cell in ("cell1", "cell2"):
            db = sqlite3.connect(data / "cells" / f"{cell}.sqlite")
            try:
                for uuid, n in db.execute(
                        "SELECT uuid, COUNT(*) FROM instances GROUP BY uuid").fetchall():
                    seen[uuid] = seen.get(uuid, 0) + n
            finally:
                db.close()
        assert {sid: seen.get(sid, 0) for sid in ids} == {sid: 1 for sid in ids}

        # Delete them all; nothing comes back.
        for sid in ids:
            assert _request(server.port, "DELETE", f"/v2.1/servers/{sid}")[0] == 204
        wait_until(lambda: set(_statuses(server.port, ids).values()) == {"404"}, 90,
                   lambda: f"{_statuses(server.port, ids)}")

        def verify_clean() -> bool:
            out = subprocess.run(
                [sys.executable, "-m", "fastpath", "verify", "--data-dir", str(data)],
                capture_output=True, text=True, timeout=120)
            return out.returncode == 0 and out.stdout.strip().splitlines()[-1].endswith(
                " in 2 cells: 0 divergent")

        wait_until(verify_clean, 60, lambda: "fastpath verify clean")
    finally:
        if frozen is not None:
            os.kill(frozen, signal.SIGCONT)
        server.stop()

"""`fastpath seed`: a real process fills a data dir, through its cells (the default) or
directly into the store (--direct); a real `fastpath serve` serves it, also while seeding
goes on (then its own cellsync brings the seeded servers up)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from fastpath.cell.registry import open_cell
from fastpath.seed import FLAVORS, IMAGES, project_id, user_id

SERVERS = 600
PROJECTS = 3


def seed(data_dir: Path, servers: int = SERVERS, projects: int = PROJECTS,
         *extra: str) -> str:
    cp = subprocess.run(
        [sys.executable, "-m", "fastpath", "seed", "--data-dir", str(data_dir),
         "--servers", str(servers), "--projects", str(projects), "--jobs", "2", *extra],
        capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
    )
    assert cp.returncode == 0, cp.stderr
    return cp.stdout


def token(p: int) -> dict[str, str]:
    return {"X-Auth-Token": f"{user_id(p)}:{project_id(p)}",
            "OpenStack-API-Version": "compute latest"}


def all_ids(server: Any, p: int, query: str = "") -> list[str]:
    """Every server id of project ``p`` in list order, following the next links."""
    ids: list[str] = []
    path = f"/v2.1/servers?limit=97{query}"
    while True:
        r = server.get(path, token(p))
        assert r.status == 200, r.body
        body = r.json()
        ids += [s["id"] for s in body["servers"]]
        links = body.get("servers_links")
        if not links:
            return ids
        path = links[0]["href"].split(server.url, 1)[1]


def verify(data_dir: Path) -> str:
    cp = subprocess.run([sys.executable, "-m", "fastpath", "verify", "--data-dir", str(data_dir)],
                        capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert cp.returncode == 0, cp.stdout + cp.stderr
    return cp.stdout.splitlines()[-1]


@pytest.mark.parametrize("direct", [False, True], ids=["cells", "direct"])
def test_seed_then_serve(tmp_path: Path, fastpath_server: Callable[..., Any],
                         direct: bool) -> None:
    data = tmp_path / "data"
    extra = ("--direct",) if direct else ()
    out = seed(data, SERVERS, PROJECTS, *extra)
    assert f"seeded {SERVERS} servers in {PROJECTS} projects" in out
    assert f"({SERVERS} written, 0 already there)" in out
    if direct:
        assert not (data / "cells").exists()
    else:
        # Through the standalone default cells, spread evenly, synced here (no serve runs).
        assert "into cells cell1, cell2 of" in out and "synced by cellsync in this process" in out
        for name in ("cell1", "cell2"):
            db = open_cell(str(data), name)
            try:
                assert len(db.all_instance_versions()) == SERVERS // 2
            finally:
                db.close()
        assert verify(data) == f"checked {SERVERS} servers in 2 cells: 0 divergent"
    # Idempotent: the same arguments change nothing.
    assert "(0 written, 600 already there)" in seed(data, SERVERS, PROJECTS, *extra)

    server = fastpath_server(workers=2, data_dir=data, sidecars=not direct)
    per_project = [all_ids(server, p) for p in range(PROJECTS)]
    assert sum(len(ids) for ids in per_project) == SERVERS
    assert all(len(set(ids)) == len(ids) for ids in per_project)
    # Every project has servers in each state the seed makes.
    for p in range(PROJECTS):
        for status in ("ACTIVE", "SHUTOFF", "ERROR"):
            assert all_ids(server, p, f"&status={status}"), (p, status)
    r = server.get("/v2.1/flavors", token(0))
    assert {f["id"] for f in r.json()["flavors"]} >= {f["id"] for f in FLAVORS if f.get("is_public", True)}
    r = server.get("/v2.1/images", {**token(0), "OpenStack-API-Version": "compute 2.35"})
    assert {i["id"] for i in r.json()["images"]} == {i["id"] for i in IMAGES}
    r = server.get("/v2.1/os-keypairs", token(1))
    assert [k["keypair"]["name"] for k in r.json()["keypairs"]] == ["default-key"]
    r = server.get("/v2.1/os-availability-zone", token(0))
    assert [z["zoneName"] for z in r.json()["availabilityZoneInfo"]] == ["nova"]
    r = server.get("/v2.1/limits", token(0))
    assert r.json()["limits"]["absolute"]["totalInstancesUsed"] == SERVERS // PROJECTS


def test_seed_while_serving(tmp_path: Path, fastpath_server: Callable[..., Any]) -> None:
    """Seeding into a data dir that a running standalone fastpath serves: the servers go
    into its cells and its own cellsync brings them up before seed returns."""
    data = tmp_path / "data"
    server = fastpath_server(workers=2, data_dir=data)
    assert all_ids(server, 0) == []
    out = seed(data, 90, 3)
    assert "into cells cell1, cell2 of" in out and "synced by the running cellsync" in out
    assert len(all_ids(server, 0)) == 30
    seed(data, 150, 3)
    assert len(all_ids(server, 0)) == 50
    assert verify(data) == "checked 150 servers in 2 cells: 0 divergent"


def test_seed_direct_while_serving(tmp_path: Path, fastpath_server: Callable[..., Any]) -> None:
    data = tmp_path / "data"
    server = fastpath_server(workers=2, data_dir=data, sidecars=False)
    seed(data, 90, 3, "--direct")
    assert len(all_ids(server, 0)) == 30


def test_seed_refuses_bad_arguments(tmp_path: Path) -> None:
    cp = subprocess.run(
        [sys.executable, "-m", "fastpath", "seed", "--data-dir", str(tmp_path),
         "--servers", "10", "--projects", "0"],
        capture_output=True, text=True, timeout=60,
    )
    assert cp.returncode == 2 and "--projects" in cp.stderr

"""The standalone ``fastpath serve``: the master runs two local cells, cellsync and the
forwarder beside its workers (issue 6 "Standalone", issue 7 "Forwarder").

Real processes only: ``fastpath serve`` on a free port and a temporary data dir,
``fastpath seed`` / ``verify`` / ``status --json`` as commands, kill -9 by PID.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastpath.seed import project_id, user_id
from tests.integration.conftest import _alive as alive  # not a zombie either
from tests.integration.conftest import children

Factory = Callable[..., Any]
SIDECAR_ROLES = ("cell", "cellsync", "forwarder")
WAIT = 60.0  # seconds: generous, the machine is shared


def cli(*argv: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fastpath", *argv], capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def status(server: Any) -> list[dict[str, Any]]:
    done = server.status_cli("--json")
    assert done.returncode == 0, done.stderr
    rows: list[dict[str, Any]] = json.loads(done.stdout)
    return rows


def sidecars(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """{"cell1": row, "cell2": row, "cellsync": row, "forwarder": row} of the running ones."""
    return {r["name"]: r for r in rows if r["role"] in SIDECAR_ROLES}


def all_ready(server: Any, names: set[str]) -> dict[str, dict[str, Any]] | None:
    found = sidecars(status(server))
    if set(found) >= names and all(found[n]["ready"] for n in names):
        return found
    return None


def verify(data_dir: Path) -> str:
    done = cli("verify", "--data-dir", str(data_dir))
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout.splitlines()[-1]


def server_ids(server: Any, projects: int) -> set[str]:
    ids: set[str] = set()
    for p in range(projects):
        r = server.get("/v2.1/servers/detail?limit=1000",
                       {"X-Auth-Token": f"{user_id(p)}:{project_id(p)}"})
        assert r.status == 200, r.body
        ids |= {s["id"] for s in r.json()["servers"]}
    return ids


def test_standalone_serve_seed_kill_and_stop(tmp_path: Path, fastpath_server: Factory,
                                             wait_until: Callable[..., Any]) -> None:
    data = tmp_path / "data"
    server = fastpath_server(workers=1, data_dir=data)
    assert "also running cells cell1, cell2, cellsync" in server.stdout()
    names = {"cell1", "cell2", "cellsync"}
    first = wait_until(lambda: all_ready(server, names), WAIT,
                       lambda: f"cells and cellsync ready: {sidecars(status(server))}", step=0.1)
    assert [first[n]["role"] for n in ("cell1", "cell2", "cellsync")] == ["cell", "cell", "cellsync"]
    assert all(first[n]["restarts"] == 0 and first[n]["uptime"] is not None for n in names)
    assert (data / "cells" / "cell1.sqlite").exists() and (data / "cells" / "cell2.sqlite").exists()

    # Seed through the cells; the running cellsync brings the servers up before seed returns.
    done = cli("seed", "--data-dir", str(data), "--servers", "200", "--projects", "2")
    assert done.returncode == 0, done.stderr
    assert "into cells cell1, cell2 of" in done.stdout
    assert "synced by the running cellsync (200 written, 0 already there)" in done.stdout
    seeded = server_ids(server, 2)
    assert len(seeded) == 200
    assert verify(data) == "checked 200 servers in 2 cells: 0 divergent"

    # kill -9 a cell and cellsync: the master restarts both.
    victims = {"cell1": first["cell1"]["pid"], "cellsync": first["cellsync"]["pid"]}
    for pid in victims.values():
        os.kill(pid, signal.SIGKILL)

    def restarted() -> dict[str, dict[str, Any]] | None:
        now = all_ready(server, names)
        if now and all(now[n]["pid"] != victims[n] and now[n]["restarts"] == 1 for n in victims):
            return now
        return None

    after = wait_until(restarted, WAIT, lambda: f"restarts: {sidecars(status(server))}", step=0.1)
    assert after["cell2"]["pid"] == first["cell2"]["pid"] and after["cell2"]["restarts"] == 0
    assert "cell cell1" in server.stderr() and "restarting" in server.stderr()

    # Still serving, and the restarted cellsync still brings new servers up.
    assert server_ids(server, 2) == seeded
    done = cli("seed", "--data-dir", str(data), "--servers", "260", "--projects", "2")
    assert done.returncode == 0, done.stderr
    assert "(60 written, 200 already there)" in done.stdout
    assert len(server_ids(server, 2)) == 260
    assert verify(data) == "checked 260 servers in 2 cells: 0 divergent"

    # cellsync publishes its figures at most once a second: the last ones come shortly.
    applied = 'fastpath_cellsync_changes_applied_total{cell="cell1"}'
    metrics = wait_until(lambda: (m := server.metrics()).get(applied, 0) >= 30 and m, WAIT,
                         lambda: f"{applied} >= 30 (the 30 of cell1 seeded after the kill)")
    assert metrics['fastpath_sidecars_ready{role="cell"}'] == 2
    assert metrics['fastpath_sidecars_ready{role="cellsync"}'] == 1
    assert metrics['fastpath_cellsync_lag_seqs{cell="cell1"}'] == 0
    assert metrics["fastpath_cellsync_stats_age_seconds"] < 30

    # SIGTERM stops everything: no orphan.
    children = {r["pid"] for r in status(server) if r["role"] != "master"}
    assert len(children) >= 4  # a worker, two cells, cellsync (and the forwarder if present)
    server.signal(signal.SIGTERM)
    assert server.wait_exit(30) == 0
    for pid in children:
        wait_until(lambda pid=pid: not alive(pid), 10, f"child {pid} to be gone")
    assert not list((data / "run" / "wake").iterdir())  # every bell removed on a clean stop


def test_a_stuck_sidecar_is_killed_and_restarted(fastpath_server: Factory,
                                                 wait_until: Callable[..., Any]) -> None:
    """SIGSTOP freezes cellsync's loop: its heartbeat stops, the master kills it after
    master.sidecar_timeout and starts a new one."""
    server = fastpath_server(workers=1, args=["--set", "master.sidecar_timeout=2",
                                              "--set", "standalone.cells=cellA"])
    names = {"cellA", "cellsync"}
    first = wait_until(lambda: all_ready(server, names), WAIT, "cellA and cellsync ready",
                       step=0.1)
    stuck = first["cellsync"]["pid"]
    os.kill(stuck, signal.SIGSTOP)
    try:
        def replaced() -> dict[str, dict[str, Any]] | None:
            now = all_ready(server, names)
            return now if now and now["cellsync"]["pid"] != stuck else None

        after = wait_until(replaced, WAIT, "a new cellsync", step=0.1)
    finally:
        if alive(stuck):
            os.kill(stuck, signal.SIGCONT)
    assert after["cellsync"]["restarts"] == 1
    assert after["cellA"]["pid"] == first["cellA"]["pid"]
    assert "no heartbeat" in server.stderr() and "master.sidecar_timeout" in server.stderr()
    assert not alive(stuck)


def test_reload_adds_a_cell_and_restarts_only_what_changed(
    tmp_path: Path, fastpath_server: Factory, wait_until: Callable[..., Any]
) -> None:
    config = tmp_path / "fastpath.toml"
    config.write_text('[standalone]\ncells = "cell1"\nforwarder = false\n')
    server = fastpath_server(workers=1, args=["--config", str(config)])
    first = wait_until(lambda: all_ready(server, {"cell1", "cellsync"}), WAIT,
                       "cell1 and cellsync ready", step=0.1)
    assert "forwarder" not in first

    config.write_text('[standalone]\ncells = "cell1,cell3"\nforwarder = false\n'
                      '[cellsync]\npoll_interval = 0.5\n')
    server.signal(signal.SIGHUP)

    def reloaded() -> dict[str, dict[str, Any]] | None:
        now = all_ready(server, {"cell1", "cell3", "cellsync"})
        return now if now and now["cellsync"]["pid"] != first["cellsync"]["pid"] else None

    after = wait_until(reloaded, WAIT, lambda: f"cell3 and a new cellsync: {sidecars(status(server))}",
                       step=0.1)
    assert after["cell1"]["pid"] == first["cell1"]["pid"]  # no cell.* setting changed
    assert (server.data_dir / "cells" / "cell3.sqlite").exists()

    config.write_text('[standalone]\ncells = "cell3"\nforwarder = false\n'
                      '[cellsync]\npoll_interval = 0.5\n')
    server.signal(signal.SIGHUP)
    gone = after["cell1"]["pid"]
    wait_until(lambda: "cell1" not in sidecars(status(server)) and not alive(gone), WAIT,
               "cell1 to be stopped", step=0.1)
    final = sidecars(status(server))
    assert final["cell3"]["pid"] == after["cell3"]["pid"]
    assert final["cellsync"]["pid"] == after["cellsync"]["pid"]


def test_seed_waits_for_a_frozen_cellsync_only_so_long(
    tmp_path: Path, fastpath_server: Factory, wait_until: Callable[..., Any]
) -> None:
    """The wait for the running cellsync is bounded: with cellsync frozen, seed says so and
    exits 1; the servers are in the cells and appear once cellsync runs again."""
    data = tmp_path / "data"
    server = fastpath_server(workers=1, data_dir=data)
    first = wait_until(lambda: all_ready(server, {"cell1", "cell2", "cellsync"}), WAIT,
                       "cells and cellsync ready", step=0.1)
    # cellsync and its shard processes (cellsync.shards), which tail the cells on their own.
    frozen = [first["cellsync"]["pid"], *children(first["cellsync"]["pid"])]
    assert len(frozen) >= 3
    for pid in frozen:
        os.kill(pid, signal.SIGSTOP)
    try:
        done = cli("seed", "--data-dir", str(data), "--servers", "40", "--projects", "2",
                   "--wait", "1")
    finally:
        for pid in frozen:
            os.kill(pid, signal.SIGCONT)
    assert done.returncode == 1
    assert "cellsync did not catch up within 1 s (cell1 at " in done.stderr
    wait_until(lambda: len(server_ids(server, 2)) == 40, WAIT, "the 40 servers on the API")
    assert verify(data) == "checked 40 servers in 2 cells: 0 divergent"


def shards_of(pid: int) -> list[int]:
    """cellsync's shard processes (not multiprocessing's resource tracker)."""
    out = []
    for c in children(pid):
        try:
            if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes():
                out.append(c)
        except FileNotFoundError:
            pass
    return out


def test_a_stuck_cellsync_shard_gets_cellsync_restarted(
    tmp_path: Path, fastpath_server: Factory, wait_until: Callable[..., Any]
) -> None:
    """A shard whose loop stops turning (frozen with SIGSTOP) stops cellsync's heartbeat, so
    the master's watchdog (master.sidecar_timeout) kills cellsync -- the frozen shard dies
    with it -- and starts it again; servers seeded meanwhile come up."""
    data = tmp_path / "data"
    server = fastpath_server(workers=1, data_dir=data,
                             args=["--set", "master.sidecar_timeout=3"])
    first = wait_until(lambda: all_ready(server, {"cell1", "cell2", "cellsync"}), WAIT,
                       "cells and cellsync ready", step=0.1)
    old = first["cellsync"]["pid"]
    shards = wait_until(lambda: shards_of(old) if len(shards_of(old)) == 2 else None, WAIT,
                        "cellsync's two shards")
    os.kill(shards[0], signal.SIGSTOP)
    try:
        new = wait_until(lambda: (all_ready(server, {"cellsync"}) or {}).get("cellsync", {})
                         .get("pid") not in (None, old), WAIT,
                         lambda: f"cellsync restarted: {sidecars(status(server))}", step=0.2)
        assert new
        wait_until(lambda: not alive(shards[0]), WAIT, "the frozen shard to be gone")
    finally:
        if alive(shards[0]):
            os.kill(shards[0], signal.SIGCONT)
    assert "silent for more than" in server.stderr()
    done = cli("seed", "--data-dir", str(data), "--servers", "20", "--projects", "2")
    assert done.returncode == 0, done.stderr
    wait_until(lambda: len(server_ids(server, 2)) == 20, WAIT, "the 20 servers on the API")
    assert verify(data) == "checked 20 servers in 2 cells: 0 divergent"

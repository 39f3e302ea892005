"""`fastpath cell --name` and `cellsync` as their own processes: the cell executes inbox
commands, cellsync brings the result up, each woken by its bell; SIGTERM stops both."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastpath.cell.db import SqliteCellDB
from fastpath.cell.registry import cell_path
from fastpath.master.status import cellsync_stats_path, read_cellsync_stats
from fastpath.wake import bell_path, ring

FLAVOR = {"id": "1", "name": "m1.tiny", "vcpus": 1, "ram": 512, "disk": 1, "ephemeral": 0,
          "swap": 0, "extra_specs": {}}
UUID = "00000000-0000-4000-8000-00000000c0de"


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *argv], capture_output=True, text=True,
                          timeout=60, stdin=subprocess.DEVNULL)


def _wait(predicate: Callable[[], Any], procs: list[subprocess.Popen[str]], what: str,
          timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        for p in procs:
            assert p.poll() is None, f"{p.args!r} exited: {p.communicate()[1]}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_cell_and_cellsync_processes_are_woken_by_their_bells(tmp_path: Path) -> None:
    """Both daemons alone; fallback polls of 10 s and 60 s, so only the bells can make this quick:
    the test rings the cell's bell after writing its inbox (as the forwarder does), the
    cell rings cellsync's after each commit."""
    data = tmp_path / "data"
    cell = subprocess.Popen(
        [sys.executable, "-m", "fastpath", "cell", "--name", "cell1", "--data-dir", str(data),
         "--set", "cell.build_delay=0.1", "--set", "cell.poll_interval=10"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
    )
    procs = [cell]
    try:
        path = cell_path(str(data), "cell1")
        cell_bell = bell_path(str(data), "cell-cell1")
        _wait(lambda: Path(path).exists() and Path(cell_bell).exists(), procs,
              "the cell's database and bell")
        sync = subprocess.Popen(
            [sys.executable, "-m", "cellsync", "--data-dir", str(data), "--interval", "60"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
        )
        procs.append(sync)
        stats_path = cellsync_stats_path(str(data))

        def stats() -> dict[str, Any] | None:
            doc = read_cellsync_stats(str(data))
            return doc if doc and "cell1" in doc["cells"] else None

        _wait(stats, procs, "cellsync's first stats")
        db = SqliteCellDB(path)
        try:
            assert db.accept_command("req-1", {"action": "create", "server": {
                "uuid": UUID, "project_id": "p1", "user_id": "u1", "name": "vm",
                "flavor": FLAVOR}}, UUID)
            ring(cell_bell)

            def active() -> bool:
                rows = db.load_instance(UUID)
                return rows is not None and rows["instance"]["vm_state"] == "active"

            # Within the cell's 10 s fallback poll: its bell woke it.
            _wait(active, procs, "the server to be ACTIVE in the cell", timeout=8.0)
            rows = db.load_instance(UUID)
            assert rows is not None and rows["instance"]["host"].startswith("cell1-compute-")
            head = db.max_seq()
        finally:
            db.close()

        def caught_up() -> dict[str, Any] | None:
            doc = stats()
            c = doc["cells"]["cell1"] if doc else None
            return c if c and c["cursor"] >= head and c["applied_total"] >= 1 else None

        # Within cellsync's 60 s fallback poll: the cell's ring woke it.
        c = _wait(caught_up, procs, f"cellsync's cursor to reach {head} ({stats_path!r})")
        assert c["lag_seqs"] == 0 and c["head"] == head
        cp = run("fastpath", "verify", "--data-dir", str(data))
        assert cp.returncode == 0, cp.stdout + cp.stderr
        assert cp.stdout.splitlines()[-1] == "checked 1 servers in 1 cells: 0 divergent"
        assert all(Path(bell_path(str(data), f"cellsync-shard{k}")).exists() for k in range(2))
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            assert p.wait(15) == 0, p.communicate()[1]
        assert not Path(cell_bell).exists()  # each removes its own bell on a clean stop
        assert not Path(bell_path(str(data), "cellsync")).exists()
        # cellsync's shards (cellsync.shards, 2) stopped cleanly with it, bells removed too.
        assert not any(Path(bell_path(str(data), f"cellsync-shard{k}")).exists()
                       for k in range(2))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)


def test_cell_name_is_checked(tmp_path: Path) -> None:
    cp = run("fastpath", "cell", "--name", "../x", "--data-dir", str(tmp_path))
    assert cp.returncode == 2 and "invalid --name" in cp.stderr

"""`fastpath cell --name`: a real cell process executes inbox commands; cellsync brings the
result up; SIGTERM stops it cleanly."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

from fastpath.cell.db import SqliteCellDB
from fastpath.cell.registry import cell_path

FLAVOR = {"id": "1", "name": "m1.tiny", "vcpus": 1, "ram": 512, "disk": 1, "ephemeral": 0,
          "swap": 0, "extra_specs": {}}
UUID = "00000000-0000-4000-8000-00000000c0de"


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *argv], capture_output=True, text=True,
                          timeout=60, stdin=subprocess.DEVNULL)


def test_cell_process_builds_a_server(tmp_path: Path) -> None:
    data = tmp_path / "data"
    proc = subprocess.Popen(
        [sys.executable, "-m", "fastpath", "cell", "--name", "cell1", "--data-dir", str(data),
         "--set", "cell.build_delay=0.1", "--set", "cell.poll_interval=0.01"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
    )
    try:
        path = cell_path(str(data), "cell1")
        deadline = time.monotonic() + 20
        while not Path(path).exists():
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline, "the cell did not create its database"
            time.sleep(0.02)
        db = SqliteCellDB(path)
        try:
            assert db.accept_command("req-1", {"action": "create", "server": {
                "uuid": UUID, "project_id": "p1", "user_id": "u1", "name": "vm",
                "flavor": FLAVOR}}, UUID)
            while True:
                rows = db.load_instance(UUID)
                if rows is not None and rows["instance"]["vm_state"] == "active":
                    break
                assert proc.poll() is None, proc.communicate()[1]
                assert time.monotonic() < deadline, f"not ACTIVE in time: {rows}"
                time.sleep(0.02)
            assert rows["instance"]["host"].startswith("cell1-compute-")
        finally:
            db.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)

    assert run("cellsync", "--data-dir", str(data), "--once").returncode == 0
    cp = run("fastpath", "verify", "--data-dir", str(data))
    assert cp.returncode == 0, cp.stdout + cp.stderr
    assert cp.stdout.splitlines()[-1] == "checked 1 servers in 1 cells: 0 divergent"


def test_cell_name_is_checked(tmp_path: Path) -> None:
    cp = run("fastpath", "cell", "--name", "../x", "--data-dir", str(tmp_path))
    assert cp.returncode == 2 and "invalid --name" in cp.stderr

"""Cells → cellsync → store → API, and `fastpath verify` / `fastpath resync`, as real
processes on a temporary data dir."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastpath.cell.registry import open_cell
from fastpath.store.samples import sample_record
from tests.unit.test_projection import cell_values_of

PROJECT = "6f70656e737461636b20342065766572"
TOKEN = {"X-Auth-Token": f"fake:{PROJECT}"}


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *argv], capture_output=True, text=True,
                          timeout=120, stdin=subprocess.DEVNULL)


def uid(i: int) -> str:
    return f"00000000-0000-4000-8000-{i:012d}"


def test_cells_reach_the_api_and_verify_tells_divergence(
    tmp_path: Path, fastpath_server: Callable[..., Any]
) -> None:
    data = tmp_path / "data"
    cells = {name: open_cell(str(data), name, create=True) for name in ("cell1", "cell2")}
    for i in range(6):
        cell = "cell1" if i % 2 else "cell2"
        cells[cell].create_instance(
            cell_values_of(sample_record(uid(i), seed=i, cell=cell, project_id=PROJECT)))

    cp = run("fastpath", "verify", "--data-dir", str(data))
    assert cp.returncode == 1, cp.stderr
    assert cp.stdout.splitlines()[-1] == "checked 6 servers in 2 cells: 6 divergent"

    cp = run("cellsync", "--data-dir", str(data), "--once")
    assert cp.returncode == 0, cp.stderr
    cp = run("fastpath", "verify", "--data-dir", str(data))
    assert cp.returncode == 0, cp.stdout + cp.stderr
    assert cp.stdout.splitlines()[-1] == "checked 6 servers in 2 cells: 0 divergent"

    # No cellsync under this server: the test runs it by hand to show the divergence first.
    server = fastpath_server(workers=1, data_dir=data, sidecars=False)
    r = server.get(f"/v2.1/servers/{uid(3)}", TOKEN)
    assert r.status == 200 and r.json()["server"]["id"] == uid(3)
    assert len(server.get("/v2.1/servers", TOKEN).json()["servers"]) == 6

    # A delete in a cell: verify sees it until cellsync brings it up; then the API says 404.
    cells["cell1"].delete_instance(uid(3))
    cp = run("fastpath", "verify", "--data-dir", str(data))
    assert cp.returncode == 1 and cp.stdout.splitlines()[-1].endswith(": 1 divergent")
    assert run("cellsync", "--data-dir", str(data), "--once").returncode == 0
    assert server.get(f"/v2.1/servers/{uid(3)}", TOKEN).status == 404

    # A full resync changes nothing on a store in step, and verify stays clean.
    cp = run("fastpath", "resync", "--data-dir", str(data))
    assert cp.returncode == 0, cp.stderr
    cp = run("fastpath", "verify", "--data-dir", str(data))
    assert cp.returncode == 0 and cp.stdout.splitlines()[-1].endswith(": 0 divergent")
    for c in cells.values():
        c.close()


def test_resync_of_an_unknown_cell_is_refused(tmp_path: Path) -> None:
    cp = run("fastpath", "resync", "--data-dir", str(tmp_path), "--cell", "nope")
    assert cp.returncode == 2 and "no cell 'nope'" in cp.stderr

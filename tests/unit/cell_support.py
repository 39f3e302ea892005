"""Helpers of the cell service tests (test_cell_driver.py, test_cell_service.py): a real SQLite
cell in a temp dir and a service over the simulated driver."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fastpath.cell import SqliteCellDB
from fastpath.cell.driver import HostSpec, SimulatedDriver
from fastpath.cell.service import CellService

HOSTS = [HostSpec("c1", 4, 8192, 100), HostSpec("c2", 8, 16384, 200)]


def cell_db(tmp_path: Path) -> Iterator[SqliteCellDB]:
    d = SqliteCellDB(str(tmp_path / "cell.sqlite"))
    yield d
    d.close()


def make_service(db: SqliteCellDB, hosts: list[HostSpec] | None = None, *, build_delay: float,
                 action_delay: float, **kw: Any) -> CellService:
    """A service of cell ``cell1``; a new one on the same ``db`` is a restarted cell."""
    driver = SimulatedDriver(hosts or HOSTS, ip_pool="192.168.7.0/24", seed=1,
                             build_delay=build_delay, action_delay=action_delay, **kw)
    return CellService(db, driver, "cell1")

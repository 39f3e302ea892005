"""The command path behind the API (issue 7): the forwarder moving 1,000 outbox entries into
two cells' inboxes, and a cell service executing 1,000 creates (BUILD then ACTIVE).

- ``bench_forwarder_1000``: one round = 1,000 entries read in one store read txn, delivered
  with one SQLite transaction per cell (durable: synchronous=FULL), deleted in one durable
  store write txn.  Entries/s = 1,000 / median.
- ``bench_cell_1000_creates``: 1,000 creates accepted in one inbox transaction, then
  ``CellService.step`` until all are ACTIVE (zero simulated delays: the cost is the cell's
  own: two state changes per server, each with its feed entry and action rows).
  Creates/s = 1,000 / median.
- ``bench_cell_stream_1000``: the same 1,000 creates arriving as a stream, 3 per delivery
  (as the forwarder hands them over under load), a step after each, with a simulated build
  of 0.5 s: what a step costs beside the work itself.  Creates/s = 1,000 / median.

The API's goal is >= 2,000 durable creates/s at 2 workers: the forwarder and the cells run
behind it, asynchronously, and must keep up on the same 2 cores.
"""

from __future__ import annotations

import itertools
import time
import uuid as uuidlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from fastpath.cell.db import SqliteCellDB
from fastpath.cell.driver import HostSpec, SimulatedDriver
from fastpath.cell.registry import open_cell
from fastpath.cell.service import CellService
from fastpath.forwarder import Forwarder
from fastpath.store import Store
from fastpath.store.commands import RESIZE_GROW, CommandTxn, run_group

N = 1000
CELLS = ("cell1", "cell2")
FLAVOR = {"id": "1", "name": "m1.tiny", "vcpus": 1, "ram": 512, "disk": 1, "ephemeral": 0,
          "swap": 0, "extra_specs": {}}
_ids = itertools.count()


def _create(cid: str, u: str) -> dict[str, Any]:
    return {"action": "create", "project_id": "p1", "user_id": "u1", "request_id": cid,
            "host": None, "server": {"uuid": u, "project_id": "p1", "user_id": "u1",
                                     "name": "bench", "flavor": FLAVOR, "image_ref": "img"}}


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[tuple[Store, Forwarder]]:
    data = tmp_path / "data"
    for name in CELLS:
        open_cell(str(data), name, create=True).close()
    store = Store.open(data, map_size=1 << 28)
    fwd = Forwarder(store, str(data), batch=N, ring=lambda path: None)
    yield store, fwd
    fwd.close()
    store.close()


def _fill(store: Store) -> None:
    """N creates in the outbox, one group commit (as the API writes them)."""

    def resize(kind: str) -> None:
        if kind == RESIZE_GROW:
            store._grow()
        else:
            store._env.set_mapsize(0)

    def work(i: int) -> Callable[[CommandTxn], int]:
        u, cid = str(uuidlib.uuid4()), f"req-{next(_ids)}"
        return lambda c: c.put_outbox(CELLS[i % 2], u, cid, _create(cid, u))

    run_group(store, [work(i) for i in range(N)], None, resize)


def bench_forwarder_1000(benchmark: Any, rig: tuple[Store, Forwarder]) -> None:
    store, fwd = rig

    def setup() -> tuple[tuple[()], dict[str, Any]]:
        _fill(store)
        return (), {}

    res = benchmark.pedantic(fwd.round, setup=setup, rounds=8, iterations=1)
    assert res.delivered == N and not res.more


@pytest.fixture
def cell(tmp_path: Path) -> Iterator[SqliteCellDB]:
    db = SqliteCellDB(str(tmp_path / "cell.sqlite"))
    yield db
    db.close()


def bench_cell_1000_creates(benchmark: Any, cell: SqliteCellDB) -> None:
    hosts = [HostSpec(f"h{i}", 100_000, 1 << 30, 1 << 30) for i in range(4)]
    svc = CellService(cell, SimulatedDriver(hosts, "10.0.0.0/12"), "bench")

    def setup() -> tuple[tuple[()], dict[str, Any]]:
        cmds = []
        for _ in range(N):
            u, cid = str(uuidlib.uuid4()), f"req-{next(_ids)}"
            cmds.append((cid, _create(cid, u), u))
        cell.accept_commands(cmds)
        return (), {}

    def run() -> int:
        n = 0
        while True:
            done = svc.step(time.time())
            n += done
            if not done:
                return n

    n = benchmark.pedantic(run, setup=setup, rounds=5, iterations=1)
    assert n == 2 * N


def bench_cell_stream_1000(benchmark: Any, cell: SqliteCellDB) -> None:
    hosts = [HostSpec(f"h{i}", 100_000, 1 << 30, 1 << 30) for i in range(4)]
    svc = CellService(cell, SimulatedDriver(hosts, "10.0.0.0/12", build_delay=0.5), "bench")
    clock = [time.time()]

    def run() -> int:
        n = 0
        for _ in range(N // 3 + 1):
            cmds = []
            for _ in range(3):
                u, cid = str(uuidlib.uuid4()), f"req-{next(_ids)}"
                cmds.append((cid, _create(cid, u), u))
            cell.accept_commands(cmds)
            clock[0] += 0.005  # a delivery every 5 ms of simulated time
            n += svc.step(clock[0])
        while svc.next_due() is not None:
            clock[0] += 0.1
            n += svc.step(clock[0])
        return n

    n = benchmark.pedantic(run, rounds=3, iterations=1)
    assert n == 2 * 3 * (N // 3 + 1)

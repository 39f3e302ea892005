"""The forwarder end to end with real processes: ``fastpath forwarder`` + two ``fastpath cell``
+ ``cellsync``; commands enter the outbox through the store's command API
(``fastpath.store.commands.run_group`` + ``CommandTxn.put_outbox``, as the API's group commit
writes them, docs/commands.md) and come back as servers in the store.  The forwarder is
killed with SIGKILL while commands are queued and started again: every command reaches its
cell's inbox exactly once and the outbox ends empty."""

from __future__ import annotations

import sqlite3
import uuid as uuidlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from fastpath.cell.registry import cell_path, open_cell
from fastpath.forwarder import outbox_stats, read_stats
from fastpath.store import Store
from fastpath.store.commands import RESIZE_GROW, CommandTxn, run_group
from tests.integration.test_sync_faults import Proc

CELLS = ("cell1", "cell2")
FLAVOR = {"id": "1", "name": "m1.tiny", "vcpus": 1, "ram": 512, "disk": 1, "ephemeral": 0,
          "swap": 0, "extra_specs": {}}
TIMEOUT = 90.0  # a loaded 2-core machine


def submit(store: Store, commands: Sequence[tuple[str, str | None, str, dict[str, Any]]]) -> None:
    """One group commit of (cell, server, command id, payload) outbox entries."""

    def resize(kind: str) -> None:  # no transaction of this process is open here
        if kind == RESIZE_GROW:
            store._grow()
        else:
            store._env.set_mapsize(0)

    def work(cell: str, server: str | None, cid: str,
             payload: dict[str, Any]) -> Callable[[CommandTxn], int]:
        return lambda c: c.put_outbox(cell, server, cid, payload)

    res = run_group(store, [work(*c) for c in commands], None, resize)
    assert all(ok for ok, _ in res.outcomes), res.outcomes


def payload(cid: str, action: str, **extra: Any) -> dict[str, Any]:
    return {"action": action, "project_id": "p1", "user_id": "u1", "request_id": cid, **extra}


@pytest.fixture()
def procs() -> Iterator[list[Proc]]:
    started: list[Proc] = []
    yield started
    for p in reversed(started):
        if p.running():
            p.terminate()


def test_outbox_to_cells_to_store_exactly_once_across_a_forwarder_kill(
        tmp_path: Path, procs: list[Proc], wait_until: Callable[..., Any]) -> None:
    data = tmp_path / "data"
    for name in CELLS:
        open_cell(str(data), name, create=True).close()
    fast = ("--set", "cell.build_delay=0.05", "--set", "cell.action_delay=0.05",
            "--set", "cell.poll_interval=0.2")
    for name in CELLS:
        procs.append(Proc(f"cell-{name}", ("fastpath", "cell", "--name", name, "--data-dir",
                                           str(data), *fast), tmp_path))
    procs.append(Proc("cellsync", ("cellsync", "--data-dir", str(data), "--interval", "0.05"),
                      tmp_path))
    fwd = Proc("forwarder", ("fastpath", "forwarder", "--data-dir", str(data),
                             "--set", "forwarder.poll_interval=0.2"), tmp_path)
    procs.append(fwd)

    store = Store.open(data, map_size=1 << 26)
    try:
        servers = {str(uuidlib.UUID(int=i + 1, version=4)): CELLS[i % 2] for i in range(16)}
        sent: dict[str, list[str]] = {name: [] for name in CELLS}

        def command(u: str, action: str, **extra: Any) -> tuple[str, str, str, dict[str, Any]]:
            cid = f"req-{uuidlib.uuid4()}"
            sent[servers[u]].append(cid)
            return servers[u], u, cid, payload(cid, action, **extra)

        uuids = list(servers)
        submit(store, [command(u, "create", host=None, server={
            "uuid": u, "project_id": "p1", "user_id": "u1", "name": f"vm-{i}", "flavor": FLAVOR,
            "image_ref": "img-1", "metadata": {"i": str(i)}}) for i, u in enumerate(uuids)])
        # Commands queued behind each create, in order per server (reboot, then stop).
        submit(store, [command(u, "reboot", type="SOFT") for u in uuids])
        evens = uuids[::2]
        submit(store, [command(u, "stop") for u in evens])

        def settled() -> bool:
            with store.read() as r:
                depth, _ = outbox_stats(r)
                recs = {u: r.get_server(u) for u in uuids}
            if depth or any(rec is None for rec in recs.values()):
                return False
            want = {u: ("stopped" if u in evens else "active") for u in uuids}
            return all((rec["vm_state"], rec["task_state"]) == (want[u], None)
                       for u, rec in recs.items() if rec is not None)

        wait_until(settled, TIMEOUT, lambda: f"the servers to settle; {fwd.stderr()[-2000:]}")

        # The forwarder dies (SIGKILL); commands keep coming and wait in the outbox.
        fwd.kill9()
        doomed = uuids[:5]
        submit(store, [command(u, "delete") for u in doomed])
        with store.read() as r:
            depth, oldest = outbox_stats(r)
        assert depth == 5 and oldest is not None
        fwd2 = Proc("forwarder-2", ("fastpath", "forwarder", "--data-dir", str(data),
                                    "--set", "forwarder.poll_interval=0.2"), tmp_path)
        procs.append(fwd2)

        def deleted() -> bool:
            with store.read() as r:
                if outbox_stats(r)[0]:
                    return False
                return all(r.get_server(u) is None and r.tombstone(u) is not None
                           for u in doomed)

        wait_until(deleted, TIMEOUT, lambda: f"the deletes; {fwd2.stderr()[-2000:]}")
    finally:
        store.close()

    # Every command reached its cell exactly once, in order, and was finished once.
    for name in CELLS:
        conn = sqlite3.connect(cell_path(str(data), name))
        try:
            rows = conn.execute("SELECT command_id, state FROM inbox ORDER BY received_at"
                                ).fetchall()
        finally:
            conn.close()
        assert [cid for cid, _ in rows] == sent[name]
        assert {state for _, state in rows} == {"done"}
    stats = read_stats(str(data))
    assert stats is not None and sum(c["delivered_total"] for c in stats["cells"].values()) > 0
    assert all(p.running() for p in procs if p is not fwd)
    for p in reversed(procs):
        if p.running():
            assert p.terminate() == 0, p.stderr()
    cp = Proc("verify", ("fastpath", "verify", "--data-dir", str(data)), tmp_path)
    assert cp.wait(120) == 0, cp.stdout() + cp.stderr()
    assert cp.stdout().splitlines()[-1] == "checked 16 servers in 2 cells: 0 divergent"


def test_forwarder_killed_repeatedly_while_commands_flow(
        tmp_path: Path, procs: list[Proc], wait_until: Callable[..., Any]) -> None:
    """SIGKILL storm: the forwarder dies every few groups (at seeded random moments, often
    mid-round) and is started again; no command is lost, none runs twice, and each server's
    commands reach its inbox in the order they were accepted."""
    import os
    import random
    import time

    seed = int(os.environ.get("FASTPATH_FAULT_SEED", random.randrange(1 << 31)))
    print(f"seed {seed}")
    rng = random.Random(seed)
    data = tmp_path / "data"
    for name in CELLS:
        open_cell(str(data), name, create=True).close()
    for name in CELLS:
        procs.append(Proc(f"cell-{name}", (
            "fastpath", "cell", "--name", name, "--data-dir", str(data),
            "--set", "cell.build_delay=0", "--set", "cell.action_delay=0"), tmp_path))

    def forwarder(n: int) -> Proc:
        p = Proc(f"forwarder-{n}", ("fastpath", "forwarder", "--data-dir", str(data),
                                    "--set", "forwarder.poll_interval=0.05",
                                    "--set", "forwarder.batch=7"), tmp_path)
        procs.append(p)
        return p

    store = Store.open(data, map_size=1 << 26)
    sent: dict[str, list[str]] = {name: [] for name in CELLS}
    by_server: dict[str, list[str]] = {}
    kills = 0
    try:
        fwd = forwarder(0)
        serial = 0
        for g in range(30):
            cmds = []
            for _ in range(rng.randint(1, 12)):
                serial += 1
                u = str(uuidlib.UUID(int=serial, version=4))
                cell = CELLS[serial % 2]
                for action in ("create", "reboot", "stop"):
                    cid = f"req-{uuidlib.uuid4()}"
                    extra: dict[str, Any] = {"server": {
                        "uuid": u, "project_id": "p1", "user_id": "u1", "name": f"vm-{serial}",
                        "flavor": FLAVOR}} if action == "create" else {}
                    cmds.append((cell, u, cid, payload(cid, action, **extra)))
                    sent[cell].append(cid)
                    by_server.setdefault(u, []).append(cid)
            submit(store, cmds)
            if g % 3 == 2:
                time.sleep(rng.uniform(0, 0.3))  # the fault injection, not a synchronisation
                fwd.kill9()
                kills += 1
                fwd = forwarder(kills)

        def drained() -> bool:
            with store.read() as r:
                return outbox_stats(r)[0] == 0

        wait_until(drained, TIMEOUT, lambda: f"the outbox to drain; {fwd.stderr()[-2000:]}")
        total = sum(map(len, sent.values()))

        def all_done() -> bool:
            n = 0
            for name in CELLS:
                conn = sqlite3.connect(cell_path(str(data), name))
                try:
                    n += conn.execute("SELECT COUNT(*) FROM inbox WHERE state != 'new'"
                                      ).fetchone()[0]
                finally:
                    conn.close()
            return n == total

        wait_until(all_done, TIMEOUT, "every command to be finished by its cell")
    finally:
        store.close()
    print(f"{kills} kills, {sum(map(len, sent.values()))} commands")
    for name in CELLS:
        conn = sqlite3.connect(cell_path(str(data), name))
        try:
            rows = conn.execute("SELECT command_id, instance_uuid, state FROM inbox"
                                " ORDER BY received_at").fetchall()
            actions = conn.execute("SELECT request_id, COUNT(*) FROM instance_actions"
                                   " GROUP BY request_id").fetchall()
        finally:
            conn.close()
        assert sorted(c for c, _, _ in rows) == sorted(sent[name])  # none lost
        for u in {u for _, u, _ in rows}:  # in order per server
            assert [c for c, su, _ in rows if su == u] == by_server[u]
        assert {s for _, _, s in rows} == {"done"}
        assert len(actions) == len(rows) and all(n == 1 for _, n in actions)  # ran once
    assert kills == 10


def test_metrics_show_a_queue_for_a_missing_cell(
        tmp_path: Path, procs: list[Proc], fastpath_server: Callable[..., Any],
        wait_until: Callable[..., Any]) -> None:
    """``/metrics`` of a real server: the outbox depth and age (one store read per scrape,
    which the workers' budget counters do not see) and the forwarder's per-cell counters
    while a cell that does not exist yet keeps its commands queued."""
    data = tmp_path / "data"
    open_cell(str(data), "cell1", create=True).close()
    server = fastpath_server(data_dir=data, sidecars=False)
    store = Store.open(data, map_size=1 << 26)
    try:
        submit(store, [("cell1", str(uuidlib.uuid4()), f"req-a{i}", payload(f"req-a{i}", "lock"))
                       for i in range(3)] +
               [("ghost", str(uuidlib.uuid4()), f"req-g{i}", payload(f"req-g{i}", "lock"))
                for i in range(2)])
    finally:
        store.close()
    m = server.metrics()
    assert m["fastpath_outbox_depth"] == 5 and m["fastpath_outbox_oldest_age_seconds"] >= 0
    reads = m["fastpath_store_read_txn_total"]
    assert server.metrics()["fastpath_store_read_txn_total"] == reads  # scrapes uncounted
    procs.append(Proc("forwarder", ("fastpath", "forwarder", "--data-dir", str(data),
                                    "--set", "forwarder.retry_initial=5"), tmp_path))

    def delivered() -> dict[str, float] | None:
        m = server.metrics()
        ok = (m.get("fastpath_outbox_depth") == 2
              and m.get('fastpath_forwarder_delivered_total{cell="cell1"}') == 3
              and m.get('fastpath_forwarder_failures_total{cell="ghost"}', 0) >= 1)
        return m if ok else None

    m = wait_until(delivered, TIMEOUT, "cell1 delivered, ghost queued with a failure")
    assert m['fastpath_forwarder_delivered_total{cell="ghost"}'] == 0

"""cellsync's whole pipeline in process (issue 6: >= 50,000 changes/s applied, durable).

A real SQLite cell of ``N_SERVERS`` servers shaped like Nova's samples (network, volumes,
metadata, tags, flavor snapshot, image properties, hosts) and a real LMDB store; every round
commits ``BATCH`` state changes in the cell (one server each: reboot started / finished,
through ``CellDB.update_instance`` in one cell transaction, not timed), then
``CellSync.sync_once`` brings them up in one durable store write transaction (timed).

Two ways to run it:

- ``pytest benchmarks/bench_sync.py --benchmark-only``: ``sync_once`` and each of its
  stages apart on the same kind of batch, medians side by side: the cell read
  (``read_feed`` + ``load_instances``), the projection, the rendering, ``Store.apply``
  without rendering (LMDB), and ``Store.apply`` with it.  changes/s = BATCH / median.
- ``python benchmarks/bench_sync.py [--servers N] [--batch B] [--rounds R] [--default-gc]``:
  ``sync_once`` rounds, un-instrumented (the headline) and instrumented (the breakdown of the
  very same rounds' time by stage), medians per round; a table and
  ``benchmarks/results/sync.json``.  The GC is set as cellsync's daemon sets it
  (``cellsync.sync.tune_gc``) unless ``--default-gc``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import cellsync.sync as sync_mod
from cellsync.projection import project_change
from cellsync.sync import CellSync, tune_gc
from fastpath.api import views
from fastpath.cell import SqliteCellDB
from fastpath.store import Batch, Store

N_SERVERS = 10_000
BATCH = 1000
CELL = "cell1"
HOSTS = 16
EPOCH_2024 = 1_704_067_200_000_000


def uid(i: int) -> str:
    return f"{i:08x}-5eed-4000-8000-{i:012x}"


def server_values(i: int) -> dict[str, Any]:
    """One server as the cell stores it (about what samples.sample_record holds)."""
    rnd = random.Random(i)
    h = i % HOSTS
    return {
        "uuid": uid(i), "project_id": f"project-{i % 50:04d}", "user_id": "bench-user",
        "name": f"server-{i}", "hostname": f"server-{i}", "vm_state": "active",
        "power_state": 1, "created_at": EPOCH_2024 + i * 1_000_003,
        "launched_at": EPOCH_2024 + i * 1_000_003 + 5_000_000,
        "host": f"compute-{h:02d}", "node": f"compute-{h:02d}.example.com",
        "instance_name": f"instance-{i:08x}", "availability_zone": "nova",
        "image_ref": "70a599e0-31e7-49b7-b260-868f441e862b", "key_name": "default-key",
        "disk_config": "AUTO", "reservation_id": f"r-{i:08x}", "root_device_name": "/dev/vda",
        "flavor": {"id": str(1 + i % 3), "name": f"m1.size{i % 3}", "vcpus": 1 + i % 3,
                   "ram": 2048, "disk": 20, "ephemeral": 0, "swap": 0,
                   "extra_specs": {"hw:cpu_policy": "shared"}},
        "image_properties": {"architecture": "x86_64", "auto_disk_config": "True"},
        "metadata": {"role": "web", "owner": f"team-{i % 7}"},
        "tags": ["web", "prod"], "security_groups": ["default"],
        "network": [{"mac": f"fa:16:3e:{i >> 16 & 255:02x}:{i >> 8 & 255:02x}:{i & 255:02x}",
                     "network": "private",
                     "ips": [{"addr": f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}", "version": 4},
                             {"addr": f"fd00::{i:x}", "version": 6}]}],
        "volumes": [{"id": str(rnd.getrandbits(64)), "delete_on_termination": False}],
    }


class SyncRig:
    """A cell with servers, a store holding them, and a stream of state changes."""

    def __init__(self, root: Path, servers: int, batch: int) -> None:
        self.db = SqliteCellDB(str(root / "cell1.sqlite"))
        for h in range(HOSTS):
            self.db.upsert_host(f"compute-{h:02d}", f"compute-{h:02d}.example.com", 64,
                                262144, 4000, "nova")
        with self.db.transaction():
            for i in range(servers):
                self.db.create_instance(server_values(i))
        self.store = Store.open(root / "store", map_size=1 << 31)
        self.sync = CellSync(self.store, {CELL: self.db}, batch=batch, txn_budget=3600.0)
        self.sync.run_until_idle()
        self.servers, self.batch = servers, batch
        self.next = 0
        self.flip = False

    def close(self) -> None:
        self.store.close()
        self.db.close()

    def commit_changes(self) -> list[str]:
        """``batch`` state changes (distinct servers, round robin), one cell transaction."""
        self.flip = not self.flip
        task = "rebooting" if self.flip else None
        uuids = []
        with self.db.transaction():
            for _ in range(self.batch):
                u = uid(self.next)
                self.next = (self.next + 1) % self.servers
                self.db.update_instance(u, task_state=task)
                uuids.append(u)
        return uuids


@pytest.fixture(scope="module")
def bench() -> Iterator[SyncRig]:
    with tempfile.TemporaryDirectory(prefix="bench-sync-") as d:
        b = SyncRig(Path(d), N_SERVERS, BATCH)
        yield b
        b.close()


def _round(bench: SyncRig) -> tuple[tuple[str], dict[str, Any]]:
    bench.commit_changes()
    return (CELL,), {}


def bench_sync_once(benchmark: Any, bench: SyncRig) -> None:
    """The whole pipeline: BATCH changes from the cell into the store, one durable txn."""
    res = benchmark.pedantic(bench.sync.sync_once, setup=lambda: _round(bench), rounds=10)
    assert res.servers == BATCH and res.applied == BATCH


def _loaded(bench: SyncRig) -> tuple[tuple[Any, ...], dict[str, Any]]:
    uuids = bench.commit_changes()
    return (uuids,), {}


def bench_stage_cell_read(benchmark: Any, bench: SyncRig) -> None:
    """read_feed + load_instances of BATCH servers (what sync_once reads from the cell)."""
    cursor = bench.sync.cursor(CELL)

    def read(uuids: list[str]) -> dict[str, Any]:
        bench.db.read_feed(cursor, BATCH + 1)
        return bench.db.load_instances(uuids)

    got = benchmark.pedantic(read, setup=lambda: _loaded(bench), rounds=10)
    assert len(got) == BATCH
    bench.sync.run_until_idle()


def bench_stage_project(benchmark: Any, bench: SyncRig) -> None:
    rows = list(bench.db.load_instances(bench.commit_changes()).values())
    out = benchmark(lambda: [project_change(r, CELL) for r in rows])
    assert len(out) == BATCH
    bench.sync.run_until_idle()


def bench_stage_render(benchmark: Any, bench: SyncRig) -> None:
    rows = list(bench.db.load_instances(bench.commit_changes()).values())
    recs = [project_change(r, CELL).record for r in rows]
    out = benchmark(lambda: [views.render_server(r) for r in recs if r is not None])
    assert len(out) == BATCH
    bench.sync.run_until_idle()


def _projected(bench: SyncRig) -> tuple[tuple[Any, ...], dict[str, Any]]:
    rows = bench.db.load_instances(bench.commit_changes())
    changes = [project_change(r, CELL) for r in rows.values()]
    return (Batch(changes),), {}


@pytest.mark.parametrize("render", [False, True], ids=["lmdb", "lmdb+render"])
def bench_stage_apply(benchmark: Any, bench: SyncRig, render: bool) -> None:
    """Store.apply of BATCH projected changes, durable; with or without rendering."""
    fn = views.render_server if render else None
    res = benchmark.pedantic(lambda b: bench.store.apply(b, render=fn),
                             setup=lambda: _projected(bench), rounds=10)
    assert res.applied == BATCH
    bench.sync.run_until_idle()  # the cursor catches up (its applies are stale, skipped)


# -- script: headline and breakdown in one run ----------------------------------------------
class _Timer:
    """Accumulates the wall time of calls to wrapped functions, per stage."""

    def __init__(self) -> None:
        self.t: dict[str, float] = {}

    def wrap(self, stage: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        clock = time.perf_counter
        t = self.t

        def timed(*a: Any, **kw: Any) -> Any:
            t0 = clock()
            try:
                return fn(*a, **kw)
            finally:
                t[stage] = t.get(stage, 0.0) + clock() - t0

        return timed


class _TimedStore:
    def __init__(self, store: Store, timer: _Timer) -> None:
        self._store = store
        self.apply = timer.wrap("apply", store.apply)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)


def run(servers: int, batch: int, rounds: int, daemon_gc: bool = True) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-sync-") as d:
        t0 = time.perf_counter()
        b = SyncRig(Path(d), servers, batch)
        setup_s = time.perf_counter() - t0
        if daemon_gc:
            tune_gc()  # as cellsync's daemon does after its start-up
        try:
            plain: list[float] = []
            for _ in range(rounds):
                b.commit_changes()
                t0 = time.perf_counter()
                res = b.sync.sync_once(CELL)
                plain.append(time.perf_counter() - t0)
                assert res.applied == batch, res
            # The same rounds, each stage timed (wrappers cost ~0.5 us per call).
            timer = _Timer()
            db = b.db
            saved = (sync_mod.project_change, sync_mod.render_server, sync_mod.prepare_upsert)
            db.read_feed = timer.wrap("cell read", db.read_feed)  # type: ignore[method-assign]
            db.load_instances = timer.wrap("cell read", db.load_instances)  # type: ignore[method-assign]
            sync_mod.project_change = timer.wrap("projection", sync_mod.project_change)  # type: ignore[assignment]
            sync_mod.render_server = timer.wrap("render", sync_mod.render_server)  # type: ignore[assignment]
            sync_mod.prepare_upsert = timer.wrap("pack", sync_mod.prepare_upsert)  # type: ignore[assignment]
            b.sync.store = _TimedStore(b.store, timer)  # type: ignore[assignment]
            stages: dict[str, list[float]] = {}
            total: list[float] = []
            try:
                for _ in range(rounds):
                    b.commit_changes()
                    timer.t.clear()
                    t0 = time.perf_counter()
                    res = b.sync.sync_once(CELL)
                    took = time.perf_counter() - t0
                    assert res.applied == batch, res
                    t = dict(timer.t)
                    # prepare_upsert renders (in project_servers, before the transaction);
                    # the store renders again only for servers with pending commands.
                    t["pack (record, index entry)"] = t.pop("pack") - t.get("render", 0.0)
                    t["LMDB apply (puts and commit)"] = t.pop("apply")
                    t["other"] = took - sum(t.values())
                    total.append(took)
                    for k, v in t.items():
                        stages.setdefault(k, []).append(v)
            finally:
                sync_mod.project_change, sync_mod.render_server, sync_mod.prepare_upsert = saved
                b.sync.store = b.store
        finally:
            b.close()
    med = statistics.median(plain)
    return {
        "servers": servers, "batch": batch, "rounds": rounds, "setup_s": round(setup_s, 2),
        "gc": "daemon (cellsync.sync.tune_gc)" if daemon_gc else "Python's default",
        "sync_once_median_ms": round(med * 1e3, 2),
        "changes_per_s": round(batch / med),
        "instrumented_median_ms": round(statistics.median(total) * 1e3, 2),
        "stages_median_ms": {k: round(statistics.median(v) * 1e3, 2) for k, v in stages.items()},
        "stages_us_per_change": {k: round(statistics.median(v) / batch * 1e6, 1)
                                 for k, v in stages.items()},
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                    "kernel": platform.release(), "loadavg_1m_at_end": os.getloadavg()[0]},
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


# -- script: the daemon's rounds over two cells, in process or with the projector --------------
def drain(servers: int, backlog: int, repeats: int, workers: int) -> dict[str, Any]:
    """Two cells of ``servers // 2`` servers; ``repeats`` times: ``backlog`` changes committed
    in each cell, then ``CellSync.sync_round`` until idle with the daemon's defaults (batch
    500, txn budget 20 ms, tune_gc), once in process and once with the projector's
    ``workers`` (cellsync.workers), alternately.  changes/s = 2 * backlog / time to drain."""
    with tempfile.TemporaryDirectory(prefix="bench-drain-") as d:
        root = Path(d)
        dbs = {c: SqliteCellDB(str(root / f"{c}.sqlite")) for c in ("cell1", "cell2")}
        per = {c: [uid(i) for i in range(k, servers, 2)] for k, c in enumerate(dbs)}
        for k, db in enumerate(dbs.values()):
            for h in range(HOSTS):
                db.upsert_host(f"compute-{h:02d}", f"compute-{h:02d}.example.com", 64,
                               262144, 4000, "nova")
            with db.transaction():
                for i in range(k, servers, 2):
                    db.create_instance(server_values(i))
        store = Store.open(root / "store", map_size=1 << 31)
        plain = CellSync(store, dbs)
        piped = CellSync(store, dbs)
        piped.start_projector(workers)
        plain.run_until_idle()
        tune_gc()
        took: dict[str, list[float]] = {"in process": [], f"projector ({workers} workers)": []}
        nxt, flip = 0, False
        try:
            for _ in range(repeats):
                for mode, sync in zip(took, (plain, piped), strict=True):
                    flip = not flip
                    for c, db in dbs.items():
                        with db.transaction():
                            for j in range(backlog):
                                db.update_instance(per[c][(nxt + j) % len(per[c])],
                                                   task_state="rebooting" if flip else None)
                    nxt += backlog
                    t0 = time.perf_counter()
                    while sync.sync_round():
                        pass
                    took[mode].append(time.perf_counter() - t0)
                    with store.read() as r:
                        assert all(r.cursor(c) == db.max_seq() for c, db in dbs.items())
        finally:
            piped.close()
            store.close()
            for db in dbs.values():
                db.close()
    return {"servers": servers, "backlog_per_cell": backlog, "repeats": repeats,
            "changes_per_s": {m: round(2 * backlog / statistics.median(t)) for m, t in took.items()},
            "drain_s_median": {m: round(statistics.median(t), 3) for m, t in took.items()},
            "loadavg_1m_at_end": os.getloadavg()[0],
            "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--servers", type=int, default=N_SERVERS)
    ap.add_argument("--batch", type=int, default=BATCH)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--default-gc", action="store_true",
                    help="keep Python's GC settings (default: the daemon's, tune_gc)")
    ap.add_argument("--json", default=str(Path(__file__).parent / "results" / "sync.json"))
    ap.add_argument("--drain", type=int, default=0, metavar="BACKLOG",
                    help="instead: two cells, BACKLOG changes each, drained by sync_round in "
                         "process and with the projector (--workers), alternately (--rounds)")
    ap.add_argument("--workers", type=int, default=2)
    a = ap.parse_args(argv)
    if a.drain:
        r = drain(a.servers, a.drain, a.rounds, a.workers)
        print(f"cellsync sync_round over 2 cells ({a.servers} servers), {a.drain:,} changes "
              f"per cell drained, median of {a.rounds} (load average {r['loadavg_1m_at_end']:.2f}):")
        for m, v in r["changes_per_s"].items():
            print(f"  {m:24s} {v:8,} changes/s ({r['drain_s_median'][m]} s)")
        path = Path(a.json).with_name("sync_drain.json")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(r, indent=2) + "\n")
        print(f"saved {path}")
        return 0
    r = run(a.servers, a.batch, a.rounds, daemon_gc=not a.default_gc)
    print(f"cellsync sync_once: {a.servers} servers in the cell, {a.batch} state changes per "
          f"round (distinct servers), {a.rounds} rounds, durable LMDB commit, GC {r['gc']}")
    print(f"  median {r['sync_once_median_ms']} ms per round -> {r['changes_per_s']:,} changes/s"
          f" (load average {r['machine']['loadavg_1m_at_end']:.2f})")
    print(f"  instrumented median {r['instrumented_median_ms']} ms; by stage (median per round):")
    for k, ms in r["stages_median_ms"].items():
        print(f"    {k:28s} {ms:8.2f} ms  {r['stages_us_per_change'][k]:6.1f} us/change")
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(r, indent=2) + "\n")
    print(f"saved {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

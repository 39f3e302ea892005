"""How fast cellsync recovers from faults, with real processes (issue 6; research notes P10:
"measure convergence time vs. instance count").

    python benchmarks/recovery.py [--servers 1000,10000] [--backlog 20000] [--out FILE]

For each server count N (two cells, N/2 each, seeded by ``fastpath seed`` into a scratch
data dir and copied into a fresh one, so the API store starts empty):

``cold``      ``cellsync --once`` on an empty store: the first sync of N servers (wall time
              of the process, start-up included).
``verify``    ``fastpath verify`` of N servers (wall time).
``gap``       each cell commits one change and prunes its feed past cellsync's cursor; then
              ``cellsync --once`` must resync both cells in full (anti-entropy of N servers).
``catch-up``  the ``cellsync`` daemon is killed with SIGKILL, the cells commit ``--backlog``
              changes (updates of random servers, 100 per cell transaction), the daemon is
              started again: time from its start until its cursors reach the feed heads, and
              the part of it spent starting (until its "syncing" log line).
``kill-mid``  the same with a second backlog, but the daemon is killed again once half of it
              is applied: the cursor it reached is kept (no work lost: the restarted one goes
              on from there), and the time to finish after the restart.

Every phase ends with ``fastpath verify`` clean (checked, not timed).  A table is printed and
the figures go to ``benchmarks/results/recovery.json``.  Timing goals are read from here,
never asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CELLS = ("cell1", "cell2")


def run(*argv: str, timeout: float = 3600) -> tuple[float, str]:
    t0 = time.perf_counter()
    cp = subprocess.run([sys.executable, "-m", *argv], capture_output=True, text=True,
                        timeout=timeout, stdin=subprocess.DEVNULL, cwd=ROOT)
    took = time.perf_counter() - t0
    if cp.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({cp.returncode}):\n{cp.stdout}\n{cp.stderr}")
    return took, cp.stdout


def cell_file(data: Path, name: str) -> str:
    return str(data / "cells" / f"{name}.sqlite")


def feed_heads(data: Path) -> dict[str, int]:
    from fastpath.cell.db import SqliteCellDB

    out = {}
    for c in CELLS:
        db = SqliteCellDB(cell_file(data, c))
        try:
            out[c] = db.max_seq()
        finally:
            db.close()
    return out


def cursors(data: Path) -> dict[str, int]:
    from fastpath.api.context import open_store
    from fastpath.settings import load

    store = open_store(load(None, {"data_dir": str(data)}))
    try:
        with store.read() as r:
            return {c: r.cursor(c) or 0 for c in CELLS}
    finally:
        store.close()


def verify_clean(data: Path, servers: int) -> None:
    _, out = run("fastpath", "verify", "--data-dir", str(data))
    last = out.splitlines()[-1]
    if last != f"checked {servers} servers in {len(CELLS)} cells: 0 divergent":
        raise SystemExit(f"verify: {last}")


def backlog(data: Path, n: int, rng: random.Random) -> None:
    """``n`` changes into the cells: name updates of random servers, 100 per transaction."""
    from fastpath.cell.db import SqliteCellDB

    dbs = [SqliteCellDB(cell_file(data, c)) for c in CELLS]
    try:
        uuids = [[u for u, _, kind in db.all_instance_versions() if kind == "upsert"]
                 for db in dbs]
        done = 0
        while done < n:
            i = done // 100 % len(dbs)
            with dbs[i].transaction():
                for u in rng.sample(uuids[i], min(100, n - done, len(uuids[i]))):
                    dbs[i].update_instance(u, name=f"r{rng.getrandbits(24):06x}")
                    done += 1
    finally:
        for db in dbs:
            db.close()


class Daemon:
    def __init__(self, data: Path, log: Path) -> None:
        self.log = log
        self.t0 = time.perf_counter()
        with open(log, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "cellsync", "--data-dir", str(data), "--interval", "0.01"],
                stdout=subprocess.DEVNULL, stderr=err, stdin=subprocess.DEVNULL, cwd=ROOT,
                start_new_session=True)

    def started(self) -> float:
        """Seconds from spawn to the daemon's "syncing" log line."""
        while "syncing" not in self.log.read_text(errors="replace"):
            if self.proc.poll() is not None:
                raise SystemExit(f"cellsync exited:\n{self.log.read_text()}")
            time.sleep(0.005)
        return time.perf_counter() - self.t0

    def kill9(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)


def until_caught_up(data: Path, timeout: float = 3600) -> float:
    t0 = time.perf_counter()
    heads = feed_heads(data)
    while cursors(data) != heads:
        if time.perf_counter() - t0 > timeout:
            raise SystemExit("cellsync did not catch up")
        time.sleep(0.01)
    return time.perf_counter()


def one_size(n: int, backlog_n: int, seed_dir: Path, work: Path, rng: random.Random) -> dict[str, Any]:
    scratch = seed_dir / f"seed-{n}"
    took, _ = run("fastpath", "seed", "--data-dir", str(scratch), "--servers", str(n),
                  "--set", f"standalone.cells={','.join(CELLS)}")
    data = work / f"data-{n}"
    (data / "cells").mkdir(parents=True)
    for c in CELLS:  # an online copy of each cell (WAL included); the store stays behind
        src, dst = sqlite3.connect(cell_file(scratch, c)), sqlite3.connect(cell_file(data, c))
        try:
            src.backup(dst)
        finally:
            dst.close()
            src.close()
    shutil.rmtree(scratch)
    res: dict[str, Any] = {"servers": n, "seed_seconds": round(took, 3)}

    res["cold_seconds"], _ = run("cellsync", "--data-dir", str(data), "--once")
    verify_t, _ = run("fastpath", "verify", "--data-dir", str(data))
    res["verify_seconds"] = verify_t

    backlog(data, 2 * len(CELLS) * 50, rng)  # a few changes, then the feed pruned past them
    from fastpath.cell.db import SqliteCellDB

    for c in CELLS:
        db = SqliteCellDB(cell_file(data, c))
        try:
            db.prune_changes(db.max_seq())
        finally:
            db.close()
    res["gap_resync_seconds"], _ = run("cellsync", "--data-dir", str(data), "--once")
    verify_clean(data, n)

    d = Daemon(data, work / f"cellsync-{n}-a.err")
    d.started()
    d.kill9()
    backlog(data, backlog_n, rng)
    d = Daemon(data, work / f"cellsync-{n}-b.err")
    startup = d.started()
    done = until_caught_up(data)
    res["catchup_changes"] = backlog_n
    res["catchup_seconds"] = done - d.t0
    res["catchup_startup_seconds"] = startup
    d.kill9()
    verify_clean(data, n)

    backlog(data, backlog_n, rng)
    heads = feed_heads(data)
    before = cursors(data)
    half = {c: before[c] + (heads[c] - before[c]) // 2 for c in CELLS}
    d = Daemon(data, work / f"cellsync-{n}-c.err")
    d.started()
    while True:
        cur = cursors(data)
        if sum(cur.values()) >= sum(half.values()):
            break
        time.sleep(0.002)
    d.kill9()
    at_kill = cursors(data)
    d = Daemon(data, work / f"cellsync-{n}-d.err")
    done = until_caught_up(data)
    res["kill_mid_cursor_kept"] = all(cursors(data)[c] >= at_kill[c] for c in CELLS)
    res["kill_mid_applied_before_kill"] = sum(at_kill[c] - before[c] for c in CELLS)
    res["kill_mid_finish_seconds"] = done - d.t0
    d.kill9()
    verify_clean(data, n)
    for k, v in list(res.items()):
        if isinstance(v, float):
            res[k] = round(v, 3)
    return res


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--servers", default="1000,10000", help="comma-separated server counts")
    p.add_argument("--backlog", type=int, default=20000, help="changes in each backlog")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "recovery.json"))
    args = p.parse_args()
    rng = random.Random(args.seed)
    rows = []
    with tempfile.TemporaryDirectory(prefix="fastpath-recovery-") as tmp:
        work = Path(tmp)
        for n in (int(x) for x in args.servers.split(",")):
            row = one_size(n, args.backlog, work, work, rng)
            rows.append(row)
            print(json.dumps(row), flush=True)
    head = ("servers", "cold s", "verify s", "gap resync s", "catch-up s (start)",
            "changes/s", "kill-mid finish s")
    print(" | ".join(head))
    for r in rows:
        rate = r["catchup_changes"] / max(r["catchup_seconds"] - r["catchup_startup_seconds"], 1e-9)
        print(" | ".join(str(x) for x in (
            r["servers"], r["cold_seconds"], r["verify_seconds"], r["gap_resync_seconds"],
            f"{r['catchup_seconds']} ({r['catchup_startup_seconds']})", f"{rate:,.0f}",
            r["kill_mid_finish_seconds"])))
    doc = {"machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                       "platform": platform.platform()},
           "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "args": vars(args),
           "results": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

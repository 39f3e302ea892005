"""End-to-end sync lag with real processes (issue 6): a change committed in a cell, until
``GET /v2.1/servers/{id}`` shows it.  Goal: p99 under 50 ms while the cells take 10,000
changes/s.

    python benchmarks/lag.py [--servers N] [--samples S] [--rate R [R ...]]
                             [--mode serve|separate] [--set NAME=VALUE ...]

What runs (temp data dir, a free port, everything stopped by PID at the end):

- ``--mode serve`` (default): ``fastpath serve`` with its sidecars: the master runs the two
  local cells (``fastpath cell``) and ``cellsync`` as children (standalone.cells=cell1,cell2).
- ``--mode separate``: ``fastpath serve`` without sidecars, plus a ``cellsync`` process.

The cell databases (``DATA_DIR/cells/cell1.sqlite``, ``cell2.sqlite``) are created and
seeded by this script before the processes start (``--servers`` servers, half per cell);
it then waits until the API shows every seeded server.  The changes are written straight
into the cells' SQLite files through ``SqliteCellDB`` (what a cell's compute side does),
and, as a cell does after each commit, the script rings cellsync's bell.

A sample: rename one probe server (``update_instance(name=...)``, one cell transaction,
durable), take t0 when the commit returns, ring the bell, then GET the server on a
keep-alive connection until the new name is in the body: t1.  lag = t1 - t0 (a GET
every ~0.7 ms: 0.5 ms pause + the round trip; that is the resolution; ``--poll-ms``
changes the pause: at 10,000 changes/s the probe's GETs take ~11 % of the 2 cores with
the default, which the processes measured then lack).  Probe servers alternate between the
cells; a random pause of 10-30 ms separates samples.

Phases: ``idle`` (only the probe writes), then one ``load R/s`` phase per ``--rate`` value:
one writer process per cell commits state changes (task_state flips on the non-probe
servers, round robin) at R changes/s in total, in transactions of ``--txn`` changes, each
followed by a ring; after it, cellsync is given ``--drain`` seconds to catch up.  A phase
samples for ``--budget`` seconds at most (behind a growing backlog each sample waits long).  The table shows p50/p90/p99/max per phase, the rate the writers reached, and
cellsync's own view of its lag at the end (``DATA_DIR/run/cellsync.json``); the JSON goes
to ``benchmarks/results/lag.json``.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_sync import server_values, uid  # noqa: E402

from fastpath import wake  # noqa: E402
from fastpath.cell.registry import open_cell  # noqa: E402

CELLS = ("cell1", "cell2")
PROBES_PER_CELL = 20
TOKEN = {"X-Auth-Token": "admin:admin"}  # noauth2: user admin has the admin role
START_TIMEOUT = 60.0
# Between two polling GETs: the resolution of a sample, and what keeps the probe from
# taking a core away from the processes it measures (2 cores here).
POLL_PAUSE = 0.0005


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(pred: Any, timeout: float, what: str, step: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(step)


def servers_of(cell_index: int, servers: int) -> list[int]:
    """Server numbers of a cell: cell k holds every second one."""
    return list(range(cell_index, servers, len(CELLS)))


# -- seeding --------------------------------------------------------------------------------
def seed(data_dir: str, servers: int) -> None:
    for k, cell in enumerate(CELLS):
        db = open_cell(data_dir, cell, create=True)
        try:
            for h in range(16):
                db.upsert_host(f"compute-{h:02d}", f"compute-{h:02d}.example.com", 64, 262144,
                               4000, "nova")
            with db.transaction():
                for i in servers_of(k, servers):
                    db.create_instance(server_values(i))
        finally:
            db.close()


# -- processes ------------------------------------------------------------------------------
class Procs:
    """The processes this script started; stop() ends exactly those (and the master's
    children it saw), by PID."""

    def __init__(self, data_dir: str, logs: Path) -> None:
        self.data_dir = data_dir
        self.logs = logs
        self.procs: list[subprocess.Popen[bytes]] = []
        self.children: set[int] = set()

    def start(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        env = dict(os.environ)
        env.pop("NOTIFY_SOCKET", None)
        with open(self.logs / f"{name}.out", "wb") as out, \
                open(self.logs / f"{name}.err", "wb") as err:
            p = subprocess.Popen(argv, stdout=out, stderr=err, env=env, start_new_session=True)
        self.procs.append(p)
        return p

    def note_children(self) -> None:
        from fastpath.master import status

        try:
            self.children |= {r["pid"] for r in status.collect(self.data_dir)
                              if r["role"] != "master"}
        except Exception:  # noqa: BLE001 - informational; stop() still ends the masters
            pass

    def stop(self) -> None:
        self.note_children()
        for p in reversed(self.procs):
            if p.poll() is None:
                p.terminate()
        for p in reversed(self.procs):
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)
        for pid in self.children:  # the master stops them; this is the safety net
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmd = f.read()
                mine = b"fastpath" in cmd or b"cellsync" in cmd
            except OSError:
                continue
            if mine:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


def start_system(procs: Procs, data_dir: str, port: int, mode: str, workers: int,
                 overrides: list[str]) -> None:
    py = sys.executable
    sets = [x for o in overrides for x in ("--set", o)]
    serve = [py, "-m", "fastpath", "serve", "--bind", f"127.0.0.1:{port}", "--data-dir",
             data_dir, "--workers", str(workers),
             "--set", "cell.build_delay=0.01", "--set", "cell.action_delay=0.01", *sets]
    if mode == "serve":
        serve += ["--set", f"standalone.cells={','.join(CELLS)}", "--set",
                  "standalone.cellsync=true", "--set", "standalone.forwarder=false"]
        procs.start("serve", serve)
    else:
        serve += ["--set", "standalone.cells=", "--set", "standalone.cellsync=false",
                  "--set", "standalone.forwarder=false"]
        procs.start("serve", serve)
        # The cellsync command takes no settings overrides: its cellsync.* are the defaults.
        procs.start("cellsync", [py, "-m", "cellsync", "--data-dir", data_dir])


# -- HTTP -----------------------------------------------------------------------------------
class Api:
    """One keep-alive connection."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)

    def get(self, path: str) -> tuple[int, bytes]:
        try:
            self.conn.request("GET", path, headers=TOKEN)
            r = self.conn.getresponse()
            return r.status, r.read()
        except (OSError, http.client.HTTPException):
            self.conn.close()
            self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
            raise

    def ready(self) -> bool:
        try:
            return self.get("/healthz")[0] == 200
        except (OSError, http.client.HTTPException):
            return False


# -- the background writer (a process of its own: --writer CELL) ------------------------------
def writer_main(data_dir: str, cell: str, rate: float, txn: int, servers: int,
                seconds: float) -> int:
    """Commit ``rate`` changes/s into ``cell`` in transactions of ``txn``; print a JSON line."""
    k = CELLS.index(cell)
    probes = set(servers_of(k, servers)[:PROBES_PER_CELL])
    targets = [uid(i) for i in servers_of(k, servers) if i not in probes]
    db = open_cell(data_dir, cell)
    bell = wake.bell_path(data_dir, "cellsync")
    stop = False

    def on_term(*_: Any) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    period = txn / rate
    n = 0
    commits = 0
    flip = 0
    start = time.monotonic()
    next_at = start
    late = 0
    while not stop and time.monotonic() - start < seconds:
        flip += 1
        task = "rebooting" if flip % 2 else None
        with db.transaction():
            for _ in range(txn):
                db.update_instance(targets[n % len(targets)], task_state=task)
                n += 1
        commits += 1
        wake.ring(bell)
        next_at += period
        pause = next_at - time.monotonic()
        if pause > 0:
            time.sleep(pause)
        else:
            late += 1
    took = time.monotonic() - start
    db.close()
    print(json.dumps({"cell": cell, "changes": n, "commits": commits, "seconds": round(took, 3),
                      "rate": round(n / took), "late_commits": late}), flush=True)
    return 0


# -- sampling -------------------------------------------------------------------------------
def sample(api: Api, dbs: dict[str, Any], bell: str, probes: list[tuple[str, str]], n: int,
           seq: list[int], budget: float = 3600.0, timeout: float = 120.0,
           poll_pause: float = POLL_PAUSE) -> list[float]:
    """Up to ``n`` lag samples, stopping early after ``budget`` seconds (a backlog that
    grows makes every sample wait for it)."""
    lags: list[float] = []
    rnd = random.Random(n)
    end = time.monotonic() + budget
    for j in range(n):
        if time.monotonic() > end:
            break
        cell, u = probes[j % len(probes)]
        seq[0] += 1
        name = f"lag-{seq[0]}"
        needle = f'"name": "{name}"'.encode()
        dbs[cell].update_instance(u, name=name)  # one durable cell transaction
        t0 = time.perf_counter()
        wake.ring(bell)
        path = f"/v2.1/servers/{u}"
        while True:
            status, body = api.get(path)
            t1 = time.perf_counter()
            if status == 200 and needle in body:
                break
            if t1 - t0 > timeout:
                raise TimeoutError(f"{u} did not show {name} within {timeout} s")
            time.sleep(poll_pause)
        lags.append(t1 - t0)
        time.sleep(rnd.uniform(0.010, 0.030))
    return lags


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(p / 100 * len(s) + 0.5) - 1))]


def summary(lags: list[float]) -> dict[str, float]:
    return {"samples": len(lags), "p50_ms": round(pct(lags, 50) * 1e3, 2),
            "p90_ms": round(pct(lags, 90) * 1e3, 2), "p99_ms": round(pct(lags, 99) * 1e3, 2),
            "max_ms": round(max(lags) * 1e3, 2), "mean_ms": round(statistics.fmean(lags) * 1e3, 2)}


def load_phase(a: argparse.Namespace, procs: Procs, data_dir: str, tmp: Path, api: Api,
               dbs: dict[str, Any], bell: str, probes: list[tuple[str, str]], seq: list[int],
               rate: float) -> dict[str, Any]:
    """Writers at ``rate`` changes/s in total while sampling; then wait for cellsync to
    catch up (bounded) so the next phase starts from an empty backlog."""
    tag = f"{rate:g}"
    writers = [procs.start(f"writer-{c}-{tag}", [
        sys.executable, __file__, "--writer", c, "--data-dir", data_dir,
        "--rate", str(rate / len(CELLS)), "--txn", str(a.txn),
        "--servers", str(a.servers), "--seconds", "3600"]) for c in CELLS]
    time.sleep(1.0)  # the writers reach their pace (a ramp, not a measurement)
    lags = sample(api, dbs, bell, probes, a.samples, seq, a.budget,
                  poll_pause=a.poll_ms / 1000)
    stats = cellsync_stats(data_dir)
    load = os.getloadavg()[0]
    for w in writers:
        w.terminate()
    reports = []
    for w, c in zip(writers, CELLS, strict=True):
        w.wait(30)
        text = (tmp / f"writer-{c}-{tag}.out").read_text().strip()
        reports.append(json.loads(text.splitlines()[-1]) if text else {"cell": c})
    out: dict[str, Any] = summary(lags)
    out["writers"] = reports
    out["writer_rate"] = sum(int(r.get("rate", 0)) for r in reports)
    out["cellsync_stats_at_end"] = stats
    out["loadavg_1m"] = round(load, 2)
    t0 = time.monotonic()
    try:
        wait_until(lambda: all(c.get("lag_seqs", 1) == 0 for c in
                               (cellsync_stats(data_dir) or {}).get("cells", {"x": {}}).values()),
                   a.drain, "cellsync to catch up", step=0.5)
        out["drained_s"] = round(time.monotonic() - t0, 1)
    except TimeoutError:
        out["drained_s"] = None  # still behind: the next phase starts with a backlog
    return out


def cellsync_stats(data_dir: str) -> Any:
    try:
        return json.loads(Path(data_dir, "run", "cellsync.json").read_text())
    except (OSError, ValueError):
        return None


def run(a: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="fastpath-lag-") as tmp:
        data_dir = os.path.join(tmp, "data")
        os.makedirs(data_dir)
        t0 = time.monotonic()
        seed(data_dir, a.servers)
        seeded_s = time.monotonic() - t0
        port = free_port()
        procs = Procs(data_dir, Path(tmp))
        result: dict[str, Any] = {"mode": a.mode, "servers": a.servers, "workers": a.workers,
                                  "seed_s": round(seeded_s, 2)}
        dbs: dict[str, Any] = {}
        try:
            start_system(procs, data_dir, port, a.mode, a.workers, a.set)
            result["settings"] = a.set
            api = Api(port)
            wait_until(api.ready, START_TIMEOUT, "GET /healthz")
            last = uid(a.servers - 1)
            t0 = time.monotonic()
            wait_until(lambda: api.get(f"/v2.1/servers/{last}")[0] == 200, START_TIMEOUT * 4,
                       "the seeded servers to reach the API", step=0.2)
            result["initial_sync_s"] = round(time.monotonic() - t0, 2)
            procs.note_children()
            bell = wake.bell_path(data_dir, "cellsync")
            dbs = {c: open_cell(data_dir, c) for c in CELLS}
            probes = [(c, uid(i)) for k, c in enumerate(CELLS)
                      for i in servers_of(k, a.servers)[:PROBES_PER_CELL]]
            probes.sort(key=lambda p: p[1])
            seq = [0]
            sample(api, dbs, bell, probes, 20, seq)  # warm-up
            phases: dict[str, Any] = {"idle": summary(sample(
                api, dbs, bell, probes, a.samples, seq, a.budget, poll_pause=a.poll_ms / 1000))}
            phases["idle"]["loadavg_1m"] = round(os.getloadavg()[0], 2)
            print(f"idle: {phases['idle']}", flush=True)
            for rate in a.rate:
                name = f"load {rate:g}/s"
                phases[name] = load_phase(a, procs, data_dir, Path(tmp), api, dbs, bell, probes,
                                          seq, rate)
                print(f"{name}: {phases[name]}", flush=True)
            result["phases"] = phases
        finally:
            for db in dbs.values():
                db.close()
            procs.stop()
        result["when"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        result["cpus"] = os.cpu_count()
        return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--servers", type=int, default=10_000)
    ap.add_argument("--samples", type=int, default=300)
    ap.add_argument("--rate", type=float, nargs="+", default=[10_000.0],
                    help="changes/s, all cells: one load phase per value")
    ap.add_argument("--drain", type=float, default=120.0,
                    help="seconds to wait for cellsync to catch up after a load phase")
    ap.add_argument("--txn", type=int, default=50, help="changes per writer transaction")
    ap.add_argument("--mode", choices=("serve", "separate"), default="serve")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                    help="a setting for fastpath serve (e.g. cellsync.batch=2000); repeatable")
    ap.add_argument("--budget", type=float, default=60.0,
                    help="seconds of sampling per phase at most (fewer samples if reached)")
    ap.add_argument("--poll-ms", type=float, default=POLL_PAUSE * 1000,
                    help="pause between two polling GETs of a sample (default 0.5 ms): the "
                         "resolution, and the probe's CPU taken from the processes measured")
    ap.add_argument("--json", default=str(Path(__file__).parent / "results" / "lag.json"))
    # writer process (internal)
    ap.add_argument("--writer", metavar="CELL")
    ap.add_argument("--data-dir")
    ap.add_argument("--seconds", type=float, default=3600.0)
    a = ap.parse_args(argv)
    if a.writer:
        return writer_main(a.data_dir, a.writer, a.rate[0], a.txn, a.servers, a.seconds)
    r = run(a)
    print(f"\nend-to-end lag (cell commit -> visible on GET /v2.1/servers/{{id}}), mode {a.mode},"
          f" {a.servers} servers in {len(CELLS)} cells, {a.workers} API worker(s)")
    print(f"{'phase':14s} {'samples':>7s} {'p50 ms':>8s} {'p90 ms':>8s} {'p99 ms':>8s}"
          f" {'max ms':>9s} {'load1':>6s}  writers reached / cellsync behind at end")
    for name, p in r["phases"].items():
        extra = "-"
        if "writer_rate" in p:
            cells = (p["cellsync_stats_at_end"] or {}).get("cells", {})
            behind = sum(int(c.get("lag_seqs", 0)) for c in cells.values())
            extra = f"{p['writer_rate']:,} changes/s / {behind:,} changes"
        print(f"{name:14s} {p['samples']:7d} {p['p50_ms']:8.2f} {p['p90_ms']:8.2f}"
              f" {p['p99_ms']:8.2f} {p['max_ms']:9.2f} {p['loadavg_1m']:6.2f}  {extra}")
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(r, indent=2) + "\n")
    print(f"saved {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

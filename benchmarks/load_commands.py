#!/usr/bin/env python3
"""Load benchmark of the command path: durable ``POST /servers`` and ``DELETE`` under wrk.

It starts, on a free loopback port and in a temporary data dir, a real standalone
``fastpath serve`` (master, ``--workers`` workers, two local cells, cellsync and the
forwarder), seeds the catalogue (flavors, images, quotas without a practical limit), and
runs wrk against it with a Lua script that builds each request:

* ``create``: ``POST /v2.1/servers`` with a fresh name each time (flavor 1, image 0,
  ``networks: none``).  Every 202 means the command was durable (its group commit was
  fsync'ed) before the answer left.
* ``create-delete``: each connection alternates a create and the ``DELETE`` of a server
  it created (ids taken from the 202 bodies), so the cells end with few servers.

The rounds run one after the other (there is no nginx twin for a durable write).  It
reports requests/s, p50/p90/p99 and the server CPU per request (median over rounds), then
waits (bounded) until the forwarder has drained the outbox to the cells.  Each round's line
also has the CPU per request by process role (worker, cell, cellsync, forwarder, master),
the store's durable commits per second (all writers, and the API workers' share from
``/metrics``), the load average, and a durable LMDB commit of one small put timed just
before the round (the disk's fsync latency, shared with whatever else runs).
``--commit-stats`` adds the committers' group sizes and writer-lock wait/hold.

    python benchmarks/load_commands.py [--workers 2] [--duration 10] [--connections 32]
                                       [--rounds 3] [--scenarios create,create-delete]
                                       [--api-only] [--commit-stats] [--set NAME=VALUE]
                                       [--json out.json]

Exit status: 0 when every run completed without socket/HTTP errors, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from load import (  # noqa: E402
    _CLK_TCK,
    HOST,
    WRK_LUA,
    Proc,
    Run,
    free_port,
    http_get,
    run_wrk,
    tree_pids,
    wait_ready,
)

PROJECT = "b3c1d2e3f4a5b6c7d8e9f0a1b2c3d4e5"
TOKEN = f"bench:{PROJECT}"
MICROVERSION = "2.100"  # networks is required from 2.37; "none" keeps Neutron out of it

_COMMON_LUA = r"""
local tid = 0
local counter = 0
local ids = {}
setup = function(thread)
  tid = tid + 1
  thread:set("tid", tid)
end
init = function(args)
  wrk.headers["Content-Type"] = "application/json"
  wrk.headers["X-Auth-Token"] = "%(token)s"
  wrk.headers["OpenStack-API-Version"] = "compute %(mv)s"
end
local function create()
  counter = counter + 1
  local body = string.format(
    '{"server": {"name": "bench-%%d-%%d", "flavorRef": "%(flavor)s", ' ..
    '"imageRef": "%(image)s", "networks": "none"}}', tid or 0, counter)
  return wrk.format("POST", "/v2.1/servers", nil, body)
end
"""

SCRIPTS: dict[str, str] = {
    "create": _COMMON_LUA + r"""
request = function()
  return create()
end
""",
    "create-delete": _COMMON_LUA + r"""
response = function(status, headers, body)
  if status == 202 then
    local id = string.match(body, '"id": *"([0-9a-f%%-]+)"')
    if id then table.insert(ids, id) end
  end
end
request = function()
  local id = table.remove(ids)
  if id then
    return wrk.format("DELETE", "/v2.1/servers/" .. id, nil, nil)
  end
  return create()
end
""",
}


def seed_catalog(data_dir: str, api_only: bool = False) -> tuple[str, str]:
    """Flavors, images and unlimited quotas, straight into the store before serve starts
    (``api_only``: and a cell's capacity, as cellsync would bring it up, so creates schedule
    with no cell running)."""
    from fastpath.api import views
    from fastpath.seed import FLAVORS, IMAGES, catalog
    from fastpath.store import Batch, Store
    from fastpath.store.changes import Catalog, CatalogPut

    store = Store.open(data_dir, map_size=1 << 30)
    try:
        puts = catalog(1)
        puts.append(CatalogPut(Catalog.QUOTA_LIMITS, PROJECT, {
            "instances": -1, "cores": -1, "ram": -1,
        }))
        if api_only:
            hosts = {f"host{i}": {"vcpus": 1 << 20, "ram_mb": 1 << 40, "disk_gb": 1 << 40,
                                  "vcpus_used": 0, "ram_mb_used": 0, "disk_gb_used": 0,
                                  "status": "enabled", "availability_zone": "nova"}
                     for i in range(16)}
            puts.append(CatalogPut(Catalog.CELLS, "cell1", {"hosts": hosts}))
        store.apply(Batch([], catalog=puts), render=views.render_server)
    finally:
        store.close()
    return str(FLAVORS[0]["id"]), str(IMAGES[0]["id"])


def commit_probe(scratch: str, n: int = 40) -> float:
    """Median ms of a durable LMDB commit of one small put in a scratch env (the disk's
    fsync latency right now: on a shared machine it decides the figures)."""
    import lmdb

    env = lmdb.open(scratch, map_size=1 << 24)
    try:
        times = []
        for i in range(n):
            t = time.perf_counter()
            with env.begin(write=True) as txn:
                txn.put(b"k%d" % (i % 4), b"x" * 100)
            times.append(time.perf_counter() - t)
        return statistics.median(times) * 1e3
    finally:
        env.close()
        shutil.rmtree(scratch, ignore_errors=True)


def last_txnid(data_dir: str) -> int:
    """The store's last committed write transaction id (every writer process counts)."""
    from fastpath.store import Store

    store = Store.open(data_dir)
    try:
        return int(store._env.info()["last_txnid"])
    finally:
        store.close()


def api_write_txns(port: int, host_header: str) -> int:
    """The API workers' store write transactions (``/metrics``), or -1."""
    try:
        status, _, body = http_get(port, "/metrics", host_header)
    except OSError:
        return -1
    for line in body.decode(errors="replace").splitlines():
        if line.startswith("fastpath_store_write_txn_total "):
            return int(float(line.split()[1]))
    return -1


def store_counts(data_dir: str) -> tuple[int, int]:
    """(live servers, outbox entries) in one read transaction."""
    from fastpath.store import Store

    store = Store.open(data_dir)
    try:
        with store.read() as r:
            live = int(r.txn.stat(r.dbs.servers)["entries"])
            outbox = int(r.txn.stat(r.dbs.outbox)["entries"])
    finally:
        store.close()
    return live, outbox


def _roles(root: int, data_dir: str) -> dict[int, str]:
    """The server's processes by role: master, worker, cell (has a cell's SQLite file
    open), cellsync and forwarder (their status files under ``run/`` name their pids)."""
    roles: dict[int, str] = {}
    for name in ("cellsync", "forwarder"):
        try:
            with open(os.path.join(data_dir, "run", f"{name}.json")) as f:
                roles[int(json.load(f)["pid"])] = name
        except (OSError, ValueError, KeyError, TypeError):
            pass
    for pid in tree_pids(root):
        if pid in roles:
            continue
        if pid == root:
            roles[pid] = "master"
            continue
        try:
            links = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
        except OSError:
            continue
        roles[pid] = "cell" if any(x.endswith(".sqlite") for x in links) else "worker"
    return roles


def cpu_by_role(roles: dict[int, str]) -> dict[str, float]:
    """User + system CPU seconds of the live processes, summed by role (and the workers'
    system CPU apart, as ``worker-sys``)."""
    out: dict[str, float] = {}
    for pid, role in roles.items():
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(b")") + 2:].split()
        out[role] = out.get(role, 0.0) + (int(fields[11]) + int(fields[12])) / _CLK_TCK
        if role == "worker":
            out["worker-sys"] = out.get("worker-sys", 0.0) + int(fields[12]) / _CLK_TCK
    return out


def commit_stats(log_path: str) -> list[str]:
    """The committers' debug lines ("group commit: N commits of M commands; ...")."""
    try:
        with open(log_path, errors="replace") as f:
            return [line.strip() for line in f if "group commit:" in line]
    except OSError:
        return []


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--duration", type=float, default=10, help="seconds per wrk run")
    p.add_argument("--connections", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--scenarios", default="create,create-delete")
    p.add_argument("--cell-hosts", type=int, default=256,
                   help="simulated hosts per local cell (room for the servers created)")
    p.add_argument("--drain-timeout", type=float, default=300,
                   help="seconds to wait for the outbox to drain after the runs")
    p.add_argument("--api-only", action="store_true",
                   help="no cells, cellsync or forwarder under serve: the API workers and their "
                        "durable group commits alone (the outbox keeps every command)")
    p.add_argument("--commit-stats", action="store_true",
                   help="serve at log level debug and print each worker's group-commit log "
                        "(commits, commands per commit, writer lock waited/held per commit)")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                   help="a setting for serve (repeatable), e.g. cellsync.txn_budget_ms=5")
    p.add_argument("--json", metavar="FILE", help="write the results as JSON")
    p.add_argument("--keep", action="store_true", help="keep the temporary data dir")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    wrk = shutil.which("wrk")
    if wrk is None:
        print("load_commands: wrk is not installed (apt-get install -y wrk)", file=sys.stderr)
        return 2
    scenarios = [s for s in args.scenarios.split(",") if s]
    for s in scenarios:
        if s not in SCRIPTS:
            print(f"load_commands: unknown scenario {s!r} (from {','.join(SCRIPTS)})",
                  file=sys.stderr)
            return 2
    tmp = tempfile.mkdtemp(prefix="fp-loadcmd-")
    data = os.path.join(tmp, "data")
    os.makedirs(data)
    flavor, image = seed_catalog(data, args.api_only)
    port = free_port()
    host_header = f"{HOST}:{port}"
    serve = Proc("fastpath", [
        sys.executable, "-m", "fastpath", "serve", "--bind", f"{HOST}:{port}",
        "--data-dir", data, "--workers", str(args.workers),
        "--set", f"cell.hosts={args.cell_hosts}", "--set", f"log.level={'debug' if args.commit_stats else 'warning'}",
        *(["--set", "standalone.cells=", "--set", "standalone.cellsync=false",
           "--set", "standalone.forwarder=false"] if args.api_only else []),
        *(x for kv in args.set for x in ("--set", kv)),
    ], os.path.join(tmp, "serve.log"))
    runs: list[Run] = []
    try:
        wait_ready(serve, port, "/healthz", host_header, 60)
        if not args.api_only:  # the sidecars' status files name their pids (CPU by role)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and not all(
                    os.path.exists(os.path.join(data, "run", f"{n}.json"))
                    for n in ("cellsync", "forwarder")):
                time.sleep(0.1)
        for name in scenarios:
            script = os.path.join(tmp, f"{name}.lua")
            with open(script, "w") as f:
                f.write(SCRIPTS[name] % {"token": TOKEN, "mv": MICROVERSION,
                                         "flavor": flavor, "image": image})
                f.write(WRK_LUA)
            for rnd in range(1, args.rounds + 1):
                argv_ = [wrk, "-t", str(args.threads), "-c", str(args.connections),
                         "-d", f"{args.duration:g}s", "--timeout", "5s", "-s", script,
                         "-H", f"Host: {host_header}", f"http://{HOST}:{port}/v2.1/servers"]
                roles = _roles(serve.pid, data)
                txn0, api0 = last_txnid(data), api_write_txns(port, host_header)
                probe = commit_probe(os.path.join(tmp, f"probe-{name}-{rnd}"))
                cpu0 = cpu_by_role(roles)
                run = run_wrk(argv_, args.duration, "fastpath", name, rnd, serve.pid)
                cpu1 = cpu_by_role(roles)
                commits = (last_txnid(data) - txn0) / args.duration
                api_commits = (api_write_txns(port, host_header) - api0) / args.duration
                runs.append(run)
                load1 = os.getloadavg()[0]
                by_role = " ".join(
                    f"{r} {(cpu1[r] - cpu0.get(r, 0.0)) * 1e6 / max(run.requests, 1):.0f}"
                    for r in sorted(cpu1))
                print(f"{name} round {rnd}: {run.rps:,.0f} req/s p50 {run.p50_us / 1000:.2f} ms "
                      f"p99 {run.p99_us / 1000:.2f} ms cpu {run.server_cpu_us_per_request:.0f} "
                      f"us/req ({by_role}) store commits/s {commits:.0f} (API {api_commits:.0f}) load {load1:.1f} "
                      f"durable commit before {probe:.2f} ms errors {run.errors} {run.failed}",
                      flush=True)
        # --api-only: nothing delivers the outbox; it is counted once.
        deadline = time.monotonic() + (0 if args.api_only else args.drain_timeout)
        while True:
            live, outbox = store_counts(data)
            if outbox == 0 or time.monotonic() >= deadline:
                break
            time.sleep(0.5)
        status, _, _ = http_get(port, "/healthz", host_header)
    finally:
        serve.stop()
    results: dict[str, Any] = {"workers": args.workers, "connections": args.connections,
                               "duration": args.duration, "scenarios": {}}
    print(f"\n{'scenario':<16}{'req/s':>10}{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}"
          f"{'cpu us/req':>12}")
    for name in scenarios:
        rs = [r for r in runs if r.scenario == name and r.ok]
        if not rs:
            print(f"{name:<16} no clean run")
            continue
        summary = {
            "rps": statistics.median(r.rps for r in rs),
            "p50_ms": statistics.median(r.p50_us for r in rs) / 1000,
            "p90_ms": statistics.median(r.p90_us for r in rs) / 1000,
            "p99_ms": statistics.median(r.p99_us for r in rs) / 1000,
            "cpu_us_per_request": statistics.median(r.server_cpu_us_per_request for r in rs),
            "rounds": [r.__dict__ for r in rs],
        }
        results["scenarios"][name] = summary
        print(f"{name:<16}{summary['rps']:>10,.0f}{summary['p50_ms']:>9.2f}"
              f"{summary['p90_ms']:>9.2f}{summary['p99_ms']:>9.2f}"
              f"{summary['cpu_us_per_request']:>12.0f}")
    print(f"outbox after the runs: {outbox} entries (0 = the forwarder delivered everything); "
          f"{live} servers in the store; healthz {status}")
    results["outbox_after"] = outbox
    if args.commit_stats:
        results["commit_stats"] = commit_stats(os.path.join(tmp, "serve.log"))
        print("group commits (per worker, every 10 s):")
        for line in results["commit_stats"]:
            print("  " + line)
    results["servers_after"] = live
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    if not args.keep:
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        print(f"data dir kept: {data}")
    ok = all(r.ok for r in runs) and outbox == 0
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())

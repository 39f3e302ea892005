#!/usr/bin/env python3
"""Load benchmark: the real ``fastpath serve`` beside nginx serving the same bytes.

It starts, on free loopback ports and in a temporary directory:

* ``fastpath serve`` (master + ``--workers`` workers, a fresh data dir);
* nginx with ``worker_processes`` = ``--workers``, ``daemon off; master_process on;``,
  ``access_log off``, unlimited keep-alive, serving as static files the very bodies
  fastpath answers for the same request (fetched from fastpath first, Host included),
  with ``default_type application/json``;

then runs wrk against each, interleaved (fastpath, nginx, nginx, fastpath, ... for
``--rounds`` rounds: the order is reversed every other round), with the same request
headers, and reports per scenario and target the median requests/s over the rounds, the
latency p50/p99 (median over rounds; from a wrk Lua ``done()`` hook), the CPU the server
spent per request, and the ratio fastpath/nginx of the medians (and of each round's pair).

Every process it starts is stopped in a ``finally`` (SIGTERM, then SIGKILL), each in its own
session so that nothing it forked survives; every wait is bounded by a timeout.  Nothing
is pinned to CPUs: the load generator shares the machine with the servers, as in the
figures quoted in docs/benchmarks.md.

    python benchmarks/load.py [--workers 2] [--duration 10] [--connections 32] [--threads 1]
                              [--rounds 3] [--scenarios v21,healthz] [--json out.json]
                              [--data-dir DIR | --seed-with-cli] [--servers N] [--projects P]

The read scenarios need a seeded store: by default ``--servers`` servers are seeded in this
process into a temporary data dir; ``--seed-with-cli`` seeds it with ``fastpath seed`` (a
process pool: much faster for large stores); ``--data-dir DIR`` serves an existing data dir
(e.g. one ``fastpath seed`` filled) and never deletes or writes it.  With the last two the
scenarios ask as ``fastpath.seed.project_id(0)`` (``--project`` to change it) and the show id
is that project's newest server, asked of fastpath itself (``GET /servers?limit=1``).
Before fastpath starts, the store file is read once through the page cache when less than
all of it is resident (``--no-warm-store`` to skip): the report says how much was resident
before and after, i.e. whether the run started cold.

Exit status: 0 when every run completed without errors, 1 when a run failed or saw
socket/HTTP errors (the table marks those), 2 for bad usage or a missing tool.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import platform
import resource
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from typing import Any

from _harness import SEED_FLAVORS, SEED_PROJECT, newest_of_project, seed_batches, seed_uuid

HOST = "127.0.0.1"


@dataclass(frozen=True)
class Scenario:
    name: str
    title: str
    path: str
    headers: tuple[str, ...] = ()
    file: str = ""  # the body file nginx serves for ``path``
    seeded: bool = False  # reads the store: the data dir is seeded first (--servers)

    @property
    def location(self) -> str:
        """The path nginx matches (``location = ...`` ignores the query string)."""
        return self.path.partition("?")[0]


SCENARIOS: dict[str, Scenario] = {
    "v21": Scenario("v21", "GET /v2.1/", "/v2.1/", file="v21.json"),
    "healthz": Scenario("healthz", "GET /healthz", "/healthz", file="healthz.json"),
    # A new connection per request: accept + close cost, both sides.
    "v21-close": Scenario(
        "v21-close",
        "GET /v2.1/ (Connection: close)",
        "/v2.1/",
        ("Connection: close",),
        file="v21.json",
    ),
}
# The read API on a seeded store.  ``{server_id}``, ``{token}`` and ``{mv}`` are filled in
# after seeding (see seed_store): show asks for one server, always the same one (wrk sends
# one URL; nginx would need a file per id to rotate).
_READ_HEADERS = ("X-Auth-Token: {token}", "OpenStack-API-Version: compute {mv}")
for _name, _title, _path in (
    ("server-show", "GET /servers/{id}", "/v2.1/servers/{server_id}"),
    ("servers-detail", "GET /servers/detail?limit=100", "/v2.1/servers/detail?limit=100"),
    ("servers-list", "GET /servers?limit=100", "/v2.1/servers?limit=100"),
    ("flavors-detail", "GET /flavors/detail", "/v2.1/flavors/detail"),
):
    SCENARIOS[_name] = Scenario(
        _name, _title, _path, _READ_HEADERS, file=f"{_name}.json", seeded=True
    )
DEFAULT_SCENARIOS = "v21,healthz"
READ_MICROVERSION = "2.104"

# wrk's done() hook: one parseable line (latencies in microseconds).
WRK_LUA = r"""
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "FPBENCH requests=%d duration_us=%d bytes=%d connect=%d read=%d write=%d status=%d " ..
    "timeout=%d p50=%d p90=%d p99=%d p999=%d mean=%.1f max=%d\n",
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write,
    e.status, e.timeout, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency:percentile(99.9), latency.mean, latency.max))
end
"""

NGINX_CONF = """\
daemon off;
master_process on;
worker_processes {workers};
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{
    worker_connections 4096;
}}
http {{
    types {{ }}
    default_type application/json;
    access_log off;
    server_tokens off;
    keepalive_requests 1000000;
    keepalive_timeout 300s;
    open_file_cache max=16 inactive=600s;
    open_file_cache_valid 600s;
    client_body_temp_path {prefix}/tmp/client_body;
    proxy_temp_path {prefix}/tmp/proxy;
    fastcgi_temp_path {prefix}/tmp/fastcgi;
    uwsgi_temp_path {prefix}/tmp/uwsgi;
    scgi_temp_path {prefix}/tmp/scgi;
    server {{
        # reuseport: one listening socket per worker, as fastpath's master does.
        listen {host}:{port} reuseport backlog=1024;
{locations}
    }}
}}
"""


def unique_locations(scenarios: list[Scenario], bodies: dict[str, bytes]) -> list[Scenario]:
    """One scenario per nginx location; two scenarios on one location must share a body
    (nginx ignores the query string: ``?limit=100`` and no limit cannot both be served)."""
    by_loc: dict[str, Scenario] = {}
    for sc in scenarios:
        other = by_loc.setdefault(sc.location, sc)
        if bodies[other.file] != bodies[sc.file]:
            raise RuntimeError(
                f"{sc.title} and {other.title} share nginx location {sc.location} "
                "but not their body: run them separately"
            )
    return list(by_loc.values())


def nginx_location(sc: Scenario, www: str, body: bytes, mode: str) -> str:
    if mode == "file":
        return f"        location = {sc.location} {{ root {www}; try_files /{sc.file} =404; }}"
    text = body.decode("utf-8")
    if "$" in text or "\n" in text:
        raise RuntimeError(f"--nginx-mode return cannot carry the body of {sc.title} ('$'/newline)")
    quoted = text.replace("\\", "\\\\").replace("'", "\\'")
    return f"        location = {sc.location} {{ return 200 '{quoted}'; }}"


# -- the store -----------------------------------------------------------------------------

def seed_store(data_dir: str, servers: int, projects: int) -> dict[str, Any]:
    """Fill ``data_dir`` in this process, then close the store (fastpath opens it after):
    ``servers`` sample servers, round-robin over ``projects`` projects (the first is
    SEED_PROJECT), rendered with ``views.render_server`` as cellsync would, and
    SEED_FLAVORS (``_harness.seed_batches``: the micro-benchmarks seed the same).  Returns
    what the read scenarios need: the show id (the newest server of SEED_PROJECT: the
    first of its list) and the counts."""
    from fastpath.api import views
    from fastpath.store import Store

    t0 = time.monotonic()
    # ~12 KB per server (record, index entries, view blob) plus room: the map grows anyway.
    store = Store.open(data_dir, map_size=max(1 << 26, servers * 32 * 1024))
    try:
        for batch in seed_batches(servers, projects):
            store.apply(batch, render=views.render_server)
    finally:
        store.close()
    newest = seed_uuid(newest_of_project(servers, projects))
    return {
        "source": "in-process",
        "servers": servers,
        "projects": projects,
        "project": SEED_PROJECT,
        "token": f"fake:{SEED_PROJECT}",
        "show_id": newest,
        "seconds": round(time.monotonic() - t0, 2),
    }


def cli_project(project: str | None) -> tuple[str, str]:
    """The project and noauth2 token the read scenarios use on a ``fastpath seed`` store:
    ``fastpath seed`` names project p ``project_id(p)`` and its user ``user_id(p)``."""
    from fastpath.seed import project_id, user_id

    if project is None or project == project_id(0):
        return project_id(0), f"{user_id(0)}:{project_id(0)}"
    return project, f"bench:{project}"


def seed_with_cli(
    fastpath_cmd: str, data_dir: str, servers: int, projects: int, log_path: str
) -> dict[str, Any]:
    """``fastpath seed`` into ``data_dir`` (a process pool renders the views)."""
    argv = [*shlex.split(fastpath_cmd), "seed", "--data-dir", data_dir,
            "--servers", str(servers), "--projects", str(projects)]
    t0 = time.monotonic()
    with open(log_path, "wb") as log:
        cp = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                            timeout=3600, start_new_session=True)
    if cp.returncode != 0:
        with open(log_path, "rb") as f:
            tail = f.read()[-2000:].decode("utf-8", "replace")
        raise RuntimeError(f"{shlex.join(argv)} failed ({cp.returncode}):\n{tail}")
    return {"source": "fastpath seed", "command": shlex.join(argv), "servers": servers,
            "projects": projects, "seconds": round(time.monotonic() - t0, 2)}


def store_files(data_dir: str) -> list[str]:
    """The LMDB data files under ``data_dir``."""
    out = []
    for root, _, files in os.walk(data_dir):
        out += [os.path.join(root, f) for f in files if f == "data.mdb"]
    return sorted(out)


def resident_bytes(path: str) -> tuple[int, int]:
    """(bytes of ``path`` in the page cache, file size), from mincore(2) on a read-only map."""
    import ctypes
    import mmap

    size = os.path.getsize(path)
    if size == 0:
        return 0, 0
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long)
    libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
    libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p)
    page = mmap.PAGESIZE
    pages = (size + page - 1) // page
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), f"mmap {path}")
        try:
            vec = ctypes.create_string_buffer(pages)
            if libc.mincore(addr, size, vec) != 0:
                raise OSError(ctypes.get_errno(), f"mincore {path}")
            resident = sum(b & 1 for b in vec.raw)
        finally:
            libc.munmap(addr, size)
    finally:
        os.close(fd)
    return min(resident * page, size), size


def warm_store(data_dir: str, warm: bool) -> dict[str, Any]:
    """Residency of the store in the page cache; when ``warm`` and not all resident, read
    the file once (sequentially, 8 MB reads) so that the measured runs do not start cold."""
    info: dict[str, Any] = {"files": {}, "warmed": False}
    for path in store_files(data_dir):
        before, size = resident_bytes(path)
        entry: dict[str, Any] = {"bytes": size, "resident_before": before}
        if warm and before < size:
            t0 = time.monotonic()
            fd = os.open(path, os.O_RDONLY)
            try:
                with contextlib.suppress(AttributeError, OSError):
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
                while os.read(fd, 8 << 20):
                    pass
            finally:
                os.close(fd)
            entry["warm_seconds"] = round(time.monotonic() - t0, 2)
            info["warmed"] = True
        entry["resident_after"] = resident_bytes(path)[0]
        info["files"][path] = entry
    return info


def describe_warm(info: dict[str, Any]) -> str:
    parts = []
    for path, e in info["files"].items():
        size = e["bytes"] or 1
        text = (f"{path} {e['bytes'] / 1e9:.2f} GB, {100 * e['resident_before'] / size:.1f}% "
                "in the page cache")
        if "warm_seconds" in e:
            text += (f"; read once in {e['warm_seconds']:.1f}s -> "
                     f"{100 * e['resident_after'] / size:.1f}%")
        parts.append(text)
    return "; ".join(parts) or "no data.mdb found"


def resolve_show_id(port: int, host_header: str, token: str) -> str:
    """The newest server of the token's project (Nova's default order: created_at desc),
    asked of fastpath itself: no store is opened in this process while fastpath runs."""
    status, _, body = http_get(
        port, "/v2.1/servers?limit=1", host_header, timeout=10,
        headers=(f"X-Auth-Token: {token}", f"OpenStack-API-Version: compute {READ_MICROVERSION}"),
    )
    if status != 200:
        raise RuntimeError(f"GET /v2.1/servers?limit=1 answered {status}: {body[:300]!r}")
    servers = json.loads(body)["servers"]
    if not servers:
        raise RuntimeError(f"the project of token {token} has no server in this data dir")
    return str(servers[0]["id"])


def bind_scenario(sc: Scenario, seed: dict[str, Any]) -> Scenario:
    """Fill the placeholders of a read scenario from what seeding wrote."""
    if not sc.seeded:
        return sc
    fill = {"server_id": seed["show_id"], "token": seed["token"],
            "mv": READ_MICROVERSION}
    return replace(
        sc, path=sc.path.format(**fill), headers=tuple(h.format(**fill) for h in sc.headers)
    )


# -- processes ---------------------------------------------------------------------------


class Proc:
    """A child in its own session (so its own children can be found by group id)."""

    def __init__(self, name: str, argv: list[str], log_path: str, cwd: str | None = None):
        self.name = name
        self.argv = argv
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.popen = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            start_new_session=True,
        )
        self.pid = self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, n: int = 2000) -> str:
        try:
            with open(self.log_path, "rb") as f:
                data = f.read()
        except OSError:
            return ""
        return data[-n:].decode("utf-8", "replace")

    def stop(self, grace: float = 15.0) -> None:
        """SIGTERM, wait ``grace``; then SIGKILL; then SIGKILL whatever is left of its group."""
        try:
            if self.alive():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGTERM)
                try:
                    self.popen.wait(timeout=grace)
                except subprocess.TimeoutExpired:
                    print(
                        f"load: {self.name} (pid {self.pid}) ignored SIGTERM for {grace:.0f}s; "
                        "killing it",
                        file=sys.stderr,
                    )
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(self.pid, signal.SIGKILL)
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        self.popen.wait(timeout=5)
            # Children that outlived their parent (the group id is the child's pid).
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, signal.SIGKILL)
        finally:
            self._log.close()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def http_get(
    port: int, path: str, host_header: str, timeout: float = 2.0, headers: tuple[str, ...] = ()
) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        hdrs = {"Host": host_header}
        for h in headers:
            k, _, v = h.partition(":")
            hdrs[k.strip()] = v.strip()
        conn.request("GET", path, headers=hdrs)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def wait_ready(proc: Proc, port: int, path: str, host_header: str, deadline_s: float) -> None:
    deadline = time.monotonic() + deadline_s
    last: str = "no answer"
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(
                f"{proc.name} exited with status {proc.popen.returncode} before answering; "
                f"its output:\n{proc.log_tail()}"
            )
        try:
            status, _, _ = http_get(port, path, host_header, timeout=1.0)
            if status == 200:
                return
            last = f"status {status}"
        except OSError as exc:
            last = str(exc)
        time.sleep(0.05)
    raise RuntimeError(
        f"{proc.name} did not answer GET {path} with 200 within {deadline_s:.0f}s ({last}); "
        f"its output:\n{proc.log_tail()}"
    )


# -- wrk ---------------------------------------------------------------------------------


@dataclass
class Run:
    target: str
    scenario: str
    round: int
    rps: float = 0.0
    requests: int = 0
    duration_s: float = 0.0
    bytes_per_response: float = 0.0
    p50_us: int = 0
    p90_us: int = 0
    p99_us: int = 0
    p999_us: int = 0
    mean_us: float = 0.0
    max_us: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    server_cpu_s: float = 0.0  # user+system CPU of the server's processes during the run
    server_cpu_us_per_request: float = 0.0
    wrk_cpu_pct: float = 0.0  # wrk's user+system CPU / wall time (100 = one core)
    loadavg_after: float = 0.0
    failed: str = ""

    @property
    def ok(self) -> bool:
        return not self.failed and not any(self.errors.values())


def wrk_argv(
    wrk: str,
    args: argparse.Namespace,
    script: str,
    host_header: str,
    scenario: Scenario,
    port: int,
    duration: float,
) -> list[str]:
    argv = [
        wrk,
        "-t",
        str(args.threads),
        "-c",
        str(args.connections),
        "-d",
        f"{duration:g}s",
        "--timeout",
        "5s",
        "-s",
        script,
        "-H",
        f"Host: {host_header}",
    ]
    for h in scenario.headers:
        argv += ["-H", h]
    argv.append(f"http://{HOST}:{port}{scenario.path}")
    return argv


_CLK_TCK = os.sysconf("SC_CLK_TCK")


def tree_pids(root: int) -> list[int]:
    """``root`` and its descendants (from /proc; the servers fork their workers)."""
    parent: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(b")") + 2 :].split()
        parent[int(entry)] = int(fields[1])
    out, frontier = [root], [root]
    while frontier:
        frontier = [pid for pid, ppid in parent.items() if ppid in frontier]
        out += frontier
    return out


def tree_cpu_seconds(root: int) -> float:
    """User + system CPU seconds of the live processes of a tree (clock-tick resolution)."""
    ticks = 0
    for pid in tree_pids(root):
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(b")") + 2 :].split()
        ticks += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
    return ticks / _CLK_TCK


def run_wrk(
    argv: list[str], duration: float, target: str, scenario: str, rnd: int, server_pid: int = 0
) -> Run:
    run = Run(target, scenario, rnd)
    cpu0 = tree_cpu_seconds(server_pid) if server_pid else 0.0
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.monotonic()
    try:
        cp = subprocess.run(
            argv, capture_output=True, text=True, timeout=duration + 30, stdin=subprocess.DEVNULL
        )
    except subprocess.TimeoutExpired:
        run.failed = f"wrk did not finish within {duration + 30:.0f}s"
        return run
    wall = time.monotonic() - t0
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu1 = tree_cpu_seconds(server_pid) if server_pid else 0.0
    run.server_cpu_s = cpu1 - cpu0
    wrk_cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    run.wrk_cpu_pct = 100.0 * wrk_cpu / wall if wall > 0 else 0.0
    run.loadavg_after = os.getloadavg()[0]
    line = next((x for x in cp.stdout.splitlines() if x.startswith("FPBENCH ")), None)
    if cp.returncode != 0 or line is None:
        run.failed = f"wrk exited {cp.returncode}: {(cp.stderr or cp.stdout).strip()[-500:]}"
        return run
    kv = dict(item.split("=", 1) for item in line.split()[1:])
    run.requests = int(kv["requests"])
    run.duration_s = int(kv["duration_us"]) / 1e6
    run.rps = run.requests / run.duration_s if run.duration_s else 0.0
    run.bytes_per_response = int(kv["bytes"]) / run.requests if run.requests else 0.0
    run.p50_us, run.p90_us, run.p99_us, run.p999_us = (
        int(kv["p50"]),
        int(kv["p90"]),
        int(kv["p99"]),
        int(kv["p999"]),
    )
    run.mean_us = float(kv["mean"])
    run.max_us = int(kv["max"])
    run.errors = {k: int(kv[k]) for k in ("connect", "read", "write", "status", "timeout")}
    if run.requests:
        run.server_cpu_us_per_request = run.server_cpu_s * 1e6 / run.requests
    return run


# -- the benchmark -----------------------------------------------------------------------


def machine_info(wrk: str, nginx: str) -> dict[str, Any]:
    def first_line(argv: list[str]) -> str:
        try:
            cp = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return "?"
        out = (cp.stdout + cp.stderr).strip().splitlines()
        return out[0] if out else "?"

    info: dict[str, Any] = {
        "cpu_count": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "wrk": first_line([wrk, "-v"]),
        "nginx": first_line([nginx, "-v"]),
        "loadavg_before": os.getloadavg(),
    }
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    try:
        from fastpath import _loader

        info["fastpath_core_source"] = _loader.load_core().SOURCE_HASH
    except Exception as exc:  # noqa: BLE001 - informational only
        info["fastpath_core_source"] = f"unavailable: {exc}"
    return info


def median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else 0.0


def summarize(runs: list[Run]) -> dict[str, Any]:
    good = [r for r in runs if not r.failed]
    return {
        "rps_median": median([r.rps for r in good]),
        "rps_rounds": [round(r.rps, 1) for r in good],
        "p50_us_median": median([r.p50_us for r in good]),
        "p99_us_median": median([r.p99_us for r in good]),
        "bytes_per_response": median([r.bytes_per_response for r in good]),
        "server_cpu_us_per_request_median": median([r.server_cpu_us_per_request for r in good]),
        "wrk_cpu_pct_median": median([r.wrk_cpu_pct for r in good]),
        "errors": sum(sum(r.errors.values()) for r in runs),
        "failed_runs": sum(1 for r in runs if r.failed),
    }


def print_table(results: dict[str, Any], scenarios: list[Scenario], targets: list[str]) -> None:
    head = (
        f"{'scenario':<32} {'target':<9} {'req/s median':>13} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'B/resp':>7} {'CPU us/req':>10} {'wrk CPU':>7}  rounds (req/s)"
    )
    print(head)
    print("-" * len(head))
    for sc in scenarios:
        res = results[sc.name]
        for t in targets:
            s = res[t]
            flag = ""
            if s["errors"] or s["failed_runs"]:
                flag = f"  !! {s['errors']} errors, {s['failed_runs']} failed runs"
            rounds = " ".join(f"{x:.0f}" for x in s["rps_rounds"])
            print(
                f"{sc.title:<32} {t:<9} {s['rps_median']:>13,.0f} "
                f"{s['p50_us_median'] / 1000:>8.3f} {s['p99_us_median'] / 1000:>8.3f} "
                f"{s['bytes_per_response']:>7.0f} {s['server_cpu_us_per_request_median']:>10.2f} "
                f"{s['wrk_cpu_pct_median']:>6.0f}%  {rounds}{flag}"
            )
        if "ratio" in res:
            print(
                f"{'':<32} {'ratio':<9} {res['ratio']:>12.2f}x  fastpath/nginx req/s medians "
                f"(per-round pairs: median {res['paired_ratio_median']:.2f}x, "
                f"range {min(res['paired_ratios']):.2f}-{max(res['paired_ratios']):.2f}); "
                f"CPU/req {res['cpu_ratio']:.2f}x"
            )
    print()
    print(
        "req/s and latency: wrk; CPU us/req: user+system CPU of the server's processes "
        "(/proc) per request; wrk CPU: the load generator's CPU (100% = one core saturated)."
    )
    print()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="fastpath vs nginx (same bytes) under wrk, interleaved rounds."
    )
    p.add_argument("--workers", type=int, default=2, help="workers of each server (default 2)")
    p.add_argument("--duration", type=float, default=10, help="seconds per wrk run (default 10)")
    p.add_argument("--connections", type=int, default=32, help="wrk -c (default 32)")
    p.add_argument("--threads", type=int, default=1, help="wrk -t (default 1)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    p.add_argument(
        "--warmup",
        type=float,
        default=2,
        help="seconds of unmeasured wrk load on each target first (default 2; 0: none)",
    )
    p.add_argument(
        "--scenarios",
        default=DEFAULT_SCENARIOS,
        help=f"comma-separated, from {','.join(SCENARIOS)} (default {DEFAULT_SCENARIOS})",
    )
    p.add_argument(
        "--targets",
        default="fastpath,nginx",
        help="comma-separated subset of fastpath,nginx (default both)",
    )
    p.add_argument(
        "--servers",
        type=int,
        default=1000,
        help="servers seeded into fastpath's data dir before it starts, when a read "
        "scenario is selected (default 1000)",
    )
    p.add_argument(
        "--projects",
        type=int,
        default=1,
        help="projects the seeded servers are spread over, round-robin; the read scenarios "
        "ask as the first (default 1)",
    )
    p.add_argument(
        "--data-dir",
        metavar="DIR",
        help="serve this existing, seeded data dir (e.g. filled by 'fastpath seed') instead of "
        "seeding a temporary one; it is neither written nor deleted (--servers/--projects "
        "are then ignored)",
    )
    p.add_argument(
        "--seed-with-cli",
        action="store_true",
        help="seed the temporary data dir with 'fastpath seed --servers N --projects P' "
        "(a process pool; much faster than the in-process seeding for large stores)",
    )
    p.add_argument(
        "--project",
        help="with --data-dir or --seed-with-cli: the project the read scenarios ask as "
        "(default fastpath.seed.project_id(0), with token user_id(0):project_id(0))",
    )
    p.add_argument(
        "--no-warm-store",
        dest="warm_store",
        action="store_false",
        help="do not read the store file through the page cache before fastpath starts "
        "(its residency is reported either way)",
    )
    p.add_argument("--json", metavar="FILE", help="write every run and the summary as JSON")
    p.add_argument(
        "--fastpath-cmd",
        default=f"{shlex.quote(sys.executable)} -m fastpath",
        help="how to run fastpath (default: this Python's -m fastpath); "
        "'serve --bind ... --workers ... --data-dir ...' is appended",
    )
    p.add_argument(
        "--fastpath-set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra --set for fastpath serve; repeatable",
    )
    p.add_argument("--wrk", default=shutil.which("wrk") or "wrk")
    p.add_argument("--nginx", default=shutil.which("nginx") or "/usr/sbin/nginx")
    p.add_argument(
        "--nginx-mode",
        choices=("file", "return"),
        default="file",
        help="file: nginx serves the body as a static file (open_file_cache; one pread per "
        "request); return: from memory with 'return 200 \"...\"', the stronger baseline "
        "(default file)",
    )
    p.add_argument("--keep-tmp", action="store_true", help="keep the temporary directory")
    args = p.parse_args(argv)
    unknown = [s for s in args.scenarios.split(",") if s not in SCENARIOS]
    if unknown:
        p.error(f"unknown scenario(s) {', '.join(unknown)}; known: {', '.join(SCENARIOS)}")
    bad = [t for t in args.targets.split(",") if t not in ("fastpath", "nginx")]
    if bad or not args.targets:
        p.error("--targets: fastpath and/or nginx")
    if args.workers < 1 or args.rounds < 1 or args.duration <= 0 or args.connections < 1:
        p.error("--workers, --rounds, --duration and --connections must be positive")
    if args.servers < 1 or args.projects < 1:
        p.error("--servers and --projects must be positive")
    if args.data_dir and args.seed_with_cli:
        p.error("--data-dir serves an existing store; --seed-with-cli seeds a new one: not both")
    if args.data_dir and not os.path.isdir(args.data_dir):
        p.error(f"--data-dir {args.data_dir}: no such directory")
    if args.project and not (args.data_dir or args.seed_with_cli):
        p.error("--project needs --data-dir or --seed-with-cli")
    return args


def install_tools() -> None:
    """Install wrk and nginx with apt-get when they are missing (root on Debian/Ubuntu, as
    on CI); otherwise the caller prints how to install them."""
    if not shutil.which("apt-get") or os.geteuid() != 0:
        return
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    print("load: installing wrk and nginx-light with apt-get", file=sys.stderr)
    for argv in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "wrk", "nginx-light"]):
        try:
            subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, timeout=600, check=True,
                           stdout=subprocess.DEVNULL)
        except (subprocess.SubprocessError, OSError) as exc:
            print(f"load: {' '.join(argv)} failed: {exc}", file=sys.stderr)
            return


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    targets = args.targets.split(",")
    def present(path: str) -> bool:
        return bool(shutil.which(path) or os.access(path, os.X_OK))

    wanted = [(t, p) for t, p in (("wrk", args.wrk), ("nginx", args.nginx))
              if t == "wrk" or "nginx" in targets]
    if any(not present(path) for _, path in wanted):
        install_tools()
    for tool, path in wanted:
        if not present(path):
            print(
                f"load: {tool} not found ({path}); apt-get install -y wrk nginx-light",
                file=sys.stderr,
            )
            return 2
    scenarios = [SCENARIOS[s] for s in args.scenarios.split(",")]
    command = shlex.join([sys.executable, *sys.argv]) if argv is None else shlex.join(argv)

    # A SIGTERM to this script must still run the finally blocks below.
    def on_term(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    tmp = tempfile.mkdtemp(prefix="fastpath-load-")
    procs: list[Proc] = []
    try:
        return _bench(args, targets, scenarios, command, tmp, procs)
    finally:
        for proc in reversed(procs):
            proc.stop()
        if args.keep_tmp:
            print(f"load: kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def _bench(
    args: argparse.Namespace,
    targets: list[str],
    scenarios: list[Scenario],
    command: str,
    tmp: str,
    procs: list[Proc],
) -> int:
    fp_port = free_port()
    ng_port = free_port()
    while ng_port == fp_port:
        ng_port = free_port()
    host_header = f"{HOST}:{fp_port}"  # both servers get fastpath's Host: same body bytes
    machine = machine_info(args.wrk, args.nginx)

    # fastpath
    seed: dict[str, Any] = {}
    reads = any(sc.seeded for sc in scenarios)
    if args.data_dir:
        # Someone else's data dir: only read (fastpath serve opens it), never deleted.
        data_dir = os.path.abspath(args.data_dir)
        seed = {"source": "existing data dir", "data_dir": data_dir}
    else:
        data_dir = os.path.join(tmp, "data")
        os.makedirs(data_dir)
        if reads and args.seed_with_cli:
            seed = seed_with_cli(args.fastpath_cmd, data_dir, args.servers, args.projects,
                                 os.path.join(tmp, "seed.log"))
            print(f"seeded:   {seed['command']} in {seed['seconds']:.1f}s", flush=True)
        elif reads:
            seed = seed_store(data_dir, args.servers, args.projects)
            print(
                f"seeded:   {seed['servers']} servers over {seed['projects']} project(s) and "
                f"{len(SEED_FLAVORS)} flavors in {seed['seconds']:.1f}s (in-process)",
                flush=True,
            )
    if reads:
        if "token" not in seed:
            seed["project"], seed["token"] = cli_project(args.project)
        # Page cache: the store is read once here (this process never opens it as LMDB).
        seed["page_cache"] = warm_store(data_dir, args.warm_store)
        print(f"store:    {describe_warm(seed['page_cache'])}", flush=True)
    fp_argv = [
        *shlex.split(args.fastpath_cmd),
        "serve",
        "--bind",
        host_header,
        "--workers",
        str(args.workers),
        "--data-dir",
        data_dir,
    ]
    for item in args.fastpath_set:
        fp_argv += ["--set", item]
    fp = Proc("fastpath", fp_argv, os.path.join(tmp, "fastpath.log"), cwd=tmp)
    procs.append(fp)
    wait_ready(fp, fp_port, "/healthz", host_header, 60)
    if reads:
        if "show_id" not in seed:
            seed["show_id"] = resolve_show_id(fp_port, host_header, seed["token"])
        print(
            f"reads:    ask as project {seed['project']} (X-Auth-Token: {seed['token']}); "
            f"show asks for {seed['show_id']}",
            flush=True,
        )
        scenarios = [bind_scenario(sc, seed) for sc in scenarios]

    # The exact bodies fastpath answers, for nginx to serve.
    www = os.path.join(tmp, "www")
    os.makedirs(www)
    bodies: dict[str, bytes] = {}
    for sc in scenarios:
        status, _, body = http_get(fp_port, sc.path, host_header, headers=sc.headers)
        if status != 200:
            raise RuntimeError(f"fastpath answered {sc.title} with {status}: {body[:300]!r}")
        bodies[sc.file] = body
        with open(os.path.join(www, sc.file), "wb") as f:
            f.write(body)

    ng = None
    conf = None
    if "nginx" in targets:
        prefix = os.path.join(tmp, "nginx")
        os.makedirs(os.path.join(prefix, "tmp"))
        locations = "\n".join(
            nginx_location(sc, www, bodies[sc.file], args.nginx_mode)
            for sc in unique_locations(scenarios, bodies)
        )
        conf = NGINX_CONF.format(
            workers=args.workers, prefix=prefix, host=HOST, port=ng_port, locations=locations
        )
        conf_path = os.path.join(prefix, "nginx.conf")
        with open(conf_path, "w") as f:
            f.write(conf)
        # nginx started as root runs its workers as nobody: let them read the bodies.
        for d in (tmp, www):
            os.chmod(d, 0o755)
        for name in bodies:
            os.chmod(os.path.join(www, name), 0o644)
        ng = Proc(
            "nginx",
            [args.nginx, "-p", prefix, "-c", conf_path, "-e", os.path.join(prefix, "error.log")],
            os.path.join(tmp, "nginx.log"),
        )
        procs.append(ng)
        wait_ready(ng, ng_port, scenarios[0].path, host_header, 30)
        for sc in scenarios:
            status, _, body = http_get(ng_port, sc.path, host_header, headers=sc.headers)
            if status != 200 or body != bodies[sc.file]:
                raise RuntimeError(
                    f"nginx does not serve fastpath's body for {sc.title} "
                    f"(status {status}, {len(body)} bytes)"
                )

    ports = {"fastpath": fp_port, "nginx": ng_port}
    pids = {"fastpath": fp.pid, "nginx": ng.pid if ng is not None else 0}
    script = os.path.join(tmp, "report.lua")
    with open(script, "w") as f:
        f.write(WRK_LUA)

    example = {
        sc.name: shlex.join(
            wrk_argv("wrk", args, "report.lua", host_header, sc, fp_port, args.duration)
        )
        for sc in scenarios
    }
    print(f"command: {command}")
    print(f"fastpath: {shlex.join(fp_argv)}  (pid {fp.pid})")
    if ng is not None:
        print(
            f"nginx:    {shlex.join(ng.argv)}  (pid {ng.pid}, worker_processes {args.workers}, "
            f"body from {'a static file' if args.nginx_mode == 'file' else 'memory (return)'})"
        )
    for sc in scenarios:
        print(f"wrk:      {example[sc.name]}   (nginx: port {ng_port}, same Host header)")
    print("bodies:   " + ", ".join(f"{sc.path} {len(bodies[sc.file])} B" for sc in scenarios))
    print(
        f"rounds:   {args.rounds} x {len(scenarios)} scenario(s) x {len(targets)} target(s) x "
        f"{args.duration:g}s, interleaved, order reversed every other round; "
        f"warm-up {args.warmup:g}s per target and scenario"
    )
    print(flush=True)

    if args.warmup > 0:
        for sc in scenarios:
            for t in targets:
                run_wrk(
                    wrk_argv(args.wrk, args, script, host_header, sc, ports[t], args.warmup),
                    args.warmup,
                    t,
                    sc.name,
                    0,
                )

    runs: list[Run] = []
    for rnd in range(1, args.rounds + 1):
        # Interleaved, and the order reversed every other round (A B, B A, ...): whatever
        # favours the first or second run of a round (it happens on a 2-core machine)
        # falls on both targets and both scenarios alike.
        order = 1 if rnd % 2 else -1
        for sc in scenarios[::order]:
            for t in targets[::order]:
                for p in procs:
                    if not p.alive():
                        raise RuntimeError(
                            f"{p.name} exited ({p.popen.returncode}) during the "
                            f"benchmark; its output:\n{p.log_tail()}"
                        )
                run = run_wrk(
                    wrk_argv(args.wrk, args, script, host_header, sc, ports[t], args.duration),
                    args.duration,
                    t,
                    sc.name,
                    rnd,
                    pids[t],
                )
                runs.append(run)
                err = "" if run.ok else f"  !! {run.failed or run.errors}"
                print(
                    f"  round {rnd}  {sc.title:<32} {t:<9} {run.rps:>10,.0f} req/s  "
                    f"p50 {run.p50_us / 1000:.3f} ms  p99 {run.p99_us / 1000:.3f} ms  "
                    f"CPU {run.server_cpu_us_per_request:.2f} us/req  wrk {run.wrk_cpu_pct:.0f}%  "
                    f"load {run.loadavg_after:.1f}{err}",
                    flush=True,
                )

    results: dict[str, Any] = {}
    for sc in scenarios:
        res: dict[str, Any] = {}
        for t in targets:
            res[t] = summarize([r for r in runs if r.scenario == sc.name and r.target == t])
        if "fastpath" in res and "nginx" in res and res["nginx"]["rps_median"]:
            res["ratio"] = res["fastpath"]["rps_median"] / res["nginx"]["rps_median"]
            # Each fastpath run beside the nginx run of the same round: robust to slow drift.
            by_round = {
                (r.round, r.target): r for r in runs if r.scenario == sc.name and not r.failed
            }
            pairs = [
                by_round[(n, "fastpath")].rps / by_round[(n, "nginx")].rps
                for n in range(1, args.rounds + 1)
                if (n, "fastpath") in by_round
                and (n, "nginx") in by_round
                and by_round[(n, "nginx")].rps
            ]
            res["paired_ratios"] = [round(x, 3) for x in pairs]
            res["paired_ratio_median"] = median(pairs)
            ng_cpu = res["nginx"]["server_cpu_us_per_request_median"]
            res["cpu_ratio"] = (
                res["fastpath"]["server_cpu_us_per_request_median"] / ng_cpu if ng_cpu else 0.0
            )
        results[sc.name] = res
    print()
    print_table(results, scenarios, targets)
    print(f"command: {command}")

    if args.json:
        doc = {
            "command": command,
            "wrk_commands": example,
            "fastpath_command": fp_argv,
            "nginx_conf": conf,
            "settings": {
                k: getattr(args, k)
                for k in (
                    "nginx_mode",
                    "workers",
                    "duration",
                    "connections",
                    "threads",
                    "rounds",
                    "warmup",
                    "scenarios",
                    "targets",
                    "servers",
                    "projects",
                    "data_dir",
                    "seed_with_cli",
                    "project",
                    "warm_store",
                )
            },
            "machine": machine,
            "bodies": {sc.name: len(bodies[sc.file]) for sc in scenarios},
            "seed": seed,
            "results": results,
            "runs": [r.__dict__ for r in runs],
        }
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=2)
        print(f"wrote {args.json}")
    ok = all(r.ok for r in runs)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

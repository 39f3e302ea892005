"""The master process end to end: real ``fastpath serve`` processes, real HTTP, signals.

Each test starts its own server on a free port and a fresh data dir and stops it in
teardown (conftest.py); every wait has a deadline.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tests.integration.conftest import FastpathServer

# Test modules do not import conftest (tests/unit has one too); helpers come as fixtures
# and as methods of the server object.
Factory = Callable[..., "FastpathServer"]
TOKEN = {"X-Auth-Token": "admin:admin"}
HEALTHZ_200 = 'fastpath_requests_total{route="GET /healthz",status="200"}'


def more_than(load: Load, n: int) -> bool:
    return load.ok > n


def is_gone(pid: int) -> bool:
    return not os.path.exists(f"/proc/{pid}")


def is_gone_or_zombie(pid: int) -> bool:
    """Orphans are reaped by init (or a subreaper), maybe not at once."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] == b"Z"
    except FileNotFoundError:
        return True


def test_serves_version_documents_and_says_where(fastpath_server: Factory) -> None:
    server = fastpath_server(workers=2)
    out = server.stdout()
    assert f"listening on {server.url} (2 workers, master pid {server.pid})" in out
    assert f"try: curl -s {server.url}/v2.1/ -H 'X-Auth-Token: admin:admin'" in out
    assert server.data_dir.is_dir()
    # The standalone default: it also says which sidecars it runs.
    assert (f"also running cells cell1, cell2, cellsync, forwarder (data dir {server.data_dir})"
            in out)

    root = server.get("/")
    assert root.status == 200
    assert {v["id"] for v in root.json()["versions"]} == {"v2.0", "v2.1"}
    v21 = server.get("/v2.1/", headers=TOKEN)
    assert v21.status == 200
    assert v21.json()["version"]["id"] == "v2.1"


def test_two_workers_both_serve(fastpath_server: Factory) -> None:
    server = fastpath_server(sidecars=False, workers=2)
    pids = server.distinct_pids(2)
    assert pids == server.worker_pids()
    assert server.pid not in pids


def test_metrics_sum_over_both_workers(fastpath_server: Factory) -> None:
    server = fastpath_server(sidecars=False, workers=2)
    server.distinct_pids(2)
    before = server.metrics().get(HEALTHZ_200, 0)
    per_pid: dict[int, int] = {}
    deadline = time.monotonic() + 10
    while len(per_pid) < 2 or sum(per_pid.values()) < 20:
        assert time.monotonic() < deadline, f"requests did not reach both workers: {per_pid}"
        pid = server.healthz_pid()
        per_pid[pid] = per_pid.get(pid, 0) + 1
    total = sum(per_pid.values())
    # Whichever worker renders /metrics, it sums every worker's shared-memory counters.
    seen: list[float] = []

    def summed() -> bool:
        seen.append(server.metrics().get(HEALTHZ_200, 0) - before)
        return seen[-1] == total

    for _ in range(4):
        server.wait_until(summed, 5, lambda: f"the sum to be {total} (saw {seen[-5:]})")


def test_status_lists_master_and_workers(fastpath_server: Factory) -> None:
    server = fastpath_server(sidecars=False, workers=2)
    done = server.status_cli("--json")
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)
    assert [r["role"] for r in rows] == ["master", "worker", "worker"]
    for row in rows:
        assert {"role", "pid", "started", "restarts"} <= row.keys()
        assert row["restarts"] == 0
        assert re.match(r"^\d{4}-\d\d-\d\dT", row["started"])
    assert rows[0]["pid"] == server.pid
    assert {r["pid"] for r in rows[1:]} == server.distinct_pids(2)
    assert all(r["ready"] and r["generation"] == 1 for r in rows[1:])

    table = server.status_cli()
    assert table.returncode == 0
    assert "master" in table.stdout and str(server.pid) in table.stdout

    server.signal(signal.SIGTERM)
    assert server.wait_exit(15) == 0
    gone = server.status_cli("--json")
    assert gone.returncode == 1 and json.loads(gone.stdout) == []
    text = server.status_cli()
    assert text.returncode == 1
    assert f"no fastpath running for {server.data_dir}" in text.stdout


def test_kill_9_of_a_worker_respawns_it_while_the_other_serves(fastpath_server: Factory) -> None:
    server = fastpath_server(sidecars=False, workers=2)
    before = {r["index"]: r["pid"] for r in server.status() if r["role"] == "worker"}
    victim, survivor = before[0], before[1]
    os.kill(victim, signal.SIGKILL)
    # Nothing fails meanwhile: connections hashed to the dead worker's socket wait in its
    # queue (the master holds the socket) until the replacement accepts them.
    answered_by = {server.healthz_pid() for _ in range(20)}

    def respawned() -> dict[int, dict[str, object]] | None:
        rows = {r["index"]: r for r in server.status() if r["role"] == "worker"}
        new = rows.get(0)
        if new and new["pid"] != victim and new["ready"]:
            return rows
        return None

    rows = server.wait_until(respawned, 10, "worker index 0 to be respawned")
    assert rows[0]["restarts"] == 1
    assert rows[1]["pid"] == survivor and rows[1]["restarts"] == 0
    master = server.status()[0]
    assert master["role"] == "master" and master["worker_restarts"] == 1
    cli = json.loads(server.status_cli("--json").stdout)
    assert [r["restarts"] for r in cli if r["role"] == "worker"] == [1, 0]
    assert server.metrics()["fastpath_worker_restarts_total"] == 1
    assert f"worker {victim} (index 0, generation 1) was killed by SIGKILL" in server.stderr()
    assert server.distinct_pids(2) == {rows[0]["pid"], survivor}
    # Some of the 20 were hashed to the dead worker's socket, queued, and answered by its
    # replacement (all 20 landing on the survivor's socket has odds of one in a million).
    assert rows[0]["pid"] in answered_by


class Load:
    """Client threads doing GET /healthz: keep-alive ones and new-connection ones."""

    def __init__(self, port: int, keepalive: int = 2, fresh: int = 2) -> None:
        self.port = port
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.ok = 0
        self.failures: list[str] = []
        self.retries = 0  # idle keep-alive connections closed under a request (retried)
        self.pids: list[int] = []
        self.threads = [
            threading.Thread(target=self._keepalive, daemon=True) for _ in range(keepalive)
        ] + [threading.Thread(target=self._fresh, daemon=True) for _ in range(fresh)]

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(10)

    def _record(self, r: http.client.HTTPResponse) -> None:
        body = r.read()
        with self.lock:
            if r.status == 200:
                self.ok += 1
                self.pids.append(json.loads(body)["pid"])
            else:
                self.failures.append(f"status {r.status}")

    def _fresh(self) -> None:
        while not self.stop.is_set():
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
            try:
                conn.request("GET", "/healthz")
                self._record(conn.getresponse())
            except Exception as exc:  # noqa: BLE001 - every failure is counted
                with self.lock:
                    self.failures.append(f"new connection: {exc!r}")
            finally:
                conn.close()

    def _keepalive(self) -> None:
        while not self.stop.is_set():
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
            try:
                self._persistent(conn)
            finally:
                conn.close()

    def _persistent(self, conn: http.client.HTTPConnection) -> None:
        """Requests on one connection until the server closes it."""
        first = True
        while not self.stop.is_set():
            try:
                conn.request("GET", "/healthz")
                r = conn.getresponse()
                self._record(r)
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError) as exc:
                with self.lock:
                    if first:
                        self.failures.append(f"keep-alive: {exc!r}")
                    else:
                        # The server closed the idle persistent connection as the request
                        # went out; RFC 9112 §9.3.1 lets a client retry (urllib3 and Go do):
                        # the caller repeats it on a new connection.
                        self.retries += 1
                return
            except Exception as exc:  # noqa: BLE001 - every failure is counted
                with self.lock:
                    self.failures.append(f"keep-alive: {exc!r}")
                return
            first = False
            if r.will_close:
                return


def test_sighup_replaces_workers_without_a_failed_request(fastpath_server: Factory) -> None:
    server = fastpath_server(sidecars=False, workers=2)
    old = server.worker_pids()
    retired: set[int] = set()
    with Load(server.port) as load:
        server.wait_until(lambda: load.ok > 50, 10, "load to run")
        for generation in (2, 3, 4):  # a few reloads in a row, the load never stops
            server.signal(signal.SIGHUP)

            def reloaded(generation: int = generation, gone: set[int] = old | retired) -> bool:
                rows = [r for r in server.status() if r["role"] == "worker"]
                return (
                    len(rows) == 2
                    and all(r["generation"] == generation and r["ready"] for r in rows)
                    and not {r["pid"] for r in rows} & gone
                )

            server.wait_until(reloaded, 20, f"generation {generation} to serve alone")
            retired |= old
            old = server.worker_pids()
            done = load.ok
            server.wait_until(partial(more_than, load, done + 50), 10, "load after the reload")
    assert load.failures == []
    assert set(load.pids) & old, "no request was answered by the newest workers"
    master = server.status()[0]
    assert master["generation"] == 4
    assert master["worker_restarts"] == 0  # a reload is not a respawn
    log = server.stderr()
    assert log.count("reload done") == 3
    for pid in retired:
        assert re.search(rf"worker {pid} \(index \d, generation \d\) retiring", log)


def test_sighup_with_a_bad_config_keeps_the_workers(
    fastpath_server: Factory, tmp_path: Path
) -> None:
    config = tmp_path / "fastpath.toml"
    config.write_text("[http]\nmax_headers = 50\n")
    server = fastpath_server(sidecars=False, workers=1, args=["--config", str(config)])
    old = server.worker_pids()
    config.write_text("[http]\nmax_headers = 'many'\n")
    server.signal(signal.SIGHUP)
    server.wait_until(lambda: "reload refused" in server.stderr(), 10, "the reload to be refused")
    assert "http.max_headers" in server.stderr()
    assert server.worker_pids() == old
    assert server.get("/healthz").status == 200


def test_sigterm_lets_an_in_flight_request_finish(fastpath_server: Factory) -> None:
    server = fastpath_server(
        sidecars=False,
        workers=2, args=["--set", "debug.test_routes=true", "--set", "master.graceful_timeout=10"]
    )
    result: dict[str, object] = {}

    def slow() -> None:
        try:
            r = server.get("/debug/sleep?ms=1500", timeout=15)
            result["status"], result["body"] = r.status, r.json()
        except Exception as exc:  # noqa: BLE001
            result["error"] = repr(exc)

    client = threading.Thread(target=slow)
    client.start()
    time.sleep(0.3)  # let the worker read the request; nothing observable tells us sooner
    sent = time.monotonic()
    server.signal(signal.SIGTERM)

    def refused() -> bool:
        try:
            socket.create_connection(("127.0.0.1", server.port), timeout=1).close()
        except ConnectionRefusedError:
            return True
        return False

    server.wait_until(refused, 5, "the listening sockets to close")
    assert client.is_alive(), "the slow request should still be in flight"
    code = server.wait_exit(10)
    client.join(5)
    assert result.get("status") == 200, result
    assert result["body"]["slept_ms"] == 1500  # type: ignore[index]
    assert code == 0
    assert time.monotonic() - sent < 10
    assert "graceful stop" in server.stderr()


def test_sigint_stops_quickly(fastpath_server: Factory) -> None:
    server = fastpath_server(sidecars=False, workers=2)
    workers = server.worker_pids()
    sent = time.monotonic()
    server.signal(signal.SIGINT)
    assert server.wait_exit(5) == 0
    assert time.monotonic() - sent < 3
    for pid in workers:
        server.wait_until(partial(is_gone, pid), 5, f"worker {pid} to exit")


def test_workers_exit_when_the_master_is_killed(fastpath_server: Factory) -> None:
    server = fastpath_server(workers=2)
    children = server.wait_until(
        lambda: len(server.child_pids()) == 6 and server.child_pids(), 20,
        "2 workers, 2 cells, cellsync and the forwarder")
    server.signal(signal.SIGKILL)
    assert server.wait_exit(5) == -signal.SIGKILL
    # PR_SET_PDEATHSIG: each child gets SIGTERM, stops (nothing in flight) and exits.
    for pid in children:
        server.wait_until(partial(is_gone_or_zombie, pid), 10, f"child {pid} to exit")
    done = server.status_cli("--json")
    assert done.returncode == 1 and json.loads(done.stdout) == []


def test_bad_setting_exits_2_naming_the_key(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "fastpath", "serve", "--data-dir", str(tmp_path / "d"),
         "--set", "master.worker_timeout=soon"],
        capture_output=True, text=True, timeout=30,
    )
    assert done.returncode == 2
    assert "'master.worker_timeout'" in done.stderr
    assert not (tmp_path / "d").exists()


def test_second_master_on_the_same_data_dir_is_refused(
    fastpath_server: Factory, free_port: Callable[[], int]
) -> None:
    first = fastpath_server(sidecars=False, workers=1)
    done = subprocess.run(
        [sys.executable, "-m", "fastpath", "serve", "--data-dir", str(first.data_dir),
         "--bind", f"127.0.0.1:{free_port()}", "--workers", "1"],
        capture_output=True, text=True, timeout=30,
    )
    assert done.returncode == 1
    assert f"another fastpath master (pid {first.pid}) is already running" in done.stderr
    assert first.get("/healthz").status == 200


def test_address_in_use_is_refused(fastpath_server: Factory, tmp_path: Path) -> None:
    first = fastpath_server(sidecars=False, workers=1)
    done = subprocess.run(
        [sys.executable, "-m", "fastpath", "serve", "--data-dir", str(tmp_path / "other"),
         "--bind", f"127.0.0.1:{first.port}", "--workers", "1"],
        capture_output=True, text=True, timeout=30,
    )
    assert done.returncode == 1
    assert "address is in use" in done.stderr


def boot_breaker(tmp_path: Path, trigger: Path | None = None) -> dict[str, str]:
    """Environment whose sitecustomize breaks the workers' boot (build_plan raises), always
    or only while ``trigger`` exists.  sitecustomize runs in the master at start; the
    workers call build_plan after fork."""
    hook = tmp_path / "hook"
    hook.mkdir()
    condition = f"os.path.exists({str(trigger)!r})" if trigger else "True"
    (hook / "sitecustomize.py").write_text(
        "import os\n"
        "import fastpath.api.routes as routes\n"
        "real = routes.build_plan\n"
        "def build_plan(*args, **kwargs):\n"
        f"    if {condition}:\n"
        "        raise RuntimeError('boot broken on purpose')\n"
        "    return real(*args, **kwargs)\n"
        "routes.build_plan = build_plan\n"
    )
    path = os.pathsep.join([str(hook), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return {"PYTHONPATH": path}


def test_a_worker_that_cannot_boot_halts_the_master(
    fastpath_server: Factory, tmp_path: Path
) -> None:
    server = fastpath_server(sidecars=False, workers=2, env=boot_breaker(tmp_path), wait=False)
    assert server.wait_exit(15) == 1
    log = server.stderr()
    assert "boot broken on purpose" in log
    assert "could not boot" in log and "halting" in log
    assert log.count(" started (index") <= 2, "a worker that cannot boot must not be respawned"
    assert "listening on" not in server.stdout()


def test_a_reload_whose_worker_cannot_boot_keeps_the_old_workers(
    fastpath_server: Factory, tmp_path: Path
) -> None:
    trigger = tmp_path / "break-boot"
    server = fastpath_server(sidecars=False, workers=2, env=boot_breaker(tmp_path, trigger))
    old = server.worker_pids()
    trigger.touch()
    server.signal(signal.SIGHUP)
    server.wait_until(lambda: "reload aborted" in server.stderr(), 15, "the reload to abort")
    assert server.proc is not None and server.proc.poll() is None, "the master must keep running"
    assert server.worker_pids() == old
    assert server.distinct_pids(2) == old
    # Fixed: the next reload goes through.
    trigger.unlink()
    server.signal(signal.SIGHUP)

    def replaced() -> bool:
        rows = [r for r in server.status() if r["role"] == "worker"]
        return len(rows) == 2 and {r["generation"] for r in rows} == {3}

    server.wait_until(replaced, 15, "generation 3 to replace the old workers")
    assert not server.worker_pids() & old


class NotifyListener:
    """A unix datagram socket in the abstract namespace playing systemd's part."""

    def __init__(self) -> None:
        self.name = f"@fastpath-test-{uuid.uuid4().hex}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(b"\0" + self.name[1:].encode())
        self.messages: list[tuple[float, dict[str, str]]] = []
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        self.sock.settimeout(0.1)
        while not self.stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if line)
            with self.lock:
                self.messages.append((time.monotonic(), fields))

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.sock.close()

    def having(self, key: str, since: float = 0.0) -> list[tuple[float, dict[str, str]]]:
        with self.lock:
            return [(t, m) for t, m in self.messages if key in m and t >= since]


def test_sd_notify_ready_watchdog_reload_stop(fastpath_server: Factory) -> None:
    listener = NotifyListener()
    try:
        server = fastpath_server(
            sidecars=False,
            workers=2,
            # Pings every 0.25 s; a stopped worker's heartbeat is stale after 3 s and it is
            # killed and replaced after worker_timeout.
            args=["--set", "master.worker_timeout=6"],
            env={"NOTIFY_SOCKET": listener.name, "WATCHDOG_USEC": "500000"},
        )
        ready = server.wait_until(lambda: listener.having("READY"), 5, "READY=1")
        assert ready[0][1]["READY"] == "1"
        assert ready[0][1]["MAINPID"] == str(server.pid)
        assert "serving on" in ready[0][1]["STATUS"]
        server.wait_until(lambda: len(listener.having("WATCHDOG")) >= 3, 5, "watchdog pings")

        # A wedged worker (SIGSTOP: no heartbeat) stops the pings; the master kills it after
        # worker_timeout and the pings resume once its replacement beats.
        victim = next(r["pid"] for r in server.status() if r["role"] == "worker")
        os.kill(victim, signal.SIGSTOP)
        stopped_at = time.monotonic()

        def silent() -> bool:
            pings = listener.having("WATCHDOG")
            return time.monotonic() - pings[-1][0] > 1.5

        server.wait_until(silent, 6, "the watchdog pings to stop")
        last = listener.having("WATCHDOG")[-1][0]
        assert last - stopped_at < 4.0  # stale after 3 missed beats, not after worker_timeout
        server.wait_until(
            lambda: listener.having("WATCHDOG", since=last + 0.5), 10, "the pings to resume"
        )
        assert "no heartbeat" in server.stderr()
        server.wait_until(lambda: victim not in server.worker_pids(), 5, "the victim's reaping")

        t0 = time.monotonic()
        server.signal(signal.SIGHUP)
        reloading = server.wait_until(
            lambda: listener.having("RELOADING", since=t0), 5, "RELOADING=1"
        )
        usec = int(reloading[0][1]["MONOTONIC_USEC"])
        assert abs(usec / 1e6 - time.clock_gettime(time.CLOCK_MONOTONIC)) < 10
        server.wait_until(
            lambda: listener.having("READY", since=reloading[0][0]), 15, "READY=1 after reload"
        )

        server.signal(signal.SIGTERM)
        assert server.wait_exit(15) == 0
        assert listener.having("STOPPING")
        assert all("STATUS" in m for _, m in listener.having("READY"))
    finally:
        listener.close()


def test_reload_changes_the_worker_count(fastpath_server: Factory, tmp_path: Path) -> None:
    config = tmp_path / "fastpath.toml"
    config.write_text("workers = 1\n")
    server = fastpath_server(sidecars=False, workers=None, args=["--config", str(config)])
    assert len(server.worker_pids()) == 1

    def workers(n: int, generation: int) -> Callable[[], bool]:
        def check() -> bool:
            rows = [r for r in server.status() if r["role"] == "worker"]
            return len(rows) == n and all(
                r["ready"] and r["generation"] == generation for r in rows
            )

        return check

    config.write_text("workers = 2\n")
    server.signal(signal.SIGHUP)
    server.wait_until(workers(2, 2), 15, "two workers of generation 2")
    assert len(server.distinct_pids(2)) == 2

    config.write_text("workers = 1\n")
    server.signal(signal.SIGHUP)
    server.wait_until(workers(1, 3), 15, "one worker of generation 3")
    # The second socket left the group: every new connection is answered by the one worker.
    (only,) = server.worker_pids()
    assert {server.healthz_pid() for _ in range(20)} == {only}

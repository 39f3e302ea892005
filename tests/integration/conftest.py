"""Fixtures of the integration tests: real ``fastpath serve`` processes on free ports.

Every server runs in its own session (a Ctrl-C of pytest does not reach it), is polled
until ``GET /healthz`` answers (with a deadline, never a fixed sleep) and is stopped in
teardown by PID: SIGTERM to the master, SIGKILL after a deadline, then SIGKILL to any of
its workers still alive (they die with the master anyway; this is the safety net).
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from fastpath.master import status as status_mod

START_TIMEOUT = 20.0
STOP_TIMEOUT = 15.0
NO_SIDECARS = ("--set", "standalone.cells=", "--set", "standalone.cellsync=false",
               "--set", "standalone.forwarder=false")


def seed_catalog(data: Path) -> None:
    """The seeded catalogue (flavors, images, keypairs, AZ, quotas: ``fastpath.seed``)
    straight into the store of ``data``, before a serve starts: what creates need."""
    from fastpath.api import views
    from fastpath.seed import catalog
    from fastpath.store import Batch, Store

    store = Store.open(data, map_size=1 << 26)
    try:
        store.apply(Batch([], catalog=catalog(1)), render=views.render_server)
    finally:
        store.close()


def children(pid: int) -> list[int]:
    """The child processes of ``pid`` (Linux: /proc/PID/task/TID/children); [] once gone."""
    out: list[int] = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            out += [int(c) for c in (task / "children").read_text().split()]
    except FileNotFoundError:
        return []
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(
    predicate: Callable[[], Any],
    timeout: float,
    what: str | Callable[[], str],
    step: float = 0.02,
) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout``.

    ``what`` names the awaited condition (a callable is asked at failure time, so the
    message can show the last values seen)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            text = what() if callable(what) else what
            raise AssertionError(f"timed out after {timeout:g} s waiting for {text}")
        time.sleep(step)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie is not alive for our purpose (its parent has not reaped it yet).
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:
        return False


def _is_fastpath(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"fastpath" in f.read()
    except OSError:
        return False


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class FastpathServer:
    """One ``fastpath serve`` subprocess and helpers to talk to it."""

    data_dir: Path
    port: int
    workers: int | None  # None: no --workers flag (the config file or the default decides)
    args: Sequence[str] = ()
    env: dict[str, str] = field(default_factory=dict)
    # False: no local cells, cellsync or forwarder under the master (faster to start).
    sidecars: bool = True
    proc: subprocess.Popen[bytes] | None = None
    seen_pids: set[int] = field(default_factory=set)
    _out: Path | None = None
    _err: Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def command(self) -> list[str]:
        return [
            sys.executable, "-m", "fastpath", "serve",
            "--bind", f"127.0.0.1:{self.port}",
            "--data-dir", str(self.data_dir),
            *(["--workers", str(self.workers)] if self.workers is not None else []),
            *([] if self.sidecars else NO_SIDECARS),
            *self.args,
        ]

    def start(self, wait: bool = True) -> FastpathServer:
        logs = self.data_dir.parent
        self._out = logs / f"serve-{self.port}.out"
        self._err = logs / f"serve-{self.port}.err"
        env = dict(os.environ)
        env.pop("NOTIFY_SOCKET", None)
        env.pop("WATCHDOG_USEC", None)
        env.update(self.env)
        with open(self._out, "wb") as out, open(self._err, "wb") as err:
            self.proc = subprocess.Popen(
                self.command(), stdout=out, stderr=err, env=env, start_new_session=True
            )
        if wait:
            self.wait_ready()
        return self

    # -- logs -----------------------------------------------------------------------------
    def stdout(self) -> str:
        return self._out.read_text() if self._out and self._out.exists() else ""

    def stderr(self) -> str:
        return self._err.read_text() if self._err and self._err.exists() else ""

    # -- lifecycle ------------------------------------------------------------------------
    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        """Until GET /healthz answers 200 and the master has announced itself."""

        def ready() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"fastpath serve exited with {self.proc.returncode} before it was ready:\n"
                    f"{self.stderr()}"
                )
            try:
                r = self.get("/healthz", timeout=1.0)
            except OSError:
                return False
            return r.status == 200 and "listening on" in self.stdout()

        wait_until(ready, timeout, f"fastpath serve on port {self.port} to answer /healthz")

    def signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def wait_exit(self, timeout: float) -> int:
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"fastpath serve did not exit within {timeout:g} s:\n{self.stderr()}"
            ) from None

    def worker_pids(self) -> set[int]:
        return {r["pid"] for r in self.status() if r["role"] == "worker"}

    def child_pids(self) -> set[int]:
        """Every child of the master: workers and sidecars."""
        return {r["pid"] for r in self.status() if r["role"] != "master"}

    def stop(self) -> None:
        """Stop everything this server started, by PID; safe to call twice."""
        if self.proc is None:
            return
        pids = set(self.seen_pids)
        try:
            pids |= self.child_pids()
        except Exception:  # noqa: BLE001 - teardown must go on
            pass
        if self.proc.poll() is None:
            # A test may have stopped a worker (SIGSTOP): it could not drain otherwise.
            for pid in pids:
                if _alive(pid) and _is_fastpath(pid):
                    os.kill(pid, signal.SIGCONT)
            try:
                self.proc.send_signal(signal.SIGCONT)
                self.proc.terminate()
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(STOP_TIMEOUT)
        for pid in pids:
            if pid != self.proc.pid and _alive(pid) and _is_fastpath(pid):
                os.kill(pid, signal.SIGKILL)

    # -- client helpers -------------------------------------------------------------------
    def get(
        self, path: str, headers: dict[str, str] | None = None, timeout: float = 5.0
    ) -> Response:
        """One request on a new connection."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request("GET", path, headers=headers or {})
            r = conn.getresponse()
            return Response(r.status, {k.lower(): v for k, v in r.getheaders()}, r.read())
        finally:
            conn.close()

    wait_until = staticmethod(wait_until)

    def distinct_pids(self, n: int, timeout: float = 10.0) -> set[int]:
        """New connections until ``n`` worker pids answered (SO_REUSEPORT spreads them)."""
        pids: set[int] = set()

        def enough() -> bool:
            pids.add(self.healthz_pid())
            return len(pids) >= n

        wait_until(enough, timeout, lambda: f"{n} distinct worker pids (seen {pids})", step=0)
        return pids

    def healthz_pid(self) -> int:
        pid = int(self.get("/healthz").json()["pid"])
        self.seen_pids.add(pid)
        return pid

    def status(self) -> list[dict[str, Any]]:
        return status_mod.collect(str(self.data_dir))

    def status_cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "fastpath", "status", "--data-dir", str(self.data_dir), *args],
            capture_output=True, text=True, timeout=30,
        )

    def metrics(self) -> dict[str, float]:
        """``/metrics`` as {'name{labels}': value}."""
        out: dict[str, float] = {}
        for line in self.get("/metrics").body.decode().splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.rpartition(" ")
                out[key] = float(value)
        return out


@pytest.fixture(name="wait_until")
def wait_until_fixture() -> Callable[..., Any]:
    """:func:`wait_until` for the tests (a fixture: test modules do not import conftest)."""
    return wait_until


@pytest.fixture(name="free_port")
def free_port_fixture() -> Callable[[], int]:
    return free_port


@pytest.fixture
def fastpath_server(tmp_path: Path) -> Iterator[Callable[..., FastpathServer]]:
    """A factory: ``fastpath_server(workers=2, args=[...], env={...}, wait=True,
    sidecars=True)``."""
    started: list[FastpathServer] = []

    def start(
        workers: int | None = 2,
        args: Sequence[str] = (),
        env: dict[str, str] | None = None,
        wait: bool = True,
        data_dir: Path | None = None,
        sidecars: bool = True,
    ) -> FastpathServer:
        server = FastpathServer(
            data_dir=data_dir or tmp_path / f"data{len(started)}",
            port=free_port(),
            workers=workers,
            args=args,
            env=env or {},
            sidecars=sidecars,
        )
        started.append(server)
        return server.start(wait=wait)

    yield start
    for server in started:
        server.stop()

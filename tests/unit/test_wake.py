"""Doorbells (fastpath.wake) and the sidecar Control's sleep: real AF_UNIX sockets."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from fastpath import wake
from fastpath.master.shm import SharedState
from fastpath.sidecar import Control, supervised_control


def test_bell_path_creates_the_folder(tmp_path: Path) -> None:
    path = wake.bell_path(str(tmp_path / "data"), "cellsync")
    assert path == str(tmp_path / "data" / "run" / "wake" / "cellsync")
    assert os.path.isdir(os.path.dirname(path))


def test_ring_wakes_a_waiting_bell(tmp_path: Path) -> None:
    path = wake.bell_path(str(tmp_path), "cellsync")
    with wake.Doorbell(path) as bell:
        assert bell.wait(0.0) is False
        wake.ring(path)
        t0 = time.monotonic()
        assert bell.wait(5.0) is True
        assert time.monotonic() - t0 < 1.0
        assert bell.wait(0.0) is False  # that ring was consumed


def test_many_rings_collapse_into_one_wakeup(tmp_path: Path) -> None:
    path = wake.bell_path(str(tmp_path), "cell-a")
    with wake.Doorbell(path) as bell:
        for _ in range(500):  # beyond the queue limit: the extra rings are dropped silently
            wake.ring(path)
        assert bell.wait(1.0) is True
        assert bell.wait(0.0) is False


def test_wait_times_out(tmp_path: Path) -> None:
    with wake.Doorbell(wake.bell_path(str(tmp_path), "forwarder")) as bell:
        t0 = time.monotonic()
        assert bell.wait(0.05) is False
        assert time.monotonic() - t0 >= 0.04


def test_ring_without_a_listener_is_silent(tmp_path: Path) -> None:
    wake.ring(str(tmp_path / "nobody"))  # ENOENT
    path = wake.bell_path(str(tmp_path), "stale")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    stale.bind(path)
    stale.close()  # the file stays, nobody listens: ECONNREFUSED
    wake.ring(path)
    # A new Doorbell replaces the stale socket file.
    with wake.Doorbell(path) as bell:
        wake.ring(path)
        assert bell.wait(1.0)


def test_ring_across_processes(tmp_path: Path) -> None:
    path = wake.bell_path(str(tmp_path), "cellsync")
    with wake.Doorbell(path) as bell:
        code = f"from fastpath import wake; wake.ring({path!r})"
        subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
        assert bell.wait(5.0)


def test_close_unlinks_only_its_own_socket(tmp_path: Path) -> None:
    path = wake.bell_path(str(tmp_path), "cell-b")
    first = wake.Doorbell(path)
    second = wake.Doorbell(path)  # a restarted process binds the same name
    first.close()
    assert os.path.exists(path)
    wake.ring(path)
    assert second.wait(1.0)
    second.close()
    assert not os.path.exists(path)


def test_a_path_too_long_for_sun_path_still_works(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    path = wake.bell_path(str(deep), "cellsync")
    assert len(path) > 107
    with wake.Doorbell(path) as bell:
        wake.ring(path)
        assert bell.wait(1.0)


def test_control_sleep_returns_on_the_bell(tmp_path: Path) -> None:
    path = wake.bell_path(str(tmp_path), "cellsync")
    ctl = Control()
    try:
        with wake.Doorbell(path) as bell:
            assert ctl.sleep(0.01, bell) is False
            wake.ring(path)
            assert ctl.sleep(5.0, bell) is True
    finally:
        ctl.close()


def test_control_sleep_returns_on_stop() -> None:
    ctl = Control()
    ctl.install()
    old = signal.getsignal(signal.SIGTERM)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.05)
        previous_alarm = signal.signal(signal.SIGALRM, lambda *_: os.kill(os.getpid(), signal.SIGTERM))
        t0 = time.monotonic()
        assert ctl.sleep(10.0) is False
        assert ctl.should_stop()
        assert ctl.stop_signal == signal.SIGTERM
        assert time.monotonic() - t0 < 5.0
        signal.signal(signal.SIGALRM, previous_alarm)
    finally:
        signal.signal(signal.SIGTERM, old)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        ctl.close()


def test_supervised_control_beats_and_marks_ready() -> None:
    shm = SharedState(4)
    shm.claim(2, 2, 1, 0, 0)
    ctl = supervised_control(shm, 2)
    try:
        assert shm.pid(2) == os.getpid()
        before = shm.heartbeat_ns(2)
        assert not shm.ready(2)
        ctl.ready()
        assert shm.ready(2)
        ctl.beat()
        assert shm.heartbeat_ns(2) >= before
    finally:
        ctl.close()
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2, signal.SIGTTIN, signal.SIGTTOU):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)

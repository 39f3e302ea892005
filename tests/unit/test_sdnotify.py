"""sd_notify datagrams, written to a socket the test binds (no systemd, no processes)."""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from fastpath.master import sdnotify
from fastpath.master.sdnotify import Notifier


def parse(datagram: bytes) -> dict[str, str]:
    text = datagram.decode()
    assert text.endswith("\n")
    return dict(line.split("=", 1) for line in text.splitlines())


@pytest.fixture
def listener() -> Iterator[tuple[str, socket.socket]]:
    """A datagram socket in the abstract namespace, named as $NOTIFY_SOCKET names it."""
    name = f"@fastpath-unit-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(b"\0" + name[1:].encode())
    sock.settimeout(2)
    yield name, sock
    sock.close()


def test_abstract_socket_address() -> None:
    assert sdnotify.socket_address("@foo/bar") == b"\0foo/bar"
    assert sdnotify.socket_address("/run/systemd/notify") == "/run/systemd/notify"


def test_messages_reach_an_abstract_socket(listener: tuple[str, socket.socket]) -> None:
    name, sock = listener
    env = {"NOTIFY_SOCKET": name}
    n = Notifier.from_environ(env, pid=os.getpid())
    assert n.enabled and n.watchdog is None
    assert env == {}, "the variables are removed so that children do not notify"

    assert n.ready("serving on http://x with 2 workers")
    assert parse(sock.recv(4096)) == {
        "READY": "1",
        "STATUS": "serving on http://x with 2 workers",
        "MAINPID": str(os.getpid()),
    }
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert n.reloading("reloading")
    msg = parse(sock.recv(4096))
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert msg["RELOADING"] == "1" and msg["STATUS"] == "reloading"
    assert before <= int(msg["MONOTONIC_USEC"]) <= after
    assert n.stopping("stopping (SIGTERM)")
    assert parse(sock.recv(4096)) == {"STOPPING": "1", "STATUS": "stopping (SIGTERM)"}
    assert n.watchdog_ping()
    assert parse(sock.recv(4096)) == {"WATCHDOG": "1"}
    assert n.status("two\nlines")
    assert parse(sock.recv(4096)) == {"STATUS": "two lines"}  # a newline would split a field
    n.close()


def test_messages_reach_a_path_socket(tmp_path: Path) -> None:
    path = tmp_path / "notify"
    if len(str(path)) >= 100:  # sun_path is 108 bytes
        pytest.skip("tmp path too long for a unix socket")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(2)
        n = Notifier.from_environ({"NOTIFY_SOCKET": str(path)}, pid=1)
        assert n.status("hello")
        assert parse(sock.recv(4096)) == {"STATUS": "hello"}
        n.close()


def test_no_socket_means_no_op() -> None:
    n = Notifier.from_environ({}, pid=1)
    assert not n.enabled
    assert n.ready("x") is False
    assert n.watchdog_ping() is False


def test_unreachable_socket_is_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    n = Notifier.from_environ({"NOTIFY_SOCKET": f"@fastpath-nobody-{uuid.uuid4().hex}"}, pid=1)
    assert n.status("a") is False
    assert n.status("b") is False
    assert len([r for r in caplog.records if "cannot notify systemd" in r.message]) == 1
    n.close()


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "42"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "43"}, None),  # meant for another pid
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({}, None),
    ],
)
def test_watchdog_interval(env: dict[str, str], expected: float | None) -> None:
    assert sdnotify.watchdog_interval(env, pid=42) == expected
    full = {"NOTIFY_SOCKET": "@x", **env}
    n = Notifier.from_environ(full, pid=42)
    assert n.watchdog == expected
    assert full == {}


def test_watchdog_needs_a_notify_socket() -> None:
    n = Notifier.from_environ({"WATCHDOG_USEC": "1000000"}, pid=1)
    assert n.watchdog is None

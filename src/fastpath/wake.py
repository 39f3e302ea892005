"""Cross-process doorbells: wake a sleeping process at once instead of making it poll.

A doorbell is an AF_UNIX SOCK_DGRAM socket bound at ``DATA_DIR/run/wake/NAME``.  The
sleeper (:class:`Doorbell`) waits on it with ``select``; anyone who just committed work
for it calls :func:`ring`, a non-blocking ``sendto`` of one byte.  Several rings before
the sleeper wakes collapse into one wake-up (``wait`` drains every pending datagram).

Names in use: ``cellsync`` (rung by the cells after a step that committed),
``forwarder`` (rung by the API after a command committed an outbox entry) and
``cell-NAME`` (rung by the forwarder after it delivered inbox rows to cell NAME).

``ring`` runs on hot paths (an API worker answering a command, a cell after every
commit), so it never blocks and never raises: a bell nobody listens on (no socket, or a
stale one: ENOENT, ECONNREFUSED) is simply not heard, and a full queue (EAGAIN,
ENOBUFS) already means "rung".  The sleeper always has a fallback poll, so a lost ring
costs latency, never correctness.
"""

from __future__ import annotations

import hashlib
import os
import select
import socket
import time

WAKE_DIR = os.path.join("run", "wake")
# Datagrams read per recv while draining (their content does not matter).
_DRAIN = 64
# sun_path holds 108 bytes with its NUL (unix(7)).  A longer path (a deep data dir) is
# replaced by a Linux abstract-namespace name derived from it, the same for every process.
_SUN_PATH_MAX = 107


def _address(path: str) -> str:
    if len(os.fsencode(path)) <= _SUN_PATH_MAX:
        return path
    return "\0fastpath-wake-" + hashlib.sha256(os.fsencode(path)).hexdigest()[:40]


def bell_path(data_dir: str, name: str) -> str:
    """The socket path of bell ``name`` under ``data_dir`` (its folder is created)."""
    folder = os.path.join(os.path.abspath(data_dir), WAKE_DIR)
    os.makedirs(folder, exist_ok=True)
    return os.path.join(folder, name)


class Doorbell:
    """The listening end of a bell: bind, wait for rings, close (unlinks the socket)."""

    def __init__(self, path: str) -> None:
        self.path = path
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        try:
            os.unlink(path)  # a stale socket from a process that died (kill -9)
        except FileNotFoundError:
            pass
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        address = _address(path)
        try:
            sock.bind(address)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        self._sock: socket.socket | None = sock
        self._owner = os.getpid()
        # close() unlinks the path only if it still names this socket (not a newer owner's).
        self._ino = os.stat(path).st_ino if address == path else -1

    def fileno(self) -> int:
        if self._sock is None:
            raise ValueError("doorbell is closed")
        return self._sock.fileno()

    def drain(self) -> bool:
        """Read every pending ring without waiting; True if there was at least one."""
        sock = self._sock
        if sock is None:
            return False
        rung = False
        while True:
            try:
                sock.recv(_DRAIN)
            except (BlockingIOError, InterruptedError):
                return rung
            except OSError:
                return rung
            rung = True

    def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for a ring; True if rung (all rings drained).

        A signal that interrupts the wait returns False early (PEP 475 would retry;
        the caller's loop checks its stop flag, so an early return is what it wants).
        """
        if self.drain():
            return True
        sock = self._sock
        if sock is None:
            if timeout > 0:
                time.sleep(timeout)
            return False
        try:
            readable, _, _ = select.select([sock], [], [], max(0.0, timeout))
        except InterruptedError:
            return False
        if not readable:
            return False
        return self.drain()

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is None:
            return
        sock.close()
        # Only the process that bound the socket removes it (a forked child's copy must
        # not unlink its parent's bell, nor a newer owner's bell at the same path).
        if os.getpid() == self._owner:
            try:
                if os.stat(self.path).st_ino == self._ino:
                    os.unlink(self.path)
            except OSError:
                pass

    def __enter__(self) -> Doorbell:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Sender:
    """One unbound non-blocking datagram socket per process, reused by every ring."""

    sock: socket.socket | None = None
    pid = -1

    @classmethod
    def get(cls) -> socket.socket:
        if cls.sock is None or cls.pid != os.getpid():  # a forked child makes its own
            cls.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            cls.sock.setblocking(False)
            cls.pid = os.getpid()
        return cls.sock


def ring(path: str) -> None:
    """Ring the bell at ``path``: never blocks, never raises."""
    try:
        _Sender.get().sendto(b"!", _address(path))
    except OSError:
        # ENOENT / ECONNREFUSED: nobody listens (the sleeper polls anyway);
        # EAGAIN / ENOBUFS: its queue is full, so it is already rung.
        pass

"""The control object of a sidecar process: the cells, cellsync and the forwarder.

A sidecar's main loop is written once, as ``run(settings, ctl) -> int``, and runs the
same way under the master (``fastpath serve`` forks it into a shared-memory slot) and on
its own (``fastpath cell``, ``cellsync``, the forwarder's own command)::

    def run(settings: Settings, ctl: Control) -> int:
        bell = Doorbell(bell_path(settings["data_dir"], "cellsync"))
        ...open databases here, after the fork...
        ctl.ready()
        while not ctl.should_stop():
            ctl.beat()
            if not do_some_work():
                ctl.sleep(fallback_poll, bell)
        return 0

:class:`Control` turns SIGTERM and SIGINT into ``should_stop()`` and makes ``sleep``
return at once when one arrives (a self-pipe registered with ``signal.set_wakeup_fd``,
so no signal is lost between the check and the wait).  Under the master ``beat`` writes
the slot's heartbeat (the master kills a sidecar whose heartbeat is older than
``master.worker_timeout``) and ``ready`` sets the slot's ready flag (``fastpath status``);
alone they do nothing.  ``sleep`` beats at least once a second, so a long fallback poll
never looks like a wedged process.
"""

from __future__ import annotations

import os
import select
import signal
import time
from types import FrameType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fastpath.master.shm import SharedState
    from fastpath.wake import Doorbell

# The longest single wait inside sleep(): the heartbeat is written at least this often.
BEAT_EVERY = 1.0


class Control:
    """Stop flag, heartbeat and readiness of one sidecar process."""

    def __init__(self, shm: SharedState | None = None, slot: int = -1) -> None:
        self._shm = shm
        self._slot = slot
        self._stop = False
        self._signal = 0
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    # -- signals ---------------------------------------------------------------------------
    def install(self) -> None:
        """Route SIGTERM/SIGINT to the stop flag (call in the main thread)."""
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._stop = True
        self._signal = signum

    def request_stop(self) -> None:
        """Stop from inside the process (tests, or a fatal condition in the loop)."""
        self._stop = True
        try:
            os.write(self._wake_w, b"\0")
        except OSError:
            pass

    @property
    def stop_signal(self) -> int:
        """The signal that asked for the stop (0 if none)."""
        return self._signal

    @property
    def supervised(self) -> bool:
        """True when run by the master (a shared-memory slot is attached)."""
        return self._shm is not None

    def fileno(self) -> int:
        """Readable when a stop was asked (for a loop that selects on more than a bell;
        :meth:`sleep` drains it)."""
        return self._wake_r

    # -- the loop's calls ------------------------------------------------------------------
    def should_stop(self) -> bool:
        return self._stop

    def beat(self) -> None:
        if self._shm is not None:
            self._shm.beat(self._slot)

    def ready(self) -> None:
        if self._shm is not None:
            self._shm.set_ready(self._slot)
            self._shm.beat(self._slot)

    def sleep(self, timeout: float, bell: Doorbell | None = None) -> bool:
        """Wait for ``bell``, ``timeout`` seconds or a stop; True if the bell rang."""
        deadline = time.monotonic() + max(0.0, timeout)
        fds: list[int] = [self._wake_r]
        if bell is not None:
            if bell.drain():
                return True
            fds.append(bell.fileno())
        while not self._stop:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            try:
                readable, _, _ = select.select(fds, [], [], min(left, BEAT_EVERY))
            except InterruptedError:
                readable = []
            if self._wake_r in readable:
                self._drain_pipe()
            if bell is not None and bell.fileno() in readable and bell.drain():
                return True
            self.beat()
        return False

    def _drain_pipe(self) -> None:
        try:
            while os.read(self._wake_r, 512):
                pass
        except OSError:
            pass

    def close(self) -> None:
        if self._wake_r >= 0:
            try:
                signal.set_wakeup_fd(-1)
            except ValueError:  # not the main thread
                pass
            os.close(self._wake_r)
            os.close(self._wake_w)
            self._wake_r = self._wake_w = -1


def standalone_control() -> Control:
    """A Control for a sidecar run alone from its command: signal handlers, no shm."""
    ctl = Control()
    ctl.install()
    return ctl


def supervised_control(shm: SharedState, slot: int) -> Control:
    """A Control for a sidecar forked by the master into ``slot`` of ``shm``."""
    # The master's handlers were inherited through fork: reset what the sidecar ignores.
    for sig in (signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2, signal.SIGTTIN, signal.SIGTTOU):
        signal.signal(sig, signal.SIG_IGN)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    shm.set_pid(slot, os.getpid())
    ctl = Control(shm, slot)
    ctl.install()
    ctl.beat()
    return ctl

"""systemd's notification protocol, spoken directly (no libsystemd).

sd_notify(3): "a datagram [is sent] to the AF_UNIX socket referenced in $NOTIFY_SOCKET ...
If the first character of $NOTIFY_SOCKET is "@", the string is understood as Linux abstract
namespace socket."  The message is newline-separated ``KEY=VALUE`` lines.  Credentials are
attached by the kernel (the receiver sets SO_PASSCRED), so a plain ``sendto`` suffices.

Only the master talks to systemd (the unit keeps the default ``NotifyAccess=main``), so
:meth:`Notifier.from_environ` removes the variables from the environment: children forked
or executed later must not believe they are the notifying service (sd_notify's
``unset_environment``).
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import MutableMapping

log = logging.getLogger("fastpath.master")

ENV_SOCKET = "NOTIFY_SOCKET"
ENV_WATCHDOG_USEC = "WATCHDOG_USEC"
ENV_WATCHDOG_PID = "WATCHDOG_PID"


def socket_address(value: str) -> str | bytes:
    """The sendto() address for a $NOTIFY_SOCKET value (abstract names start with NUL)."""
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    return value


def monotonic_usec() -> int:
    """CLOCK_MONOTONIC in microseconds, as ``MONOTONIC_USEC=`` wants it (systemd ≥ 257
    waits for it with ``RELOADING=1`` before it considers a reload started)."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def watchdog_interval(environ: MutableMapping[str, str], pid: int) -> float | None:
    """Seconds between two ``WATCHDOG=1`` pings (half of WATCHDOG_USEC), or None.

    sd_watchdog_enabled(3): WATCHDOG_PID, when set, names the process that must ping;
    any other process (here: anything but the master) must not.
    """
    usec = environ.get(ENV_WATCHDOG_USEC, "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    wpid = environ.get(ENV_WATCHDOG_PID, "")
    if wpid and (not wpid.isdigit() or int(wpid) != pid):
        return None
    return int(usec) / 2e6


class Notifier:
    """Sends notifications to systemd; every method is a no-op without $NOTIFY_SOCKET."""

    def __init__(self, address: str | bytes | None, watchdog: float | None = None) -> None:
        self.address = address
        self.watchdog = watchdog  # seconds between pings, None if no watchdog is wanted
        self._sock: socket.socket | None = None
        self._warned = False

    @classmethod
    def from_environ(
        cls, environ: MutableMapping[str, str] | None = None, pid: int | None = None
    ) -> Notifier:
        env = os.environ if environ is None else environ
        pid = os.getpid() if pid is None else pid
        value = env.get(ENV_SOCKET, "")
        address = socket_address(value) if value else None
        watchdog = watchdog_interval(env, pid) if address is not None else None
        for key in (ENV_SOCKET, ENV_WATCHDOG_USEC, ENV_WATCHDOG_PID):
            env.pop(key, None)
        return cls(address, watchdog)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, **fields: object) -> bool:
        """Send ``KEY=VALUE`` lines (keyword names are the keys); True if it was sent.

        A failure is logged once and otherwise ignored: systemd being unreachable must
        not take the API down.
        """
        if self.address is None:
            return False
        lines = []
        for key, value in fields.items():
            text = str(value)
            if "\n" in text:  # one line per field: a newline would start a new field
                text = text.replace("\n", " ")
            lines.append(f"{key}={text}")
        message = ("\n".join(lines) + "\n").encode("utf-8", "replace")
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto(message, self.address)
        except OSError as exc:
            if not self._warned:
                self._warned = True
                log.warning("cannot notify systemd at %r: %s", self.address, exc)
            return False
        return True

    # The messages fastpath sends, named after what they mean.
    def ready(self, status: str) -> bool:
        return self.send(READY=1, STATUS=status, MAINPID=os.getpid())

    def reloading(self, status: str) -> bool:
        return self.send(RELOADING=1, MONOTONIC_USEC=monotonic_usec(), STATUS=status)

    def stopping(self, status: str) -> bool:
        return self.send(STOPPING=1, STATUS=status)

    def status(self, status: str) -> bool:
        return self.send(STATUS=status)

    def watchdog_ping(self) -> bool:
        return self.send(WATCHDOG=1)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

"""An API worker process: one uvloop loop serving HTTP on its slot's inherited socket.

The master forks this after binding; :func:`run_worker` never returns.  Exit codes:

* 0  clean exit (SIGTERM drain finished, or SIGINT);
* 3  ``EXIT_BOOT_ERROR``: the worker could not start (the master halts instead of
     respawning forever, as gunicorn's arbiter does);
* 1  ``EXIT_CRASH``: an error escaped the loop after the worker served; anything else
     (or a signal) is a crash too, and the master respawns with back-off.

Signals: SIGTERM = stop accepting, finish in-flight requests, close idle keep-alive
connections, exit within ``master.graceful_timeout``; SIGINT = exit now; SIGHUP and
SIGUSR1 are ignored (the master owns reloads).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
import traceback
from typing import NoReturn

from fastpath.master.shm import ROLE_WORKER, SharedState
from fastpath.settings import Settings

EXIT_OK = 0
EXIT_CRASH = 1
EXIT_BOOT_ERROR = 3
# Seconds between closing the listener and closing idle connections on SIGTERM.

log = logging.getLogger("fastpath.worker")


def run_worker(
    settings: Settings, sock: socket.socket, shm: SharedState, slot: int, generation: int
) -> NoReturn:
    code = EXIT_BOOT_ERROR
    try:
        code = _serve(settings, sock, shm, slot, generation)
    except BaseException:  # noqa: BLE001 - a worker reports everything before it exits
        traceback.print_exc()
        sys.stderr.flush()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code)


def _serve(settings: Settings, sock: socket.socket, shm: SharedState, slot: int, generation: int) -> int:
    # Signals: the master's handlers were inherited through fork; reset them first.
    for sig in (signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2, signal.SIGTTIN, signal.SIGTTOU):
        signal.signal(sig, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    signal.set_wakeup_fd(-1)

    shm.set_pid(slot, os.getpid())
    try:
        import uvloop

        from fastpath import _loader
        from fastpath.api.routes import build_plan

        core = _loader.load_core()
        plan = build_plan(settings, shm, slot)
        loop = uvloop.new_event_loop()
        asyncio.set_event_loop(loop)
        worker = core.Worker(plan, shm.buf, shm.slot_offset(slot), loop)
        server = loop.run_until_complete(
            loop.create_server(worker.protocol_factory, sock=sock, backlog=settings["backlog"])
        )
    except Exception:
        log.exception("worker in slot %d could not start", slot)
        return EXIT_BOOT_ERROR

    stopping = {"quick": False, "graceful": False}

    def graceful() -> None:
        if worker.stopping or stopping["graceful"]:
            return
        stopping["graceful"] = True
        log.debug("worker %d: graceful stop", os.getpid())
        server.close()  # our descriptor only: the master keeps the socket and its queue
        # Connections accepted but silent so far are not idle: _core serves their first
        # request (with Connection: close) before the drain completes.
        worker.begin_shutdown(settings["master.graceful_timeout"], loop.stop)

    def quick() -> None:
        stopping["quick"] = True
        server.close()
        loop.stop()

    loop.add_signal_handler(signal.SIGTERM, graceful)
    loop.add_signal_handler(signal.SIGINT, quick)
    worker.start()  # ticker: Date header, heartbeat, timeouts; marks the slot ready
    log.debug("worker %d serving (slot %d, generation %d, role %d)", os.getpid(), slot, generation, ROLE_WORKER)
    try:
        loop.run_forever()
    except Exception:
        # Not EXIT_BOOT_ERROR: this worker did serve, so the master respawns it.
        log.exception("worker %d crashed", os.getpid())
        return EXIT_CRASH
    finally:
        worker.close_all()
    return EXIT_OK

"""The master process behind ``fastpath serve``: binds, pre-forks, supervises, reloads.

Gunicorn's arbiter, trimmed (``benoitc/gunicorn:gunicorn/arbiter.py``): signal handlers
only enqueue the signal (the wakeup fd wakes the loop); one loop dispatches signals, reaps
children, kills the ones whose heartbeat stopped or whose grace ran out, steps a rolling
reload and tops up missing workers.

Sockets.  Closing an SO_REUSEPORT listener drops the connections queued on it: they are
not handed to the other sockets of the group (unless ``net.ipv4.tcp_migrate_req=1``,
Linux >= 5.14).  So the master owns the listening sockets, one per worker *index*, and
closes one only when its index goes away (stop, or a reload to fewer workers).  The worker
of index i (its replacement, and during a reload both the old and the new one) accepts
from socket i; a worker that exits closes only its own descriptor, so the kernel keeps the
socket and its queue for the next worker.

Workers and memory.  Every child owns a slot of the shared memory
(:mod:`fastpath.master.shm`), published as ``DATA_DIR/run/fastpath.shm`` so that
``fastpath status`` can read it; the slot carries the heartbeat (written by the worker's
loop every second), the ready flag and the request counters.

Sidecars.  In the standalone mode (the default) the master also runs, each in its own
shared-memory slot: one local cell per name of ``standalone.cells`` (role ``cell``),
``cellsync`` (``standalone.cellsync``) and the forwarder (``standalone.forwarder``).  A
sidecar's loop is ``run(settings, ctl)`` with a :class:`fastpath.sidecar.Control`; it opens
its databases after the fork.  A sidecar that dies is restarted with the workers' back-off
(never a halt: a cell that cannot start must not take the API down); one whose heartbeat
is older than ``master.sidecar_timeout`` is killed and restarted.  On SIGHUP the set of
sidecars follows the new settings (cells added or removed, cellsync or the forwarder
turned on or off), and a running sidecar is restarted (stopped first, then started with
the new settings) only if a setting it reads changed (``SIDECAR_PREFIXES``); the others
keep running (cellsync finds added cells by itself).

Signals: TERM graceful stop; INT and QUIT quick stop; HUP reload the configuration and
replace the workers one by one (the new worker of an index is ready before the old one is
asked to drain, so no request is refused); CHLD reap.
"""

from __future__ import annotations

import collections
import errno
import fcntl
import logging
import os
import select
import signal
import socket
import sys
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from types import FrameType
from typing import Any, NoReturn

from fastpath import settings as settings_mod
from fastpath.errors import MasterError, SettingsError
from fastpath.master import status as status_mod
from fastpath.master.sdnotify import Notifier
from fastpath.master.shm import (
    ROLE_CELL,
    ROLE_CELLSYNC,
    ROLE_FORWARDER,
    ROLE_NAMES,
    ROLE_WORKER,
    SharedState,
)
from fastpath.master.worker import EXIT_BOOT_ERROR, run_worker
from fastpath.settings import Settings
from fastpath.sidecar import Control, supervised_control

log = logging.getLogger("fastpath.master")

# Slots for the standalone sidecars (two cells, cellsync, forwarder) beside the workers;
# more when standalone.cells names more cells, plus room for cells added by a reload.
SIDECAR_SLOTS = 4
SIDECAR_SPARE_SLOTS = 4
# The master announces readiness (stdout, sd_notify READY=1) once the workers and the
# sidecars are ready, waiting at most this long for the sidecars.
SIDECAR_READY_WAIT = 30.0
# A sidecar is restarted on reload only if a setting it reads changed: these prefixes.
SIDECAR_PREFIXES: dict[int, tuple[str, ...]] = {
    ROLE_CELL: ("cell.", "log."),
    ROLE_CELLSYNC: ("cellsync.", "store.", "log."),
    ROLE_FORWARDER: ("forwarder.", "store.", "log."),
}
# A worker that dies sooner than this after it started counts as crash-looping: its next
# respawn waits twice as long as the last one (from BACKOFF_FIRST up to
# master.respawn_backoff_max); one that lived longer is respawned at once.
QUICK_DEATH = 5.0
BACKOFF_FIRST = 0.1
# On a quick stop (INT, QUIT) workers exit at once; whatever is left after this is killed.
QUICK_STOP_TIMEOUT = 5.0
# The watchdog ping is withheld while a worker's heartbeat is older than this (capped by
# master.worker_timeout): the worker loop beats every second, so three missed beats mean it
# is wedged, and systemd should hear about it before worker_timeout lets the master act.
HEARTBEAT_STALE = 3.0
# Loop wake-ups: often while something is booting (readiness is polled), rarely otherwise.
TICK_BUSY = 0.02
TICK_IDLE = 0.5
# A fork that failed (or found no free slot) is tried again after this many seconds.
SPAWN_RETRY = 0.5
# A master starting while `fastpath status` briefly holds the shared lock retries this long.
LOCK_RETRY = 0.5

HANDLED_SIGNALS = (signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGCHLD)

PR_SET_PDEATHSIG = 1


def _load_prctl() -> Callable[..., int] | None:
    try:
        import ctypes

        prctl: Callable[..., int] = ctypes.CDLL(None, use_errno=True).prctl
    except (ImportError, OSError, AttributeError):  # not Linux: workers rely on the master
        return None
    return prctl


_prctl = _load_prctl()


def _signame(num: int) -> str:
    try:
        return signal.Signals(num).name
    except ValueError:
        return str(num)


def describe_exit(code: int) -> str:
    """``waitstatus_to_exitcode`` result in words: "exited with code 1", "killed by SIGKILL"."""
    return f"exited with code {code}" if code >= 0 else f"was killed by {_signame(-code)}"


@dataclass
class Sidecar:
    """A supervised sidecar: a local cell, cellsync or the forwarder."""

    role: int
    name: str  # the cell's name, "cellsync" or "forwarder"
    index: int  # position among the sidecars of its role (shm worker_index)
    target: Callable[[Settings, Control], int]
    settings: Settings
    pid: int | None = None
    restarts: int = 0
    respawn: bool = False  # the next spawn replaces one that died
    backoff: float = 0.0
    respawn_at: float = 0.0
    removed: bool = False  # dropped by a reload: not started again

    def label(self) -> str:
        role = ROLE_NAMES[self.role]
        return f"{role} {self.name}" if self.role == ROLE_CELL else role


@dataclass
class Proc:
    """A forked child, from fork to reap."""

    pid: int
    slot: int
    index: int
    generation: int
    started: float  # time.monotonic()
    ready: bool = False
    retiring: bool = False  # asked to drain and exit; its exit is expected
    kill_at: float | None = None  # SIGKILL if it is still alive then
    killed: str = ""  # why the master sent SIGKILL, for the exit log line
    sidecar: Sidecar | None = None

    def name(self) -> str:
        if self.sidecar is not None:
            return f"{self.sidecar.label()} {self.pid}"
        return f"worker {self.pid} (index {self.index}, generation {self.generation})"


@dataclass
class WorkerIndex:
    """Worker index i: its listening socket, the settings its worker runs, its respawns."""

    sock: socket.socket
    settings: Settings
    generation: int
    pid: int | None = None  # the worker serving this index (not a retiring one)
    restarts: int = 0
    respawn: bool = False  # the next spawn replaces a worker that died
    backoff: float = 0.0
    respawn_at: float = 0.0


@dataclass
class Reload:
    """A rolling reload in progress: one new worker at a time, old retired once it is ready."""

    settings: Settings
    previous: Settings
    generation: int
    old_count: int
    todo: collections.deque[int] = field(default_factory=collections.deque)
    pending: Proc | None = None  # the new worker being waited for
    deadline: float = 0.0


class Master:
    def __init__(
        self,
        settings: Settings,
        config_file: str | None = None,
        overrides: dict[str, object] | None = None,
    ) -> None:
        self.settings = settings
        self.config_file = config_file
        self.overrides = dict(overrides or {})
        self.data_dir = os.path.abspath(settings["data_dir"])
        self.pid = os.getpid()
        self.indexes: list[WorkerIndex] = []
        self.procs: dict[int, Proc] = {}
        self.generation = 1
        self.reload: Reload | None = None
        self.reload_again = False
        self.stopping = ""  # "", "graceful" or "quick"
        self.stop_deadline = 0.0
        self.exit_code = 0
        self.announced = False
        self.url = ""
        self.shm: SharedState | None = None
        self.shm_path = ""
        self.notifier = Notifier(None)
        self.next_ping = 0.0
        self.watchdog_withheld = False
        self._status_text = ""
        self._lock_fd = -1
        self._wake_r = self._wake_w = -1
        self._signals: collections.deque[int] = collections.deque()
        self._family = socket.AF_INET
        self._address: Any = ()
        self._no_slot_logged = False
        self.started_at = time.monotonic()
        self._sidecar_wait_logged = False
        self.sidecars: list[Sidecar] = []
        self.sidecar_slots = SIDECAR_SLOTS

    # -- entry point --------------------------------------------------------------------
    def run(self) -> int:
        """Serve until stopped; the exit code (0 stopped, 1 halted).  MasterError if it
        cannot start (data dir locked, address in use, ...)."""
        setup_logging(self.settings["log.level"])
        try:
            self._start()  # its errors (MasterError, CoreBuildError) reach the CLI as they are
        except BaseException:
            self._cleanup()
            raise
        try:
            return self._loop()
        except BaseException:
            # A bug in the master must not leave workers behind.
            log.critical("master failed:\n%s", traceback.format_exc().rstrip())
            self._kill_all(signal.SIGKILL, "the master failed")
            return 1
        finally:
            self._cleanup()

    def _start(self) -> None:
        run_dir, pid_path, self.shm_path = status_mod.run_paths(self.data_dir)
        try:
            os.makedirs(run_dir, exist_ok=True)
        except OSError as exc:
            raise MasterError(f"cannot create data dir {self.data_dir}: {exc.strerror}") from None
        self._lock_data_dir(pid_path)
        self._install_signals()
        self.notifier = Notifier.from_environ()

        # Import the worker's code once here: a stale or missing build is reported before
        # anything binds, and the forked workers start with it already loaded.
        from fastpath import _loader
        from fastpath.api import routes  # noqa: F401

        _loader.load_core()
        import uvloop  # noqa: F401

        count = self.settings.worker_count
        self._bind(count)
        self.sidecars = self._plan_sidecars(self.settings)
        self._prepare_cells(self.settings)
        # Room for a reload's new generation beside the draining old one, and the sidecars.
        self.sidecar_slots = max(SIDECAR_SLOTS, len(self.sidecars)) + SIDECAR_SPARE_SLOTS
        nslots = 2 * max(count, os.cpu_count() or 1) + self.sidecar_slots
        try:
            self.shm = SharedState.create_file(self.shm_path, nslots)
        except OSError as exc:
            raise MasterError(f"cannot create {self.shm_path}: {exc.strerror}") from None
        self.shm.set_master_pid(self.pid)
        self.shm.master_started = time.time()
        self.shm.generation = self.generation
        log.info(
            "master %d starting %d workers on %s (data dir %s)%s",
            self.pid, count, self.url, self.data_dir,
            f" and sidecars: {self._sidecar_text()}" if self.sidecars else "",
        )
        self.notifier.status(f"starting {count} workers")
        if self.notifier.watchdog:
            log.info("systemd watchdog: pinging every %.1f s", self.notifier.watchdog)

    # -- data dir lock ------------------------------------------------------------------
    def _lock_data_dir(self, pid_path: str) -> None:
        try:
            fd = os.open(pid_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise MasterError(f"cannot open {pid_path}: {exc.strerror}") from None
        deadline = time.monotonic() + LOCK_RETRY
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    os.close(fd)
                    raise MasterError(f"cannot lock {pid_path}: {exc.strerror}") from None
                if time.monotonic() >= deadline:
                    other = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "?"
                    os.close(fd)
                    raise MasterError(
                        f"another fastpath master (pid {other}) is already running for data dir "
                        f"{self.data_dir}; stop it first, or use another --data-dir"
                    ) from None
                time.sleep(0.02)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{self.pid}\n".encode(), 0)
        self._lock_fd = fd

    # -- listening sockets ----------------------------------------------------------------
    def _bind(self, count: int) -> None:
        host, port = self.settings.bind_address
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        except socket.gaierror as exc:
            raise MasterError(f"cannot listen on {self.settings['bind']}: {exc.strerror}") from None
        family, _, _, _, address = infos[0]
        # SO_REUSEPORT would silently join another process's group on the same port (same
        # user): probe with a plain socket first, which fails if anything listens there.
        # It also turns port 0 into a concrete port every slot's socket then shares.
        probe = socket.socket(family, socket.SOCK_STREAM)
        try:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(address)
            self._address = probe.getsockname()
        except OSError as exc:
            reason = "the address is in use" if exc.errno == errno.EADDRINUSE else exc.strerror
            raise MasterError(f"cannot listen on {self.settings['bind']}: {reason}") from None
        finally:
            probe.close()
        self._family = family
        shown = f"[{host}]" if ":" in host else host
        self.url = f"http://{shown}:{self._address[1]}"
        for _ in range(count):
            self.indexes.append(WorkerIndex(self._listener(), self.settings, self.generation))

    def _listener(self) -> socket.socket:
        sock = socket.socket(self._family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind(self._address)
            sock.listen(self.settings["backlog"])
        except OSError as exc:
            sock.close()
            raise MasterError(f"cannot listen on {self.settings['bind']}: {exc.strerror}") from None
        return sock

    # -- signals --------------------------------------------------------------------------
    def _install_signals(self) -> None:
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        for sig in HANDLED_SIGNALS:
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        # Only enqueue: the loop does the work (the wakeup fd already woke it).
        self._signals.append(signum)

    def _dispatch(self, signum: int) -> None:
        if signum == signal.SIGCHLD:
            return  # the loop reaps on every turn
        if signum == signal.SIGHUP:
            self._begin_reload()
        elif signum == signal.SIGTERM:
            self._begin_stop(quick=False, why="SIGTERM")
        elif signum in (signal.SIGINT, signal.SIGQUIT):
            self._begin_stop(quick=True, why=_signame(signum))

    # -- the loop -------------------------------------------------------------------------
    def _loop(self) -> int:
        while True:
            try:
                while os.read(self._wake_r, 512):
                    pass
            except BlockingIOError:
                pass
            while self._signals:
                self._dispatch(self._signals.popleft())
            self._reap()
            now = time.monotonic()
            self._poll_ready()
            if self.reload is not None:
                self._step_reload(now)
            self._check_workers(now)
            if not self.stopping:
                self._top_up(now)
                self._top_up_sidecars(now)
                self._announce()
            self._watchdog(now)
            if self.stopping and not self.procs:
                log.info("master %d exiting with code %d", self.pid, self.exit_code)
                return self.exit_code
            try:
                select.select([self._wake_r], [], [], self._timeout(time.monotonic()))
            except InterruptedError:
                pass

    def _timeout(self, now: float) -> float:
        timeout = TICK_IDLE
        if any(not p.ready and not p.retiring for p in self.procs.values()):
            timeout = TICK_BUSY
        for ix in self.indexes:
            if ix.pid is None and not self.stopping:
                timeout = min(timeout, max(0.0, ix.respawn_at - now))
        for sc in self.sidecars:
            if sc.pid is None and not sc.removed and not self.stopping:
                timeout = min(timeout, max(0.0, sc.respawn_at - now))
        for p in self.procs.values():
            if p.kill_at is not None:
                timeout = min(timeout, max(0.0, p.kill_at - now))
        if self.notifier.watchdog and self.announced:
            timeout = min(timeout, max(0.0, self.next_ping - now))
        return max(timeout, 0.001)

    # -- spawning -------------------------------------------------------------------------
    def _spawn(self, index: int, settings: Settings, generation: int) -> Proc | None:
        assert self.shm is not None
        ix = self.indexes[index]
        slot = self.shm.free_slot(ROLE_WORKER)
        if slot is None:
            if not self._no_slot_logged:
                self._no_slot_logged = True
                log.warning("no free shared-memory slot for worker index %d; waiting", index)
            return None
        self._no_slot_logged = False
        restarts = ix.restarts + (1 if ix.respawn else 0)
        self.shm.claim(slot, ROLE_WORKER, generation, index, restarts)
        sys.stdout.flush()
        sys.stderr.flush()
        # Signals stay blocked across fork so the child cannot run the master's handlers.
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED_SIGNALS)
        try:
            pid = os.fork()
        except OSError as exc:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
            self.shm.release(slot)
            log.error("cannot fork worker index %d: %s", index, exc.strerror)
            return None
        if pid == 0:
            self._child(index, slot, settings, generation, blocked)
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        self.shm.set_pid(slot, pid)  # the child writes it too; this closes the window
        if ix.respawn:
            ix.respawn = False
            ix.restarts = restarts
            self.shm.worker_restarts += 1
        proc = Proc(pid, slot, index, generation, time.monotonic())
        self.procs[pid] = proc
        log.info(
            "worker %d started (index %d, slot %d, generation %d%s)",
            pid, index, slot, generation, f", restart {restarts}" if restarts else "",
        )
        return proc

    def _child_common(self, mask: Iterable[int]) -> None:
        """In a freshly forked child: die with the master, drop the master's signals and
        descriptors."""
        # Die with the master (a kill -9 of the master must not leave children running).
        if _prctl is not None:
            _prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != self.pid:
            os._exit(0)
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        for fd in (self._wake_r, self._wake_w, self._lock_fd):
            if fd >= 0:
                os.close(fd)
        self.notifier.close()

    def _child(
        self, index: int, slot: int, settings: Settings, generation: int, mask: Iterable[int]
    ) -> NoReturn:
        try:
            self._child_common(mask)
            for i, other in enumerate(self.indexes):
                if i != index:
                    other.sock.close()
            assert self.shm is not None
            run_worker(settings, self.indexes[index].sock, self.shm, slot, generation)
        except BaseException:  # noqa: BLE001 - report, then leave without running atexit
            traceback.print_exc()
        finally:
            os._exit(EXIT_BOOT_ERROR)

    def _top_up(self, now: float) -> None:
        pending = self.reload.pending if self.reload is not None else None
        for i, ix in enumerate(self.indexes):
            if ix.pid is not None or now < ix.respawn_at:
                continue
            if pending is not None and pending.index == i:
                continue  # the reload's new worker takes this index over
            proc = self._spawn(i, ix.settings, ix.generation)
            if proc is not None:
                ix.pid = proc.pid
            else:
                ix.respawn_at = now + SPAWN_RETRY

    # -- sidecars -------------------------------------------------------------------------
    def _plan_sidecars(self, settings: Settings) -> list[Sidecar]:
        """The sidecars ``settings`` ask for (their code imported now, before any fork)."""
        out: list[Sidecar] = []
        cells = settings.standalone_cells
        if cells:
            from fastpath.cell.main import run_cell

            for i, name in enumerate(cells):
                out.append(Sidecar(ROLE_CELL, name, i, _cell_target(run_cell, name), settings))
        if settings["standalone.cellsync"]:
            from cellsync.daemon import run_daemon

            out.append(Sidecar(ROLE_CELLSYNC, "cellsync", 0, run_daemon, settings))
        if settings["standalone.forwarder"]:
            target = _forwarder_target()
            if target is not None:
                out.append(Sidecar(ROLE_FORWARDER, "forwarder", 0, target, settings))
        return out

    def _prepare_cells(self, settings: Settings, names: Iterable[str] | None = None) -> None:
        """Create the local cells' databases now, so that they exist (for ``fastpath seed``
        and the forwarder) as soon as the master answers; the cells open them after fork."""
        from fastpath.cell.registry import open_cell

        for name in settings.standalone_cells if names is None else names:
            try:
                open_cell(self.data_dir, name, create=True).close()
            except Exception as exc:  # noqa: BLE001 - the cell itself reports it again
                raise MasterError(f"cannot create the database of cell {name}: {exc}") from None

    def _sidecar_text(self) -> str:
        live = [sc for sc in self.sidecars if not sc.removed]
        cells = [sc.name for sc in live if sc.role == ROLE_CELL]
        parts = [f"cells {', '.join(cells)}"] if cells else []
        parts += [ROLE_NAMES[sc.role] for sc in live if sc.role != ROLE_CELL]
        return ", ".join(parts)

    def _spawn_sidecar(self, sc: Sidecar, now: float) -> Proc | None:
        assert self.shm is not None
        slot = self.shm.free_slot(sc.role)
        if slot is None:
            if not self._no_slot_logged:
                self._no_slot_logged = True
                log.warning("no free shared-memory slot for %s; waiting", sc.label())
            return None
        self._no_slot_logged = False
        restarts = sc.restarts + (1 if sc.respawn else 0)
        self.shm.claim(slot, sc.role, self.generation, sc.index, restarts, sc.name)
        sys.stdout.flush()
        sys.stderr.flush()
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED_SIGNALS)
        try:
            pid = os.fork()
        except OSError as exc:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
            self.shm.release(slot)
            log.error("cannot fork %s: %s", sc.label(), exc.strerror)
            return None
        if pid == 0:
            self._sidecar_child(sc, slot, blocked)
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        self.shm.set_pid(slot, pid)
        sc.respawn = False
        sc.restarts = restarts
        sc.pid = pid
        proc = Proc(pid, slot, sc.index, self.generation, now, sidecar=sc)
        self.procs[pid] = proc
        log.info(
            "%s started (slot %d%s)",
            proc.name(), slot, f", restart {restarts}" if restarts else "",
        )
        return proc

    def _sidecar_child(self, sc: Sidecar, slot: int, mask: Iterable[int]) -> NoReturn:
        code = 1
        try:
            self._child_common(mask)
            for ix in self.indexes:
                ix.sock.close()  # a sidecar accepts nothing
            assert self.shm is not None
            ctl = supervised_control(self.shm, slot)
            code = int(sc.target(sc.settings, ctl))
        except BaseException:  # noqa: BLE001 - report, then leave without running atexit
            traceback.print_exc()
            code = 1
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)

    def _top_up_sidecars(self, now: float) -> None:
        for sc in self.sidecars:
            if sc.pid is not None or sc.removed or now < sc.respawn_at:
                continue
            if self._spawn_sidecar(sc, now) is None:
                sc.respawn_at = now + SPAWN_RETRY
        self.sidecars = [sc for sc in self.sidecars if not (sc.removed and sc.pid is None)]

    def _sidecar_exited(self, proc: Proc, code: int, what: str) -> None:
        sc = proc.sidecar
        assert sc is not None
        if sc.pid == proc.pid:
            sc.pid = None
        now = time.monotonic()
        if self.stopping or sc.removed:
            expected = code in (0, -signal.SIGTERM, -signal.SIGINT)
            log.log(logging.INFO if expected else logging.WARNING, "%s", what)
            return
        if proc.retiring:  # stopped to restart with new settings: at once
            log.info("%s; starting it again with the new settings", what)
            sc.respawn_at = now
            return
        _schedule_respawn(sc, sc.settings, proc, now, what, "restarting")

    def _reload_sidecars(self, new: Settings) -> None:
        """Make the sidecars follow ``new`` (see the module doc)."""
        wanted = {(sc.role, sc.name): sc for sc in self._plan_sidecars(new)}
        kept: list[Sidecar] = []
        for sc in self.sidecars:
            fresh = wanted.pop((sc.role, sc.name), None)
            proc = self.procs.get(sc.pid) if sc.pid is not None else None
            if fresh is None:
                if not sc.removed:
                    sc.removed = True
                    if proc is not None:
                        self._retire(proc, "no longer in the settings")
            elif sc.removed:
                # Asked for again while the previous reload's stop is under way: it starts
                # again (with the new settings) once that process has exited.
                sc.removed = False
                sc.settings, sc.index = new, fresh.index
            elif _sidecar_settings_changed(sc.role, sc.settings, new):
                sc.settings, sc.index = new, fresh.index
                if proc is not None:
                    self._retire(proc, "its settings changed")
            else:
                sc.settings, sc.index = new, fresh.index
            kept.append(sc)
        for sc in wanted.values():  # newly asked for
            if sc.role == ROLE_CELL:
                try:
                    self._prepare_cells(new, [sc.name])
                except MasterError as exc:
                    log.error("reload: not adding %s: %s", sc.label(), exc)
                    continue
            log.info("reload: adding %s", sc.label())
            kept.append(sc)
        self.sidecars = kept

    # -- reaping and health ---------------------------------------------------------------
    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            proc = self.procs.pop(pid, None)
            if proc is None:
                continue
            assert self.shm is not None
            self.shm.release(proc.slot)
            self._on_exit(proc, os.waitstatus_to_exitcode(status))

    def _on_exit(self, proc: Proc, code: int) -> None:
        now = time.monotonic()
        what = f"{proc.name()} {describe_exit(code)}"
        if proc.killed:
            what += f" ({proc.killed})"
        if proc.sidecar is not None:
            self._sidecar_exited(proc, code, what)
            return
        if self.stopping or proc.retiring:
            expected = code in (0, -signal.SIGTERM, -signal.SIGINT)
            log.log(logging.INFO if expected else logging.WARNING, "%s", what)
            return
        if self.reload is not None and self.reload.pending is proc:
            log.error("%s before it was ready", what)
            self._abort_reload(f"new worker {proc.pid} {describe_exit(code)} before it was ready")
            return
        ix = self.indexes[proc.index] if proc.index < len(self.indexes) else None
        if ix is None or ix.pid != proc.pid:
            log.warning("%s", what)
            return
        ix.pid = None
        if code == EXIT_BOOT_ERROR and not proc.ready:
            log.error("%s: it could not boot (its error is above)", what)
            self._halt(f"worker index {proc.index} could not boot; stopping instead of respawning")
            return
        _schedule_respawn(ix, ix.settings, proc, now, what, "respawning")
        self._set_status(f"respawning worker index {proc.index}")

    def _poll_ready(self) -> None:
        assert self.shm is not None
        became_ready = False
        for proc in self.procs.values():
            if not proc.ready and self.shm.ready(proc.slot):
                proc.ready = became_ready = True
                log.debug("%s ready after %.3f s", proc.name(), time.monotonic() - proc.started)
        if became_ready and self.announced and self.reload is None and self._all_ready():
            self._set_status(self._serving_text())

    def _check_workers(self, now: float) -> None:
        assert self.shm is not None
        now_ns = time.monotonic_ns()
        for proc in list(self.procs.values()):
            if proc.killed:
                continue
            key = "master.worker_timeout" if proc.sidecar is None else "master.sidecar_timeout"
            timeout = self._settings_of(proc)[key]
            age = (now_ns - self.shm.heartbeat_ns(proc.slot)) / 1e9
            if age > timeout:
                self._kill(proc, f"no heartbeat for {age:.1f} s ({key} {timeout:g} s)")
            elif proc.kill_at is not None and now >= proc.kill_at:
                self._kill(proc, "still running when its grace period ended")

    def _settings_of(self, proc: Proc) -> Settings:
        if proc.sidecar is not None:
            return proc.sidecar.settings
        if proc.index < len(self.indexes):
            return self.indexes[proc.index].settings
        return self.settings

    def _kill(self, proc: Proc, why: str) -> None:
        proc.killed = why
        log.warning("%s: %s; sending SIGKILL", proc.name(), why)
        try:
            os.kill(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def _signal(self, proc: Proc, sig: int) -> None:
        try:
            os.kill(proc.pid, sig)
        except ProcessLookupError:
            pass  # already gone; the reap follows

    def _kill_all(self, sig: int, why: str) -> None:
        for proc in list(self.procs.values()):
            proc.killed = proc.killed or why
            self._signal(proc, sig)
        deadline = time.monotonic() + 5.0
        while self.procs and time.monotonic() < deadline:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                time.sleep(0.01)
            else:
                self.procs.pop(pid, None)

    # -- readiness, status, watchdog ------------------------------------------------------
    def _all_ready(self) -> bool:
        for ix in self.indexes:
            proc = self.procs.get(ix.pid) if ix.pid is not None else None
            if proc is None or not proc.ready:
                return False
        return True

    def _serving_text(self) -> str:
        n = len(self.indexes)
        return f"serving on {self.url} with {n} workers (generation {self.generation})"

    def _sidecars_ready(self) -> bool:
        """True once every sidecar is ready, or SIDECAR_READY_WAIT after the start: the
        standalone cloud answers commands from its first announced second (cellsync has
        told the store which cells exist), but a sidecar that cannot start must not keep
        the API from serving reads."""
        if time.monotonic() - self.started_at >= SIDECAR_READY_WAIT:
            if not self._sidecar_wait_logged:
                self._sidecar_wait_logged = True
                late = [sc.label() for sc in self.sidecars if not sc.removed
                        and not (sc.pid is not None and self.procs.get(sc.pid) is not None
                                 and self.procs[sc.pid].ready)]
                if late:
                    log.warning("sidecars not ready after %.0f s: %s; serving without waiting",
                                SIDECAR_READY_WAIT, ", ".join(late))
            return True
        for sc in self.sidecars:
            if sc.removed:
                continue
            proc = self.procs.get(sc.pid) if sc.pid is not None else None
            if proc is None or not proc.ready:
                return False
        return True

    def _announce(self) -> None:
        if self.announced or self.reload is not None or not self._all_ready():
            return
        if not self._sidecars_ready():
            return
        self.announced = True
        n = len(self.indexes)
        plural = "s" if n != 1 else ""
        try:
            print(f"fastpath: listening on {self.url} ({n} worker{plural}, master pid {self.pid})")
            if self.sidecars:
                print(f"fastpath: also running {self._sidecar_text()} (data dir {self.data_dir})")
            print(f"try: curl -s {self.url}/v2.1/ -H 'X-Auth-Token: admin:admin'", flush=True)
        except OSError:  # stdout closed (daemonised by hand): the log line below suffices
            pass
        log.info("ready: %s", self._serving_text())
        self._status_text = self._serving_text()
        self.notifier.ready(self._status_text)
        self.next_ping = time.monotonic()
        if self.reload_again:  # a SIGHUP that came during the boot
            self.reload_again = False
            self._begin_reload()

    def _set_status(self, text: str) -> None:
        if text != self._status_text:
            self._status_text = text
            self.notifier.status(text)

    def _workers_fresh(self) -> bool:
        assert self.shm is not None
        now_ns = time.monotonic_ns()
        for proc in self.procs.values():
            # Sidecars are left out: the master restarts a stuck one itself, and a long
            # resync must not make systemd restart the whole service.
            if proc.retiring or proc.killed or proc.sidecar is not None:
                continue
            stale = min(HEARTBEAT_STALE, self._settings_of(proc)["master.worker_timeout"])
            if now_ns - self.shm.heartbeat_ns(proc.slot) > stale * 1e9:
                return False
        return True

    def _watchdog(self, now: float) -> None:
        interval = self.notifier.watchdog
        if not interval or not self.announced or now < self.next_ping:
            return
        if self._workers_fresh():
            if self.watchdog_withheld:
                self.watchdog_withheld = False
                log.info("systemd watchdog: every worker beats again; pinging")
            self.notifier.watchdog_ping()
            self.next_ping = now + interval
        elif not self.watchdog_withheld:
            # Checked again on every turn, and pinged as soon as the workers beat again.
            self.watchdog_withheld = True
            log.warning("systemd watchdog: a worker's heartbeat is stale; withholding the ping")

    # -- stop -----------------------------------------------------------------------------
    def _begin_stop(self, quick: bool, why: str) -> None:
        if self.stopping == "quick" and quick:
            log.warning("%s again: killing every worker now", why)
            for proc in self.procs.values():
                if not proc.killed:
                    self._kill(proc, "quick stop repeated")
            return
        if self.stopping and not quick:
            return  # already stopping (gracefully or quickly)
        now = time.monotonic()
        first = not self.stopping
        self.stopping = "quick" if quick else "graceful"
        grace = self.settings["master.graceful_timeout"]
        timeout = min(QUICK_STOP_TIMEOUT, grace) if quick else grace
        self.stop_deadline = now + timeout
        log.info(
            "%s: %s stop of %d processes (grace %.1f s)",
            why, self.stopping, len(self.procs), timeout,
        )
        if first:
            self.notifier.stopping(f"stopping ({why})")
            # Listeners: new connections are refused from now on rather than queued for
            # nobody (each socket lives on until its worker closes its own descriptor).
            for ix in self.indexes:
                ix.sock.close()
            if self.reload is not None:
                self.reload = None
        sig = signal.SIGINT if quick else signal.SIGTERM
        for proc in self.procs.values():
            if proc.killed:
                continue
            proc.retiring = True
            proc.kill_at = min(proc.kill_at or self.stop_deadline, self.stop_deadline)
            self._signal(proc, sig)

    def _halt(self, why: str) -> None:
        log.error("halting: %s", why)
        self.exit_code = 1
        self._begin_stop(quick=False, why="halt")

    # -- reload ---------------------------------------------------------------------------
    def _begin_reload(self) -> None:
        if self.stopping:
            return
        if self.reload is not None or not self.announced:
            # One at a time: this one runs when the current reload (or the boot) is done.
            self.reload_again = True
            log.info("SIGHUP: a reload will follow the one in progress")
            return
        log.info("SIGHUP: reloading %s", self.config_file or "the command-line settings")
        self.notifier.reloading("reloading the configuration")
        old = self.settings
        try:
            new = settings_mod.load(self.config_file, self.overrides)
        except SettingsError as exc:
            log.error("reload refused, the workers keep their settings: %s", exc)
            self._status_text = f"{self._serving_text()}; last reload refused: {exc}"
            self.notifier.ready(self._status_text)
            return
        for key in ("data_dir", "bind"):
            if new[key] != old[key]:
                log.warning(
                    "reload: changing %s from %r to %r needs a restart; keeping %r",
                    key, old[key], new[key], old[key],
                )
                new = new.replace(**{key: old[key]})
        assert self.shm is not None
        count = new.worker_count
        most = (self.shm.nslots - self.sidecar_slots) // 2
        if count > most:
            msg = f"{count} workers need a restart (shared memory is sized for {most})"
            log.error("reload refused: %s", msg)
            self._status_text = f"{self._serving_text()}; last reload refused: {msg}"
            self.notifier.ready(self._status_text)
            return
        old_count = len(self.indexes)
        self.generation += 1
        self.shm.generation = self.generation
        self.settings = new
        set_log_level(new["log.level"])
        self._reload_sidecars(new)
        for _ in range(old_count, count):  # more workers: new sockets join the group
            try:
                sock = self._listener()
            except MasterError as exc:
                log.error("reload: %s", exc)
                break
            self.indexes.append(WorkerIndex(sock, new, self.generation, respawn_at=float("inf")))
        todo = collections.deque(range(min(count, len(self.indexes))))
        self.reload = Reload(new, old, self.generation, old_count, todo)
        log.info(
            "reload: generation %d, %d workers (was %d), replacing them one by one",
            self.generation, count, old_count,
        )

    def _step_reload(self, now: float) -> None:
        r = self.reload
        assert r is not None
        while True:
            if r.pending is not None:
                new = r.pending
                if not new.ready:
                    if now > r.deadline:
                        self._kill(new, "not ready in time during the reload")
                        new.retiring = True
                        waited = r.deadline - new.started
                        self._abort_reload(f"new worker {new.pid} not ready within {waited:.0f} s")
                    return
                ix = self.indexes[new.index]
                old_pid = ix.pid
                ix.pid, ix.settings, ix.generation = new.pid, r.settings, r.generation
                ix.respawn, ix.backoff, ix.respawn_at = False, 0.0, 0.0
                r.pending = None
                old = self.procs.get(old_pid) if old_pid is not None else None
                if old is not None:
                    self._retire(old, f"replaced by {new.pid}")
                continue
            if not r.todo:
                break
            i = r.todo.popleft()
            ix = self.indexes[i]
            if ix.generation == r.generation and ix.pid is not None:
                continue  # respawned with the new settings in the meantime
            proc = self._spawn(i, r.settings, r.generation)
            if proc is None:
                r.todo.appendleft(i)  # no free slot until an old worker exits; retry
                return
            r.pending = proc
            r.deadline = now + r.settings["master.worker_timeout"]
        # Fewer workers: index i's socket is closed before its worker drains, so the kernel
        # drops the socket from the group as soon as that worker stops accepting.
        count = r.settings.worker_count
        for ix in self.indexes[count:]:
            ix.sock.close()
            old = self.procs.get(ix.pid) if ix.pid is not None else None
            if old is not None:
                self._retire(old, "fewer workers after the reload")
        del self.indexes[count:]
        self.reload = None
        log.info("reload done: %s", self._serving_text())
        self._status_text = self._serving_text()
        self.notifier.ready(self._status_text)
        if self.reload_again:
            self.reload_again = False
            self._begin_reload()

    def _retire(self, proc: Proc, why: str) -> None:
        proc.retiring = True
        proc.kill_at = time.monotonic() + self._settings_of(proc)["master.graceful_timeout"]
        log.info("%s retiring: %s", proc.name(), why)
        self._signal(proc, signal.SIGTERM)

    def _abort_reload(self, why: str) -> None:
        r = self.reload
        assert r is not None
        self.reload = None
        if r.pending is not None and r.pending.pid in self.procs and not r.pending.killed:
            r.pending.retiring = True
            self._kill(r.pending, "the reload was aborted")
        # Indexes already replaced keep their new worker; the rest keep the old one.  New
        # indexes that got no worker are removed again (their sockets had no acceptor yet).
        keep = r.old_count
        if r.pending is not None:
            keep = max(keep, r.pending.index)
        for ix in self.indexes[keep:]:
            if ix.pid is None:
                ix.sock.close()
        kept = [ix for ix in self.indexes[keep:] if ix.pid is not None]
        self.indexes = self.indexes[:keep] + kept
        self.settings = r.previous
        set_log_level(r.previous["log.level"])
        replaced = sum(1 for ix in self.indexes if ix.generation == r.generation)
        log.error(
            "reload aborted: %s; %d worker(s) run generation %d, the others keep their settings",
            why, replaced, r.generation,
        )
        self._status_text = f"{self._serving_text()}; last reload failed: {why}"
        self.notifier.ready(self._status_text)
        if self.reload_again:  # a SIGHUP that came meanwhile may bring a fixed config
            self.reload_again = False
            self._begin_reload()

    # -- cleanup --------------------------------------------------------------------------
    def _cleanup(self) -> None:
        if self.procs:
            self._kill_all(signal.SIGKILL, "the master is exiting")
        for ix in self.indexes:
            ix.sock.close()
        if self._wake_w >= 0:
            signal.set_wakeup_fd(-1)
            os.close(self._wake_r)
            os.close(self._wake_w)
            self._wake_r = self._wake_w = -1
        self.notifier.close()
        if self.shm is not None:
            try:
                if self.shm.master_pid == self.pid:
                    os.unlink(self.shm_path)
            except OSError:
                pass
            self.shm.buf.close()
            self.shm = None
        if self._lock_fd >= 0:
            # The pid file stays (unlinking a lock file races with a master opening it);
            # emptied, and with nobody holding its lock, it reads as "not running".
            os.ftruncate(self._lock_fd, 0)
            os.close(self._lock_fd)
            self._lock_fd = -1


def _schedule_respawn(
    holder: WorkerIndex | Sidecar, settings: Settings, proc: Proc, now: float, what: str,
    verb: str,
) -> None:
    """The back-off of a worker index or a sidecar whose process just died: at once if it
    lived QUICK_DEATH or longer, else twice the previous wait (BACKOFF_FIRST up to
    master.respawn_backoff_max)."""
    lived = now - proc.started
    holder.respawn = True
    if lived < QUICK_DEATH:
        cap = settings["master.respawn_backoff_max"]
        holder.backoff = min(max(2 * holder.backoff, BACKOFF_FIRST), cap)
    else:
        holder.backoff = 0.0
    holder.respawn_at = now + holder.backoff
    log.warning(
        "%s after %.1f s; %s%s",
        what, lived, verb, f" in {holder.backoff:.1f} s" if holder.backoff else "",
    )


def _cell_target(run_cell: Callable[..., int], name: str) -> Callable[[Settings, Control], int]:
    def target(settings: Settings, ctl: Control) -> int:
        return int(run_cell(settings, name, ctl))

    return target


def _forwarder_target() -> Callable[[Settings, Control], int] | None:
    """``fastpath.forwarder.run`` if that module is there (it is optional)."""
    import importlib

    try:
        mod = importlib.import_module("fastpath.forwarder")
    except ImportError:
        return None
    except Exception:  # noqa: BLE001 - a broken forwarder must not stop the API
        log.exception("fastpath.forwarder cannot be imported; running without the forwarder")
        return None
    run = getattr(mod, "run", None)
    return run if callable(run) else None


def _sidecar_settings_changed(role: int, old: Settings, new: Settings) -> bool:
    prefixes = SIDECAR_PREFIXES[role]
    return any(old[k] != new[k] for k in new if k.startswith(prefixes))


def setup_logging(level: str) -> None:
    """Master and workers log to stderr, one line per event (journald adds the time too)."""
    for name in ("fastpath", "cellsync"):  # cellsync is a top-level package
        logger = logging.getLogger(name)
        if not logger.handlers and not logging.getLogger().handlers:
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(
                logging.Formatter("%(asctime)s %(name)s[%(process)d] %(levelname)s %(message)s")
            )
            logger.addHandler(handler)
    set_log_level(level)


def set_log_level(level: str) -> None:
    logging.getLogger("fastpath").setLevel(level.upper())
    logging.getLogger("cellsync").setLevel(level.upper())

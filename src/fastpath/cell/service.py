"""The cell service: executes the inbox's commands with Nova's state machine (issues 6 and 7).

:class:`CellService` takes commands from the cell database's inbox (oldest first) and drives
the compute driver.  The payloads are those of docs/commands.md ("Inbox payloads").  A
command runs in *phases*; each phase is one atomic unit (state change, change feed entry,
instance action/event rows together), and the next phase falls due ``action_delay`` seconds
later (``build_delay`` for a create).  The units of a step share SQLite transactions, one
savepoint each, and a transaction changes a server at most once (see :meth:`CellService.step`):

============  ==========================================  ===================================
command       phases (task_state written by each)         last phase
============  ==========================================  ===================================
create        row created building / spawning, host       active, power 1, addresses; or
              claimed (the scheduled host if it has room)  error + fault (driver fault, "No
                                                           valid host was found.")
reboot        rebooting (rebooting_hard for HARD)         active, power 1
stop          powering-off                                stopped, power 4
start         powering-on                                 active, power 1
pause         pausing                                     paused, power 3
unpause       unpausing                                   active, power 1
suspend       suspending                                  suspended, power 7
resume        resuming                                    active, power 1
delete        deleting                                    soft-deleted, claims released
resize        resize_prep (new flavor claimed),           resized (VERIFY_RESIZE), the new
              resize_migrating, resize_finish             flavor, host = destination
revertResize  resize_reverting                            the old flavor and host, new claim
                                                           released; active (stopped if off)
rebuild       rebuilding, rebuild_spawning                new image_ref (+ name, description,
                                                           metadata), active (stopped if off)
createImage   image_snapshot, image_pending_upload        task_state none
============  ==========================================  ===================================

One-phase commands change the server when taken: ``lock``/``unlock`` (locked, locked_by,
locked_reason), ``update`` (name, description, hostname), ``metadata`` and ``tags`` (their
``op``), ``confirmResize`` (active, or stopped if powered off; the old claim released).

Every command is finished (``finish_command``) exactly once, in its last transaction, so the
server lists it in ``done_commands`` and the API drops its pending overlay: ``done``; or
``failed`` when the driver raised (power actions and builds: ERROR with a fault; a snapshot:
the server is left as it was, with a fault; a resize with no room: the server is left as it
was, with the fault "No valid host was found.") or when the command does not apply to the
server's state at execution time (no state change; the instance action records the error).

Time is passed in: :meth:`CellService.step` ``(now)`` (seconds since the epoch) advances every
phase whose due time has passed, so tests are deterministic.  Commands for one server run one
at a time, in inbox order; different servers proceed concurrently.  The driver claims at once
for create and resize (so concurrent commands cannot overcommit) and does the rest of its work
in the last phase.

Phases in flight live in memory.  A restarted service gives the driver back its claims from
the database (:meth:`fastpath.cell.driver.SimulatedDriver.restore`) and re-takes the commands
still ``new`` in the inbox; a command whose server shows one of its task states resumes at that
phase (a create whose server exists resumes at its last phase).
"""

from __future__ import annotations

import heapq
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fastpath.cell.db import INSTANCE_COLUMNS, CellDBError, SqliteCellDB
from fastpath.cell.driver import (
    PAUSED,
    RUNNING,
    SHUTDOWN,
    SUSPENDED,
    ComputeDriver,
    DriverFault,
    HostUsage,
    Spawned,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Action:
    """How the cell runs one kind of command (see the module docstring's table)."""

    allowed: frozenset[str] | None  # vm_states it applies to; None: any live server
    task_states: tuple[str, ...]  # written by the phases before the last; (): one phase
    event: str | None  # the instance action event (None: no compute work, no event)
    idle: bool = True  # refused while another task runs (task_state set)
    record: bool = True  # recorded as an instance action (Nova: not update/metadata/tags)
    call: str = ""  # ComputeDriver method of the last phase (power actions)
    vm_state: str = ""  # vm_state after the last phase (power actions)
    power_state: int = 0


_ACTIVE = frozenset({"active"})
ACTIONS: dict[str, Action] = {
    "reboot": Action(frozenset({"active", "stopped", "paused", "suspended", "error"}),
                     ("rebooting",), "compute_reboot_instance", call="reboot",
                     vm_state="active", power_state=RUNNING),
    "stop": Action(frozenset({"active", "paused", "suspended", "rescued", "error"}),
                   ("powering-off",), "compute_stop_instance", call="power_off",
                   vm_state="stopped", power_state=SHUTDOWN),
    "start": Action(frozenset({"stopped"}), ("powering-on",), "compute_start_instance",
                    call="power_on", vm_state="active", power_state=RUNNING),
    "pause": Action(_ACTIVE, ("pausing",), "compute_pause_instance", call="pause",
                    vm_state="paused", power_state=PAUSED),
    "unpause": Action(frozenset({"paused"}), ("unpausing",), "compute_unpause_instance",
                      call="unpause", vm_state="active", power_state=RUNNING),
    "suspend": Action(_ACTIVE, ("suspending",), "compute_suspend_instance", call="suspend",
                      vm_state="suspended", power_state=SUSPENDED),
    "resume": Action(frozenset({"suspended"}), ("resuming",), "compute_resume_instance",
                     call="resume", vm_state="active", power_state=RUNNING),
    "delete": Action(None, ("deleting",), "compute_terminate_instance", idle=False,
                     call="destroy", vm_state="deleted"),
    "lock": Action(None, (), None, idle=False),
    "unlock": Action(None, (), None, idle=False),
    "update": Action(None, (), None, idle=False, record=False),
    "metadata": Action(None, (), None, idle=False, record=False),
    "tags": Action(None, (), None, idle=False, record=False),
    "resize": Action(frozenset({"active", "stopped"}),
                     ("resize_prep", "resize_migrating", "resize_finish"),
                     "compute_resize_instance"),
    "confirmResize": Action(frozenset({"resized"}), (), "compute_confirm_resize"),
    "revertResize": Action(frozenset({"resized"}), ("resize_reverting",),
                           "compute_revert_resize"),
    "rebuild": Action(frozenset({"active", "stopped", "error"}),
                      ("rebuilding", "rebuild_spawning"), "compute_rebuild_instance"),
    "createImage": Action(frozenset({"active", "stopped", "paused", "suspended"}),
                          ("image_snapshot", "image_pending_upload"),
                          "compute_snapshot_instance"),
}
CREATE_EVENT = "compute_build_and_run_instance"
# Servers whose transitions share one SQLite transaction (a step's pass); bounded so that
# the forwarder, waiting to insert into the inbox, never waits long for the write lock.
PASS = 256
RESCAN = 1.0  # seconds between two full reads of the inbox's unfinished commands
SCAN_LIMIT = 100_000  # unfinished commands a full read looks at
# What create_instance takes besides INSTANCE_COLUMNS (fastpath.cell.db).
_CREATE_NESTED = frozenset({"flavor", "metadata", "tags", "security_groups", "network",
                            "volumes", "image_properties", "scheduler_hints",
                            "trusted_image_certificates", "server_groups"})
_CREATE_KEYS = frozenset(INSTANCE_COLUMNS) | _CREATE_NESTED
# What ``update`` may set (the API's UPDATE_FIELDS); ``rebuild`` also the _REBUILD_FIELDS.
_UPDATE_FIELDS = ("name", "description", "hostname", "access_ip_v4", "access_ip_v6",
                  "disk_config")
_REBUILD_FIELDS = (*_UPDATE_FIELDS, "key_name", "user_data")
_NOT_NULL = frozenset({"name", "disk_config"})


def payload_uuid(payload: dict[str, Any]) -> str | None:
    server = payload.get("server")
    return server.get("uuid") if isinstance(server, dict) else None


def _us(now: float) -> int:
    return int(now * 1_000_000)


class Refused(Exception):
    """A command does not apply (bad payload, or the server's state at execution time)."""


@dataclass
class _Job:
    command_id: str
    uuid: str
    action: str
    due: float
    action_id: int
    event_id: int
    payload: dict[str, Any]
    spawned: Spawned | None = None
    fault: DriverFault | None = None
    task_states: tuple[str, ...] = ()
    stage: int = 0  # index in task_states of the task_state the server shows
    extra: dict[str, Any] = field(default_factory=dict)


class CellService:
    """Runs one cell: the inbox's commands through ``driver`` into ``db``."""

    def __init__(self, db: SqliteCellDB, driver: ComputeDriver, name: str) -> None:
        self.db = db
        self.driver = driver
        self.name = name
        self._jobs: dict[str, _Job] = {}  # command_id -> a phase pending
        self._busy: set[str] = set()  # uuids with a job in flight
        self._due: list[tuple[float, str]] = []  # heap of (due, command_id); stale ones skipped
        self._waiting: dict[str, str | None] = {}  # not taken yet, inbox order: id -> uuid
        self._rowid = 0  # the highest inbox rowid read
        self._next_scan = 0.0  # ``now`` of the next full read of the inbox
        self._dirty_hosts: set[str] = set()  # hosts whose usage row may be out of date
        self._host_figures: dict[str, tuple[int, int, int]] = {}  # usage last written
        self._restore_claims()
        with db.transaction():
            for usage in driver.hosts():
                self._write_host(usage)

    def _restore_claims(self) -> None:
        """Give the driver back what the database says the live servers hold."""
        n = 0
        for c in self.db.live_claims():
            m = c["migration"]
            if m is not None and m["source_host"]:
                self.driver.restore(c["uuid"], m["source_host"], m["old_flavor"], c["ip"],
                                    c["mac"], c["power_state"],
                                    resize=(m["dest_host"], m["new_flavor"]))
            else:
                self.driver.restore(c["uuid"], c["host"], c["flavor"], c["ip"], c["mac"],
                                    c["power_state"])
            n += 1
        if n:
            log.info("cell %s: restored the claims of %d server(s)", self.name, n)

    # -- the loop body ---------------------------------------------------------------------
    def step(self, now: float) -> int:
        """Advance everything due at ``now``; returns how many transitions were committed.

        PERF: the transitions of a step share SQLite transactions (one fsync per pass of up
        to :data:`PASS` servers instead of one per transition), each command's unit in its own
        savepoint (``atomic``) so a refused one leaves the others.  A pass changes a server at
        most once, so every state change still has its own version step and feed entry.
        """
        done = self._run_due(now)
        self._read_inbox(now)
        # Commands to take now: the oldest waiting one of each idle server, at most PASS;
        # payloads are decoded only for those.
        chosen: list[tuple[str, str | None]] = []
        touched: set[str] = set()
        for command_id, uuid in self._waiting.items():
            if uuid is not None:
                if uuid in self._busy or uuid in touched:
                    continue  # in order per server: wait for the command in flight
                touched.add(uuid)
            chosen.append((command_id, uuid))
            if len(chosen) >= PASS:
                break
        for command_id, _ in chosen:
            del self._waiting[command_id]
        payloads = self.db.command_payloads([cid for cid, _ in chosen])
        todo: list[tuple[str, str | None, dict[str, Any]]] = []
        for command_id, uuid in chosen:
            payload = payloads[command_id]
            target = uuid or payload_uuid(payload)
            if uuid is None and target is not None:  # named in the payload only
                if target in self._busy or target in touched:
                    continue
                touched.add(target)
            todo.append((command_id, target, payload))
        if todo:
            with self.db.transaction():
                for command_id, target, payload in todo:
                    if target is None:
                        self._reject(command_id, None, payload, now, "command names no server")
                        done += 1
                    else:
                        done += self._start(command_id, target, payload, now)
                self._flush_hosts()
        # Phases whose delay is zero complete within the same step.
        return done + self._run_due(now)

    def _read_inbox(self, now: float) -> None:
        """Bring ``_waiting`` (commands not yet taken, inbox order) up to date: the rows
        inserted since the last read, and every unfinished row once per RESCAN seconds
        (which also catches a row that slipped past the rowid watermark)."""
        if now >= self._next_scan:
            rows = self.db.pending_heads(limit=SCAN_LIMIT)
            self._waiting = {cid: u for _, cid, u in rows if cid not in self._jobs}
            self._next_scan = now + RESCAN
        else:
            rows = self.db.pending_heads(limit=4 * PASS, after_rowid=self._rowid)
            for _, cid, u in rows:
                if cid not in self._jobs:
                    self._waiting.setdefault(cid, u)
        if rows:
            self._rowid = max(self._rowid, max(r for r, _, _ in rows))

    def _run_due(self, now: float) -> int:
        done = 0
        heap = self._due
        while heap and heap[0][0] <= now:
            due: list[_Job] = []
            while heap and heap[0][0] <= now and len(due) < PASS:
                at, command_id = heapq.heappop(heap)
                job = self._jobs.get(command_id)
                if job is not None and job.due == at:  # else a stale entry: skip it
                    due.append(job)
            if not due:
                continue
            with self.db.transaction():
                for job in due:
                    self._advance(job, now)
                    done += 1
                self._flush_hosts()
        return done

    def next_due(self) -> float | None:
        """When the earliest phase in flight falls due (None: nothing in flight)."""
        heap = self._due
        while heap and (heap[0][1] not in self._jobs or self._jobs[heap[0][1]].due != heap[0][0]):
            heapq.heappop(heap)
        return heap[0][0] if heap else None

    # -- taking a command ------------------------------------------------------------------
    def _start(self, command_id: str, uuid: str, payload: dict[str, Any], now: float) -> int:
        action = str(payload.get("action"))
        if action == "create":
            return self._start_create(command_id, uuid, payload, now)
        spec = ACTIONS.get(action)
        rows = self.db.load_instance(uuid)
        if spec is None or rows is None or rows["instance"]["deleted_at"] is not None:
            why = (f"unknown action {action!r}" if spec is None else
                   f"no instance {uuid}" if rows is None else f"instance {uuid} is deleted")
            self._reject(command_id, uuid if rows else None, payload, now, why)
            return 1
        inst = rows["instance"]
        task_states = self._task_states(action, spec, payload)
        resuming = inst["task_state"] is not None and inst["task_state"] in task_states
        if not resuming and ((spec.allowed is not None and inst["vm_state"] not in spec.allowed)
                             or (spec.idle and inst["task_state"] is not None)):
            self._reject(command_id, uuid, payload, now,
                         f"Cannot '{action}' instance {uuid} while it is in vm_state"
                         f" {inst['vm_state']}, task_state {inst['task_state']}")
            return 1
        try:
            if not task_states:
                self._one_phase(command_id, uuid, action, spec, payload, rows, now)
                return 1
            stage = task_states.index(inst["task_state"]) if resuming else 0
            with self.db.atomic():
                if not resuming:
                    self._prepare(action, uuid, command_id, payload, rows, now)
                    self.db.update_instance(uuid, task_state=task_states[0], updated_at=_us(now))
                action_id, event_id = self._begin_action(uuid, command_id, action,
                                                         spec.event, payload, inst, now)
        except (Refused, CellDBError) as e:
            if action == "resize" and not resuming:  # give back a claim taken before it failed
                self._write_hosts(self.driver.revert_resize(uuid))
            self._reject(command_id, uuid, payload, now, str(e))
            return 1
        except DriverFault as e:
            self._fail_unchanged(command_id, uuid, action, payload, inst, now, e)
            return 1
        self._track(_Job(command_id, uuid, action, now + self.driver.action_delay, action_id,
                         event_id, payload, task_states=task_states, stage=stage,
                         extra={"prior": inst["vm_state"], "power": inst["power_state"]}))
        return 1

    @staticmethod
    def _task_states(action: str, spec: Action, payload: dict[str, Any]) -> tuple[str, ...]:
        if action == "reboot" and str(payload.get("type", "SOFT")).upper() == "HARD":
            return ("rebooting_hard",)
        return spec.task_states

    def _prepare(self, action: str, uuid: str, command_id: str, payload: dict[str, Any],
                 rows: dict[str, Any], now: float) -> None:
        """What a multi-phase command does when taken, inside its first transaction."""
        if action == "resize":
            flavor = payload.get("flavor")
            if not isinstance(flavor, dict) or rows["flavor"] is None:
                raise Refused("resize: no flavor snapshot in the command")
            _scalar_fields(payload, ("disk_config",))  # refused now, not in the last phase
            try:
                host, node = self.driver.resize_claim(uuid, flavor)
            except KeyError as e:
                raise Refused(f"resize: invalid flavor, missing {e}") from None
            self.db.start_migration(uuid, command_id, rows["instance"]["host"], host, node,
                                    _record_flavor(rows["flavor"]), flavor, at=_us(now))
            self._write_hosts(self.driver.hosts_of(uuid))
        elif action == "rebuild":
            if not isinstance(payload.get("image_ref"), str):
                raise Refused("rebuild: no image_ref in the command")
            _scalar_fields(payload, _REBUILD_FIELDS)  # refused now, not in the last phase
        elif action == "revertResize":
            if self.db.active_migration(uuid) is None:
                raise Refused(f"instance {uuid} has no resize to revert")

    def _start_create(self, command_id: str, uuid: str, payload: dict[str, Any],
                      now: float) -> int:
        server = {k: v for k, v in dict(payload.get("server") or {}).items() if k in _CREATE_KEYS}
        ignored = set(payload.get("server") or {}) - _CREATE_KEYS
        if ignored:
            log.warning("cell %s: create %s: ignoring field(s) %s", self.name, uuid,
                        sorted(ignored))
        server["uuid"] = uuid
        existing = self.db.load_instance(uuid)
        spawned: Spawned | None = None
        fault: DriverFault | None = None
        host = payload.get("host")
        try:
            spawned = self.driver.spawn(uuid, server.get("flavor") or {},
                                        host if isinstance(host, str) else None,
                                        network=payload.get("networks") != "none")
        except DriverFault as e:
            fault = e
        except KeyError as e:
            fault = DriverFault(400, f"Invalid flavor: missing {e}")
        try:
            with self.db.atomic():
                if existing is None:
                    server.setdefault("created_at", _us(now))
                    server.update(vm_state="building", task_state="spawning", power_state=0,
                                  updated_at=_us(now))
                    if spawned is not None:
                        server.update(host=spawned.host, node=spawned.node,
                                      availability_zone=spawned.availability_zone)
                    self.db.create_instance(server)
                elif existing["instance"]["vm_state"] != "building":
                    raise CellDBError(f"instance {uuid} exists and is not building")
                elif spawned is not None:  # resumed after a restart
                    self.db.update_instance(uuid, host=spawned.host, node=spawned.node,
                                            updated_at=_us(now))
                if spawned is not None:
                    self._write_host_of(spawned.host)
                inst = existing["instance"] if existing else server
                action_id, event_id = self._begin_action(uuid, command_id, "create",
                                                         CREATE_EVENT, payload, inst, now)
        except (CellDBError, KeyError) as e:
            if spawned is not None:
                self._release(uuid)
            # Only a payload the cell cannot make a server of (no flavor...) ends here.
            log.error("cell %s: create %s refused: %s", self.name, uuid, e)
            self._reject(command_id, None, payload, now, str(e))
            return 1
        self._track(_Job(command_id, uuid, "create", now + self.driver.build_delay, action_id,
                         event_id, payload, spawned=spawned, fault=fault))
        return 1

    def _begin_action(self, uuid: str, command_id: str, action: str, event: str | None,
                      payload: dict[str, Any], inst: dict[str, Any],
                      now: float) -> tuple[int, int]:
        action_id = self.db.record_action(
            uuid, command_id, action, str(payload.get("project_id") or inst["project_id"]),
            str(payload.get("user_id") or inst["user_id"]), start_time=_us(now))
        event_id = 0
        if event is not None:
            event_id = self.db.open_action_event(action_id, event, start_time=_us(now))
        return action_id, event_id

    def _track(self, job: _Job) -> None:
        self._jobs[job.command_id] = job
        self._busy.add(job.uuid)
        heapq.heappush(self._due, (job.due, job.command_id))

    # -- one-phase commands ----------------------------------------------------------------
    def _one_phase(self, command_id: str, uuid: str, action: str, spec: Action,
                   payload: dict[str, Any], rows: dict[str, Any], now: float) -> None:
        ts = _us(now)
        inst = rows["instance"]
        with self.db.atomic():
            if action == "lock":
                reason = payload.get("reason")
                self.db.update_instance(uuid, locked=True,
                                        locked_by=str(payload.get("locked_by") or "owner"),
                                        locked_reason=reason if isinstance(reason, str) else None,
                                        updated_at=ts)
            elif action == "unlock":
                self.db.update_instance(uuid, locked=False, locked_by=None, locked_reason=None,
                                        updated_at=ts)
            elif action == "update":
                self.db.update_instance(uuid, updated_at=ts,
                                        **_scalar_fields(payload, _UPDATE_FIELDS))
            elif action == "metadata":
                self.db.set_metadata(uuid, _metadata_op(rows["metadata"], payload))
            elif action == "tags":
                self.db.set_tags(uuid, _tags_op(rows["tags"], payload))
            elif action == "confirmResize":
                hosts = self.driver.confirm_resize(uuid)
                mig = self.db.active_migration(uuid)
                if mig is not None:
                    self.db.set_migration_status(uuid, mig["request_id"], "confirmed", at=ts)
                self.db.update_instance(uuid, vm_state=_settled(inst["power_state"]),
                                        task_state=None, updated_at=ts)
                self._write_hosts(hosts)
            if spec.record:
                action_id, event_id = self._begin_action(uuid, command_id, action, spec.event,
                                                         payload, inst, now)
                if event_id:
                    self.db.finish_action_event(event_id, "Success", None, finish_time=ts)
                self.db.finish_action(action_id, finish_time=ts)
            self.db.finish_command(command_id, "done")

    # -- later phases ----------------------------------------------------------------------
    def _advance(self, job: _Job, now: float) -> None:
        if job.action != "create" and job.stage + 1 < len(job.task_states):
            job.stage += 1
            ts = _us(now)
            with self.db.atomic():
                self.db.update_instance(job.uuid, task_state=job.task_states[job.stage],
                                        updated_at=ts)
                if job.action == "resize":
                    status = ("migrating", "post-migrating")[min(job.stage - 1, 1)]
                    self.db.set_migration_status(job.uuid, job.command_id, status, at=ts)
            job.due = now + self.driver.action_delay
            heapq.heappush(self._due, (job.due, job.command_id))
            return
        if job.action == "create":
            self._finish_create(job, now)
        else:
            self._finish_action(job, now)
        del self._jobs[job.command_id]
        self._busy.discard(job.uuid)

    def _finish_create(self, job: _Job, now: float) -> None:
        ts = _us(now)
        with self.db.atomic():
            if job.spawned is not None:
                self.db.update_instance(job.uuid, vm_state="active", task_state=None,
                                        power_state=RUNNING, launched_at=ts, updated_at=ts)
                self.db.set_network(job.uuid, job.spawned.network_info())
                self._close_action(job, ts, None)
                self.db.finish_command(job.command_id, "done")
            else:
                fault = job.fault or DriverFault(500, "Unknown spawn failure")
                self.db.update_instance(job.uuid, vm_state="error", task_state=None,
                                        power_state=0, updated_at=ts)
                self.db.add_fault(job.uuid, fault.code, fault.message, fault.details,
                                  None, created_at=ts)
                self._close_action(job, ts, fault)
                self.db.finish_command(job.command_id, "failed")

    def _finish_action(self, job: _Job, now: float) -> None:
        ts = _us(now)
        fault: DriverFault | None = None
        hosts: list[str] = []
        try:
            hosts = self._last_call(job)
        except DriverFault as e:
            fault = e
        with self.db.atomic():
            if fault is not None:
                # A failed snapshot leaves the server as it was (Nova resets the task only).
                vm_state = job.extra["prior"] if job.action == "createImage" else "error"
                self.db.update_instance(job.uuid, vm_state=vm_state, task_state=None,
                                        updated_at=ts)
                self.db.add_fault(job.uuid, fault.code, fault.message, fault.details,
                                  None, created_at=ts)
            else:
                self._last_phase(job, ts)
                self._write_hosts(hosts)
            self._close_action(job, ts, fault)
            self.db.finish_command(job.command_id, "failed" if fault else "done")

    def _last_call(self, job: _Job) -> list[str]:
        """The driver's work of the last phase; the hosts whose usage it changed."""
        spec = ACTIONS[job.action]
        if job.action == "reboot":
            self.driver.reboot(job.uuid, hard=job.task_states == ("rebooting_hard",))
        elif job.action == "delete":
            hosts = self.driver.hosts_of(job.uuid)
            self.driver.destroy(job.uuid)
            return hosts
        elif spec.call:
            call: Callable[[str], Any] = getattr(self.driver, spec.call)
            call(job.uuid)
        elif job.action == "revertResize":
            return self.driver.revert_resize(job.uuid)
        elif job.action == "rebuild":
            self.driver.rebuild(job.uuid)
        elif job.action == "createImage":
            self.driver.snapshot(job.uuid)
        return []

    def _last_phase(self, job: _Job, ts: int) -> None:
        """The state change of a successful last phase (inside its transaction)."""
        spec = ACTIONS[job.action]
        uuid, p = job.uuid, job.payload
        fields: dict[str, Any]
        if job.action == "delete":
            self.db.delete_instance(uuid, deleted_at=ts)
        elif spec.vm_state:
            self.db.update_instance(uuid, vm_state=spec.vm_state, task_state=None,
                                    power_state=spec.power_state, updated_at=ts)
        elif job.action == "resize":
            mig = self.db.active_migration(uuid)
            if mig is None:
                raise CellDBError(f"resize of {uuid}: its migration is gone")
            self.db.set_flavor(uuid, mig["new_flavor"])
            fields = _scalar_fields(p, ("disk_config",))
            self.db.update_instance(uuid, vm_state="resized", task_state=None,
                                    host=mig["dest_host"], node=mig["dest_node"], updated_at=ts,
                                    **fields)
            self.db.set_migration_status(uuid, job.command_id, "finished", at=ts)
        elif job.action == "revertResize":
            mig = self.db.active_migration(uuid)
            fields = {}
            if mig is not None:
                self.db.set_flavor(uuid, mig["old_flavor"])
                src = self.db.host(mig["source_host"]) if mig["source_host"] else None
                fields = {"host": mig["source_host"], "node": src["node"] if src else None}
                self.db.set_migration_status(uuid, mig["request_id"], "reverted", at=ts)
            self.db.update_instance(uuid, vm_state=_settled(job.extra["power"]),
                                    task_state=None, updated_at=ts, **fields)
        elif job.action == "rebuild":
            stopped = job.extra["prior"] == "stopped"  # Nova keeps a stopped server stopped
            fields = _scalar_fields(p, _REBUILD_FIELDS)
            self.db.update_instance(uuid, image_ref=p["image_ref"],
                                    vm_state="stopped" if stopped else "active",
                                    power_state=SHUTDOWN if stopped else RUNNING,
                                    task_state=None, launched_at=ts, updated_at=ts, **fields)
            if isinstance(p.get("metadata"), dict):
                self.db.set_metadata(uuid, {str(k): str(v) for k, v in p["metadata"].items()})
            extra = {k: p[src] for k, src in (("image_properties", "image_properties"),
                                              ("trusted_certs", "trusted_image_certificates"))
                     if src in p}
            if extra:
                self.db.update_extra(uuid, **extra)
        elif job.action == "createImage":
            self.db.update_instance(uuid, task_state=None, updated_at=ts)

    def _close_action(self, job: _Job, ts: int, fault: DriverFault | None) -> None:
        if job.event_id:
            self.db.finish_action_event(job.event_id, "Error" if fault else "Success",
                                        None if fault is None else fault.message, finish_time=ts)
        self.db.finish_action(job.action_id, message="Error" if fault else None,
                              finish_time=ts)

    # -- refusals and hosts ----------------------------------------------------------------
    def _reject(self, command_id: str, uuid: str | None, payload: dict[str, Any], now: float,
                why: str) -> None:
        """A command that cannot run: finished as failed, the server is not changed."""
        ts = _us(now)
        log.info("cell %s: command %s failed: %s", self.name, command_id, why)
        with self.db.atomic():
            if uuid is not None:
                rows = self.db.load_instance(uuid)
                if rows is not None:
                    inst = rows["instance"]
                    action_id = self.db.record_action(
                        uuid, command_id, str(payload.get("action")),
                        str(payload.get("project_id") or inst["project_id"]),
                        str(payload.get("user_id") or inst["user_id"]), start_time=ts)
                    self.db.add_action_event(action_id, f"compute_{payload.get('action')}",
                                             result="Error", traceback=why, start_time=ts,
                                             finish_time=ts)
                    self.db.finish_action(action_id, message="Error", finish_time=ts)
            self.db.finish_command(command_id, "failed")

    def _fail_unchanged(self, command_id: str, uuid: str, action: str,
                        payload: dict[str, Any], inst: dict[str, Any], now: float,
                        fault: DriverFault) -> None:
        """The driver refused when taken (a resize with no room): a fault, no state change."""
        ts = _us(now)
        log.info("cell %s: %s of %s failed: %s", self.name, action, uuid, fault.message)
        with self.db.atomic():
            self.db.add_fault(uuid, fault.code, fault.message, fault.details, None,
                              created_at=ts)
            action_id, event_id = self._begin_action(uuid, command_id, action,
                                                     ACTIONS[action].event, payload, inst, now)
            if event_id:
                self.db.finish_action_event(event_id, "Error", fault.message, finish_time=ts)
            self.db.finish_action(action_id, message="Error", finish_time=ts)
            self.db.finish_command(command_id, "failed")

    def _release(self, uuid: str) -> None:
        hosts = self.driver.hosts_of(uuid)
        self.driver.destroy(uuid)
        self._write_hosts(hosts)

    def _write_hosts(self, names: list[str]) -> None:
        """Mark hosts whose usage changed; written once per pass (:meth:`_flush_hosts`).

        The driver is the truth about usage, so a unit rolled back after marking a host
        only costs a rewrite of the same figures.
        """
        self._dirty_hosts.update(names)

    def _flush_hosts(self) -> None:
        """Write the usage of the marked hosts whose figures moved (the host rows exist:
        ``__init__`` declared them)."""
        if not self._dirty_hosts:
            return
        wanted, self._dirty_hosts = self._dirty_hosts, set()
        for usage in self.driver.hosts():
            name = usage.spec.name
            figures = (usage.vcpus_used, usage.ram_mb_used, usage.disk_gb_used)
            if name in wanted and self._host_figures.get(name) != figures:
                self.db.set_host_usage(name, *figures)
                self._host_figures[name] = figures

    def _write_host_of(self, host: str) -> None:
        self._write_hosts([host])

    def _write_host(self, usage: HostUsage) -> None:
        spec = usage.spec
        self.db.upsert_host(spec.name, spec.node_name, spec.vcpus, spec.ram_mb, spec.disk_gb,
                            spec.az)
        figures = (usage.vcpus_used, usage.ram_mb_used, usage.disk_gb_used)
        self.db.set_host_usage(spec.name, *figures)
        self._host_figures[spec.name] = figures


# -- payload helpers ------------------------------------------------------------------------------
def _settled(power_state: int) -> str:
    """The vm_state a server settles in after confirming or reverting a resize."""
    return "stopped" if power_state == SHUTDOWN else "active"


def _record_flavor(f: dict[str, Any]) -> dict[str, Any]:
    """The flavor snapshot of ``load_instance`` (cell columns) in the record's keys."""
    return {"id": str(f["flavor_id"]), "name": f["name"], "vcpus": f["vcpus"],
            "ram": f["memory_mb"], "disk": f["root_gb"], "ephemeral": f["ephemeral_gb"],
            "swap": f["swap"], "extra_specs": dict(f["extra_specs"])}


def _scalar_fields(p: dict[str, Any], names: tuple[str, ...]) -> dict[str, Any]:
    """The instance columns among ``names`` that the payload sets, checked (strings, or null
    where the column allows it); :class:`Refused` otherwise."""
    out: dict[str, Any] = {}
    for k in names:
        if k in p:
            v = p[k]
            if not (isinstance(v, str) or (v is None and k not in _NOT_NULL)):
                raise Refused(f"{k} must be a string")
            out[k] = v
    return out


def _metadata_op(current: dict[str, str], p: dict[str, Any]) -> dict[str, str]:
    op = p.get("op")
    if op in ("replace", "merge"):
        md = p.get("metadata")
        if not isinstance(md, dict):
            raise Refused(f"metadata {op}: no metadata map")
        new = {str(k): str(v) for k, v in md.items()}
        return new if op == "replace" else {**current, **new}
    if op == "set" and isinstance(p.get("key"), str):
        return {**current, p["key"]: str(p.get("value"))}
    if op == "delete" and isinstance(p.get("key"), str):
        return {k: v for k, v in current.items() if k != p["key"]}
    raise Refused(f"metadata: bad op {op!r}")


def _tags_op(current: list[str], p: dict[str, Any]) -> list[str]:
    op = p.get("op")
    if op == "replace" and isinstance(p.get("tags"), list):
        return [str(t) for t in p["tags"]]
    if op == "add" and isinstance(p.get("tag"), str):
        return [*current, p["tag"]]
    if op == "delete" and isinstance(p.get("tag"), str):
        return [t for t in current if t != p["tag"]]
    if op == "clear":
        return []
    raise Refused(f"tags: bad op {op!r}")


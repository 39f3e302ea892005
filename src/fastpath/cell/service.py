"""The cell service: executes the inbox's commands with Nova's state machine (issue 6).

:class:`CellService` takes commands from the cell database's inbox (oldest first) and drives
the compute driver.  Each command has two phases, each one cell transaction (state change,
change feed entry, instance action/event rows together):

========  ====================================  ==========================================
command   phase 1 (when taken)                  phase 2 (``build_delay``/``action_delay`` later)
========  ====================================  ==========================================
create    row created: building / spawning,     active, power 1, addresses, launched_at;
          host + node if the driver claimed     or error + fault (driver fault, no valid host)
reboot    task_state rebooting(_hard)           active, power 1
stop      task_state powering-off               stopped, power 4
start     task_state powering-on                active, power 1
pause     task_state pausing                    paused, power 3
unpause   task_state unpausing                  active, power 1
suspend   task_state suspending                 suspended, power 7
resume    task_state resuming                   active, power 1
delete    task_state deleting                   soft-deleted, capacity and IP released
========  ====================================  ==========================================

The command is finished (``finish_command``) exactly once, in phase 2's transaction:
``done``, or ``failed`` when the driver raised (the server goes to ERROR with a fault) or the
command does not apply to the server's state (no state change, the action records an error).

Payloads: ``{"action": "create", "server": <create_instance values without the states>}``;
``{"action": "reboot", "type": "SOFT" | "HARD"}``; ``{"action": "stop" | "start" | "pause" |
"unpause" | "suspend" | "resume" | "delete"}``; optional ``project_id``/``user_id`` for the
instance action (else the server's).

Time is passed in: :meth:`CellService.step` ``(now)`` (seconds since the epoch) advances every
phase whose due time has passed, so tests are deterministic.  Commands for one server run one
at a time, in inbox order; different servers proceed concurrently.  The driver is called in
phase 1 for create (the claim must be immediate so concurrent builds cannot overcommit) and in
phase 2 for the other commands.

Phases in flight live in memory: a restarted service re-takes commands still ``new`` in the
inbox (a create whose server already exists resumes at phase 2).  Rebuilding the simulated
driver's claims from the database after a restart is still to do.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fastpath.cell.db import CellDBError, SqliteCellDB
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
class Transition:
    """A non-create command: allowed vm_states, its task_state, driver call, end state."""

    allowed: frozenset[str]
    task_state: str
    call: str  # ComputeDriver method name
    vm_state: str
    power_state: int
    event: str


_ANY_LIVE = frozenset({"active", "building", "stopped", "paused", "suspended", "error",
                       "rescued", "resized", "shelved", "shelved_offloaded", "soft-delete"})
TRANSITIONS: dict[str, Transition] = {
    "reboot": Transition(frozenset({"active", "stopped", "paused", "suspended", "error"}),
                         "rebooting", "reboot", "active", RUNNING, "compute_reboot_instance"),
    "stop": Transition(frozenset({"active", "paused", "suspended", "rescued", "error"}),
                       "powering-off", "power_off", "stopped", SHUTDOWN,
                       "compute_stop_instance"),
    "start": Transition(frozenset({"stopped"}), "powering-on", "power_on", "active", RUNNING,
                        "compute_start_instance"),
    "pause": Transition(frozenset({"active"}), "pausing", "pause", "paused", PAUSED,
                        "compute_pause_instance"),
    "unpause": Transition(frozenset({"paused"}), "unpausing", "unpause", "active", RUNNING,
                          "compute_unpause_instance"),
    "suspend": Transition(frozenset({"active"}), "suspending", "suspend", "suspended",
                          SUSPENDED, "compute_suspend_instance"),
    "resume": Transition(frozenset({"suspended"}), "resuming", "resume", "active", RUNNING,
                         "compute_resume_instance"),
    "delete": Transition(_ANY_LIVE, "deleting", "destroy", "deleted", 0,
                         "compute_terminate_instance"),
}
CREATE_EVENT = "compute_build_and_run_instance"


def payload_uuid(payload: dict[str, Any]) -> str | None:
    server = payload.get("server")
    return server.get("uuid") if isinstance(server, dict) else None


def _us(now: float) -> int:
    return int(now * 1_000_000)


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
    extra: dict[str, Any] = field(default_factory=dict)


class CellService:
    """Runs one cell: the inbox's commands through ``driver`` into ``db``."""

    def __init__(self, db: SqliteCellDB, driver: ComputeDriver, name: str) -> None:
        self.db = db
        self.driver = driver
        self.name = name
        self._jobs: dict[str, _Job] = {}  # command_id -> phase 2 pending
        self._busy: set[str] = set()  # uuids with a job in flight
        with db.transaction():
            for usage in driver.hosts():
                self._write_host(usage)

    # -- the loop body ---------------------------------------------------------------------
    def step(self, now: float) -> int:
        """Advance everything due at ``now``; returns how many transitions were committed."""
        done = 0
        for job in sorted(self._jobs.values(), key=lambda j: (j.due, j.command_id)):
            if job.due <= now:
                self._finish(job, now)
                done += 1
        for command_id, uuid, payload in self.db.pending_commands(limit=1000):
            if command_id in self._jobs:
                continue
            target = uuid or payload.get("server", {}).get("uuid")
            if target is None:
                self._reject(command_id, None, payload, now, "command names no server")
                done += 1
                continue
            if target in self._busy:
                continue  # in order per server: wait for the command in flight
            done += self._start(command_id, target, payload, now)
        # A phase whose delay is zero completes within the same step.
        for job in sorted(self._jobs.values(), key=lambda j: (j.due, j.command_id)):
            if job.due <= now:
                self._finish(job, now)
                done += 1
        return done

    def next_due(self) -> float | None:
        """When the earliest phase in flight falls due (None: nothing in flight)."""
        return min((j.due for j in self._jobs.values()), default=None)

    # -- phase 1 ---------------------------------------------------------------------------
    def _start(self, command_id: str, uuid: str, payload: dict[str, Any], now: float) -> int:
        action = payload.get("action")
        if action == "create":
            return self._start_create(command_id, uuid, payload, now)
        tr = TRANSITIONS.get(str(action))
        rows = self.db.load_instance(uuid)
        if tr is None or rows is None:
            why = f"unknown action {action!r}" if tr is None else f"no instance {uuid}"
            self._reject(command_id, uuid if rows else None, payload, now, why)
            return 1
        inst = rows["instance"]
        resuming = inst["task_state"] == self._task_state(tr, payload)
        if not resuming and (inst["vm_state"] not in tr.allowed or inst["task_state"]):
            self._reject(command_id, uuid, payload, now,
                         f"Cannot '{action}' instance {uuid} while it is in vm_state"
                         f" {inst['vm_state']}, task_state {inst['task_state']}")
            return 1
        with self.db.transaction():
            self.db.update_instance(uuid, task_state=self._task_state(tr, payload),
                                    updated_at=_us(now))
            action_id, event_id = self._begin_action(uuid, command_id, str(action), tr.event,
                                                     payload, inst, now)
        self._track(_Job(command_id, uuid, str(action), now + self.driver.action_delay,
                         action_id, event_id, payload, extra={"prior": inst["vm_state"]}))
        return 1

    @staticmethod
    def _task_state(tr: Transition, payload: dict[str, Any]) -> str:
        if tr.call == "reboot" and str(payload.get("type", "SOFT")).upper() == "HARD":
            return "rebooting_hard"
        return tr.task_state

    def _start_create(self, command_id: str, uuid: str, payload: dict[str, Any],
                      now: float) -> int:
        server = dict(payload.get("server") or {})
        server["uuid"] = uuid
        existing = self.db.load_instance(uuid)
        spawned: Spawned | None = None
        fault: DriverFault | None = None
        try:
            spawned = self.driver.spawn(uuid, server.get("flavor") or {})
        except DriverFault as e:
            fault = e
        except KeyError as e:
            fault = DriverFault(400, f"Invalid flavor: missing {e}")
        try:
            with self.db.transaction():
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
            log.warning("cell %s: create %s refused: %s", self.name, uuid, e)
            self._reject(command_id, None, payload, now, str(e))
            return 1
        self._track(_Job(command_id, uuid, "create", now + self.driver.build_delay, action_id,
                         event_id, payload, spawned=spawned, fault=fault))
        return 1

    def _begin_action(self, uuid: str, command_id: str, action: str, event: str,
                      payload: dict[str, Any], inst: dict[str, Any],
                      now: float) -> tuple[int, int]:
        action_id = self.db.record_action(
            uuid, command_id, action, str(payload.get("project_id") or inst["project_id"]),
            str(payload.get("user_id") or inst["user_id"]), start_time=_us(now))
        event_id = self.db.add_action_event(action_id, event, start_time=_us(now))
        return action_id, event_id

    def _track(self, job: _Job) -> None:
        self._jobs[job.command_id] = job
        self._busy.add(job.uuid)

    # -- phase 2 ---------------------------------------------------------------------------
    def _finish(self, job: _Job, now: float) -> None:
        if job.action == "create":
            self._finish_create(job, now)
        else:
            self._finish_action(job, now)
        del self._jobs[job.command_id]
        self._busy.discard(job.uuid)

    def _finish_create(self, job: _Job, now: float) -> None:
        ts = _us(now)
        with self.db.transaction():
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
        tr = TRANSITIONS[job.action]
        call: Callable[..., Any] = getattr(self.driver, tr.call)
        fault: DriverFault | None = None
        host: str | None = None
        try:
            if tr.call == "reboot":
                call(job.uuid, hard=self._task_state(tr, job.payload) == "rebooting_hard")
            elif tr.call == "destroy":
                host = call(job.uuid)
            else:
                call(job.uuid)
        except DriverFault as e:
            fault = e
        with self.db.transaction():
            if fault is not None:
                self.db.update_instance(job.uuid, vm_state="error", task_state=None,
                                        updated_at=ts)
                self.db.add_fault(job.uuid, fault.code, fault.message, fault.details,
                                  None, created_at=ts)
            elif tr.call == "destroy":
                self.db.delete_instance(job.uuid, deleted_at=ts)
                if host is not None:
                    self._write_host_of(host)
            else:
                self.db.update_instance(job.uuid, vm_state=tr.vm_state, task_state=None,
                                        power_state=tr.power_state, updated_at=ts)
            self._close_action(job, ts, fault)
            self.db.finish_command(job.command_id, "failed" if fault else "done")

    def _close_action(self, job: _Job, ts: int, fault: DriverFault | None) -> None:
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
        with self.db.transaction():
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

    def _release(self, uuid: str) -> None:
        host = self.driver.destroy(uuid)
        if host is not None:
            with self.db.transaction():
                self._write_host_of(host)

    def _write_host_of(self, host: str) -> None:
        for usage in self.driver.hosts():
            if usage.spec.name == host:
                self._write_host(usage)

    def _write_host(self, usage: HostUsage) -> None:
        spec = usage.spec
        self.db.upsert_host(spec.name, spec.node_name, spec.vcpus, spec.ram_mb, spec.disk_gb,
                            spec.az)
        self.db.set_host_usage(spec.name, usage.vcpus_used, usage.ram_mb_used,
                               usage.disk_gb_used)

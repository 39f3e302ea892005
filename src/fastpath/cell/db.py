"""The cell database: normalized compute state, the command inbox and the change feed.

A cell owns the truth about its servers (DESIGN.md, "Data flow").  Its database is shaped for
compute work, in the spirit of Nova's cell database, and is reached only through
:class:`CellDB`; :class:`SqliteCellDB` is the embedded default (one SQLite file in WAL mode
under the data dir).  A PostgreSQL backend implements the same interface later.

Schema (``SCHEMA``)
-------------------
Times are integers, microseconds since the Unix epoch (UTC), as in the store's record, so
nothing is lost or reformatted on the way up.  Child rows are keyed by the instance uuid and a
natural key (P1: no cell-local autoincrement id ever leaves the cell, except the ids of
actions, faults and events, which are never synced).

``instances``
    One row per server, deleted ones included (soft delete: ``deleted_at`` set, ``vm_state``
    ``deleted``).  Scalar columns are :data:`INSTANCE_COLUMNS`; ``image_ref`` is NULL for a
    volume-backed server.  ``version`` is the per-server version (P2): it only grows, by one
    per transaction that changes anything about the server, and is what cellsync compares.
``instance_flavor``
    The flavor snapshot taken at build (or resize): id, name, vcpus, memory_mb, root_gb,
    ephemeral_gb, swap (MiB) and ``extra_specs`` (JSON object of strings).
``instance_extra``
    JSON columns: ``image_properties`` (image metadata copied at build), ``scheduler_hints``,
    ``trusted_certs`` (list or NULL), ``server_groups`` (list of group uuids).
``instance_metadata`` (uuid, key, value), ``instance_tags`` (uuid, tag),
``instance_security_groups`` (uuid, name, position)
    The server's user data.
``virtual_interfaces`` (uuid, instance_uuid, address = MAC, network_label, position) and
``ip_addresses`` (instance_uuid, address, vif_uuid, version 4/6, type fixed/floating,
position)
    Network info: what ``addresses`` renders, with ``OS-EXT-IPS-MAC:mac_addr`` and
    ``OS-EXT-IPS:type``.
``volume_attachments`` (instance_uuid, volume_id, device_name, delete_on_termination,
attached_at)
    Attached volumes (Nova's block_device_mapping, reduced to what the API shows).
``instance_faults``
    Faults (code, message, details, host, created_at); the newest is the server's fault.
``instance_actions`` and ``instance_actions_events``
    The os-instance-actions history: one action per command (``request_id``), its events.
    They are not part of the server record and do not bump its version.
``hosts``
    Compute hosts and their capacity: name, node, availability_zone, vcpus, ram_mb, disk_gb,
    vcpus_used, ram_mb_used, disk_gb_used, status (UP/DOWN/MAINTENANCE: the record's
    ``host_status``), updated_at.
``inbox``
    Commands from the API: ``command_id`` PRIMARY KEY, so delivery is idempotent (P7);
    instance_uuid, payload (JSON), received_at, state (``new``/``done``/``failed``),
    finished_at.  Commands done for a server are listed in its record's ``done_commands``.
``changes``
    The change feed: ``seq`` INTEGER PRIMARY KEY AUTOINCREMENT (never reused, even after a
    prune), uuid, version, kind (``upsert``/``delete``), at.  One row is appended, in the same
    SQL transaction, for every transaction that changed a server (P2, P8).
``consumers``
    One row per consumer of the feed (an API host's cellsync): name, the seq it has applied,
    when it said so.  :meth:`SqliteCellDB.prune_acked` deletes feed entries every consumer
    seen within ``consumer_timeout`` has applied (beyond a retention); a consumer silent
    longer finds a gap on return and resyncs.
``meta``
    key/value: ``schema`` version; ``epoch`` (absent = 0: versions are
    ``epoch << EPOCH_SHIFT | counter``, see :meth:`SqliteCellDB.start_epoch`);
    ``hosts_version`` (raised by triggers on every change to ``hosts``: cellsync re-reads
    the hosts when it moved); ``done_commands_kept`` (the last N finished commands a record
    lists, written by :meth:`SqliteCellDB.maintenance` from the cell's settings).

Writing
-------
Every write helper joins the transaction opened by :meth:`CellDB.transaction`, or runs in a
transaction of its own.  The servers a transaction touches are collected; just before COMMIT
each gets ``version = version + 1``, ``updated_at`` (now, unless the transaction set it) and
one ``changes`` row.  So a transaction is one version step per server, whatever it did, and
an exception anywhere inside rolls back the state change and its feed entry together.

SQLite gives the feed a total order equal to commit order (one writer at a time).  A
PostgreSQL backend must keep that property (sequences are not commit-ordered: allocate the
seq under a lock, or publish a "stable up to" watermark), or cellsync would see gaps.
"""

from __future__ import annotations

import abc
import json
import logging
import sqlite3
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, NamedTuple

from fastpath.store.record import now_us

log = logging.getLogger("fastpath.cell")

SCHEMA_VERSION = 1

INSTANCE_COLUMNS: tuple[str, ...] = (
    "uuid", "project_id", "user_id", "name", "hostname", "description",
    "vm_state", "task_state", "power_state", "progress",
    "locked", "locked_by", "locked_reason",
    "created_at", "updated_at", "launched_at", "terminated_at", "deleted_at",
    "host", "node", "instance_name", "availability_zone", "pinned_availability_zone",
    "image_ref", "key_name", "config_drive", "disk_config", "access_ip_v4", "access_ip_v6",
    "reservation_id", "launch_index", "kernel_id", "ramdisk_id", "root_device_name",
    "user_data", "version",
)
# Columns update_instance may set (the rest are identity or managed here).
UPDATABLE: frozenset[str] = frozenset(INSTANCE_COLUMNS) - {"uuid", "version", "created_at"}
FLAVOR_COLUMNS = ("flavor_id", "name", "vcpus", "memory_mb", "root_gb", "ephemeral_gb", "swap",
                  "extra_specs")
EXTRA_COLUMNS = ("image_properties", "scheduler_hints", "trusted_certs", "server_groups")
HOST_COLUMNS = ("name", "node", "availability_zone", "vcpus", "ram_mb", "disk_gb", "vcpus_used",
                "ram_mb_used", "disk_gb_used", "status", "updated_at")

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS instances (
    uuid TEXT PRIMARY KEY,
    project_id TEXT NOT NULL,
    user_id TEXT NOT NULL,
    name TEXT NOT NULL,
    hostname TEXT,
    description TEXT,
    vm_state TEXT NOT NULL,
    task_state TEXT,
    power_state INTEGER NOT NULL DEFAULT 0,
    progress INTEGER,
    locked INTEGER NOT NULL DEFAULT 0,
    locked_by TEXT,
    locked_reason TEXT,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    launched_at INTEGER,
    terminated_at INTEGER,
    deleted_at INTEGER,
    host TEXT,
    node TEXT,
    instance_name TEXT NOT NULL DEFAULT '',
    availability_zone TEXT,
    pinned_availability_zone TEXT,
    image_ref TEXT,
    key_name TEXT,
    config_drive TEXT NOT NULL DEFAULT '',
    disk_config TEXT NOT NULL DEFAULT 'MANUAL',
    access_ip_v4 TEXT,
    access_ip_v6 TEXT,
    reservation_id TEXT NOT NULL DEFAULT '',
    launch_index INTEGER NOT NULL DEFAULT 0,
    kernel_id TEXT,
    ramdisk_id TEXT,
    root_device_name TEXT,
    user_data TEXT,
    version INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS instances_host ON instances (host);
CREATE TABLE IF NOT EXISTS instance_flavor (
    instance_uuid TEXT PRIMARY KEY REFERENCES instances (uuid),
    flavor_id TEXT NOT NULL,
    name TEXT NOT NULL,
    vcpus INTEGER NOT NULL,
    memory_mb INTEGER NOT NULL,
    root_gb INTEGER NOT NULL,
    ephemeral_gb INTEGER NOT NULL DEFAULT 0,
    swap INTEGER NOT NULL DEFAULT 0,
    extra_specs TEXT NOT NULL DEFAULT '{}'
);
CREATE TABLE IF NOT EXISTS instance_extra (
    instance_uuid TEXT PRIMARY KEY REFERENCES instances (uuid),
    image_properties TEXT NOT NULL DEFAULT '{}',
    scheduler_hints TEXT NOT NULL DEFAULT '{}',
    trusted_certs TEXT,
    server_groups TEXT NOT NULL DEFAULT '[]'
);
CREATE TABLE IF NOT EXISTS instance_metadata (
    instance_uuid TEXT NOT NULL REFERENCES instances (uuid),
    key TEXT NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY (instance_uuid, key)
);
CREATE TABLE IF NOT EXISTS instance_tags (
    instance_uuid TEXT NOT NULL REFERENCES instances (uuid),
    tag TEXT NOT NULL,
    PRIMARY KEY (instance_uuid, tag)
);
CREATE TABLE IF NOT EXISTS instance_security_groups (
    instance_uuid TEXT NOT NULL REFERENCES instances (uuid),
    name TEXT NOT NULL,
    position INTEGER NOT NULL,
    PRIMARY KEY (instance_uuid, name)
);
CREATE TABLE IF NOT EXISTS virtual_interfaces (
    uuid TEXT PRIMARY KEY,
    instance_uuid TEXT NOT NULL REFERENCES instances (uuid),
    address TEXT NOT NULL,
    network_label TEXT NOT NULL,
    position INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS vifs_instance ON virtual_interfaces (instance_uuid);
CREATE TABLE IF NOT EXISTS ip_addresses (
    instance_uuid TEXT NOT NULL REFERENCES instances (uuid),
    address TEXT NOT NULL,
    vif_uuid TEXT NOT NULL REFERENCES virtual_interfaces (uuid),
    version INTEGER NOT NULL,
    type TEXT NOT NULL DEFAULT 'fixed',
    position INTEGER NOT NULL,
    PRIMARY KEY (instance_uuid, address)
);
CREATE TABLE IF NOT EXISTS volume_attachments (
    instance_uuid TEXT NOT NULL REFERENCES instances (uuid),
    volume_id TEXT NOT NULL,
    device_name TEXT,
    delete_on_termination INTEGER NOT NULL DEFAULT 0,
    attached_at INTEGER NOT NULL,
    PRIMARY KEY (instance_uuid, volume_id)
);
CREATE TABLE IF NOT EXISTS instance_faults (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    instance_uuid TEXT NOT NULL REFERENCES instances (uuid),
    code INTEGER NOT NULL,
    message TEXT NOT NULL,
    details TEXT,
    host TEXT,
    created_at INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS faults_instance ON instance_faults (instance_uuid, id);
CREATE TABLE IF NOT EXISTS instance_actions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    instance_uuid TEXT NOT NULL REFERENCES instances (uuid),
    request_id TEXT NOT NULL,
    action TEXT NOT NULL,
    project_id TEXT NOT NULL,
    user_id TEXT NOT NULL,
    start_time INTEGER NOT NULL,
    finish_time INTEGER,
    message TEXT,
    UNIQUE (instance_uuid, request_id)
);
CREATE TABLE IF NOT EXISTS instance_actions_events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    action_id INTEGER NOT NULL REFERENCES instance_actions (id),
    event TEXT NOT NULL,
    start_time INTEGER NOT NULL,
    finish_time INTEGER,
    result TEXT,
    traceback TEXT,
    host TEXT,
    details TEXT
);
CREATE INDEX IF NOT EXISTS events_action ON instance_actions_events (action_id);
CREATE TABLE IF NOT EXISTS hosts (
    name TEXT PRIMARY KEY,
    node TEXT NOT NULL,
    availability_zone TEXT,
    vcpus INTEGER NOT NULL,
    ram_mb INTEGER NOT NULL,
    disk_gb INTEGER NOT NULL,
    vcpus_used INTEGER NOT NULL DEFAULT 0,
    ram_mb_used INTEGER NOT NULL DEFAULT 0,
    disk_gb_used INTEGER NOT NULL DEFAULT 0,
    status TEXT NOT NULL DEFAULT 'UP',
    updated_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS inbox (
    command_id TEXT PRIMARY KEY,
    instance_uuid TEXT,
    payload TEXT NOT NULL,
    received_at INTEGER NOT NULL,
    state TEXT NOT NULL DEFAULT 'new',
    finished_at INTEGER
);
CREATE INDEX IF NOT EXISTS inbox_state ON inbox (state, received_at);
CREATE INDEX IF NOT EXISTS inbox_instance ON inbox (instance_uuid, state);
CREATE TABLE IF NOT EXISTS changes (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    uuid TEXT NOT NULL,
    version INTEGER NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('upsert', 'delete')),
    at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS consumers (
    name TEXT PRIMARY KEY,
    seq INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
);
"""

# Every change to ``hosts`` raises the ``hosts_version`` counter in ``meta``, whichever code
# path made it: cellsync reads the hosts only when that counter moved.
_BUMP_HOSTS = ("INSERT INTO meta (key, value) VALUES ('hosts_version', '1') ON CONFLICT (key)"
               " DO UPDATE SET value = CAST(value AS INTEGER) + 1")
TRIGGERS: tuple[str, ...] = tuple(
    f"CREATE TRIGGER IF NOT EXISTS hosts_{op.lower()} AFTER {op} ON hosts"
    f" BEGIN {_BUMP_HOSTS}; END"
    for op in ("INSERT", "UPDATE", "DELETE")
)

# Versions carry the cell's epoch in their high bits: version = epoch << EPOCH_SHIFT | counter
# (see :meth:`SqliteCellDB.start_epoch`).  2**40 steps per server per epoch never run out.
EPOCH_SHIFT = 40
DONE_COMMANDS_KEPT = 50  # default of the setting cell.done_commands_kept
# The newest instance actions of a server that go up into its record (os-instance-actions
# lists these): every state change re-reads and re-sends them, so a server's long history
# must not make each of its changes cost more.  The cell keeps every action.
ACTIONS_KEPT = 100

Change = tuple[int, str, int, str]  # (seq, uuid, version, kind)


class FeedEntry(NamedTuple):
    seq: int
    uuid: str
    version: int
    kind: str  # 'upsert' | 'delete'
    at: int  # commit time, microseconds


class Feed(NamedTuple):
    """What one :meth:`CellDB.read_feed` saw, in one snapshot."""

    entries: list[FeedEntry]
    min_seq: int
    max_seq: int
    epoch: int
    hosts_version: int
    after_at: int = 0  # commit time of the entry at seq ``after`` (0: none, e.g. pruned)
    top_at: int = 0  # commit time of the entry at ``max_seq`` (0: none)


@dataclass(frozen=True)
class Retention:
    """How a cell keeps its change feed and its servers' ``done_commands`` (the ``cell.*``
    settings; :meth:`from_settings`).  Times in seconds."""

    feed_min_age: float = 3600.0  # never prune entries younger than this
    feed_keep: int = 10_000  # always keep this many newest entries
    consumer_timeout: float = 86400.0  # a consumer silent this long holds nothing back
    done_commands_kept: int = DONE_COMMANDS_KEPT
    interval: float = 10.0  # maintenance runs at most this often
    chunk: int = 10_000  # entries deleted per SQL transaction

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> Retention:
        return cls(
            feed_min_age=float(settings["cell.feed_min_age"]),
            feed_keep=int(settings["cell.feed_keep"]),
            consumer_timeout=float(settings["cell.consumer_timeout"]),
            done_commands_kept=int(settings["cell.done_commands_kept"]),
            interval=float(settings["cell.maintenance_interval"]),
        )


class CellDBError(Exception):
    """A cell database operation was refused (unknown server, duplicate, bad field...)."""


class CellDB(abc.ABC):
    """The interface of a cell's database (SQLite today, PostgreSQL later)."""

    # -- writing (the cell service and its compute driver) --------------------------------
    @abc.abstractmethod
    def transaction(self) -> Any:
        """A context manager: one atomic SQL transaction; the helpers below join it."""

    @abc.abstractmethod
    def create_instance(self, values: Mapping[str, Any]) -> None: ...

    @abc.abstractmethod
    def update_instance(self, uuid: str, **fields: Any) -> None: ...

    @abc.abstractmethod
    def delete_instance(self, uuid: str, deleted_at: int | None = None) -> None: ...

    @abc.abstractmethod
    def set_metadata(self, uuid: str, metadata: Mapping[str, str]) -> None: ...

    @abc.abstractmethod
    def set_tags(self, uuid: str, tags: Sequence[str]) -> None: ...

    @abc.abstractmethod
    def add_fault(self, uuid: str, code: int, message: str, details: str | None = None,
                  host: str | None = None, created_at: int | None = None) -> None: ...

    @abc.abstractmethod
    def record_action(self, uuid: str, request_id: str, action: str, project_id: str,
                      user_id: str, start_time: int | None = None) -> int: ...

    @abc.abstractmethod
    def accept_command(self, command_id: str, payload: Mapping[str, Any],
                       instance_uuid: str | None = None) -> bool: ...

    @abc.abstractmethod
    def finish_action_event(self, event_id: int, result: str, traceback: str | None = None,
                            finish_time: int | None = None) -> None: ...

    @abc.abstractmethod
    def set_host_usage(self, name: str, vcpus_used: int, ram_mb_used: int,
                       disk_gb_used: int) -> None: ...

    # -- reading (cellsync, verify, resync) ----------------------------------------------
    @abc.abstractmethod
    def changes_after(self, seq: int, limit: int) -> list[Change]: ...

    @abc.abstractmethod
    def max_seq(self) -> int: ...

    @abc.abstractmethod
    def min_seq(self) -> int: ...

    @abc.abstractmethod
    def prune_changes(self, upto_seq: int) -> int: ...

    @abc.abstractmethod
    def read_feed(self, after: int, limit: int) -> Feed: ...

    @abc.abstractmethod
    def hosts(self) -> dict[str, dict[str, Any]]: ...

    @abc.abstractmethod
    def ack(self, consumer: str, seq: int, at: int | None = None) -> None: ...

    @abc.abstractmethod
    def prune_acked(self, now: int, retention: Retention) -> int: ...

    @abc.abstractmethod
    def maintenance(self, now: float, retention: Retention | None = None) -> int: ...

    @abc.abstractmethod
    def epoch(self) -> int: ...

    @abc.abstractmethod
    def start_epoch(self, at_least: int = 0) -> int: ...

    @abc.abstractmethod
    def load_instance(self, uuid: str) -> dict[str, Any] | None: ...

    @abc.abstractmethod
    def all_instance_versions(self) -> list[tuple[str, int, str]]: ...

    @abc.abstractmethod
    def close(self) -> None: ...


ACTION_COLUMNS = ("id", "request_id", "action", "project_id", "user_id", "start_time",
                  "finish_time", "message")
EVENT_COLUMNS = ("action_id", "event", "start_time", "finish_time", "result", "traceback",
                 "host", "details")


def _load_actions(c: sqlite3.Connection, uuid: str) -> list[dict[str, Any]]:
    """The server's newest :data:`ACTIONS_KEPT` instance actions, newest first (Nova:
    created_at desc, id desc), each with ``events`` (newest first, likewise); the ids stay
    in the cell (P1)."""
    actions = [dict(zip(ACTION_COLUMNS, row, strict=True)) for row in c.execute(
        f"SELECT {', '.join(ACTION_COLUMNS)} FROM instance_actions WHERE instance_uuid = ?"
        " ORDER BY start_time DESC, id DESC LIMIT ?", (uuid, ACTIONS_KEPT))]
    by_id: dict[int, list[dict[str, Any]]] = {}
    for a in actions:
        a["events"] = by_id.setdefault(a.pop("id"), [])
    _load_events(c, by_id, "e.start_time DESC, e.id DESC")
    return actions


def _load_events(c: sqlite3.Connection, by_id: dict[int, list[dict[str, Any]]],
                 order: str) -> None:
    """Append the events of the actions ``by_id`` (action id -> its events list)."""
    if not by_id:
        return
    for row in c.execute(
            f"SELECT {', '.join('e.' + x for x in EVENT_COLUMNS)} FROM instance_actions_events e"
            f" WHERE e.action_id IN (SELECT value FROM json_each(?)) ORDER BY {order}",
            (json.dumps(list(by_id)),)):
        event = dict(zip(EVENT_COLUMNS, row, strict=True))
        events = by_id.get(event.pop("action_id"))
        if events is not None:
            events.append(event)


def _dumps(v: Any) -> str:
    return json.dumps(v, separators=(",", ":"), sort_keys=True)


class SqliteCellDB(CellDB):
    """The embedded cell database: one SQLite file, WAL, ``synchronous=FULL``.

    One connection per object, used from one thread.  Several processes may open the same
    file (the cell service writes, cellsync reads): WAL lets readers run beside the writer,
    and ``busy_timeout`` makes writers wait for each other instead of failing.
    """

    def __init__(self, path: str, busy_timeout_ms: int = 10_000) -> None:
        self.path = path
        # isolation_level=None: no implicit transactions; BEGIN/COMMIT are ours.
        self._conn = sqlite3.connect(path, isolation_level=None)
        self._conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
        self._conn.execute("PRAGMA journal_mode = WAL")
        # FULL: a committed change-feed entry survives power loss (WAL + NORMAL may not).
        self._conn.execute("PRAGMA synchronous = FULL")
        self._conn.execute("PRAGMA foreign_keys = ON")
        self._depth = 0
        self._dirty: dict[str, bool] = {}  # uuid -> updated_at set explicitly
        self._next_maintenance = 0.0
        self._create_schema()

    # -- connection and transactions --------------------------------------------------------
    def _create_schema(self) -> None:
        cur = self._conn.cursor()
        cur.execute("BEGIN IMMEDIATE")
        try:
            for stmt in SCHEMA.split(";"):
                if stmt.strip():
                    cur.execute(stmt)
            for stmt in TRIGGERS:
                cur.execute(stmt)
            row = cur.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
            if row is None:
                cur.execute("INSERT INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
            elif int(row[0]) != SCHEMA_VERSION:
                raise CellDBError(f"{self.path}: cell schema {row[0]}, expected {SCHEMA_VERSION}")
            cur.execute("COMMIT")
        except BaseException:
            cur.execute("ROLLBACK")
            raise

    def close(self) -> None:
        self._conn.close()

    @contextmanager
    def transaction(self) -> Iterator[SqliteCellDB]:
        """One write transaction (BEGIN IMMEDIATE); nested calls join the outer one."""
        if self._depth:
            self._depth += 1
            try:
                yield self
            finally:
                self._depth -= 1
            return
        self._conn.execute("BEGIN IMMEDIATE")
        self._depth = 1
        self._dirty = {}
        try:
            yield self
            self._flush()
            self._conn.execute("COMMIT")
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        finally:
            self._depth = 0
            self._dirty = {}

    @contextmanager
    def _snapshot(self) -> Iterator[sqlite3.Connection]:
        """A consistent read: inside the current transaction, or a read transaction."""
        if self._depth:
            yield self._conn
            return
        self._conn.execute("BEGIN")
        try:
            yield self._conn
        finally:
            self._conn.execute("COMMIT")

    def _touch(self, uuid: str, explicit_updated_at: bool = False) -> None:
        self._dirty[uuid] = self._dirty.get(uuid, False) or explicit_updated_at

    def _flush(self) -> None:
        """One version step and one feed entry per server this transaction touched."""
        now = now_us()
        ex = self._conn.execute
        for uuid, explicit in self._dirty.items():
            if explicit:
                ex("UPDATE instances SET version = version + 1 WHERE uuid = ?", (uuid,))
            else:
                ex("UPDATE instances SET version = version + 1, updated_at = ? WHERE uuid = ?",
                   (now, uuid))
            version, deleted_at = ex("SELECT version, deleted_at FROM instances WHERE uuid = ?",
                                     (uuid,)).fetchone()
            kind = "upsert" if deleted_at is None else "delete"
            ex("INSERT INTO changes (uuid, version, kind, at) VALUES (?, ?, ?, ?)",
               (uuid, version, kind, now))

    def _exists(self, uuid: str) -> bool:
        return self._conn.execute(
            "SELECT 1 FROM instances WHERE uuid = ?", (uuid,)).fetchone() is not None

    def _require(self, uuid: str) -> None:
        if not self._exists(uuid):
            raise CellDBError(f"no instance {uuid}")

    # -- writing ---------------------------------------------------------------------------
    def create_instance(self, values: Mapping[str, Any]) -> None:
        """Insert a server and its child rows.

        ``values``: :data:`INSTANCE_COLUMNS` (``uuid``, ``project_id``, ``user_id``, ``name``,
        ``vm_state`` required; ``version`` not accepted) plus ``flavor`` (required: id, name,
        vcpus, ram, disk, ephemeral, swap, extra_specs -- the record's keys), and optionally
        ``metadata``, ``tags``, ``security_groups``, ``network`` (see :meth:`set_network`),
        ``volumes`` (list of {id, delete_on_termination[, device_name]}),
        ``image_properties``, ``scheduler_hints``, ``trusted_image_certificates``,
        ``server_groups``.
        """
        nested = {"flavor", "metadata", "tags", "security_groups", "network", "volumes",
                  "image_properties", "scheduler_hints", "trusted_image_certificates",
                  "server_groups"}
        unknown = set(values) - set(INSTANCE_COLUMNS) - nested
        if unknown or "version" in values:
            bad = sorted(unknown | ({"version"} & set(values)))
            raise CellDBError(f"create_instance: refused field(s) {bad}")
        if "flavor" not in values:
            raise CellDBError("create_instance: a flavor snapshot is required")
        cols = {k: v for k, v in values.items() if k in INSTANCE_COLUMNS}
        now = now_us()
        cols.setdefault("created_at", now)
        cols.setdefault("updated_at", cols["created_at"])
        if "locked" in cols:
            cols["locked"] = int(bool(cols["locked"]))
        uuid = cols["uuid"]
        with self.transaction():
            # A new server starts at the cell's epoch (its first version: base + 1).
            cols["version"] = self._meta_int(self._conn, "epoch") << EPOCH_SHIFT
            try:
                self._conn.execute(
                    f"INSERT INTO instances ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
                    tuple(cols.values()))
            except sqlite3.IntegrityError as e:
                raise CellDBError(f"create_instance {uuid}: {e}") from e
            self._touch(uuid, explicit_updated_at="updated_at" in values)
            self.set_flavor(uuid, values["flavor"])
            self._conn.execute(
                "INSERT INTO instance_extra (instance_uuid, image_properties, scheduler_hints,"
                " trusted_certs, server_groups) VALUES (?, ?, ?, ?, ?)",
                (uuid, _dumps(values.get("image_properties", {})),
                 _dumps(values.get("scheduler_hints", {})),
                 None if values.get("trusted_image_certificates") is None
                 else _dumps(values["trusted_image_certificates"]),
                 _dumps(values.get("server_groups", []))))
            self.set_metadata(uuid, values.get("metadata", {}))
            self.set_tags(uuid, values.get("tags", []))
            self.set_security_groups(uuid, values.get("security_groups", []))
            self.set_network(uuid, values.get("network", []))
            for vol in values.get("volumes", []):
                self.attach_volume(uuid, vol["id"], bool(vol.get("delete_on_termination", False)),
                                   vol.get("device_name"))

    def update_instance(self, uuid: str, **fields: Any) -> None:
        """Set scalar columns of a server (bumps its version once per transaction)."""
        bad = set(fields) - UPDATABLE
        if bad:
            raise CellDBError(f"update_instance: refused field(s) {sorted(bad)}")
        if "locked" in fields:
            fields["locked"] = int(bool(fields["locked"]))
        with self.transaction():
            self._require(uuid)
            if fields:
                self._conn.execute(
                    f"UPDATE instances SET {', '.join(f'{k} = ?' for k in fields)} WHERE uuid = ?",
                    (*fields.values(), uuid))
            self._touch(uuid, explicit_updated_at="updated_at" in fields)

    def delete_instance(self, uuid: str, deleted_at: int | None = None) -> None:
        """Soft-delete: ``deleted_at``, vm_state ``deleted``; its feed entry is a ``delete``."""
        at = now_us() if deleted_at is None else deleted_at
        with self.transaction():
            self._require(uuid)
            self._conn.execute(
                "UPDATE instances SET vm_state = 'deleted', task_state = NULL, power_state = 0,"
                " deleted_at = COALESCE(deleted_at, ?), terminated_at = COALESCE(terminated_at, ?)"
                " WHERE uuid = ?", (at, at, uuid))
            self._touch(uuid)

    def set_flavor(self, uuid: str, flavor: Mapping[str, Any]) -> None:
        """Replace the flavor snapshot (record keys: id, name, vcpus, ram, disk, ...)."""
        with self.transaction():
            self._require(uuid)
            self._conn.execute(
                "INSERT OR REPLACE INTO instance_flavor VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (uuid, str(flavor["id"]), flavor["name"], flavor["vcpus"], flavor["ram"],
                 flavor["disk"], flavor.get("ephemeral", 0), flavor.get("swap", 0),
                 _dumps(dict(flavor.get("extra_specs", {})))))
            self._touch(uuid)

    def update_extra(self, uuid: str, **fields: Any) -> None:
        """Set JSON columns of instance_extra (:data:`EXTRA_COLUMNS`)."""
        bad = set(fields) - set(EXTRA_COLUMNS)
        if bad:
            raise CellDBError(f"update_extra: refused field(s) {sorted(bad)}")
        with self.transaction():
            self._require(uuid)
            for k, v in fields.items():
                self._conn.execute(f"UPDATE instance_extra SET {k} = ? WHERE instance_uuid = ?",
                                   (None if v is None else _dumps(v), uuid))
            self._touch(uuid)

    def set_metadata(self, uuid: str, metadata: Mapping[str, str]) -> None:
        """Replace all metadata of a server."""
        with self.transaction():
            self._require(uuid)
            self._conn.execute("DELETE FROM instance_metadata WHERE instance_uuid = ?", (uuid,))
            self._conn.executemany("INSERT INTO instance_metadata VALUES (?, ?, ?)",
                                   [(uuid, k, v) for k, v in metadata.items()])
            self._touch(uuid)

    def set_tags(self, uuid: str, tags: Sequence[str]) -> None:
        """Replace all tags of a server (duplicates collapse)."""
        with self.transaction():
            self._require(uuid)
            self._conn.execute("DELETE FROM instance_tags WHERE instance_uuid = ?", (uuid,))
            self._conn.executemany("INSERT OR IGNORE INTO instance_tags VALUES (?, ?)",
                                   [(uuid, t) for t in tags])
            self._touch(uuid)

    def set_security_groups(self, uuid: str, names: Sequence[str]) -> None:
        with self.transaction():
            self._require(uuid)
            self._conn.execute("DELETE FROM instance_security_groups WHERE instance_uuid = ?",
                               (uuid,))
            self._conn.executemany("INSERT OR IGNORE INTO instance_security_groups VALUES (?, ?, ?)",
                                   [(uuid, n, i) for i, n in enumerate(names)])
            self._touch(uuid)

    def set_network(self, uuid: str, vifs: Sequence[Mapping[str, Any]]) -> None:
        """Replace the network info: ``[{uuid, mac, network, ips: [{addr, version, type}]}]``."""
        with self.transaction():
            self._require(uuid)
            ex = self._conn.execute
            ex("DELETE FROM ip_addresses WHERE instance_uuid = ?", (uuid,))
            ex("DELETE FROM virtual_interfaces WHERE instance_uuid = ?", (uuid,))
            pos = 0
            for i, vif in enumerate(vifs):
                vif_uuid = vif.get("uuid") or f"{uuid}-vif{i}"
                ex("INSERT INTO virtual_interfaces VALUES (?, ?, ?, ?, ?)",
                   (vif_uuid, uuid, vif["mac"], vif["network"], i))
                for ip in vif.get("ips", []):
                    ex("INSERT INTO ip_addresses VALUES (?, ?, ?, ?, ?, ?)",
                       (uuid, ip["addr"], vif_uuid, ip["version"], ip.get("type", "fixed"), pos))
                    pos += 1
            self._touch(uuid)

    def attach_volume(self, uuid: str, volume_id: str, delete_on_termination: bool = False,
                      device_name: str | None = None) -> None:
        with self.transaction():
            self._require(uuid)
            self._conn.execute(
                "INSERT OR REPLACE INTO volume_attachments VALUES (?, ?, ?, ?, ?)",
                (uuid, volume_id, device_name, int(delete_on_termination), now_us()))
            self._touch(uuid)

    def detach_volume(self, uuid: str, volume_id: str) -> None:
        with self.transaction():
            self._require(uuid)
            self._conn.execute(
                "DELETE FROM volume_attachments WHERE instance_uuid = ? AND volume_id = ?",
                (uuid, volume_id))
            self._touch(uuid)

    def add_fault(self, uuid: str, code: int, message: str, details: str | None = None,
                  host: str | None = None, created_at: int | None = None) -> None:
        """Record a fault; the newest fault is the server's ``fault``."""
        with self.transaction():
            self._require(uuid)
            self._conn.execute(
                "INSERT INTO instance_faults (instance_uuid, code, message, details, host,"
                " created_at) VALUES (?, ?, ?, ?, ?, ?)",
                (uuid, code, message, details, host, now_us() if created_at is None else created_at))
            self._touch(uuid)

    def record_action(self, uuid: str, request_id: str, action: str, project_id: str,
                      user_id: str, start_time: int | None = None) -> int:
        """Start an instance action (idempotent per (uuid, request_id)); returns its id.

        Actions are history, not part of the server record: no version step.
        """
        with self.transaction():
            self._require(uuid)
            self._conn.execute(
                "INSERT OR IGNORE INTO instance_actions (instance_uuid, request_id, action,"
                " project_id, user_id, start_time) VALUES (?, ?, ?, ?, ?, ?)",
                (uuid, request_id, action, project_id, user_id,
                 now_us() if start_time is None else start_time))
            row = self._conn.execute(
                "SELECT id FROM instance_actions WHERE instance_uuid = ? AND request_id = ?",
                (uuid, request_id)).fetchone()
            return int(row[0])

    def add_action_event(self, action_id: int, event: str, result: str | None = None,
                         host: str | None = None, traceback: str | None = None,
                         details: str | None = None, start_time: int | None = None,
                         finish_time: int | None = None) -> int:
        with self.transaction():
            cur = self._conn.execute(
                "INSERT INTO instance_actions_events (action_id, event, start_time, finish_time,"
                " result, traceback, host, details) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (action_id, event, now_us() if start_time is None else start_time, finish_time,
                 result, traceback, host, details))
            return int(cur.lastrowid or 0)

    def finish_action(self, action_id: int, message: str | None = None,
                      finish_time: int | None = None) -> None:
        with self.transaction():
            self._conn.execute(
                "UPDATE instance_actions SET finish_time = ?, message = ? WHERE id = ?",
                (now_us() if finish_time is None else finish_time, message, action_id))

    def finish_action_event(self, event_id: int, result: str,
                            traceback: str | None = None,
                            finish_time: int | None = None) -> None:
        """Close an instance action event (``result`` Success or Error)."""
        with self.transaction():
            self._conn.execute(
                "UPDATE instance_actions_events SET finish_time = ?, result = ?, traceback = ?"
                " WHERE id = ?",
                (now_us() if finish_time is None else finish_time, result, traceback, event_id))

    def set_host_usage(self, name: str, vcpus_used: int, ram_mb_used: int,
                       disk_gb_used: int) -> None:
        """What the host's servers claim (``upsert_host`` declares capacity, keeps usage)."""
        with self.transaction():
            cur = self._conn.execute(
                "UPDATE hosts SET vcpus_used = ?, ram_mb_used = ?, disk_gb_used = ?,"
                " updated_at = ? WHERE name = ?",
                (vcpus_used, ram_mb_used, disk_gb_used, now_us(), name))
            if cur.rowcount == 0:
                raise CellDBError(f"no host {name!r} (declare it with upsert_host)")

    def upsert_host(self, name: str, node: str, vcpus: int, ram_mb: int, disk_gb: int,
                    availability_zone: str | None = None, status: str = "UP") -> None:
        """Declare a compute host and its capacity (usage columns are kept)."""
        with self.transaction():
            self._conn.execute(
                "INSERT INTO hosts (name, node, availability_zone, vcpus, ram_mb, disk_gb,"
                " status, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (name) DO"
                " UPDATE SET node = excluded.node, availability_zone = excluded.availability_zone,"
                " vcpus = excluded.vcpus, ram_mb = excluded.ram_mb, disk_gb = excluded.disk_gb,"
                " status = excluded.status, updated_at = excluded.updated_at",
                (name, node, availability_zone, vcpus, ram_mb, disk_gb, status, now_us()))

    def host(self, name: str) -> dict[str, Any] | None:
        with self._snapshot() as c:
            row = c.execute(f"SELECT {', '.join(HOST_COLUMNS)} FROM hosts WHERE name = ?",
                            (name,)).fetchone()
        return None if row is None else dict(zip(HOST_COLUMNS, row, strict=True))

    def accept_command(self, command_id: str, payload: Mapping[str, Any],
                       instance_uuid: str | None = None) -> bool:
        """Store a command from the API; False if this command id was already accepted."""
        with self.transaction():
            cur = self._conn.execute(
                "INSERT OR IGNORE INTO inbox (command_id, instance_uuid, payload, received_at)"
                " VALUES (?, ?, ?, ?)", (command_id, instance_uuid, _dumps(payload), now_us()))
            return cur.rowcount == 1

    def pending_commands(self, limit: int = 100) -> list[tuple[str, str | None, dict[str, Any]]]:
        """Accepted commands not yet finished, oldest first: (command_id, uuid, payload)."""
        with self._snapshot() as c:
            rows = c.execute(
                "SELECT command_id, instance_uuid, payload FROM inbox WHERE state = 'new'"
                " ORDER BY received_at, command_id LIMIT ?", (limit,)).fetchall()
        return [(cid, u, json.loads(p)) for cid, u, p in rows]

    def finish_command(self, command_id: str, state: str = "done") -> None:
        """Mark a command done/failed; its server (if any) lists it in ``done_commands``."""
        if state not in ("done", "failed"):
            raise CellDBError(f"finish_command: bad state {state!r}")
        with self.transaction():
            row = self._conn.execute("SELECT instance_uuid FROM inbox WHERE command_id = ?",
                                     (command_id,)).fetchone()
            if row is None:
                raise CellDBError(f"no command {command_id}")
            self._conn.execute(
                "UPDATE inbox SET state = ?, finished_at = ? WHERE command_id = ?",
                (state, now_us(), command_id))
            # A refused create names a server that never came to exist: only the inbox row
            # changes then.  Otherwise the server lists the command in done_commands.
            if row[0] is not None and self._exists(row[0]):
                self._touch(row[0])

    # -- reading (cellsync) ---------------------------------------------------------------
    def changes_after(self, seq: int, limit: int) -> list[Change]:
        """Feed entries with ``seq`` greater than ``seq``, in order, at most ``limit``."""
        with self._snapshot() as c:
            rows = c.execute("SELECT seq, uuid, version, kind FROM changes WHERE seq > ?"
                             " ORDER BY seq LIMIT ?", (seq, limit)).fetchall()
        return [(int(s), u, int(v), k) for s, u, v, k in rows]

    def max_seq(self) -> int:
        """The highest seq ever assigned (0 if none), pruned entries included."""
        with self._snapshot() as c:
            row = c.execute("SELECT seq FROM sqlite_sequence WHERE name = 'changes'").fetchone()
        return 0 if row is None else int(row[0])

    def min_seq(self) -> int:
        """The lowest seq still in the feed; ``max_seq() + 1`` when the feed is empty.

        A consumer whose cursor ``c`` is below ``min_seq() - 1`` has missed pruned entries
        and must resync (P9): never a silent loss.
        """
        with self._snapshot() as c:
            row = c.execute("SELECT MIN(seq) FROM changes").fetchone()
            if row[0] is not None:
                return int(row[0])
            top = c.execute("SELECT seq FROM sqlite_sequence WHERE name = 'changes'").fetchone()
        return 1 if top is None else int(top[0]) + 1

    def prune_changes(self, upto_seq: int) -> int:
        """Delete feed entries with ``seq <= upto_seq``; returns how many."""
        with self.transaction():
            cur = self._conn.execute("DELETE FROM changes WHERE seq <= ?", (upto_seq,))
            return cur.rowcount

    @staticmethod
    def _meta_int(c: sqlite3.Connection, key: str, default: int = 0) -> int:
        row = c.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return default if row is None else int(row[0])

    def _done_commands(self, c: sqlite3.Connection, uuid: str) -> list[str]:
        """The last ``done_commands_kept`` commands finished for a server, oldest first.

        The inbox keeps every command (idempotent delivery needs the ids); the record lists
        only recent ones: the store drops a pending entry when its command is listed, and a
        command older than the last N was echoed long ago.
        """
        keep = self._meta_int(c, "done_commands_kept", DONE_COMMANDS_KEPT)
        rows = c.execute(
            "SELECT command_id FROM inbox WHERE instance_uuid = ? AND state != 'new'"
            " ORDER BY finished_at DESC, command_id DESC LIMIT ?", (uuid, keep)).fetchall()
        return [cid for (cid,) in reversed(rows)]

    def read_feed(self, after: int, limit: int) -> Feed:
        """Entries after ``after`` (at most ``limit``) and the feed's state, in one snapshot.

        cellsync's one SQLite read per round: the bounds tell a gap or a regression apart,
        ``epoch`` a restored cell, ``hosts_version`` whether host capacity moved;
        ``after_at``/``top_at`` (the commit times of the entries at ``after`` and at
        ``max_seq``) fingerprint the feed, so a restored cell whose feed grew past the
        consumer's cursor again is still recognised.
        """
        with self._snapshot() as c:
            rows = c.execute("SELECT seq, uuid, version, kind, at FROM changes WHERE seq > ?"
                             " ORDER BY seq LIMIT ?", (after, limit)).fetchall()
            row = c.execute("SELECT MIN(seq), (SELECT seq FROM sqlite_sequence"
                            " WHERE name = 'changes') FROM changes").fetchone()
            meta = dict(c.execute("SELECT key, value FROM meta"
                                  " WHERE key IN ('epoch', 'hosts_version')").fetchall())
            top = 0 if row[1] is None else int(row[1])
            marks = dict(c.execute("SELECT seq, at FROM changes WHERE seq IN (?, ?)",
                                   (after, top)).fetchall())
        low = top + 1 if row[0] is None else int(row[0])
        return Feed([FeedEntry(int(s), u, int(v), k, int(a)) for s, u, v, k, a in rows],
                    low, top, int(meta.get("epoch", 0)), int(meta.get("hosts_version", 0)),
                    int(marks.get(after, 0)), int(marks.get(top, 0)))

    def hosts(self) -> dict[str, dict[str, Any]]:
        """Every compute host by name: capacity, usage, status, node and zone."""
        with self._snapshot() as c:
            rows = c.execute(f"SELECT {', '.join(HOST_COLUMNS)} FROM hosts ORDER BY name").fetchall()
        return {r[0]: dict(zip(HOST_COLUMNS[1:], r[1:], strict=True)) for r in rows}

    # -- consumers and feed pruning -------------------------------------------------------
    def ack(self, consumer: str, seq: int, at: int | None = None) -> None:
        """Record that ``consumer`` (one API host's cellsync) has applied the feed up to ``seq``.

        Written after the consumer's store commit, so it may lag (pruning then waits a
        little longer); it is set exactly, so a consumer that resynced lower moves back.
        """
        with self.transaction():
            self._conn.execute(
                "INSERT INTO consumers (name, seq, updated_at) VALUES (?, ?, ?) ON CONFLICT"
                " (name) DO UPDATE SET seq = excluded.seq, updated_at = excluded.updated_at",
                (consumer, seq, now_us() if at is None else at))

    def consumers(self) -> dict[str, tuple[int, int]]:
        """consumer -> (acked seq, last seen in microseconds)."""
        with self._snapshot() as c:
            return {n: (int(s), int(t)) for n, s, t in c.execute(
                "SELECT name, seq, updated_at FROM consumers ORDER BY name")}

    def prune_acked(self, now: int, retention: Retention) -> int:
        """Delete feed entries every live consumer has applied, beyond the retention.

        An entry goes when (1) its seq is at or below the lowest cursor of the consumers
        seen within ``consumer_timeout`` (a consumer silent longer holds nothing back: when
        it returns its cursor is below the feed's start, a gap, and it resyncs -- never a
        silent loss), (2) it is older than ``feed_min_age`` and (3) it is not among the
        ``feed_keep`` newest.  With no consumer ever recorded nothing is pruned.  At most
        ``chunk`` entries per call, in one short transaction.  Returns how many went.
        """
        with self.transaction():
            c = self._conn
            if c.execute("SELECT 1 FROM consumers LIMIT 1").fetchone() is None:
                return 0
            top = c.execute("SELECT seq FROM sqlite_sequence WHERE name = 'changes'").fetchone()
            if top is None:
                return 0
            live = c.execute("SELECT MIN(seq) FROM consumers WHERE updated_at >= ?",
                             (now - int(retention.consumer_timeout * 1e6),)).fetchone()[0]
            bound = min(int(top[0]) - retention.feed_keep,
                        int(top[0]) if live is None else int(live))
            cur = c.execute(
                "DELETE FROM changes WHERE seq IN (SELECT seq FROM changes WHERE seq <= ?"
                " AND at < ? ORDER BY seq LIMIT ?)",
                (bound, now - int(retention.feed_min_age * 1e6), retention.chunk))
            return cur.rowcount

    def maintenance(self, now: float, retention: Retention | None = None) -> int:
        """The cell's housekeeping, for its service loop: call it every iteration.

        Runs at most every ``retention.interval`` seconds (``now``: time.time()): records
        ``done_commands_kept`` and prunes the feed (:meth:`prune_acked`).  Returns the feed
        entries pruned.
        """
        if now < self._next_maintenance:
            return 0
        r = retention or Retention()
        self._next_maintenance = now + r.interval
        try:
            with self._snapshot() as c:
                kept = self._meta_int(c, "done_commands_kept", DONE_COMMANDS_KEPT)
            if kept != r.done_commands_kept:
                with self.transaction():
                    self._conn.execute(
                        "INSERT OR REPLACE INTO meta VALUES ('done_commands_kept', ?)",
                        (str(r.done_commands_kept),))
            return self.prune_acked(int(now * 1e6), r)
        except sqlite3.OperationalError as exc:
            # Housekeeping waits for the next interval; the cell's own work goes on.
            log.warning("%s: maintenance skipped: %s", self.path, exc)
            return 0

    # -- epochs ---------------------------------------------------------------------------
    def epoch(self) -> int:
        with self._snapshot() as c:
            return self._meta_int(c, "epoch")

    def start_epoch(self, at_least: int = 0) -> int:
        """Begin a new epoch: every server's version jumps above its previous epochs.

        A cell restored from a backup has lost the versions it produced after the backup,
        which the API stores still hold: its own would lose to them.  In one transaction the
        epoch becomes ``max(epoch + 1, highest version's epoch + 1, at_least)`` (cellsync
        passes one above every version its store saw from this cell), every server's version
        becomes ``epoch << EPOCH_SHIFT | 1`` (new servers start there too) and every server
        gets a feed entry: each consumer's resync then replaces whatever it held.  Times
        (``updated_at``) stay: nothing about the servers changed.  Returns the new epoch.
        """
        with self.transaction():
            c = self._conn
            top = c.execute("SELECT MAX(version) FROM instances").fetchone()[0] or 0
            epoch = max(self._meta_int(c, "epoch") + 1, (int(top) >> EPOCH_SHIFT) + 1, at_least)
            c.execute("INSERT OR REPLACE INTO meta VALUES ('epoch', ?)", (str(epoch),))
            c.execute("UPDATE instances SET version = ?", ((epoch << EPOCH_SHIFT) | 1,))
            c.execute(
                "INSERT INTO changes (uuid, version, kind, at) SELECT uuid, version, CASE WHEN"
                " deleted_at IS NULL THEN 'upsert' ELSE 'delete' END, ? FROM instances"
                " ORDER BY uuid", (now_us(),))
        return epoch

    def load_instance(self, uuid: str) -> dict[str, Any] | None:
        """All normalized rows of one server, read in one snapshot; None if unknown.

        ``{"instance": {column: value}, "flavor": {...}, "extra": {...}, "metadata": {k: v},
        "tags": [...], "security_groups": [...], "vifs": [{uuid, mac, network}],
        "ips": [{addr, vif_uuid, version, type}], "volumes": [{id, device_name,
        delete_on_termination}], "fault": newest fault or None, "host": host row or None,
        "done_commands": [...], "actions": [...] (:func:`_load_actions`)}``; JSON columns
        decoded, booleans as bool.
        """
        with self._snapshot() as c:
            row = c.execute(f"SELECT {', '.join(INSTANCE_COLUMNS)} FROM instances WHERE uuid = ?",
                            (uuid,)).fetchone()
            if row is None:
                return None
            inst = dict(zip(INSTANCE_COLUMNS, row, strict=True))
            inst["locked"] = bool(inst["locked"])
            frow = c.execute(f"SELECT {', '.join(FLAVOR_COLUMNS)} FROM instance_flavor"
                             " WHERE instance_uuid = ?", (uuid,)).fetchone()
            flavor = None
            if frow is not None:
                flavor = dict(zip(FLAVOR_COLUMNS, frow, strict=True))
                flavor["extra_specs"] = json.loads(flavor["extra_specs"])
            erow = c.execute(f"SELECT {', '.join(EXTRA_COLUMNS)} FROM instance_extra"
                             " WHERE instance_uuid = ?", (uuid,)).fetchone()
            extra: dict[str, Any] = {"image_properties": {}, "scheduler_hints": {},
                                     "trusted_certs": None, "server_groups": []}
            if erow is not None:
                extra = {k: None if v is None else json.loads(v)
                         for k, v in zip(EXTRA_COLUMNS, erow, strict=True)}
            metadata = dict(c.execute("SELECT key, value FROM instance_metadata"
                                      " WHERE instance_uuid = ? ORDER BY key", (uuid,)).fetchall())
            tags = [t for (t,) in c.execute("SELECT tag FROM instance_tags WHERE instance_uuid = ?"
                                            " ORDER BY tag", (uuid,))]
            groups = [n for (n,) in c.execute(
                "SELECT name FROM instance_security_groups WHERE instance_uuid = ?"
                " ORDER BY position", (uuid,))]
            vifs = [{"uuid": u, "mac": m, "network": n} for u, m, n in c.execute(
                "SELECT uuid, address, network_label FROM virtual_interfaces"
                " WHERE instance_uuid = ? ORDER BY position", (uuid,))]
            ips = [{"addr": a, "vif_uuid": vu, "version": v, "type": t} for a, vu, v, t in c.execute(
                "SELECT address, vif_uuid, version, type FROM ip_addresses"
                " WHERE instance_uuid = ? ORDER BY position", (uuid,))]
            volumes = [{"id": v, "device_name": d, "delete_on_termination": bool(x)}
                       for v, d, x in c.execute(
                           "SELECT volume_id, device_name, delete_on_termination"
                           " FROM volume_attachments WHERE instance_uuid = ?"
                           " ORDER BY attached_at, volume_id", (uuid,))]
            frow = c.execute("SELECT code, message, details, host, created_at FROM instance_faults"
                             " WHERE instance_uuid = ? ORDER BY id DESC LIMIT 1", (uuid,)).fetchone()
            fault = None if frow is None else dict(
                zip(("code", "message", "details", "host", "created_at"), frow, strict=True))
            host = None
            if inst["host"] is not None:
                hrow = c.execute(f"SELECT {', '.join(HOST_COLUMNS)} FROM hosts WHERE name = ?",
                                 (inst["host"],)).fetchone()
                host = None if hrow is None else dict(zip(HOST_COLUMNS, hrow, strict=True))
            done = self._done_commands(c, uuid)
            actions = _load_actions(c, uuid)
        return {"instance": inst, "flavor": flavor, "extra": extra, "metadata": metadata,
                "tags": tags, "security_groups": groups, "vifs": vifs, "ips": ips,
                "volumes": volumes, "fault": fault, "host": host, "done_commands": done,
                "actions": actions}

    def all_instance_versions(self) -> list[tuple[str, int, str]]:
        """``(uuid, version, 'upsert' | 'delete')`` of every server, by uuid (verify, resync)."""
        with self._snapshot() as c:
            rows = c.execute("SELECT uuid, version, deleted_at IS NOT NULL FROM instances"
                             " ORDER BY uuid").fetchall()
        return [(u, int(v), "delete" if d else "upsert") for u, v, d in rows]

    # -- the forwarder's delivery (issue 7) ------------------------------------------------
    def accept_commands(self, commands: Sequence[tuple[str, Mapping[str, Any], str | None]]
                        ) -> int:
        """Store ``(command_id, payload, instance_uuid)`` commands in one transaction, in order.

        Idempotent by command id like :meth:`accept_command`; returns how many were new.
        ``received_at`` strictly increases along the list and past every pending command,
        so the inbox (ordered by ``received_at``) runs them in the order given.
        """
        with self.transaction():
            ex = self._conn.execute
            row = ex("SELECT MAX(received_at) FROM inbox WHERE state = 'new'").fetchone()
            at = max(now_us(), (row[0] or 0) + 1)
            n = 0
            for command_id, payload, uuid in commands:
                cur = ex("INSERT OR IGNORE INTO inbox (command_id, instance_uuid, payload,"
                         " received_at) VALUES (?, ?, ?, ?)",
                         (command_id, uuid, _dumps(payload), at))
                if cur.rowcount == 1:
                    n += 1
                    at += 1
            return n

    # -- resizes and the compute driver's claims (the cell service, issue 7) ---------------
    # Cell-local like actions and faults (never synced, no version step): Nova's
    # ``migrations`` table, reduced to what a simulated resize needs to be confirmed,
    # reverted, or taken back after a restart.
    _MIGRATIONS_SCHEMA = (
        "CREATE TABLE IF NOT EXISTS migrations (instance_uuid TEXT NOT NULL, request_id TEXT"
        " NOT NULL, source_host TEXT, dest_host TEXT, dest_node TEXT, old_flavor TEXT NOT NULL,"
        " new_flavor TEXT NOT NULL, status TEXT NOT NULL, created_at INTEGER NOT NULL,"
        " updated_at INTEGER NOT NULL, PRIMARY KEY (instance_uuid, request_id))"
    )
    MIGRATION_DONE = ("confirmed", "reverted", "error")

    def _migrations(self) -> sqlite3.Connection:
        if not getattr(self, "_migrations_ready", False):
            with self.transaction():
                self._conn.execute(self._MIGRATIONS_SCHEMA)
            self._migrations_ready = True
        return self._conn

    def start_migration(self, uuid: str, request_id: str, source_host: str | None,
                        dest_host: str, dest_node: str, old_flavor: Mapping[str, Any],
                        new_flavor: Mapping[str, Any], at: int | None = None) -> None:
        """Record a resize (status ``pre-migrating``); idempotent per (uuid, request_id)."""
        c = self._migrations()
        ts = now_us() if at is None else at
        with self.transaction():
            c.execute("INSERT OR IGNORE INTO migrations VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                      (uuid, request_id, source_host, dest_host, dest_node, _dumps(old_flavor),
                       _dumps(new_flavor), "pre-migrating", ts, ts))

    def set_migration_status(self, uuid: str, request_id: str, status: str,
                             at: int | None = None) -> None:
        c = self._migrations()
        with self.transaction():
            c.execute("UPDATE migrations SET status = ?, updated_at = ? WHERE instance_uuid = ?"
                      " AND request_id = ?",
                      (status, now_us() if at is None else at, uuid, request_id))

    def active_migration(self, uuid: str) -> dict[str, Any] | None:
        """The server's unfinished resize (newest), or None: source_host, dest_host,
        dest_node, old_flavor, new_flavor (record keys), status, request_id."""
        c = self._migrations()
        with self._snapshot():
            row = c.execute(
                "SELECT request_id, source_host, dest_host, dest_node, old_flavor, new_flavor,"
                " status FROM migrations WHERE instance_uuid = ? AND status NOT IN (?, ?, ?)"
                " ORDER BY created_at DESC LIMIT 1", (uuid, *self.MIGRATION_DONE)).fetchone()
        if row is None:
            return None
        rid, src, dst, node, old, new, status = row
        return {"request_id": rid, "source_host": src, "dest_host": dst, "dest_node": node,
                "old_flavor": json.loads(old), "new_flavor": json.loads(new), "status": status}

    def live_claims(self) -> list[dict[str, Any]]:
        """What every live server holds, for the driver after a restart: ``uuid``, ``host``,
        ``flavor`` (record keys vcpus, ram, disk, ephemeral, swap), ``ip`` and ``mac`` (its
        first fixed IPv4 and VIF, or None), ``power_state``, ``migration`` (unfinished
        resize or None), one snapshot."""
        c = self._migrations()
        out: list[dict[str, Any]] = []
        with self._snapshot():
            rows = c.execute(
                "SELECT i.uuid, i.host, i.power_state, f.vcpus, f.memory_mb, f.root_gb,"
                " f.ephemeral_gb, f.swap FROM instances i JOIN instance_flavor f"
                " ON f.instance_uuid = i.uuid WHERE i.deleted_at IS NULL AND i.host IS NOT NULL"
                " ORDER BY i.uuid").fetchall()
            ips = dict(c.execute(
                "SELECT instance_uuid, address FROM ip_addresses WHERE version = 4 AND"
                " type = 'fixed' ORDER BY instance_uuid, position DESC").fetchall())
            macs = dict(c.execute(
                "SELECT instance_uuid, address FROM virtual_interfaces"
                " ORDER BY instance_uuid, position DESC").fetchall())
            migs = {r[0]: r for r in c.execute(
                "SELECT instance_uuid, request_id, source_host, dest_host, dest_node,"
                " old_flavor, new_flavor, status FROM migrations WHERE status NOT IN (?, ?, ?)"
                " ORDER BY created_at", self.MIGRATION_DONE)}
            for uuid, host, power, vcpus, ram, disk, eph, swap in rows:
                m = migs.get(uuid)
                out.append({
                    "uuid": uuid, "host": host, "power_state": int(power),
                    "flavor": {"vcpus": vcpus, "ram": ram, "disk": disk, "ephemeral": eph,
                               "swap": swap},
                    "ip": ips.get(uuid), "mac": macs.get(uuid),
                    "migration": None if m is None else {
                        "request_id": m[1], "source_host": m[2], "dest_host": m[3],
                        "dest_node": m[4], "old_flavor": json.loads(m[5]),
                        "new_flavor": json.loads(m[6]), "status": m[7]},
                })
        return out

    def open_action_event(self, action_id: int, event: str, start_time: int | None = None
                          ) -> int:
        """The unfinished event ``event`` of an action, started now if there is none (a
        command resumed after a restart keeps the event it had)."""
        with self.transaction():
            row = self._conn.execute(
                "SELECT id FROM instance_actions_events WHERE action_id = ? AND event = ?"
                " AND finish_time IS NULL ORDER BY id DESC LIMIT 1", (action_id, event)).fetchone()
            if row is not None:
                return int(row[0])
            return self.add_action_event(action_id, event, start_time=start_time)

    # -- batch read (cellsync; issue 6 throughput) ------------------------------------------
    def load_instances(self, uuids: Sequence[str]) -> dict[str, dict[str, Any]]:
        """:meth:`load_instance` of many servers: ``{uuid: rows}`` in the same shape, read in
        one snapshot with one query per table for the whole batch (not ~12 per server).
        Unknown uuids are absent from the result; its order is that of ``uuids``.

        PERF: the uuids go in as ONE JSON parameter (``IN (SELECT value FROM json_each(?))``:
        no limit on the number of SQL variables, one statement to prepare); each child query
        is ordered by ``instance_uuid`` then by the order :meth:`load_instance` uses, so the
        rows of a server come out consecutive and in the right order.
        """
        import orjson  # PERF: ~4 JSON columns per server; json.loads' set-up costs more

        def loads(text: str) -> Any:
            try:
                return orjson.loads(text)
            except orjson.JSONDecodeError:  # beyond orjson (NaN, integers past 64 bits)
                return json.loads(text)

        wanted = json.dumps(list(dict.fromkeys(uuids)))
        batch = "instance_uuid IN (SELECT value FROM json_each(?))"
        out: dict[str, dict[str, Any]] = {}

        def each(sql: str, *extra: Any) -> Iterator[Any]:
            return c.execute(sql, (wanted, *extra))  # type: ignore[no-any-return]

        with self._snapshot() as c:
            for row in each(f"SELECT {', '.join(INSTANCE_COLUMNS)} FROM instances"
                            " WHERE uuid IN (SELECT value FROM json_each(?))"):
                inst = dict(zip(INSTANCE_COLUMNS, row, strict=True))
                inst["locked"] = bool(inst["locked"])
                out[inst["uuid"]] = {
                    "instance": inst, "flavor": None,
                    "extra": {"image_properties": {}, "scheduler_hints": {},
                              "trusted_certs": None, "server_groups": []},
                    "metadata": {}, "tags": [], "security_groups": [], "vifs": [], "ips": [],
                    "volumes": [], "fault": None, "host": None, "done_commands": [],
                    "actions": []}
            if not out:
                return {}
            for row in each(f"SELECT instance_uuid, {', '.join(FLAVOR_COLUMNS)}"
                            f" FROM instance_flavor WHERE {batch}"):
                flavor = dict(zip(FLAVOR_COLUMNS, row[1:], strict=True))
                flavor["extra_specs"] = loads(flavor["extra_specs"])
                out[row[0]]["flavor"] = flavor
            for row in each(f"SELECT instance_uuid, {', '.join(EXTRA_COLUMNS)}"
                            f" FROM instance_extra WHERE {batch}"):
                out[row[0]]["extra"] = {k: None if v is None else loads(v)
                                        for k, v in zip(EXTRA_COLUMNS, row[1:], strict=True)}
            for u, k, v in each("SELECT instance_uuid, key, value FROM instance_metadata"
                                f" WHERE {batch} ORDER BY instance_uuid, key"):
                out[u]["metadata"][k] = v
            for u, t in each(f"SELECT instance_uuid, tag FROM instance_tags WHERE {batch}"
                             " ORDER BY instance_uuid, tag"):
                out[u]["tags"].append(t)
            for u, n in each("SELECT instance_uuid, name FROM instance_security_groups"
                             f" WHERE {batch} ORDER BY instance_uuid, position"):
                out[u]["security_groups"].append(n)
            for iu, vu, m, n in each(
                    "SELECT instance_uuid, uuid, address, network_label FROM virtual_interfaces"
                    f" WHERE {batch} ORDER BY instance_uuid, position"):
                out[iu]["vifs"].append({"uuid": vu, "mac": m, "network": n})
            for u, a, vu, v, t in each(
                    "SELECT instance_uuid, address, vif_uuid, version, type FROM ip_addresses"
                    f" WHERE {batch} ORDER BY instance_uuid, position"):
                out[u]["ips"].append({"addr": a, "vif_uuid": vu, "version": v, "type": t})
            for u, v, d, x in each(
                    "SELECT instance_uuid, volume_id, device_name, delete_on_termination"
                    f" FROM volume_attachments WHERE {batch}"
                    " ORDER BY instance_uuid, attached_at, volume_id"):
                out[u]["volumes"].append({"id": v, "device_name": d,
                                          "delete_on_termination": bool(x)})
            for u, *frow in each(
                    "SELECT instance_uuid, code, message, details, host, created_at"
                    " FROM instance_faults WHERE id IN (SELECT MAX(id) FROM instance_faults"
                    f" WHERE {batch} GROUP BY instance_uuid)"):
                out[u]["fault"] = dict(zip(("code", "message", "details", "host", "created_at"),
                                           frow, strict=True))
            names = sorted({r["instance"]["host"] for r in out.values()
                            if r["instance"]["host"] is not None})
            if names:
                hosts = {row[0]: dict(zip(HOST_COLUMNS, row, strict=True)) for row in c.execute(
                    f"SELECT {', '.join(HOST_COLUMNS)} FROM hosts"
                    " WHERE name IN (SELECT value FROM json_each(?))", (json.dumps(names),))}
                for r in out.values():
                    r["host"] = hosts.get(r["instance"]["host"])
            keep = self._meta_int(c, "done_commands_kept", DONE_COMMANDS_KEPT)
            for u, cid in each(
                    "SELECT instance_uuid, command_id FROM (SELECT instance_uuid, command_id,"
                    " finished_at, ROW_NUMBER() OVER (PARTITION BY instance_uuid"
                    " ORDER BY finished_at DESC, command_id DESC) AS n FROM inbox"
                    f" WHERE {batch} AND state != 'new') WHERE n <= ?"
                    " ORDER BY instance_uuid, finished_at, command_id", keep):
                out[u]["done_commands"].append(cid)
            events: dict[int, list[dict[str, Any]]] = {}
            for row in each(f"SELECT instance_uuid, {', '.join(ACTION_COLUMNS)} FROM"
                            f" (SELECT *, ROW_NUMBER() OVER (PARTITION BY instance_uuid"
                            " ORDER BY start_time DESC, id DESC) AS n FROM instance_actions"
                            f" WHERE {batch}) WHERE n <= ?"
                            " ORDER BY instance_uuid, start_time DESC, id DESC", ACTIONS_KEPT):
                action = dict(zip(ACTION_COLUMNS, row[1:], strict=True))
                action["events"] = events.setdefault(action.pop("id"), [])
                out[row[0]]["actions"].append(action)
            _load_events(c, events, "e.action_id, e.start_time DESC, e.id DESC")
        return {u: out[u] for u in dict.fromkeys(uuids) if u in out}

    @contextmanager
    def atomic(self) -> Iterator[SqliteCellDB]:
        """A unit that commits or rolls back alone: :meth:`transaction` when none is open,
        else a SAVEPOINT inside the open one (the cell service runs many commands' phases in
        one transaction, one savepoint each, so a refused one leaves the others' writes)."""
        if not self._depth:
            with self.transaction():
                yield self
            return
        dirty = dict(self._dirty)
        self._conn.execute("SAVEPOINT unit")
        self._depth += 1
        try:
            yield self
        except BaseException:
            self._conn.execute("ROLLBACK TO unit")
            self._conn.execute("RELEASE unit")
            self._dirty = dirty  # what the rolled-back unit touched gets no version step
            raise
        else:
            self._conn.execute("RELEASE unit")
        finally:
            self._depth -= 1

    def pending_heads(self, limit: int = 100, after_rowid: int | None = None
                      ) -> list[tuple[int, str, str | None]]:
        """(rowid, command_id, uuid) of unfinished commands, payloads not read: all of them
        oldest first, or (``after_rowid``) only those inserted since that row, in insertion
        order -- the service reads what is new at every step and everything now and then."""
        with self._snapshot() as c:
            if after_rowid is None:
                rows = c.execute(
                    "SELECT rowid, command_id, instance_uuid FROM inbox WHERE state = 'new'"
                    " ORDER BY received_at, command_id LIMIT ?", (limit,))
            else:
                rows = c.execute(
                    "SELECT rowid, command_id, instance_uuid FROM inbox WHERE rowid > ?"
                    " AND state = 'new' ORDER BY rowid LIMIT ?", (after_rowid, limit))
            return [(int(r), cid, u) for r, cid, u in rows]

    def command_payloads(self, command_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        """The payloads of these commands, by command id (one query)."""
        if not command_ids:
            return {}
        with self._snapshot() as c:
            return {cid: json.loads(p) for cid, p in c.execute(
                "SELECT command_id, payload FROM inbox WHERE command_id IN"
                " (SELECT value FROM json_each(?))", (json.dumps(list(command_ids)),))}

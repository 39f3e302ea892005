"""The canonical server record: the ONE place the denormalized record is defined.

A server's record holds everything any microversion's view of the server needs (Nova
v2.1 up to 2.104, admin and non-admin), so that a view is rendered from the one record
read and never from a second lookup (DESIGN.md, "Microversions and views").  The record is
a msgpack map keyed by the field names below; ``schema`` carries :data:`SCHEMA_VERSION`.

Conventions
-----------
- Timestamps are integers: microseconds since the Unix epoch, UTC (``None`` = null).
  Nova renders some as ``2013-09-03T04:01:32Z`` and others as ``2013-09-23T13:37:00.880302``;
  an integer keeps every digit and leaves the format to the view.
- Ids are strings (server uuid in canonical lowercase form, flavor id, image id, ...).
- Optional values are ``None``, never a missing key: every record has every field.

Owners (DESIGN.md rule 7, research notes P5)
--------------------------------------------
Each field has exactly one writer:

- ``cell`` fields come from the cell that owns the server, through cellsync and
  :meth:`fastpath.store.Store.apply`; a record with a higher ``version`` replaces them all.
- ``api`` fields are written by the API's command path only.  The cell never sends them:
  ``apply`` ignores whatever an incoming record holds for them and carries the stored API
  values over (they live in the ``api_fields`` database, see ``layout``), so a cell update
  can never overwrite what a command wrote, and a command never writes a cell field.

Today the only API-owned field is ``pending``: provisional values of accepted commands that
the cell has not echoed yet (read-your-writes, P6), keyed by command id.  The cell lists the
ids of commands it has executed in the cell-owned ``done_commands``; ``apply`` drops the
matching ``pending`` entries, since the cell's own fields now carry their effect.

Where each field shows up in Nova's API (``doc/api_samples/servers`` at every microversion)
is in :data:`FIELDS` (``nova``) so that the view table can be checked against it.

The index entry
---------------
:class:`IndexEntry` is the projection of a record that list queries filter and sort on;
it is stored as the VALUE of the per-project, global and changes-since index entries, so a
list page is one cursor walk plus N gets in one read transaction.  ``updated_at`` is not in
it (it lives in the changes-since key), so that an update touching no listed field leaves the
per-project and global index entries unwritten.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any, NamedTuple

import msgpack

from fastpath.store.errors import RecordError

SCHEMA_VERSION = 1


class Owner(Enum):
    CELL = "cell"
    API = "api"


@dataclass(frozen=True, slots=True)
class Field:
    """One field of the record: name, accepted types, owner, default, where Nova shows it."""

    name: str
    types: tuple[type, ...]
    owner: Owner
    default: Callable[[], Any] | None  # None: the field is required
    nova: str  # the API key(s) it feeds, and from which microversion
    check: Callable[[Any], str | None] | None = None  # returns a problem or None

    @property
    def required(self) -> bool:
        return self.default is None


def _none() -> None:
    return None


def _false() -> bool:
    return False


def _zero() -> int:
    return 0


def _empty_str() -> str:
    return ""


def _empty_dict() -> dict[str, Any]:
    return {}


def _empty_list() -> list[Any]:
    return []


_N = type(None)
_INT = (int,)
_STR = (str,)
_OPT_INT = (int, _N)
_OPT_STR = (str, _N)


def _check_ts(v: Any) -> str | None:
    if v is None:
        return None
    if isinstance(v, bool) or not 0 <= v < 2**63:
        return "expected microseconds since the epoch (0 <= t < 2**63)"
    return None


def _check_key_name(v: Any) -> str | None:
    if 0 < len(v) <= 63 and "\x00" not in v:  # PERF: at most 4 bytes a character: fits
        return None
    b = v.encode()
    if not 0 < len(b) <= 255 or b"\x00" in b:
        return "expected 1 to 255 bytes of UTF-8 without NUL (it goes into store keys)"
    return None


def _check_version(v: Any) -> str | None:
    if isinstance(v, bool) or not 0 <= v < 2**64:
        return "expected an integer from 0 to 2**64-1"
    return None


_STR_TYPE = frozenset((str,))


def _check_str_map(v: Any) -> str | None:
    # PERF: the usual case (exactly str keys and values) without a Python-level loop.
    if _STR_TYPE.issuperset(map(type, v)) and _STR_TYPE.issuperset(map(type, v.values())):
        return None
    if not all(isinstance(k, str) and isinstance(x, str) for k, x in v.items()):
        return "expected a map of strings to strings"
    return None


def _check_str_list(v: Any) -> str | None:
    if v is None or _STR_TYPE.issuperset(map(type, v)):  # PERF: as in _check_str_map
        return None
    if not all(isinstance(x, str) for x in v):
        return "expected a list of strings"
    return None


# Sub-structures: (key, accepted types) -- validated by make_record / validate.
FLAVOR_KEYS: tuple[tuple[str, tuple[type, ...]], ...] = (
    ("id", _STR),  # flavor id (flavor.id before 2.47)
    ("name", _STR),  # flavor.original_name (2.47+)
    ("vcpus", _INT),
    ("ram", _INT),  # MiB
    ("disk", _INT),  # GiB
    ("ephemeral", _INT),
    ("swap", _INT),  # MiB
    ("extra_specs", (dict,)),  # flavor.extra_specs (2.47+, policy-gated)
)
IMAGE_KEYS: tuple[tuple[str, tuple[type, ...]], ...] = (
    ("id", _STR),
    ("properties", (dict,)),  # image.properties (2.98+), from image_* system metadata
)
ADDRESS_KEYS: tuple[tuple[str, tuple[type, ...]], ...] = (
    ("addr", _STR),
    ("version", _INT),  # 4 or 6
    ("mac", _OPT_STR),  # OS-EXT-IPS-MAC:mac_addr
    ("type", _STR),  # OS-EXT-IPS:type: "fixed" or "floating"
)
VOLUME_KEYS: tuple[tuple[str, tuple[type, ...]], ...] = (
    ("id", _STR),
    ("delete_on_termination", (bool,)),  # shown from 2.3
)
FAULT_KEYS: tuple[tuple[str, tuple[type, ...]], ...] = (
    ("code", _INT),
    ("message", _STR),
    ("details", _OPT_STR),  # admin only
    ("created", _INT),  # microseconds since the epoch
)


def _check_keys(v: Mapping[str, Any], keys: tuple[tuple[str, tuple[type, ...]], ...]) -> str | None:
    for k, types in keys:
        x = v.get(k, _MISSING)
        if type(x) in types:  # PERF: the usual case, exactly an accepted type (bool is not int)
            continue
        if x is _MISSING:
            return f"missing key {k!r}"
        if not isinstance(x, types) or (isinstance(x, bool) and bool not in types):
            return f"key {k!r}: expected {_type_names(types)}"
    return None


def _check_flavor(v: Any) -> str | None:
    return _check_keys(v, FLAVOR_KEYS) or _check_str_map(v["extra_specs"])


def _check_image(v: Any) -> str | None:
    if v is None:
        return None
    return _check_keys(v, IMAGE_KEYS)


def _check_addresses(v: Any) -> str | None:
    for net, entries in v.items():
        if not isinstance(net, str) or not isinstance(entries, list):
            return "expected a map of network name to a list of addresses"
        for e in entries:
            if not isinstance(e, dict):
                return "an address must be a map"
            problem = _check_keys(e, ADDRESS_KEYS)
            if problem:
                return f"network {net!r}: {problem}"
    return None


def _check_volumes(v: Any) -> str | None:
    for e in v:
        if not isinstance(e, dict):
            return "a volume must be a map"
        problem = _check_keys(e, VOLUME_KEYS)
        if problem:
            return problem
    return None


def _check_fault(v: Any) -> str | None:
    return None if v is None else _check_keys(v, FAULT_KEYS)


ACTION_KEYS: tuple[tuple[str, tuple[type, ...]], ...] = (
    ("request_id", _STR),  # the command id (Nova's request_id)
    ("action", _STR),  # create, reboot, stop, ...
    ("project_id", _STR),
    ("user_id", _STR),
    ("start_time", _INT),
    ("updated_at", _INT),  # the latest start or finish of the action or an event (2.58)
    ("message", _OPT_STR),
    ("events", (list,)),  # EVENT_KEYS maps, newest first
)
EVENT_KEYS: tuple[tuple[str, tuple[type, ...]], ...] = (
    ("event", _STR),
    ("start_time", _INT),
    ("finish_time", _OPT_INT),
    ("result", _OPT_STR),
    ("traceback", _OPT_STR),  # admin only
    ("host", _OPT_STR),  # 2.62 admin; hostId 2.62
    ("details", _OPT_STR),  # 2.84 admin
)


def _check_actions(v: Any) -> str | None:
    if not v:
        return None
    problems = (
        "an action must be a map" if not isinstance(a, dict) else _check_keys(a, ACTION_KEYS)
        or next((f"event: {p}" for p in (
            _check_keys(e, EVENT_KEYS) if isinstance(e, dict) else "not a map"
            for e in a["events"]) if p), None)
        for a in v)
    return next((p for p in problems if p), None)


def _check_pending(v: Any) -> str | None:
    if not all(isinstance(k, str) and isinstance(x, dict) for k, x in v.items()):
        return "expected a map of command id to a map of field values"
    return None


C = Owner.CELL
A = Owner.API

# The record, field by field.  Order is documentation only: the record is a map.
FIELDS: tuple[Field, ...] = (
    # -- identity, ownership, versioning
    Field("schema", _INT, C, None, "(layout) SCHEMA_VERSION of this record"),
    Field("uuid", _STR, C, None, "id"),
    Field("version", _INT, C, None, "(sync) per-server version, only grows (P2)", _check_version),
    Field("cell", _STR, C, None, "(sync) name of the owning cell", _check_key_name),
    Field("project_id", _STR, C, None, "tenant_id", _check_key_name),
    Field("user_id", _STR, C, None, "user_id", _check_key_name),
    # -- names
    Field("name", _STR, C, None, "name"),
    Field("hostname", _OPT_STR, C, _none, "OS-EXT-SRV-ATTR:hostname (2.3 admin, 2.90 all)"),
    Field("description", _OPT_STR, C, _none, "description (2.19)"),
    # -- state
    Field("vm_state", _STR, C, None, "OS-EXT-STS:vm_state; status"),
    Field("task_state", _OPT_STR, C, _none, "OS-EXT-STS:task_state; status"),
    Field("power_state", _INT, C, _zero, "OS-EXT-STS:power_state"),
    Field("status", _STR, C, None, "status (derived: status_from_state)"),
    Field("progress", _OPT_INT, C, _none, "progress"),
    Field("locked", (bool,), C, _false, "locked (2.9)"),
    Field("locked_by", _OPT_STR, C, _none, "(policy) 'admin' or 'owner'; sort key locked_by"),
    Field("locked_reason", _OPT_STR, C, _none, "locked_reason (2.73)"),
    # -- timestamps (microseconds since the epoch)
    Field("created_at", _INT, C, None, "created", _check_ts),
    Field("updated_at", _INT, C, None, "updated", _check_ts),
    Field("launched_at", _OPT_INT, C, _none, "OS-SRV-USG:launched_at", _check_ts),
    Field("terminated_at", _OPT_INT, C, _none, "OS-SRV-USG:terminated_at", _check_ts),
    Field("deleted_at", _OPT_INT, C, _none, "(changes-since) deletion time", _check_ts),
    # -- placement
    Field("host", _OPT_STR, C, _none, "OS-EXT-SRV-ATTR:host (admin); hostId = sha224(project+host)"),
    Field("node", _OPT_STR, C, _none, "OS-EXT-SRV-ATTR:hypervisor_hostname (admin)"),
    Field("host_status", _OPT_STR, C, _none, "host_status (2.16, policy): UP/DOWN/MAINTENANCE/UNKNOWN/''"),
    Field("instance_name", _STR, C, _empty_str, "OS-EXT-SRV-ATTR:instance_name (admin)"),
    Field("availability_zone", _OPT_STR, C, _none, "OS-EXT-AZ:availability_zone"),
    Field("pinned_availability_zone", _OPT_STR, C, _none, "pinned_availability_zone (2.96)"),
    # -- what it runs
    Field("flavor", (dict,), C, None, "flavor: {id, links} < 2.47; embedded snapshot 2.47+", _check_flavor),
    Field("image", (dict, _N), C, _none, "image: {id, links[, properties 2.98]} or '' (volume)", _check_image),
    Field("key_name", _OPT_STR, C, _none, "key_name"),
    Field("config_drive", _STR, C, _empty_str, "config_drive ('' or 'True')"),
    Field("disk_config", _STR, C, lambda: "MANUAL", "OS-DCF:diskConfig ('AUTO' or 'MANUAL')"),
    Field("trusted_image_certificates", (list, _N), C, _none, "trusted_image_certificates (2.63)", _check_str_list),
    # -- network
    Field("addresses", (dict,), C, _empty_dict, "addresses (+ OS-EXT-IPS-MAC:mac_addr, OS-EXT-IPS:type)", _check_addresses),
    Field("access_ip_v4", _OPT_STR, C, _none, "accessIPv4"),
    Field("access_ip_v6", _OPT_STR, C, _none, "accessIPv6"),
    Field("security_groups", (list,), C, _empty_list, "security_groups [{name}]", _check_str_list),
    # -- user data of the server
    Field("metadata", (dict,), C, _empty_dict, "metadata; /servers/{id}/metadata", _check_str_map),
    Field("tags", (list,), C, _empty_list, "tags (2.26); /servers/{id}/tags", _check_str_list),
    Field("volumes_attached", (list,), C, _empty_list, "os-extended-volumes:volumes_attached", _check_volumes),
    Field("server_groups", (list,), C, _empty_list, "server_groups (2.71)", _check_str_list),
    Field("scheduler_hints", (dict,), C, _empty_dict, "scheduler_hints (2.100)"),
    # -- extended server attributes (2.3+, admin)
    Field("reservation_id", _STR, C, _empty_str, "OS-EXT-SRV-ATTR:reservation_id"),
    Field("launch_index", _INT, C, _zero, "OS-EXT-SRV-ATTR:launch_index"),
    Field("kernel_id", _OPT_STR, C, _none, "OS-EXT-SRV-ATTR:kernel_id"),
    Field("ramdisk_id", _OPT_STR, C, _none, "OS-EXT-SRV-ATTR:ramdisk_id"),
    Field("root_device_name", _OPT_STR, C, _none, "OS-EXT-SRV-ATTR:root_device_name"),
    Field("user_data", _OPT_STR, C, _none, "OS-EXT-SRV-ATTR:user_data (base64)"),
    # -- errors
    Field("fault", (dict, _N), C, _none, "fault {code, created, message, details(admin)}", _check_fault),
    # -- history (os-instance-actions: not in any server view, read by that API alone)
    Field("actions", (list,), C, _empty_list, "os-instance-actions (newest first)", _check_actions),
    # -- commands (read-your-writes)
    Field("done_commands", (list,), C, _empty_list, "(sync) ids of commands the cell executed", _check_str_list),
    Field("pending", (dict,), A, _empty_dict, "(sync) provisional values of accepted commands", _check_pending),
)

FIELD_NAMES: tuple[str, ...] = tuple(f.name for f in FIELDS)
BY_NAME: dict[str, Field] = {f.name: f for f in FIELDS}
API_FIELDS: tuple[str, ...] = tuple(f.name for f in FIELDS if f.owner is Owner.API)
CELL_FIELDS: tuple[str, ...] = tuple(f.name for f in FIELDS if f.owner is Owner.CELL)


def default_of(name: str) -> Any:
    """A fresh default value of an optional field."""
    default = BY_NAME[name].default
    if default is None:
        raise RecordError(f"{name} is required and has no default")
    return default()


def _type_names(types: tuple[type, ...]) -> str:
    return " or ".join("null" if t is _N else t.__name__ for t in types)


# -- status (nova/api/openstack/common.py, _STATE_MAP and status_from_state) ----------------
_RESIZE: dict[str | None, str] = {"resize_prep": "RESIZE", "resize_migrating": "RESIZE",
           "resize_migrated": "RESIZE", "resize_finish": "RESIZE"}
_REBUILD: dict[str | None, str] = {"rebuilding": "REBUILD", "rebuild_block_device_mapping": "REBUILD",
            "rebuild_spawning": "REBUILD"}
STATE_MAP: dict[str, dict[str | None, str]] = {
    "active": {
        None: "ACTIVE",
        "rebooting": "REBOOT", "reboot_pending": "REBOOT", "reboot_started": "REBOOT",
        "rebooting_hard": "HARD_REBOOT", "reboot_pending_hard": "HARD_REBOOT",
        "reboot_started_hard": "HARD_REBOOT",
        "updating_password": "PASSWORD",
        "migrating": "MIGRATING",
        **_REBUILD, **_RESIZE,
    },
    "building": {None: "BUILD"},
    "stopped": {None: "SHUTOFF", **_RESIZE, **_REBUILD},
    "resized": {None: "VERIFY_RESIZE", "resize_reverting": "REVERT_RESIZE"},
    "paused": {None: "PAUSED", "migrating": "MIGRATING"},
    "suspended": {None: "SUSPENDED"},
    "rescued": {None: "RESCUE"},
    "error": {None: "ERROR", **_REBUILD},
    "deleted": {None: "DELETED"},
    "soft-delete": {None: "SOFT_DELETED"},
    "shelved": {None: "SHELVED"},
    "shelved_offloaded": {None: "SHELVED_OFFLOADED"},
}


def status_from_state(vm_state: str, task_state: str | None) -> str:
    """Nova's server status for (vm_state, task_state); 'UNKNOWN' for an unknown vm_state."""
    task_map = STATE_MAP.get(vm_state)
    if task_map is None:
        return "UNKNOWN"
    return task_map.get(task_state, task_map[None])


# Fields a pending entry may not overlay: identity, sync bookkeeping, the API's own and
# ``status`` (always derived from vm_state and task_state).
NOT_PENDABLE = frozenset(("schema", "uuid", "version", "cell", "project_id", "user_id",
                          "created_at", "updated_at", "done_commands", "pending", "status"))
PENDABLE: frozenset[str] = frozenset(CELL_FIELDS) - NOT_PENDABLE
# A pending entry older than this is dropped by the next cell record of its server even if
# the cell never lists its command as done (a command lost before it reached the cell, or
# more than ``cell.done_commands_kept`` commands finishing between two syncs): the overlay
# of a prediction must not outlive the prediction forever.  A cell that is merely down keeps
# sending nothing, so its servers' overlays stay until it is back.
PENDING_TTL_US = 3600 * 1_000_000


def effective(rec: Mapping[str, Any]) -> Mapping[str, Any]:
    """The record as the API shows it: the cell's fields overlaid by every ``pending``
    entry's ``fields``, oldest ``at`` first (ties by command id), ``status`` derived again
    when a pending entry moved ``vm_state``/``task_state`` (docs/commands.md,
    read-your-writes).  Fields outside :data:`PENDABLE` are ignored.  ``actions`` is merged,
    not replaced: a pending entry's actions (the instance action its command starts, as Nova
    records it in the API) come first, newest first, unless the cell's list already has
    that ``request_id``.  Without pending entries: ``rec`` itself (no copy)."""
    pending = rec.get("pending")
    if not pending:
        return rec
    out = dict(rec)
    touched = False
    for _, entry in sorted(pending.items(), key=lambda kv: (kv[1].get("at", 0), kv[0])):
        fields = entry.get("fields") or {}
        for name, value in fields.items():
            if name == "actions":
                have = {a.get("request_id") for a in out["actions"]}
                out["actions"] = [a for a in value if a.get("request_id") not in have] + \
                    list(out["actions"])
            elif name in PENDABLE:
                out[name] = value
                touched = touched or name in ("vm_state", "task_state")
    if touched:
        out["status"] = status_from_state(out["vm_state"], out["task_state"])
    return out


# -- building and checking records ------------------------------------------------------------
# PERF: make_record runs once per record a cell sends up (cellsync projects every change:
# issue 6 wants 50,000 changes/s through one process), so it builds and checks the record in
# one walk over this plan, made once from FIELDS: (name, default, the exact types accepted,
# check).  ``type(v) in types`` implies the isinstance test and the bool rule of the full
# pass (_validate_all), which decides whatever the quick test does not accept (a subclass
# passes there; a problem is named there).
_MISSING = object()
_FIELD_SET = frozenset(FIELD_NAMES)
_PLAN: tuple[tuple[str, Callable[[], Any] | None, frozenset[type],
                   Callable[[Any], str | None] | None], ...] = tuple(
    (f.name, f.default, frozenset(f.types), f.check) for f in FIELDS)


def make_record(values: Mapping[str, Any]) -> dict[str, Any]:
    """Build a complete, validated record from ``values``.

    Missing optional fields take their defaults; ``schema`` is set and ``status`` derived
    from ``vm_state``/``task_state`` unless given.  Unknown fields are refused (a typo
    would otherwise silently drop data).  Raises :class:`RecordError` naming every problem.
    """
    if not _FIELD_SET.issuperset(values):
        unknown = sorted(set(values) - _FIELD_SET)
        raise RecordError(f"unknown record field(s): {', '.join(unknown)}")
    rec: dict[str, Any] = {}
    get = values.get
    quick = True  # every value so far of exactly an accepted type, its check passed
    for name, default, types, check in _PLAN:
        v = get(name, _MISSING)
        if v is _MISSING:
            if name == "schema":
                v = SCHEMA_VERSION
            elif name == "status" and "vm_state" in values:
                v = status_from_state(values["vm_state"], values.get("task_state"))
            elif default is not None:
                v = default()
            else:
                quick = False  # required: the full pass names it
                continue
        rec[name] = v
        if quick and (type(v) not in types or (check is not None and check(v))):
            quick = False
    if not quick or rec["schema"] != SCHEMA_VERSION:
        _validate_all(rec)
    return rec


def validate(rec: Mapping[str, Any]) -> None:
    """Check that ``rec`` is a complete record of this schema; raise :class:`RecordError`."""
    # The quick pass (as in make_record): every field present, of exactly an accepted type,
    # its check passing, nothing else, this schema.  Anything else goes to the full pass.
    if len(rec) == len(_PLAN) and rec.get("schema") == SCHEMA_VERSION:
        get = rec.get
        for name, _, types, check in _PLAN:
            v = get(name, _MISSING)
            if type(v) not in types or (check is not None and check(v)):
                break
        else:
            return
    _validate_all(rec)


def _validate_all(rec: Mapping[str, Any]) -> None:
    """validate's full pass: names every problem."""
    problems: list[str] = []
    for f in FIELDS:
        if f.name not in rec:
            problems.append(f"{f.name}: missing")
            continue
        v = rec[f.name]
        if not isinstance(v, f.types) or (isinstance(v, bool) and bool not in f.types):
            problems.append(f"{f.name}: expected {_type_names(f.types)}, got {type(v).__name__}")
            continue
        if f.check is not None:
            problem = f.check(v)
            if problem:
                problems.append(f"{f.name}: {problem}")
    extra = set(rec) - set(FIELD_NAMES)
    if extra:
        problems.append(f"unknown field(s): {', '.join(sorted(extra))}")
    if not problems and rec["schema"] != SCHEMA_VERSION:
        problems.append(f"schema: {rec['schema']} is not {SCHEMA_VERSION}")
    if problems:
        raise RecordError("invalid server record: " + "; ".join(problems))


def now_us() -> int:
    """The current time in the record's unit (microseconds since the epoch)."""
    return time.time_ns() // 1000


# msgpack: str as str, bytes as bin (use_bin_type) so that a record round-trips exactly.
_packer = msgpack.Packer(use_bin_type=True)


def pack(rec: Mapping[str, Any]) -> bytes:
    return _packer.pack(rec)


def unpack(buf: bytes | memoryview) -> dict[str, Any]:
    rec = msgpack.unpackb(buf, raw=False)
    if not isinstance(rec, dict):
        raise RecordError("stored server record is not a map")
    return rec


# -- the index entry ---------------------------------------------------------------------------
class IndexEntry(NamedTuple):
    """What a list needs to filter and sort on, stored as the value of every index entry.

    Packed as a msgpack array in this field order (``pack_index``); change the order only
    with a new ``LAYOUT_VERSION``.
    """

    project_id: str
    user_id: str
    created_at: int
    name: str
    status: str
    vm_state: str
    task_state: str | None
    power_state: int
    flavor_id: str
    image_id: str | None
    host: str | None
    node: str | None
    availability_zone: str | None
    locked: bool
    key_name: str | None
    hostname: str | None
    tags: list[str]
    ips: list[str]  # every fixed address of every network (filters ip / ip6)
    launched_at: int | None
    terminated_at: int | None
    config_drive: str
    reservation_id: str
    vcpus: int  # quota usage bookkeeping (cores)
    ram: int  # quota usage bookkeeping (MiB)
    deleted: bool  # True only in changes-since entries of tombstoned servers


INDEX_FIELDS: tuple[str, ...] = IndexEntry._fields


def index_entry(rec: Mapping[str, Any], deleted: bool = False) -> IndexEntry:
    flavor = rec["flavor"]
    image = rec["image"]
    # Fixed addresses only: Nova's ip/ip6 filters match a server's fixed IPs, not its
    # floating ones (compute.API._ip_filter; Neutron's ip_address_substr on ports).
    ips = [a["addr"] for entries in rec["addresses"].values() for a in entries if a["type"] == "fixed"]
    return IndexEntry(
        rec["project_id"], rec["user_id"], rec["created_at"], rec["name"],
        "DELETED" if deleted else rec["status"], rec["vm_state"], rec["task_state"],
        rec["power_state"], flavor["id"], image["id"] if image else None, rec["host"],
        rec["node"], rec["availability_zone"], rec["locked"], rec["key_name"], rec["hostname"],
        rec["tags"], ips, rec["launched_at"], rec["terminated_at"], rec["config_drive"],
        rec["reservation_id"], flavor["vcpus"], flavor["ram"], deleted,
    )


def deleted_entry(project_id: str, created_at: int) -> IndexEntry:
    """The index entry of a tombstone that came without a final record."""
    return IndexEntry(
        project_id, "", created_at, "", "DELETED", "deleted", None, 0, "", None, None, None,
        None, False, None, None, [], [], None, None, "", "", 0, 0, True,
    )


def pack_index(entry: Sequence[Any]) -> bytes:
    # PERF: an array, not a map: ~3x smaller and faster to decode than keyed fields.
    return _packer.pack(tuple(entry))


def unpack_index(buf: bytes | memoryview) -> IndexEntry:
    return IndexEntry._make(msgpack.unpackb(buf, raw=False))

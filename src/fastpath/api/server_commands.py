"""Server write routes: ``POST /servers`` (create), ``PUT /servers/{id}`` (update),
``DELETE /servers/{id}`` and ``POST /servers/{id}/action`` (reboot, os-stop, os-start,
pause, unpause, suspend, resume, lock, unlock, resize, confirmResize, revertResize,
rebuild, createImage) -- Nova v2.1, microversions 2.1-2.104 (docs/commands.md).

Every command is one read transaction (body validation, tenancy, lock, vm/task state,
catalogue look-ups, quota, scheduling) and one write transaction shared with the other
commands of its group commit (:mod:`fastpath.api.commit`), in which it re-checks what may
have changed since its read (the server's state and lock, quota headroom) and writes: the
provisional record (create) or a ``pending`` entry (the API's prediction of the cell's
fields: a reboot shows REBOOT at once), quota usage (through apply), and one outbox entry
per server for its cell.  The answer goes out once that commit is durable.  A refusal in
either phase writes nothing.

State rules follow Nova's ``check_instance_lock`` / ``check_instance_state`` (lock first,
then vm_state, then task_state) with Nova's 409 texts; the server seen is the *effective*
record (cell fields + pending commands), so a second command right after a first is
judged against the first's task state, as in Nova where the API writes it at once.
"""

from __future__ import annotations

import os
import re
import string
import uuid as uuidlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from fastpath._loader import load_core
from fastpath.api import common as C
from fastpath.api import flavors as F
from fastpath.api import images as I
from fastpath.api import limits as Lim
from fastpath.api import schedule, views
from fastpath.api import validation as V
from fastpath.api.context import ApiContext
from fastpath.api.links import Links, link_project
from fastpath.api.routes import API_ROOT, RouteSpec
from fastpath.errors import BadRequest, Conflict, Forbidden, HTTPFault, NotFound
from fastpath.store import record as R
from fastpath.store.changes import Catalog
from fastpath.store.commands import (
    CommandTxn,
    OutboxEntry,
    Provisional,
    pack_outbox,
    prepare_pending,
    prepare_provisional,
)
from fastpath.store.reader import Reader

_core = load_core()

GIB = 1 << 30
PASSWORD_SYMBOLS = "23456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
DEFAULT_ZONE = "nova"  # Nova's default_availability_zone
DISK_CONFIG = ["AUTO", "MANUAL"]
# Seconds a worker's scheduler keeps a decoded cells table once cellsync wrote a newer one
# (schedule.Scheduler's max_age: hosts' usage lags the cells by the sync delay anyway).
CAPACITY_MAX_AGE = 0.1


# -- schemas (in Nova's key order: the first error decides the message) -----------------------
def _hints() -> dict[str, Any]:
    uuid_or_list = {"oneOf": [{"type": "string", "format": "uuid"},
                              {"type": "array", "items": {"type": "string", "format": "uuid"}}]}
    return {"type": "object", "properties": {
        "group": {"type": "string", "format": "uuid"},
        "different_host": uuid_or_list, "same_host": uuid_or_list,
        "query": {"type": ["string", "object"]},
        "target_cell": V.name(),
        "different_cell": {"type": ["string", "array"], "items": {"type": "string"}},
        "build_near_host_ip": {"type": "string", "oneOf": [{"format": "ipv4"}, {"format": "ipv6"}]},
        "cidr": {"type": "string", "pattern": "^/[0-9a-f.:]+$"},
    }, "additionalProperties": True}


def _bdm_item(version: int) -> dict[str, Any]:
    props: dict[str, Any] = {
        "source_type": {"type": "string", "enum": ["volume", "image", "snapshot", "blank"]},
        "uuid": {"type": "string", "minLength": 1, "maxLength": 255, "pattern": "^[a-zA-Z0-9._-]*$"},
        "image_id": {"type": "string", "format": "uuid"},
        "destination_type": {"type": "string", "enum": ["local", "volume"]},
        "guest_format": {"type": "string", "maxLength": 255},
        "device_type": {"type": "string", "maxLength": 255},
        "disk_bus": {"type": "string", "maxLength": 255},
        "boot_index": {"type": ["integer", "string", "null"], "pattern": "^-?[0-9]+$"},
        "device_name": {"type": "string", "maxLength": 255},
        "delete_on_termination": V.boolean(),
        "no_device": {},
        "connection_info": {"type": "string", "maxLength": 16777215},
        "volume_size": {"type": ["integer", "string", "null"], "pattern": "^[0-9]+$", "minimum": 1},
        "snapshot_id": {"type": "string"},
        "volume_id": {"type": "string"},
    }
    if version >= 32:
        props["tag"] = V.tag()
    if version >= 67:
        props["volume_type"] = {"type": ["string", "null"], "minLength": 0, "maxLength": 255}
    return {"type": "object", "properties": props, "additionalProperties": False}


def create_schema(version: int) -> dict[str, Any]:
    net_item: dict[str, Any] = {"type": "object", "properties": {
        "fixed_ip": {"type": "string", "oneOf": [{"format": "ipv4"}, {"format": "ipv6"}]},
        "port": {"oneOf": [{"type": "string", "format": "uuid"}, {"type": "null"}]},
        "uuid": {"type": "string"},
    }, "additionalProperties": False}
    if version >= 32:
        net_item["properties"]["tag"] = V.tag()
    networks: dict[str, Any] = {"type": "array", "items": net_item}
    if version >= 37:
        networks = {"oneOf": [networks, {"type": "string", "enum": ["none", "auto"]}]}
    props: dict[str, Any] = {
        "name": V.name(),
        "imageRef": {"oneOf": [{"type": "string", "format": "uuid"},
                               {"type": "string", "maxLength": 0}]},
        "flavorRef": {"type": ["string", "integer"], "minLength": 1},
        "adminPass": {"type": "string"},
        "metadata": V.metadata(),
        "networks": networks,
        "OS-DCF:diskConfig": {"type": "string", "enum": DISK_CONFIG},
        "accessIPv4": {"type": "string", "format": "ipv4"},
        "accessIPv6": {"type": "string", "format": "ipv6"},
    }
    if version < 57:
        props["personality"] = {"type": "array", "items": {"type": "object", "properties": {
            "path": {"type": "string"}, "contents": {"type": "string", "format": "base64"}},
            "additionalProperties": False}}
    props.update({
        "availability_zone": V.name(),
        "block_device_mapping": {"type": "array", "items": {"type": "object"}},
        "block_device_mapping_v2": {"type": "array", "items": _bdm_item(version)},
        "config_drive": V.boolean(),
        "key_name": V.name_with_spaces(),
        "min_count": V.positive_integer(),
        "max_count": V.positive_integer(),
        "return_reservation_id": V.boolean(),
        "security_groups": {"type": "array", "items": {"type": "object", "properties": {
            "name": {"type": "string", "minLength": 1, "maxLength": 255}},
            "additionalProperties": False}},
        "user_data": {"type": "string", "format": "base64", "maxLength": 65535},
    })
    if version >= 19:
        props["description"] = V.description()
    if version >= 52:
        props["tags"] = {"type": "array", "items": V.tag(), "maxItems": 50}
    if version >= 63:
        props["trusted_image_certificates"] = {
            "type": ["array", "null"], "minItems": 1, "maxItems": 50, "uniqueItems": True,
            "items": {"type": "string", "minLength": 1}}
    if version >= 74:
        props["host"] = {"type": "string", "minLength": 1, "maxLength": 255}
        props["hypervisor_hostname"] = {"type": "string", "minLength": 1, "maxLength": 255}
    if version >= 90:
        props["hostname"] = V.hostname(fqdn=version >= 94)
    required = ["name", "flavorRef"] + (["networks"] if version >= 37 else [])
    return {"type": "object", "properties": {
        "server": {"type": "object", "properties": props, "required": required,
                   "additionalProperties": False},
        "os:scheduler_hints": _hints(),
        "OS-SCH-HNT:scheduler_hints": _hints(),
    }, "required": ["server"], "additionalProperties": False}


def update_schema(version: int) -> dict[str, Any]:
    props: dict[str, Any] = {
        "name": V.name(),
        "OS-DCF:diskConfig": {"type": "string", "enum": DISK_CONFIG},
        "accessIPv4": {"type": "string", "format": "ipv4"},
        "accessIPv6": {"type": "string", "format": "ipv6"},
    }
    if version >= 19:
        props["description"] = V.description()
    if version >= 90:
        props["hostname"] = V.hostname(fqdn=version >= 94)
    return {"type": "object", "properties": {"server": {
        "type": "object", "properties": props, "additionalProperties": False}},
        "required": ["server"], "additionalProperties": False}


def _action(name: str, inner: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "properties": {name: inner}, "required": [name],
            "additionalProperties": False}


def rebuild_schema(version: int) -> dict[str, Any]:
    props: dict[str, Any] = {
        "name": V.name(),
        "imageRef": {"type": "string", "format": "uuid"},
        "adminPass": {"type": "string"},
        "metadata": V.metadata(),
        "preserve_ephemeral": V.boolean(),
        "OS-DCF:diskConfig": {"type": "string", "enum": DISK_CONFIG},
        "accessIPv4": {"type": "string", "format": "ipv4"},
        "accessIPv6": {"type": "string", "format": "ipv6"},
    }
    if version < 57:
        props["personality"] = {"type": "array", "items": {"type": "object"}}
    if version >= 19:
        props["description"] = V.description()
    if version >= 54:
        props["key_name"] = {"oneOf": [V.name_with_spaces(), {"type": "null"}]}
    if version >= 57:
        props["user_data"] = {"oneOf": [{"type": "string", "format": "base64", "maxLength": 65535},
                                        {"type": "null"}]}
    if version >= 63:
        props["trusted_image_certificates"] = {"type": ["array", "null"]}
    if version >= 90:
        props["hostname"] = V.hostname(fqdn=version >= 94)
    return _action("rebuild", {"type": "object", "properties": props, "required": ["imageRef"],
                               "additionalProperties": False})


REBOOT_SCHEMA = _action("reboot", {"type": "object", "properties": {"type": {
    "type": "string", "enum": ["HARD", "Hard", "hard", "SOFT", "Soft", "soft"]}},
    "required": ["type"], "additionalProperties": False})
RESIZE_SCHEMA = _action("resize", {"type": "object", "properties": {
    "flavorRef": {"type": ["string", "integer"], "minLength": 1},
    "OS-DCF:diskConfig": {"type": "string", "enum": DISK_CONFIG}},
    "required": ["flavorRef"], "additionalProperties": False})
CREATE_IMAGE_SCHEMA = _action("createImage", {"type": "object", "properties": {
    "name": V.name(), "metadata": V.metadata()},
    "required": ["name"], "additionalProperties": False})
LOCK_SCHEMA_V273 = _action("lock", {"oneOf": [{"type": "null"}, {"type": "object", "properties": {
    "locked_reason": {"type": "string", "minLength": 1, "maxLength": 255}},
    "additionalProperties": False}]})


_META_KEY = re.compile("^[a-zA-Z0-9-_:. ]{1,255}$")  # V.metadata()'s patternProperties
_DESCRIPTION = re.compile(V.description()["pattern"])


def _name_ok(v: Any) -> bool:
    return type(v) is str and 1 <= len(v) <= 255 and V._NAME.search(v) is not None


def fast_create_ok(body: Any, version: int) -> bool:
    """True only for create bodies that :func:`create_schema` certainly accepts, in their
    common shape (name, flavorRef, imageRef, networks, key_name, availability_zone,
    metadata, adminPass, description); anything else -- and every refusal, with its
    message -- goes through jsonschema.  PERF: ~5 us instead of ~80 us a create.  A
    property test checks that it never accepts what the schema refuses."""
    if type(body) is not dict or len(body) != 1:
        return False
    s = body.get("server")
    if type(s) is not dict or "name" not in s or "flavorRef" not in s:
        return False
    if version >= 37 and "networks" not in s:
        return False
    for k, v in s.items():
        if k == "name" or k == "availability_zone":
            ok = _name_ok(v)
        elif k == "flavorRef":
            ok = (type(v) is str and len(v) >= 1) or type(v) is int
        elif k == "imageRef":
            ok = type(v) is str and (v == "" or (len(v) == 36 and V._uuid(v)))
        elif k == "networks":
            ok = version >= 37 and type(v) is str and v in ("none", "auto")
        elif k == "key_name":
            ok = type(v) is str and 1 <= len(v) <= 255 and V._NAME_SPACES.search(v) is not None
        elif k == "metadata":
            ok = type(v) is dict and all(
                _META_KEY.search(a) is not None and type(b) is str and len(b) <= 255
                for a, b in v.items())
        elif k == "adminPass":
            ok = type(v) is str
        elif k == "description" and version >= 19:
            ok = v is None or (type(v) is str and len(v) <= 255 and _DESCRIPTION.search(v) is not None)
        else:
            return False
        if not ok:
            return False
    return True


class _Schemas:
    """Compiled schemas per microversion, built on first use."""

    def __init__(self, build: Callable[[int], dict[str, Any]]) -> None:
        self.build = build
        self.cache: dict[int, V.Schema] = {}

    def __call__(self, version: int) -> V.Schema:
        s = self.cache.get(version)
        if s is None:
            s = self.cache[version] = V.Schema(self.build(version))
        return s


CREATE = _Schemas(create_schema)
UPDATE = _Schemas(update_schema)
REBUILD = _Schemas(rebuild_schema)
REBOOT = V.Schema(REBOOT_SCHEMA)
RESIZE = V.Schema(RESIZE_SCHEMA)
CREATE_IMAGE = V.Schema(CREATE_IMAGE_SCHEMA)
LOCK_V273 = V.Schema(LOCK_SCHEMA_V273)


# -- Nova's state rules -----------------------------------------------------------------------
@dataclass(frozen=True)
class Rule:
    """``check_instance_state`` of one compute API method (None: any)."""

    vm: frozenset[str] | None
    task: frozenset[str | None] | None
    lock: bool = True  # check_instance_lock


_ANY = None
_IDLE: frozenset[str | None] = frozenset({None})
ALLOW_REBOOT: frozenset[str | None] = frozenset({None, "rebooting", "reboot_pending",
                                                 "reboot_started", "rebooting_hard", "resuming",
                                                 "unpausing", "pausing", "suspending"})
RULES: dict[str, Rule] = {
    "reboot": Rule(frozenset({"active", "stopped", "paused", "suspended", "error"}), ALLOW_REBOOT),
    "reboot_SOFT": Rule(frozenset({"active"}), _IDLE),
    "reboot_HARD": Rule(frozenset({"active", "stopped", "paused", "suspended", "error"}), ALLOW_REBOOT),
    "stop": Rule(frozenset({"active", "error"}), _IDLE),
    "start": Rule(frozenset({"stopped"}), _IDLE),
    "pause": Rule(frozenset({"active"}), _IDLE),
    "unpause": Rule(frozenset({"paused"}), _IDLE),
    "suspend": Rule(frozenset({"active"}), _IDLE),
    "resume": Rule(frozenset({"suspended"}), _IDLE),
    "delete": Rule(_ANY, _ANY),
    "lock": Rule(_ANY, _ANY, lock=False),
    "unlock": Rule(_ANY, _ANY, lock=False),
    "update": Rule(_ANY, _ANY, lock=False),
    "resize": Rule(frozenset({"active", "stopped"}), _IDLE),
    "confirmResize": Rule(frozenset({"resized"}), _ANY),
    "revertResize": Rule(frozenset({"resized"}), _IDLE),
    "rebuild": Rule(frozenset({"active", "stopped", "error"}), _IDLE),
    "createImage": Rule(frozenset({"active", "stopped", "paused", "suspended"}), _IDLE, lock=False),
}
# The task state each accepted command shows at once (pending), by action.
TASK_OF = {"stop": "powering-off", "start": "powering-on", "pause": "pausing",
           "unpause": "unpausing", "suspend": "suspending", "resume": "resuming",
           "delete": "deleting", "resize": "resize_prep", "revertResize": "resize_reverting",
           "rebuild": "rebuilding", "createImage": "image_snapshot"}


def check_state(rec: Mapping[str, Any], action: str, rule_name: str, is_admin: bool) -> None:
    """Nova's lock then state checks of ``rec`` (the effective record): 409s."""
    rule = RULES[rule_name]
    uid = rec["uuid"]
    if rule.lock and rec["locked"] and not is_admin:
        raise Conflict(f"Instance {uid} is locked")
    if rule.vm is not None and rec["vm_state"] not in rule.vm:
        raise Conflict(f"Cannot '{action}' instance {uid} while it is in vm_state {rec['vm_state']}")
    if rule.task is not None and rec["task_state"] not in rule.task:
        raise Conflict(f"Cannot '{action}' instance {uid} while it is in task_state "
                       f"{rec['task_state']}")


# Body key -> record field of what update (and rebuild) may change.
UPDATE_FIELDS = (("name", "name"), ("description", "description"), ("hostname", "hostname"),
                 ("accessIPv4", "access_ip_v4"), ("accessIPv6", "access_ip_v6"),
                 ("OS-DCF:diskConfig", "disk_config"))
REBUILD_FIELDS = UPDATE_FIELDS + (("metadata", "metadata"), ("key_name", "key_name"),
                                  ("user_data", "user_data"),
                                  ("trusted_image_certificates", "trusted_image_certificates"))


def instance_action(request_id: str, action: str, req: Any, at: int) -> dict[str, Any]:
    """The instance action a command starts (record.ACTION_KEYS), as the API predicts it."""
    return {"request_id": request_id, "action": action, "project_id": str(req.project),
            "user_id": str(req.user), "start_time": at, "updated_at": at, "message": None,
            "events": []}


def not_found(server_id: str) -> NotFound:
    return NotFound(f"Instance {server_id} could not be found.")


def id_from_href(ref: Any) -> str:
    """Nova's ``common.get_id_from_href``: the last path segment of a URL, or the value."""
    s = str(ref)
    return urlsplit(s).path.rstrip("/").split("/")[-1] if "/" in s else s


def sanitize_hostname(name: str, default: str | None = None) -> str:
    """Nova's ``utils.sanitize_hostname``."""
    h = name.encode("latin-1", "ignore").decode("latin-1")
    h = re.sub(r"[ _.]", "-", h)
    h = re.sub(r"[^\w.-]+", "", h, flags=re.ASCII)
    h = h.lower().strip(".-")[:63]
    if not h and default is not None:
        return sanitize_hostname(default)
    return h


_RID_ALPHABET = string.ascii_lowercase + string.digits


def random_string(alphabet: str, k: int) -> str:
    """``k`` characters of ``alphabet`` from the OS's CSPRNG, unbiased (rejection of the
    bytes past the last whole multiple of the alphabet).  PERF: one ``os.urandom`` call,
    where ``secrets.choice`` per character made a system call each (~20 us a password)."""
    n = len(alphabet)
    limit = 256 - 256 % n
    out: list[str] = []
    while len(out) < k:
        for b in os.urandom(2 * k):
            if b < limit:
                out.append(alphabet[b % n])
                if len(out) == k:
                    break
    return "".join(out)


def generate_password(length: int = 12) -> str:
    return random_string(PASSWORD_SYMBOLS, length)


def reservation_id() -> str:
    """Nova's ``utils.generate_uid('r')``: r- and 8 characters of [a-z0-9]."""
    return "r-" + random_string(_RID_ALPHABET, 8)


def flavor_snapshot(f: Mapping[str, Any]) -> dict[str, Any]:
    """The record's flavor snapshot from a catalogue flavor."""
    return {"id": str(f["id"]), "name": str(f["name"]), "vcpus": int(f["vcpus"]),
            "ram": int(f["ram"]), "disk": int(f["disk"]), "ephemeral": int(f.get("ephemeral", 0)),
            "swap": int(f.get("swap", 0)), "extra_specs": dict(f.get("extra_specs") or {})}


def _quota_message(overs: list[str], req: dict[str, Any], used: dict[str, int],
                   limits: dict[str, int]) -> str:
    # nova.compute.utils.get_over_quota_detail + TooManyInstances.
    return (f"Quota exceeded for {', '.join(overs)}: Requested "
            f"{', '.join(str(req[o]) for o in overs)}, but already used "
            f"{', '.join(str(used[o]) for o in overs)} of "
            f"{', '.join(str(limits[o]) for o in overs)} {', '.join(overs)}")


def instances_allowed(r: Reader, project: str, flavor: Mapping[str, Any], min_count: int,
                      max_count: int) -> int:
    """How many of ``min_count..max_count`` servers of ``flavor`` the project's quota admits
    (Nova's ``check_num_instances_quota``); 403 with Nova's message below ``min_count``."""
    limits = Lim.project_limits(r, project)
    used = r.quota_usage(project)
    vcpus, ram = int(flavor["vcpus"]), int(flavor["ram"])
    per = {"instances": 1, "cores": vcpus, "ram": ram}
    headroom: dict[str, int] = {}
    for res in ("instances", "cores", "ram"):
        lim = int(limits.get(res, -1))
        headroom[res] = (1 << 62) if lim < 0 else lim - int(used.get(res, 0))
    allowed = max_count
    for res, n in per.items():
        if n:
            allowed = min(allowed, headroom[res] // n)
    if allowed >= min_count:
        return allowed
    requested_n = str(min_count) if min_count == max_count else f"{min_count}-{max_count}"
    req = {"instances": requested_n, "cores": vcpus * max_count, "ram": ram * max_count}
    overs = sorted(res for res, n in per.items() if n and headroom[res] < n * min_count)
    use = {res: int(used.get(res, 0)) for res in per}
    raise Forbidden(_quota_message(overs, req, use, {k: int(limits.get(k, -1)) for k in per}))


def check_upsize_quota(r: Reader, project: str, old: Mapping[str, Any],
                       new: Mapping[str, Any]) -> None:
    """Quota for a resize to a bigger flavor (cores and ram deltas)."""
    limits = Lim.project_limits(r, project)
    used = r.quota_usage(project)
    delta = {"cores": int(new["vcpus"]) - int(old["vcpus"]), "ram": int(new["ram"]) - int(old["ram"])}
    overs = sorted(res for res, d in delta.items()
                   if d > 0 and int(limits.get(res, -1)) >= 0
                   and int(used.get(res, 0)) + d > int(limits[res]))
    if overs:
        use = {res: int(used.get(res, 0)) for res in delta}
        raise Forbidden(_quota_message(overs, delta, use, {k: int(limits.get(k, -1)) for k in delta}))


# -- create -----------------------------------------------------------------------------------
@dataclass
class _Planned:
    """One server of a create, decided in the read phase."""

    uuid: str
    command_id: str
    record: dict[str, Any]
    payload: dict[str, Any]
    cell: str
    # PERF: its record, index entries, views and outbox entry, packed on the event loop:
    # the write transaction only re-checks and puts (~60 -> ~20 us a create under the
    # writer lock, bench_commands).
    prepared: Provisional
    outbox: OutboxEntry


@dataclass
class _CreatePlan:
    project: str
    user: str
    flavor: dict[str, Any]
    min_count: int
    password: str
    servers: list[_Planned] = field(default_factory=list)


def _image_ok(r: Reader, req: Any, image_id: str, flavor: Mapping[str, Any],
              volume_backed: bool = False) -> dict[str, Any]:
    img = r.image(image_id)
    if img is None or not I._visible(img, req.project, req.is_admin):
        raise BadRequest(f"Image {image_id} could not be found.")
    if img.get("status", "active") != "active":
        raise BadRequest(f"Image {image_id} is not active.")
    if int(flavor["ram"]) < int(img.get("min_ram") or 0):
        raise BadRequest("Flavor's memory is too small for requested image.")
    disk = int(flavor["disk"])
    if not volume_backed and disk:
        if int(img.get("size") or 0) > disk * GIB:
            raise BadRequest(f"Flavor's disk is too small for requested image. Flavor disk is "
                             f"{disk * GIB} bytes, image is {int(img['size'])} bytes.")
        if int(img.get("min_disk") or 0) > disk:
            raise BadRequest(f"Flavor's disk is too small for requested image. Flavor disk is "
                             f"{disk * GIB} bytes, minimum size is {int(img['min_disk']) * GIB} bytes.")
    return img


BDM_INVALID = ("Block Device Mapping is Invalid: Boot sequence for the instance and image/block "
               "device mapping combination is not valid.")


def _boot_index(b: Mapping[str, Any]) -> int | None:
    bi = b.get("boot_index")
    if bi is None:
        return None
    try:
        return int(bi)
    except (TypeError, ValueError):
        return None


def _volumes(bdms: list[dict[str, Any]]) -> tuple[str | None, list[dict[str, Any]]]:
    """(image id of an image-backed root disk from the mappings, volumes to attach)."""
    root_image: str | None = None
    vols: list[dict[str, Any]] = []
    for b in bdms:
        src, dest = b.get("source_type"), b.get("destination_type", "volume" if
                                                   b.get("source_type") == "volume" else "local")
        ident = b.get("uuid") or b.get("image_id") or b.get("volume_id") or b.get("snapshot_id")
        if src == "image" and dest == "local" and _boot_index(b) == 0:
            root_image = str(ident) if ident else None
        elif dest == "volume":
            vid = str(ident) if src == "volume" and ident else str(uuidlib.uuid4())
            vols.append({"id": vid, "delete_on_termination": V.is_true(
                b.get("delete_on_termination", src != "volume"))})
    return root_image, vols


# A complete provisional record (every field, defaults), validated once by make_record;
# each create copies it and sets its values.  PERF: make_record's field-by-field validation
# cost ~80 us a create; the values set here are typed by the create schema (strings, string
# maps and lists) and by the code above, and test_commands_servers validates what is stored.
_TEMPLATE = R.make_record({
    "uuid": "00000000-0000-4000-8000-000000000000", "version": 0, "cell": "-",
    "project_id": "-", "user_id": "-", "name": "", "vm_state": "building",
    "task_state": "scheduling", "created_at": 0, "updated_at": 0,
    "flavor": {"id": "", "name": "", "vcpus": 0, "ram": 0, "disk": 0, "ephemeral": 0, "swap": 0,
               "extra_specs": {}}})


def provisional_record(values: Mapping[str, Any]) -> dict[str, Any]:
    """The version-0 record of a create: the template with ``values`` (record field names)."""
    unknown = set(values) - set(_TEMPLATE)
    if unknown:
        raise ValueError(f"unknown record field(s): {sorted(unknown)}")
    rec = dict(_TEMPLATE)
    for name in _EMPTY_CONTAINERS:  # never share the template's lists and maps
        rec[name] = type(rec[name])()
    rec.update(values)
    rec["status"] = R.status_from_state(rec["vm_state"], rec["task_state"])
    return rec


_EMPTY_CONTAINERS = tuple(k for k, v in _TEMPLATE.items() if isinstance(v, dict | list) and not v)


class ServerCommands:
    """The write handlers, closed over one worker's :class:`ApiContext`."""

    def __init__(self, ctx: ApiContext) -> None:
        self.ctx = ctx
        self.store = ctx.store
        if ctx.committer is None:
            raise ValueError("the API context has no group committer")
        self.committer = ctx.committer
        self.scheduler = schedule.Scheduler(max_age=CAPACITY_MAX_AGE)
        self.actions: dict[str, Callable[[Any, str, Any], Any]] = {
            "reboot": self._reboot,
            "os-stop": self._simple("stop"), "os-start": self._simple("start"),
            "pause": self._simple("pause"), "unpause": self._simple("unpause"),
            "suspend": self._simple("suspend"), "resume": self._simple("resume"),
            "lock": self._lock, "unlock": self._unlock,
            "resize": self._resize, "confirmResize": self._confirm_resize,
            "revertResize": self._simple("revertResize"),
            "rebuild": self._rebuild, "createImage": self._create_image,
        }

    def specs(self) -> list[RouteSpec]:
        s = API_ROOT + "/servers"
        return [
            RouteSpec("POST", s, self.create),
            RouteSpec("PUT", s + "/{server_id}", self.update),
            RouteSpec("DELETE", s + "/{server_id}", self.delete),
            RouteSpec("POST", s + "/{server_id}/action", self.action),
        ]

    # -- create ----------------------------------------------------------------------------
    async def create(self, req: Any) -> tuple[int, bytes]:
        version: int = req.version
        body = V.json_body(req)
        if not fast_create_ok(body, version):
            CREATE(version).validate(body)
        s: dict[str, Any] = body["server"]
        with self.store.read() as r:
            plan = self._plan_create(r, req, body, s, version)
        planned = plan.servers

        def work(c: CommandTxn) -> int:
            n = instances_allowed(c.reader, plan.project, plan.flavor, plan.min_count, len(planned))
            c.put_provisional([p.prepared for p in planned[:n]])
            for p in planned[:n]:
                c.put_outbox_packed(p.outbox)
            return n

        await self.committer.submit(work)
        first = planned[0]
        if V.is_true(s.get("return_reservation_id", False)):
            return 202, C.dumps({"reservation_id": first.record["reservation_id"]})
        sgs = [{"name": n} for n in first.record["security_groups"]]
        out: dict[str, Any] = {"OS-DCF:diskConfig": first.record["disk_config"],
                               "adminPass": plan.password, "id": first.uuid,
                               "links": Links(req).pair("servers", first.uuid)}
        if sgs:
            out["security_groups"] = sgs
        return 202, C.dumps({"server": out})

    def _plan_create(self, r: Reader, req: Any, body: dict[str, Any], s: dict[str, Any],
                     version: int) -> _CreatePlan:
        project, user = str(req.project), str(req.user)
        # min/max count (the API layer's check; quota decides how many within them)
        min_count = int(s.get("min_count", 1))
        max_count = int(s.get("max_count", min_count))
        if min_count > max_count:
            raise BadRequest("min_count must be <= max_count")
        if version >= 74 and ("host" in s or "hypervisor_hostname" in s) and not req.is_admin:
            raise C.forbidden("compute:servers:create:requested_destination")
        # flavor
        fid = id_from_href(s["flavorRef"])
        raw = r.flavor(fid)
        fl = F.full(raw) if raw is not None else None
        if fl is None or not F.visible(fl, req.project, req.is_admin):
            raise BadRequest("Invalid flavorRef provided.")
        flavor = flavor_snapshot(fl)
        # image / block devices
        bdms: list[dict[str, Any]] = list(s.get("block_device_mapping_v2") or [])
        image_id = s.get("imageRef") or ""
        root_image, volumes = _volumes(bdms)
        volume_backed = False
        if not image_id:
            if not bdms and not s.get("block_device_mapping"):
                raise BadRequest("Missing imageRef attribute")
            if root_image:
                image_id = root_image
            elif not any(_boot_index(b) == 0 for b in bdms) and not s.get("block_device_mapping"):
                raise BadRequest(BDM_INVALID)
            else:
                volume_backed = True
        image_rec: dict[str, Any] | None = None
        if image_id:
            image_rec = _image_ok(r, req, str(image_id), flavor, volume_backed)
        for b in bdms:
            if b.get("source_type") == "image" and b.get("uuid") and b.get("uuid") != image_id:
                _image_ok(r, req, str(b["uuid"]), flavor, True)
        # key pair
        key_name = s.get("key_name")
        if key_name is not None and r.keypair(user, key_name) is None:
            raise BadRequest("Invalid key_name provided.")
        # metadata quota
        md: dict[str, str] = dict(s.get("metadata") or {})
        limits = Lim.project_limits(r, project)
        md_limit = int(limits.get("metadata_items", 128))
        if md_limit >= 0 and len(md) > md_limit:
            raise Forbidden(f"Maximum number of metadata items exceeds {md_limit}")
        # availability zone, or Nova's forced host "zone:host[:node]" (admin)
        zone = s.get("availability_zone")
        forced: str | None = str(s["host"]) if version >= 74 and s.get("host") else None
        if zone is not None and ":" in zone:
            zone, _, rest = zone.partition(":")
            if not req.is_admin:
                raise C.forbidden("os_compute_api:servers:create:forced_host")
            forced = rest.split(":", 1)[0] or forced
            zone = zone or None
        if zone is not None:
            zones = self.scheduler.known_zones(r) or {DEFAULT_ZONE}
            if zone not in zones:
                raise BadRequest("The requested availability zone is not available")
        # quota (again, inside the write transaction)
        count = instances_allowed(r, project, flavor, min_count, max_count)
        # scheduling
        try:
            places = self.scheduler.choose(r, flavor, zone, count)
        except schedule.NoCells as e:
            raise HTTPFault(503, f"No valid host was found. {e}.", ((b"Retry-After", b"5"),)) from None
        if forced is not None:
            owner = self.scheduler.capacity(r).host_cell(forced)
            if owner is None:
                raise BadRequest(f"Compute host {forced} could not be found.")
            places = [schedule.Placement(owner, forced, zone) for _ in places]

        name = str(s["name"])
        hints = body.get("OS-SCH-HNT:scheduler_hints") or body.get("os:scheduler_hints") or {}
        groups = [str(hints["group"])] if isinstance(hints, dict) and hints.get("group") else []
        sgs = [str(g["name"]) for g in s.get("security_groups") or []] or ["default"]
        disk_config = s.get("OS-DCF:diskConfig")
        if disk_config is None:
            props = (image_rec or {}).get("properties") or {}
            disk_config = "AUTO" if V.is_true(props.get("auto_disk_config", False)) else "MANUAL"
        image_props = dict((image_rec or {}).get("properties") or {})
        rid = reservation_id()
        now = R.now_us()
        plan = _CreatePlan(project, user, flavor, min_count,
                           str(s.get("adminPass") or generate_password()))
        for i, place in enumerate(places):
            uid = str(uuidlib.uuid4())
            disp = name if len(places) == 1 else f"{name}-{i + 1}"
            if version >= 90 and s.get("hostname") and len(places) == 1:
                host_name = str(s["hostname"])
            else:
                host_name = sanitize_hostname(disp, f"Server-{uid}")
            values: dict[str, Any] = {
                "uuid": uid, "version": 0, "cell": place.cell, "project_id": project,
                "user_id": user, "name": disp, "hostname": host_name,
                "description": s.get("description"), "vm_state": "building",
                "task_state": "scheduling", "power_state": 0, "progress": 0,
                "created_at": now, "updated_at": now, "availability_zone": zone,
                "flavor": flavor,
                "image": {"id": str(image_id), "properties": image_props} if image_id and not volume_backed else None,
                "key_name": key_name,
                "config_drive": "True" if V.is_true(s.get("config_drive", False)) else "",
                "disk_config": disk_config,
                "access_ip_v4": s.get("accessIPv4"), "access_ip_v6": s.get("accessIPv6"),
                "security_groups": sgs, "metadata": md, "tags": list(s.get("tags") or []),
                "volumes_attached": volumes, "server_groups": groups,
                "scheduler_hints": dict(hints) if isinstance(hints, dict) else {},
                "reservation_id": rid, "launch_index": i, "user_data": s.get("user_data"),
                "trusted_image_certificates": s.get("trusted_image_certificates"),
            }
            # The first server's command id is the request's own id (the 202's
            # X-OpenStack-Request-ID); a multi-create's other servers need ids of their own
            # (the cell inbox is keyed by command id).
            cid = req.request_id if i == 0 else _core.make_request_id()
            values["actions"] = [instance_action(cid, "create", req, now)]
            rec = provisional_record(values)
            server = {
                "uuid": uid, "project_id": project, "user_id": user, "name": disp,
                "hostname": host_name, "description": values["description"],
                "availability_zone": zone, "image_ref": str(image_id) if image_id and not volume_backed else None,
                "key_name": key_name, "config_drive": values["config_drive"],
                "disk_config": disk_config, "access_ip_v4": values["access_ip_v4"],
                "access_ip_v6": values["access_ip_v6"], "reservation_id": rid,
                "launch_index": i, "user_data": values["user_data"], "created_at": now,
                "flavor": flavor, "metadata": md, "tags": values["tags"],
                "security_groups": sgs, "volumes": volumes, "image_properties": image_props,
                "scheduler_hints": values["scheduler_hints"],
                "trusted_image_certificates": values["trusted_image_certificates"],
                "server_groups": groups,
            }
            payload = {"action": "create", "server": server, "host": place.host,
                       "project_id": project, "user_id": user, "request_id": cid,
                       "networks": s.get("networks", "auto")}
            plan.servers.append(_Planned(
                uid, cid, rec, payload, place.cell,
                prepare_provisional(rec, views.render_server(rec)),
                pack_outbox(place.cell, uid, cid, payload, now)))
        return plan

    # -- one server's commands -------------------------------------------------------------
    def _visible_record(self, r: Reader, req: Any, server_id: str) -> dict[str, Any]:
        head = r.head(server_id)
        if head is None or not (req.is_admin or head.project_id == req.project):
            raise not_found(server_id)
        rec = r.get_server(server_id)
        if rec is None:
            raise not_found(server_id)
        return rec

    async def _command(self, req: Any, server_id: str, action: str, rule: str,
                       fields: Mapping[str, Any] | None, payload: dict[str, Any],
                       extra: Callable[[Mapping[str, Any], Reader], None] | None = None,
                       then: Callable[[CommandTxn, Mapping[str, Any]], Any] | None = None) -> Any:
        """The common shape: read (visibility, lock, state, ``extra`` checks), then one
        group-committed write re-checking the same and writing pending + outbox.  Returns
        the effective record after the write (or ``then``'s value)."""
        is_admin = bool(req.is_admin)
        cid = req.request_id
        with self.store.read() as r:
            rec = self._visible_record(r, req, server_id)
            eff = R.effective(rec)
            check_state(eff, action, rule, is_admin)
            if extra is not None:
                extra(eff, r)
            at = R.now_us()
            full = {**payload, "project_id": req.project, "user_id": req.user,
                    "request_id": cid}
            if payload["action"] != "update":  # Nova records no instance action for an update
                # Nova records the instance action in the API: it lists at once (the cell's
                # own entry, with its events, replaces it; record.effective merges the lists).
                fields = {**(fields or {}), "actions": [
                    instance_action(cid, str(payload["action"]), req, at)]}
            # PERF: the write planned from the bytes read here; the write transaction only
            # checks that they did not change (else it decodes and re-checks as below).
            plan = prepare_pending(r, server_id, cid, fields, at, self.committer.render) \
                if fields else None
        entry = pack_outbox(str(rec["cell"]), server_id, cid, full, at) if plan else None

        def work(c: CommandTxn) -> Any:
            if plan is not None and entry is not None and c.pending_is_current(plan):
                # The same server as read: the state checks hold; ``extra`` re-checks the
                # rest (flavor, image, quota) against this transaction.
                if extra is not None:
                    extra(eff, c.reader)
                e = c.put_pending(plan)
                c.put_outbox_packed(entry)
                return then(c, e) if then is not None else e
            cur = c.reader.get_server(server_id)
            if cur is None:
                raise not_found(server_id)
            e = R.effective(cur)
            check_state(e, action, rule, is_admin)
            if extra is not None:
                extra(e, c.reader)
            if fields:
                e = c.set_pending(server_id, cid, fields, at)
            c.put_outbox(str(cur["cell"]), server_id, cid, full, at)
            return then(c, e) if then is not None else e

        return await self.committer.submit(work)

    async def delete(self, req: Any) -> tuple[int, bytes]:
        server_id = req.params[0]
        await self._command(req, server_id, "delete", "delete", {"task_state": "deleting"},
                            {"action": "delete"})
        return 204, b""

    async def update(self, req: Any) -> tuple[int, bytes]:
        server_id = req.params[0]
        body = V.json_body(req)
        UPDATE(req.version).validate(body)
        s = body["server"]
        fields = {f: s[k] for k, f in UPDATE_FIELDS if k in s}
        eff = await self._command(req, server_id, "update", "update", fields,
                                  {"action": "update", **fields})
        return 200, b'{"server": ' + self._view(req, eff, views.UPDATE) + b"}"

    @staticmethod
    def _view(req: Any, eff: Mapping[str, Any], kind: int) -> bytes:
        blob = views.render_server(eff)[views.VIEW_ID]
        return bytes(views.server_json(blob, req.version, req.is_admin, req.base_url.encode(),
                                       link_project(req), kind))

    async def action(self, req: Any) -> Any:
        server_id = req.params[0]
        body = V.json_body(req)
        if not isinstance(body, dict) or len(body) != 1:
            raise BadRequest(V.MALFORMED)
        name = next(iter(body))
        handler = self.actions.get(name)
        if handler is None:
            raise BadRequest(f"There is no such action: {name}")
        return await handler(req, server_id, body)

    def _simple(self, action: str) -> Callable[[Any, str, Any], Any]:
        task = TASK_OF[action]
        wire = {"stop": "stop", "start": "start"}.get(action, action)

        async def run(req: Any, server_id: str, body: Any) -> tuple[int, bytes]:
            await self._command(req, server_id, action, action, {"task_state": task},
                                {"action": wire})
            return 202, b""

        return run

    async def _reboot(self, req: Any, server_id: str, body: Any) -> tuple[int, bytes]:
        REBOOT.validate(body)
        kind = str(body["reboot"]["type"]).upper()
        task = "rebooting_hard" if kind == "HARD" else "rebooting"

        def inner(eff: Mapping[str, Any], r: Reader) -> None:
            check_state(eff, "reboot", f"reboot_{kind}", bool(req.is_admin))

        await self._command(req, server_id, "reboot", "reboot", {"task_state": task},
                            {"action": "reboot", "type": kind}, inner)
        return 202, b""

    async def _lock(self, req: Any, server_id: str, body: Any) -> tuple[int, bytes]:
        reason = None
        if req.version >= 73:
            LOCK_V273.validate(body)
            if isinstance(body["lock"], dict):
                reason = body["lock"].get("locked_reason")
        by = "admin" if req.is_admin else "owner"
        await self._command(req, server_id, "lock", "lock",
                            {"locked": True, "locked_by": by, "locked_reason": reason},
                            {"action": "lock", "reason": reason, "locked_by": by})
        return 202, b""

    async def _unlock(self, req: Any, server_id: str, body: Any) -> tuple[int, bytes]:
        def may_unlock(eff: Mapping[str, Any], r: Reader) -> None:
            if eff["locked"] and eff["locked_by"] == "admin" and not req.is_admin:
                raise C.forbidden("os_compute_api:os-lock-server:unlock:unlock_override")

        await self._command(req, server_id, "unlock", "unlock",
                            {"locked": False, "locked_by": None, "locked_reason": None},
                            {"action": "unlock"}, may_unlock)
        return 202, b""

    async def _resize(self, req: Any, server_id: str, body: Any) -> tuple[int, bytes]:
        RESIZE.validate(body)
        fid = id_from_href(body["resize"]["flavorRef"])
        payload: dict[str, Any] = {"action": "resize"}
        if "OS-DCF:diskConfig" in body["resize"]:
            payload["disk_config"] = body["resize"]["OS-DCF:diskConfig"]

        def flavor_checks(eff: Mapping[str, Any], r: Reader) -> None:
            # compute.API.resize, after its lock and state checks.
            raw = r.flavor(fid)
            fl = F.full(raw) if raw is not None else None
            if fl is None or not F.visible(fl, req.project, req.is_admin):
                raise BadRequest("Unable to locate requested flavor.")
            new = flavor_snapshot(fl)
            old = eff["flavor"]
            if new["id"] == old["id"]:
                raise BadRequest("When resizing, instances must change flavor!")
            if new["disk"] < int(old["disk"]):
                raise BadRequest("Resizing to a smaller disk flavor is not allowed.")
            check_upsize_quota(r, eff["project_id"], old, new)
            payload["flavor"] = new

        await self._command(req, server_id, "resize", "resize", {"task_state": "resize_prep"},
                            payload, flavor_checks)
        return 202, b""

    async def _confirm_resize(self, req: Any, server_id: str, body: Any) -> tuple[int, bytes]:
        await self._command(req, server_id, "confirmResize", "confirmResize", None,
                            {"action": "confirmResize"})
        return 204, b""

    async def _rebuild(self, req: Any, server_id: str, body: Any) -> tuple[int, bytes]:
        version = req.version
        REBUILD(version).validate(body)
        b = body["rebuild"]
        image_id = str(b["imageRef"])
        password = str(b.get("adminPass") or generate_password())
        fields: dict[str, Any] = {"task_state": "rebuilding"}
        payload: dict[str, Any] = {"action": "rebuild", "image_ref": image_id}
        for key, fname in REBUILD_FIELDS:
            if key in b:
                fields[fname] = b[key]
                payload[fname] = b[key]

        def image_checks(eff: Mapping[str, Any], r: Reader) -> None:
            img = _image_ok(r, req, image_id, eff["flavor"])
            if b.get("key_name") is not None and r.keypair(str(req.user), b["key_name"]) is None:
                raise BadRequest("Invalid key_name provided.")
            props = dict(img.get("properties") or {})
            fields["image"] = {"id": image_id, "properties": props}
            payload["image_properties"] = props

        eff = await self._command(req, server_id, "rebuild", "rebuild", fields, payload,
                                  image_checks)
        view = self._view(req, eff, views.REBUILD)
        view = view[:-1] + b', "adminPass": ' + C.dumps(password) + b"}"
        return 202, b'{"server": ' + view + b"}"

    async def _create_image(self, req: Any, server_id: str, body: Any) -> tuple[int, bytes, bytes] | tuple[int, bytes]:
        CREATE_IMAGE.validate(body)
        ci = body["createImage"]
        image_id = str(uuidlib.uuid4())
        now = R.now_us()

        def put_image(c: CommandTxn, eff: Mapping[str, Any]) -> None:
            base = eff.get("image") or {}
            props = {**dict(base.get("properties") or {}), **dict(ci.get("metadata") or {}),
                     "instance_uuid": server_id, "image_type": "snapshot"}
            c.put_catalog(Catalog.IMAGES, image_id, {
                "id": image_id, "name": ci["name"], "status": "active", "size": 0,
                "min_ram": 0, "min_disk": int(eff["flavor"]["disk"]), "created_at": now,
                "updated_at": now, "properties": props, "visibility": "private",
                "owner": eff["project_id"], "members": []})

        await self._command(req, server_id, "createImage", "createImage",
                            {"task_state": "image_snapshot"},
                            {"action": "createImage", "image_id": image_id, "name": ci["name"]},
                            then=put_image)
        if req.version >= 45:
            return 202, C.dumps({"image_id": image_id})
        location = f"{I.glance_url(req)}/images/{image_id}"
        return 202, b"", b"Location: " + location.encode() + b"\r\n"


def routes(ctx: ApiContext) -> list[RouteSpec]:
    return ServerCommands(ctx).specs()


__all__ = ["ServerCommands", "check_state", "create_schema", "instances_allowed", "routes"]

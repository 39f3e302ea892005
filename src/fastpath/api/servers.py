"""Server read routes: ``GET /v2.1/servers``, ``/servers/detail``, ``/servers/{id}`` and the
sub-resources ``ips``, ``metadata`` and ``tags``.

Budget (DESIGN.md): every request here is exactly one store read transaction and no other
store call -- validation, tenancy, the index walk, the view fragments and any record decoded
all happen inside the one ``with ctx.store.read() as r:`` of the handler, errors included.

Lists follow Nova's ``ServersController._get_servers`` step by step (query schema per
microversion, ``remove_invalid_options``, status mapping, changes-since/-before,
all_tenants policy, sort keys, marker), then read:

- default order (``created_at`` desc, id desc) or its exact reverse (``sort_key=created_at``
  ``&sort_dir=asc``) without a changes window: one cursor walk of the project (or global)
  index, filtering on the index entries, stopping at ``limit`` matches.  The uuid stands
  in for Nova's integer ``id`` as the tie-break (docs/store.md).
- any other sort: every matching index entry of the scope is collected, then sorted --
  O(servers in scope) entries decoded, in the same transaction.  Sort keys that the index
  entry lacks cost a record decode (or a frame-head read for ``updated_at``) per matching
  server.  PERF: add a sort key to the index entry (or an index of its own) once it is
  common.
- ``changes-since``/``changes-before``: candidates come from the changes log (live and
  deleted servers changed in the window, DELETED from their tombstones), then as above.

Filters that the index entry carries are tested on it (no record decoding); the rare
admin-only filters on fields it lacks (kernel_id, description, access IPs, ...) decode the
record of each candidate.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import UTC, datetime
from functools import cmp_to_key
from typing import Any

from fastpath._loader import load_core
from fastpath.api import common as C
from fastpath.api import query as Q
from fastpath.api import views
from fastpath.api.context import ApiContext
from fastpath.api.links import Links, collection_links, link_project
from fastpath.api.routes import API_ROOT, RouteSpec
from fastpath.errors import BadRequest, Forbidden, NotFound
from fastpath.store import MarkerNotFound, Reader
from fastpath.store import layout as L
from fastpath.store import record as R
from fastpath.store.record import IndexEntry

_core = load_core()
# The compiled paths (http/serverpath.pxi) answer the default list page and the plain show;
# tests switch them off to compare their bodies with the general path's, byte for byte.
COMPILED = True

# -- Nova's servers query schema (nova/api/openstack/compute/schemas/servers.py) -------------------
JOINED_TABLE_PARAMS = (
    "block_device_mapping", "services", "metadata", "system_metadata", "info_cache",
    "security_groups", "pci_devices",
)
_REGEX_PARAMS = frozenset((
    "kernel_id", "ramdisk_id", "hostname", "key_name", "power_state", "node", "flavor",
    "reservation_id", "launched_at", "terminated_at", "availability_zone", "name",
    "display_name", "description", "display_description", "locked_by", "root_device_name",
    "config_drive", "access_ip_v4", "access_ip_v6", "auto_disk_config", "progress", "ip", "ip6",
    "created_at",
))
# query_params_v21's properties in Nova's order (the order its validator reports errors in).
_PROPERTIES_V21 = (
    "user_id", "project_id", "tenant_id", "launch_index", "image_ref", "image", "kernel_id",
    "ramdisk_id", "hostname", "key_name", "power_state", "vm_state", "task_state", "host",
    "node", "flavor", "reservation_id", "launched_at", "terminated_at", "availability_zone",
    "name", "display_name", "description", "display_description", "locked_by", "uuid",
    "root_device_name", "config_drive", "access_ip_v4", "access_ip_v6", "auto_disk_config",
    "progress", "sort_key", "sort_dir", "all_tenants", "soft_deleted", "deleted", "status",
    "changes-since", "ip", "ip6", "created_at", *JOINED_TABLE_PARAMS, "limit", "marker",
)
TAG_FILTERS = ("tags", "tags-any", "not-tags", "not-tags-any")
PAGING_SORTING = ("sort_key", "sort_dir", "limit", "marker")
# patternProperties "^_": kept through validation, refused as filters.
_INTERNAL = ("^_",)

IGNORE_SORT_KEYS = (
    "architecture", "cell_name", "cleaned", "default_ephemeral_device", "default_swap_device",
    "deleted", "deleted_at", "disable_terminate", "ephemeral_gb", "ephemeral_key_uuid", "id",
    "key_data", "launched_on", "locked", "memory_mb", "os_type", "reservation_id", "root_gb",
    "shutdown_terminate", "user_data", "vcpus", "vm_mode",
)
IGNORE_SORT_KEYS_V273 = tuple(k for k in IGNORE_SORT_KEYS if k != "locked")
VALID_SORT_KEYS = (
    "access_ip_v4", "access_ip_v6", "auto_disk_config", "availability_zone", "config_drive",
    "created_at", "display_description", "display_name", "host", "hostname", "image_ref",
    "instance_type_id", "kernel_id", "key_name", "launch_index", "launched_at", "locked_by",
    "node", "power_state", "progress", "project_id", "ramdisk_id", "root_device_name",
    "task_state", "terminated_at", "updated_at", "user_id", "uuid", "vm_state",
)


def _sort_key_enum(version: int) -> list[str]:
    if version >= 75:
        return ["locked", *VALID_SORT_KEYS]
    if version >= 73:
        return ["locked", *VALID_SORT_KEYS, *IGNORE_SORT_KEYS_V273]
    return [*VALID_SORT_KEYS, *IGNORE_SORT_KEYS]


def _schema(version: int) -> dict[str, Q.Check]:
    """The list query schema's properties at 2.``version``, in Nova's order."""
    names = list(_PROPERTIES_V21)
    if version >= 26:
        names += TAG_FILTERS
    if version >= 66:
        names.append("changes-before")
    if version >= 73:
        names.append("locked")
    schema: dict[str, Q.Check] = {}
    for name in names:
        if name in _REGEX_PARAMS or name in TAG_FILTERS:
            schema[name] = Q.regex
        elif name in ("changes-since", "changes-before"):
            schema[name] = Q.date_time
        else:
            schema[name] = Q.any_string
    schema.update(Q.PAGINATION)  # limit and marker keep their place
    schema["sort_key"] = Q.enum(_sort_key_enum(version))
    return schema


_SCHEMAS = {v: _schema(v) for v in range(1, 105)}

def _search_options(version: int) -> frozenset[str]:
    """``_get_server_search_options``: what a non-admin may filter on."""
    opts = ["reservation_id", "name", "status", "image", "flavor", "ip", "changes-since",
            "all_tenants"]
    if version >= 5:
        opts.append("ip6")
    if version >= 26:
        opts += TAG_FILTERS
    if version >= 66:
        opts.append("changes-before")
    if version >= 73:
        opts.append("locked")
    if version >= 83:
        opts += ["availability_zone", "config_drive", "key_name", "created_at", "launched_at",
                 "terminated_at", "power_state", "task_state", "vm_state", "progress", "user_id"]
    if version >= 90:
        opts.append("hostname")
    return frozenset(opts)


_SEARCH_OPTIONS = {v: _search_options(v) for v in range(1, 105)}


def validate_list_query(q: Q.Query, version: int) -> Q.Query:
    """The query schema of the servers list at 2.``version``: values checked, unknown
    parameters stripped (before 2.75) or refused (2.75+).  Returns the parameters kept."""
    return Q.validate(q, _SCHEMAS.get(version, _SCHEMAS[104]), version < 75, _INTERNAL)


# -- Nova's status mapping (nova/api/openstack/common.py) -------------------------------------------
def vm_and_task_states(statuses: list[str]) -> tuple[set[str], set[str | None]]:
    """``task_and_vm_state_from_status``; None stands for Nova's 'default' task state."""
    lower = {s.lower() for s in statuses}
    vm: set[str] = set()
    task: set[str | None] = set()
    for vm_state, task_map in R.STATE_MAP.items():
        for task_state, status in task_map.items():
            if status.lower() in lower:
                vm.add(vm_state)
                task.add(task_state)
    return vm, task


# -- filters ------------------------------------------------------------------------------------------
Pred = Callable[[IndexEntry], bool]
RecPred = Callable[[dict[str, Any]], bool]


def _ts_str(t: int | None) -> str | None:
    # A DATETIME column as the database compares it with REGEXP.
    if t is None:
        return None
    return datetime.fromtimestamp(t / 1e6, UTC).strftime("%Y-%m-%d %H:%M:%S")


def _str(x: Any) -> str | None:
    if x is None:
        return None
    if isinstance(x, bool):
        return "1" if x else "0"
    return str(x)


# query option -> index entry field, compared by regular expression (search, as the DB's
# REGEXP) or exactly (Nova's exact_match_filter_names).
_INDEX_REGEX: dict[str, Callable[[IndexEntry], str | None]] = {
    "name": lambda e: e.name,
    "display_name": lambda e: e.name,
    "reservation_id": lambda e: e.reservation_id,
    "hostname": lambda e: e.hostname,
    "key_name": lambda e: e.key_name,
    "node": lambda e: e.node,
    "availability_zone": lambda e: e.availability_zone,
    "config_drive": lambda e: e.config_drive,
    "power_state": lambda e: _str(e.power_state),
    "created_at": lambda e: _ts_str(e.created_at),
    "launched_at": lambda e: _ts_str(e.launched_at),
    "terminated_at": lambda e: _ts_str(e.terminated_at),
}
_INDEX_EXACT: dict[str, Callable[[IndexEntry], Any]] = {
    "user_id": lambda e: e.user_id,
    "image": lambda e: e.image_id,
    "image_ref": lambda e: e.image_id,
    "host": lambda e: e.host,
    "flavor": lambda e: e.flavor_id,
    "vm_state": lambda e: "deleted" if e.deleted else e.vm_state,
    "task_state": lambda e: None if e.deleted else e.task_state,
}
_RECORD_REGEX: dict[str, Callable[[dict[str, Any]], str | None]] = {
    "kernel_id": lambda r: r["kernel_id"],
    "ramdisk_id": lambda r: r["ramdisk_id"],
    "description": lambda r: r["description"],
    "display_description": lambda r: r["description"],
    "locked_by": lambda r: r["locked_by"],
    "root_device_name": lambda r: r["root_device_name"],
    "access_ip_v4": lambda r: r["access_ip_v4"],
    "access_ip_v6": lambda r: r["access_ip_v6"],
    "progress": lambda r: _str(r["progress"]),
    "launch_index": lambda r: _str(r["launch_index"]),
    "auto_disk_config": lambda r: "1" if r["disk_config"] == "AUTO" else "0",
}


def _regex_pred(get: Callable[[Any], str | None], pattern: str,
                name: str = "") -> Callable[[Any], bool]:
    # Nova matches these filters with the database's REGEXP; a pattern that does not
    # compile is the caller's error (400 in the schema's words), never a 500.
    try:
        rx = re.compile(pattern)
    except (re.error, RecursionError, OverflowError):
        raise Q.invalid(name, pattern, f"{pattern!r} is not a 'regex'") from None

    def pred(x: Any) -> bool:
        v = get(x)
        return v is not None and rx.search(v) is not None

    return pred


def _exact_pred(get: Callable[[IndexEntry], Any], value: Any) -> Pred:
    if isinstance(value, set):
        return lambda e: get(e) in value
    return lambda e: get(e) == value


def _ip_pred(ip: str | None, ip6: str | None) -> Pred:
    # compute.API._ip_filter: re.match over the fixed addresses, v4 for ip, v6 for ip6.
    rx4 = re.compile(ip) if ip is not None else None
    rx6 = re.compile(ip6) if ip6 is not None else None

    def pred(e: IndexEntry) -> bool:
        for a in e.ips:
            rx = rx6 if ":" in a else rx4
            if rx is not None and rx.match(a):
                return True
        return False

    return pred


def _tags_pred(kind: str, tags: list[str]) -> Pred:
    want = set(tags)
    if kind == "tags":
        return lambda e: want.issubset(e.tags)
    if kind == "tags-any":
        return lambda e: not want.isdisjoint(e.tags)
    if kind == "not-tags":
        return lambda e: not want.issubset(e.tags)
    return lambda e: want.isdisjoint(e.tags)


# -- sorting ------------------------------------------------------------------------------------------
_INDEX_SORT: dict[str, Callable[[IndexEntry], Any]] = {
    "created_at": lambda e: e.created_at,
    "display_name": lambda e: e.name,
    "host": lambda e: e.host,
    "hostname": lambda e: e.hostname,
    "image_ref": lambda e: e.image_id,
    "instance_type_id": lambda e: e.flavor_id,
    "key_name": lambda e: e.key_name,
    "launched_at": lambda e: e.launched_at,
    "node": lambda e: e.node,
    "power_state": lambda e: e.power_state,
    "project_id": lambda e: e.project_id,
    "task_state": lambda e: e.task_state,
    "terminated_at": lambda e: e.terminated_at,
    "user_id": lambda e: e.user_id,
    "vm_state": lambda e: e.vm_state,
    "availability_zone": lambda e: e.availability_zone,
    "config_drive": lambda e: e.config_drive,
    "locked": lambda e: e.locked,
}
_RECORD_SORT: dict[str, Callable[[dict[str, Any]], Any]] = {
    "access_ip_v4": lambda r: r["access_ip_v4"],
    "access_ip_v6": lambda r: r["access_ip_v6"],
    "auto_disk_config": lambda r: r["disk_config"] == "AUTO",
    "display_description": lambda r: r["description"],
    "kernel_id": lambda r: r["kernel_id"],
    "ramdisk_id": lambda r: r["ramdisk_id"],
    "launch_index": lambda r: r["launch_index"],
    "locked_by": lambda r: r["locked_by"],
    "progress": lambda r: r["progress"],
    "root_device_name": lambda r: r["root_device_name"],
}


def _cmp_values(a: Any, b: Any) -> int:
    # NULL sorts first ascending (MySQL, SQLite), last descending.
    if a is None or b is None:
        return 0 if a is b else (-1 if a is None else 1)
    return -1 if a < b else (1 if a > b else 0)


class _Candidate:
    """A server of a sorted list: its uuid, index entry and (lazily) sort values."""

    __slots__ = ("u", "entry", "values")

    def __init__(self, u: bytes, entry: IndexEntry) -> None:
        self.u = u
        self.entry = entry
        self.values: list[Any] = []


# -- the handlers ---------------------------------------------------------------------------------------
def _not_found(server_id: str) -> NotFound:
    return NotFound(f"Instance {server_id} could not be found.")


class ServerRoutes:
    """The handlers, closed over one worker's :class:`ApiContext`."""

    def __init__(self, ctx: ApiContext) -> None:
        self.ctx = ctx
        self.store = ctx.store
        self.max_limit = ctx.max_limit

    def specs(self) -> list[RouteSpec]:
        s = API_ROOT + "/servers"
        return [
            RouteSpec("GET", s, self.index),
            RouteSpec("GET", s + "/detail", self.detail),
            RouteSpec("GET", s + "/{server_id}", self.show),
            RouteSpec("GET", s + "/{server_id}/ips", self.ips),
            RouteSpec("GET", s + "/{server_id}/ips/{network_label}", self.ip_network),
            RouteSpec("GET", s + "/{server_id}/metadata", self.metadata),
            RouteSpec("GET", s + "/{server_id}/metadata/{key}", self.metadata_item),
            RouteSpec("GET", s + "/{server_id}/tags", self.tags),
            RouteSpec("GET", s + "/{server_id}/tags/{tag}", self.tag),
        ]

    # -- one server ------------------------------------------------------------------------------
    @staticmethod
    def _visible(r: Reader, req: Any, server_id: str) -> bool:
        """The server exists and the caller may see it (own project, or admin)."""
        head = r.head(server_id)
        return head is not None and (req.is_admin or head.project_id == req.project)

    def show(self, req: Any) -> tuple[int, bytes]:
        with self.store.read() as r:
            if COMPILED and not req.query:
                # PERF: compiled (http/serverpath.pxi); None when the server is not visible
                # (or anything unusual): the general path below answers.
                body = _core.server_show(req, r.txn, r.dbs)
                if body is not None:
                    return 200, body
            server_id = req.params[0]
            Q.strict(req)
            if not self._visible(r, req, server_id):
                raise _not_found(server_id)
            blob = r.view(server_id, views.VIEW_ID)
            if blob is None:
                raise _not_found(server_id)
            # PERF: assembled straight from the map (a buffer), before the txn ends.
            body = views.server_json(blob, req.version, req.is_admin, req.base_url.encode(),
                                     link_project(req))
        return 200, b'{"server": ' + body + b"}"

    def _record(self, r: Reader, req: Any, server_id: str) -> dict[str, Any]:
        if not self._visible(r, req, server_id):
            raise _not_found(server_id)
        rec = r.get_server(server_id)
        if rec is None:
            raise _not_found(server_id)
        # Accepted commands show at once (read-your-writes: docs/commands.md).
        return dict(R.effective(rec))

    @staticmethod
    def _addresses(rec: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
        # views/ips.py: version and addr only.
        return {
            net: [{"version": a["version"], "addr": a["addr"]} for a in entries]
            for net, entries in rec["addresses"].items()
        }

    def ips(self, req: Any) -> tuple[int, bytes]:
        # Cold route: the record is decoded (still the one transaction).
        with self.store.read() as r:
            Q.strict(req)
            rec = self._record(r, req, req.params[0])
        return 200, C.dumps({"addresses": self._addresses(rec)})

    def ip_network(self, req: Any) -> tuple[int, bytes]:
        server_id, label = req.params
        with self.store.read() as r:
            Q.strict(req)
            rec = self._record(r, req, server_id)
        addresses = self._addresses(rec)
        if label not in addresses:
            raise NotFound("Instance is not a member of specified network")
        return 200, C.dumps({label: addresses[label]})

    def metadata(self, req: Any) -> tuple[int, bytes]:
        with self.store.read() as r:
            Q.strict(req)
            rec = self._record(r, req, req.params[0])
        return 200, C.dumps({"metadata": rec["metadata"]})

    def metadata_item(self, req: Any) -> tuple[int, bytes]:
        server_id, key = req.params
        with self.store.read() as r:
            # server_metadata.show has no query schema: nothing is refused, even at 2.102.
            rec = self._record(r, req, server_id)
        if key not in rec["metadata"]:
            raise NotFound("Metadata item was not found")
        return 200, C.dumps({"meta": {key: rec["metadata"][key]}})

    def _tags_of(self, r: Reader, req: Any, server_id: str) -> list[str]:
        if req.version < 26:
            # @wsgi.api_version("2.26"): the method does not exist below it.
            raise NotFound(C.RESOURCE_NOT_FOUND)
        Q.strict(req)
        entry = r.index_entry(server_id) if self._visible(r, req, server_id) else None
        if entry is None or entry.deleted:
            # server_tags looks the server up by its instance mapping.
            raise NotFound(f"Instance {server_id} has no mapping to a cell.")
        return list(entry.tags)

    def tags(self, req: Any) -> tuple[int, bytes]:
        with self.store.read() as r:
            tags = self._tags_of(r, req, req.params[0])
        return 200, C.dumps({"tags": tags})

    def tag(self, req: Any) -> tuple[int, bytes]:
        server_id, tag = req.params
        with self.store.read() as r:
            tags = self._tags_of(r, req, server_id)
        if tag not in tags:
            raise NotFound(f"Server {server_id} has no tag '{tag}'")
        return 204, b""

    # -- lists ---------------------------------------------------------------------------------------
    def index(self, req: Any) -> tuple[int, bytes]:
        return self._list(req, detail=False)

    def detail(self, req: Any) -> tuple[int, bytes]:
        return self._list(req, detail=True)

    def _list(self, req: Any, detail: bool) -> tuple[int, bytes]:
        with self.store.read() as r:
            # PERF: the default page (only limit/marker) walks, filters and assembles in
            # _core (http/serverpath.pxi); None for anything else: the _ListPlan below.
            if COMPILED:
                body = _core.servers_page(req, r.txn, r.dbs, detail, self.max_limit)
                if body is not None:
                    return 200, body
            plan = _ListPlan(req, detail, self.max_limit)
            if plan.empty:
                return 200, b'{"servers": []}'
            found = plan.run(r)
            blobs = [self._blob(r, u, e) for u, e in found]
            # PERF: one compiled assembly of the whole page, from buffers into the map.
            items = views.servers_json_join(blobs, req.version, req.is_admin, req.base_url.encode(),
                                            not detail, link_project(req))
        links = b""
        nxt = collection_links(plan.kept, Links(req), self.max_limit, len(found),
                                "servers/detail" if detail else "servers",
                                L.uuid_str(found[-1][0]) if found else None)
        if nxt:
            links = b', "servers_links": ' + C.dumps(nxt)
        return 200, b'{"servers": [' + items + b"]" + links + b"}"

    @staticmethod
    def _blob(r: Reader, u: bytes, entry: IndexEntry) -> Any:
        blob = None if entry.deleted else r.view(u, views.VIEW_ID)
        if blob is not None:
            return blob
        # A deleted server (changes-since): its tombstone keeps no fragments; render its
        # final record, as DELETED (cold: changes-since pages of deleted servers only).
        t = r.tombstone(u)
        if t is not None and t.record is not None:
            rec = dict(t.record, vm_state="deleted", task_state=None, status="DELETED")
        else:
            # A tombstone without a final record: what the index knows, on a stand-in
            # record (id, name, project, created; DELETED).
            rec = _stand_in(L.uuid_str(u), entry)
        return views.render_server(rec)[views.VIEW_ID]


def _stand_in(uid: str, e: IndexEntry) -> dict[str, Any]:
    return R.make_record({
        "uuid": uid, "version": 0, "cell": "-", "project_id": e.project_id or "-",
        "user_id": e.user_id or "-", "name": e.name, "vm_state": "deleted",
        "status": "DELETED", "created_at": e.created_at, "updated_at": e.created_at,
        "flavor": {"id": e.flavor_id, "name": "", "vcpus": e.vcpus, "ram": e.ram, "disk": 0,
                   "ephemeral": 0, "swap": 0, "extra_specs": {}},
    })


class _ListPlan:
    """What one list request asks for, decided as Nova's ``_get_servers`` decides it."""

    def __init__(self, req: Any, detail: bool, max_limit: int) -> None:
        version: int = req.version
        is_admin: bool = req.is_admin
        kept = validate_list_query(Q.Query.of(req), version)
        self.kept = kept
        self.empty = False
        self.preds: list[Pred] = []
        self.rec_preds: list[RecPred] = []
        self.uuid_filter: str | None = None

        opts: dict[str, str] = {}
        for k, v in kept.items:
            opts[k] = v  # webob: the last value of a repeated parameter
        if is_admin:  # allow_all_filters (admin by default)
            for k in PAGING_SORTING:
                opts.pop(k, None)
        else:
            allowed = _SEARCH_OPTIONS.get(version, _SEARCH_OPTIONS[104])
            opts = {k: v for k, v in opts.items() if k in allowed}
        for k in opts:
            if k in JOINED_TABLE_PARAMS or k.startswith("_"):
                raise BadRequest(f"Invalid filter field: {k}.")

        # status -> vm_state (+ task_state)
        opts.pop("status", None)
        vm_states: set[str] | None = None
        task_states: set[str | None] | None = None
        statuses = kept.getall("status")
        if statuses:
            vm, task = vm_and_task_states(statuses)
            if not vm and not task:
                if version >= 38:
                    raise BadRequest("Invalid status value")
                self.empty = True
                return
            vm_states = vm
            if None not in task:
                task_states = task

        self.since: int | None = None
        self.before: int | None = None
        if "changes-since" in opts:
            self.since = Q.parse_isotime(opts["changes-since"])
            if self.since is None:
                raise BadRequest("Invalid filter field: changes-since.")
        if "changes-before" in opts:
            self.before = Q.parse_isotime(opts["changes-before"])
            if self.before is None:
                raise BadRequest("Invalid filter field: changes-before.")
            if self.since is not None and self.before < self.since:
                raise BadRequest(
                    "The value of changes-since must be less than or equal to changes-before."
                )
        window = "changes-since" in opts or "changes-before" in opts

        # deleted: live servers only, unless a changes window or an admin's deleted=
        self.deleted: bool | None
        if "deleted" not in opts:
            self.deleted = None if window else False
        else:
            self.deleted = Q.bool_from_string(opts["deleted"], default=False)
        if vm_states == {"deleted"}:
            if not is_admin:
                raise Forbidden("Only administrators may list deleted instances")
            self.deleted = True
        self.soft_deleted = bool(opts.get("soft_deleted"))

        tag_filters: dict[str, list[str]] = {}
        if version >= 26:
            for t in TAG_FILTERS:
                if t in opts:
                    tag_filters[t] = opts[t].split(",")

        all_tenants = False
        if "all_tenants" in opts:
            value = opts["all_tenants"]
            if value:
                try:
                    all_tenants = Q.bool_from_string(value, strict=True)
                except ValueError as e:
                    raise BadRequest(f"Invalid input received: {e}") from None
            else:
                all_tenants = True  # the empty string enables it

        locked: bool | None = None
        if "locked" in opts:
            try:
                locked = Q.bool_from_string(opts["locked"], strict=True)
            except ValueError as e:
                raise BadRequest(f"Invalid input received: {e}") from None

        self.scope: str | None
        if all_tenants:
            if not is_admin:
                rule = "detail" if detail else "index"
                raise C.forbidden(f"os_compute_api:servers:{rule}:get_all_tenants")
            self.scope = None
            for k in opts:  # compute.API maps tenant_id to project_id; the later one wins
                if k in ("project_id", "tenant_id"):
                    self.scope = opts[k]
        else:
            self.scope = req.project

        # limit, marker, sort
        self.limit, self.marker = Q.limit_and_marker(kept, max_limit)
        sort_keys = [s.strip() for s in kept.getall("sort_key")] or ["created_at"]
        sort_dirs = [s.strip() for s in kept.getall("sort_dir")] or ["desc"]
        ignore = IGNORE_SORT_KEYS_V273 if version >= 73 else IGNORE_SORT_KEYS
        for key in list(sort_keys):
            if key in ignore:
                i = sort_keys.index(key)
                if len(sort_dirs) > i:
                    sort_dirs.pop(i)
                sort_keys.pop(i)
            elif key in ("host", "node") and not is_admin:
                raise Forbidden(f"Only administrators can sort servers by {key}")
        self.sort = _process_sort_params(sort_keys, sort_dirs)

        # filters (compute.API.get_all's remapping, then the DB's exact/regex filters)
        for k, v in opts.items():
            if k in _INDEX_REGEX:
                self.preds.append(_regex_pred(_INDEX_REGEX[k], v, k))
            elif k in _INDEX_EXACT and k not in ("vm_state", "task_state"):
                self.preds.append(_exact_pred(_INDEX_EXACT[k], v))
            elif k in _RECORD_REGEX:
                self.rec_preds.append(_regex_pred(_RECORD_REGEX[k], v, k))
            elif k == "uuid":
                self.uuid_filter = v  # exact, on the index key (run)
        if vm_states is None and "vm_state" in opts:
            vm_states = {opts["vm_state"]}
        if task_states is None and "task_state" in opts:
            task_states = {opts["task_state"]}
        if vm_states is not None:
            self.preds.append(_exact_pred(_INDEX_EXACT["vm_state"], vm_states))
        if task_states is not None:
            self.preds.append(_exact_pred(_INDEX_EXACT["task_state"], task_states))
        if "ip" in opts or "ip6" in opts:
            self.preds.append(_ip_pred(opts.get("ip"), opts.get("ip6")))
        for kind, tags in tag_filters.items():
            self.preds.append(_tags_pred(kind, tags))
        if locked is not None:
            self.preds.append(lambda e: e.locked is locked)
        if self.deleted is False and not self.soft_deleted:
            self.preds.append(lambda e: e.vm_state != "soft-delete")
        self.window = window

    # -- reading --------------------------------------------------------------------------------------
    def _match(self, r: Reader, u: bytes, e: IndexEntry) -> bool:
        for p in self.preds:
            if not p(e):
                return False
        if self.deleted is not None and e.deleted is not self.deleted:
            return False
        if self.rec_preds:
            rec = self._record_of(r, u, e)
            if rec is None or not all(p(rec) for p in self.rec_preds):
                return False
        return True

    @staticmethod
    def _record_of(r: Reader, u: bytes, e: IndexEntry) -> dict[str, Any] | None:
        if e.deleted:
            t = r.tombstone(u)
            return None if t is None else t.record
        return r.get_server(u)

    def run(self, r: Reader) -> list[tuple[bytes, IndexEntry]]:
        uuid_filter = self.uuid_filter
        if self.limit == 0:
            self._check_marker(r)
            return []
        keys = [k for k, _ in self.sort]
        dirs = [d for _, d in self.sort]
        walkable = not self.window and self.deleted is False and keys[:1] == ["created_at"] and (
            keys == ["created_at", "id"] and dirs[0] == dirs[1]
        )
        if walkable and uuid_filter is None:
            return self._walk(r, reverse=dirs[0] == "asc")
        return self._sorted(r, uuid_filter)

    def _walk(self, r: Reader, reverse: bool) -> list[tuple[bytes, IndexEntry]]:
        out: list[tuple[bytes, IndexEntry]] = []
        try:
            for u, value in r.walk(self.scope, marker=self.marker, reverse=reverse):
                e = R.unpack_index(value)
                if self._match(r, u, e):
                    out.append((u, e))
                    if len(out) >= self.limit:
                        break
        except MarkerNotFound:
            raise BadRequest(f"marker [{self.marker}] not found") from None
        return out

    def _check_marker(self, r: Reader) -> IndexEntry | None:
        if self.marker is None:
            return None
        e = r.index_entry(self.marker)
        if e is None or (self.scope is not None and e.project_id != self.scope):
            raise BadRequest(f"marker [{self.marker}] not found")
        return e

    def _candidates(self, r: Reader) -> list[tuple[bytes, IndexEntry]]:
        out: list[tuple[bytes, IndexEntry]] = []
        if self.window or self.deleted is True:
            # The changes log: live and deleted servers, each at its latest change.
            for c in r.changes(self.since, before=self.before, project=self.scope):
                e = r.index_entry(c.uuid)
                if e is not None and self._match(r, c.uuid, e):
                    out.append((c.uuid, e))
        else:
            for u, value in r.walk(self.scope):
                e = R.unpack_index(value)
                if self._match(r, u, e):
                    out.append((u, e))
        return out

    def _sorted(self, r: Reader, uuid_filter: str | None) -> list[tuple[bytes, IndexEntry]]:
        marker_entry = self._check_marker(r)
        found = self._candidates(r)
        if uuid_filter is not None:
            key = L.parse_uuid(uuid_filter)
            found = [(u, e) for u, e in found if u == key]
        cands = [_Candidate(u, e) for u, e in found]
        for c in cands:
            c.values = self._sort_values(r, c.u, c.entry)
        dirs = [d for _, d in self.sort]

        def cmp(a: _Candidate, b: _Candidate) -> int:
            for va, vb, d in zip(a.values, b.values, dirs, strict=True):
                c = _cmp_values(va, vb)
                if c:
                    return -c if d == "desc" else c
            return 0

        cands.sort(key=cmp_to_key(cmp))
        if marker_entry is not None and self.marker is not None:
            mk = _Candidate(L.uuid_key(self.marker), marker_entry)
            mk.values = self._sort_values(r, mk.u, marker_entry)
            cands = [c for c in cands if cmp(c, mk) > 0]
        return [(c.u, c.entry) for c in cands[: self.limit]]

    def _sort_values(self, r: Reader, u: bytes, e: IndexEntry) -> list[Any]:
        out: list[Any] = []
        rec: dict[str, Any] | None = None
        for key, _ in self.sort:
            if key in ("id", "uuid"):
                out.append(u)  # the uuid stands in for Nova's integer id
            elif key in _INDEX_SORT:
                out.append(_INDEX_SORT[key](e))
            elif key == "updated_at":
                head = r.head(u)
                if head is not None:
                    out.append(head.updated_at)
                else:
                    t = r.tombstone(u)
                    out.append(t.deleted_at if t is not None else None)
            elif key in _RECORD_SORT:
                if rec is None:
                    rec = self._record_of(r, u, e) or {}
                out.append(_RECORD_SORT[key](rec) if rec else None)
            else:
                out.append(None)
        return out


def _process_sort_params(keys: list[str], dirs: list[str]) -> list[tuple[str, str]]:
    """nova.db.utils.process_sort_params with Nova's list defaults (created_at, id; desc)."""
    default_dir = dirs[0] if dirs else "desc"
    for d in dirs:
        if d not in ("asc", "desc"):
            raise BadRequest("Invalid input received: Unknown sort direction, must be 'desc' or 'asc'")
    result_dirs = list(dirs) if dirs else [default_dir for _ in keys]
    while len(result_dirs) < len(keys):
        result_dirs.append(default_dir)
    if len(result_dirs) > len(keys):
        raise BadRequest("Invalid input received: Sort direction size exceeds sort key size")
    result_keys = list(keys)
    for key in ("created_at", "id"):
        if key not in result_keys:
            result_keys.append(key)
            result_dirs.append(default_dir)
    return list(zip(result_keys, result_dirs, strict=True))


def routes(ctx: ApiContext) -> list[RouteSpec]:
    return ServerRoutes(ctx).specs()


__all__ = ["ServerRoutes", "routes", "validate_list_query", "vm_and_task_states"]

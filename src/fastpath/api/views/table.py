"""The one table of server views: which JSON fragment shows at which microversion, for
which role, in which response, under which extension group — and how each fragment is
rendered from the canonical record (fastpath.store.record) at write time.

Learned from Nova (nova/api/openstack/compute/views/servers.py ``ViewBuilder.show``,
``detail``, ``basic``; the controllers' ``update`` and ``_action_rebuild``; default policies
in nova/policies): rendered again here, never copied.

Fragments
---------
A fragment is the bytes ``"key": value`` of one key of the server object, JSON with
``ensure_ascii`` (as Nova's ``jsonutils.dumps``).  A fragment may be EMPTY: the key is then
absent from every view that selects it (``fault`` of a healthy server, ``progress`` outside
the progress statuses, ``security_groups`` without groups — Nova leaves those keys out).
Where a link goes, the fragment holds a placeholder that JSON never contains raw:

- ``\\x00S`` — the *self* prefix: ``base_url + api_root [+ "/" + project]``
  (Nova's ``_get_href_link``: ``request.application_url`` then the project);
- ``\\x00B`` — the *bookmark* prefix: ``base_url [+ "/" + project]``
  (``_get_bookmark_link``: the application URL without its version).

Rows
----
``ROWS`` is the table: (fragment, key, min, max, role, groups, kinds, reduced).  Several
rows may select the same fragment (a fragment shows once per view: plans deduplicate).

- ``min``/``max``: microversion minors (2.min .. 2.max), inclusive.
- ``role``: ``ALL``, ``ADMIN`` (Nova's default policy is admin-only: OS-EXT-SRV-ATTR:*,
  host_status) or ``USER`` (non-admins only: the 2.90 hostname, the fault without the
  details of a 500).
- ``groups``: extension groups that must be enabled (``"X"``) or disabled (``"!X"``) for
  the row to apply (``api.disabled_extensions``; see ``GROUPS``).
- ``kinds``: which responses: ``S`` GET /servers/{id}, ``D`` each server of
  GET /servers/detail (no ``server_groups``: Nova shows them on show, update and rebuild
  only), ``U`` PUT /servers/{id}, ``R`` rebuild (the caller adds ``adminPass``),
  ``L`` each server of GET /servers (id, links, name).
- ``reduced``: before 2.75 update and rebuild answer a reduced view (no OS-EXT-*, no
  key_name, config_drive, security groups, volumes, addresses without MAC/type); a row
  shows in it only when ``reduced`` is true.  From 2.75 they show what show shows.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, NamedTuple

# Roles
ALL = 0
ADMIN = 1
USER = 2

# Kinds of response (index into the compiled plans).
SHOW = 0
DETAIL = 1
UPDATE = 2
REBUILD = 3
SUMMARY = 4
KIND_LETTERS = "SDURL"
N_KINDS = 5

MV_MIN = 1
MV_MAX = 104
FULL_UPDATE = 75  # 2.75: update and rebuild show the whole server

# Response extension groups that api.disabled_extensions may name (Nova v2.0 extension
# names / key prefixes).  OS-EXT-IPS and OS-EXT-IPS-MAC live inside ``addresses``.
GROUPS: frozenset[str] = frozenset({
    "OS-DCF", "OS-EXT-AZ", "OS-EXT-IPS", "OS-EXT-IPS-MAC", "OS-EXT-SRV-ATTR", "OS-EXT-STS",
    "OS-SRV-USG", "os-extended-volumes", "os-config-drive", "os-keypairs",
    "os-security-groups",
})

# Statuses with a progress key and with a fault key (ViewBuilder._progress_statuses,
# _fault_statuses).
PROGRESS_STATUSES = frozenset({"ACTIVE", "BUILD", "REBUILD", "RESIZE", "VERIFY_RESIZE",
                               "MIGRATING"})
FAULT_STATUSES = frozenset({"ERROR", "DELETED"})

SELF = "\x00S"
BOOKMARK = "\x00B"


class Row(NamedTuple):
    fragment: str
    key: str
    min: int
    max: int
    role: int
    groups: tuple[str, ...]
    kinds: str
    reduced: bool


_SRV = ("OS-EXT-SRV-ATTR",)
_X = MV_MAX
_FULL = "SDUR"

# fragment, key, min, max, role, groups, kinds, reduced — in Nova's key order of show().
ROWS: tuple[Row, ...] = tuple(Row(*r) for r in (
    ("accessIPv4", "accessIPv4", 1, _X, ALL, (), _FULL, True),
    ("accessIPv6", "accessIPv6", 1, _X, ALL, (), _FULL, True),
    ("addresses", "addresses", 1, _X, ALL, ("OS-EXT-IPS", "OS-EXT-IPS-MAC"), _FULL, False),
    ("addresses_ips", "addresses", 1, _X, ALL, ("OS-EXT-IPS", "!OS-EXT-IPS-MAC"), _FULL, False),
    ("addresses_mac", "addresses", 1, _X, ALL, ("!OS-EXT-IPS", "OS-EXT-IPS-MAC"), _FULL, False),
    ("addresses_plain", "addresses", 1, _X, ALL, ("!OS-EXT-IPS", "!OS-EXT-IPS-MAC"), _FULL, False),
    ("addresses_plain", "addresses", 1, FULL_UPDATE - 1, ALL, (), "UR", True),
    ("created", "created", 1, _X, ALL, (), _FULL, True),
    ("flavor", "flavor", 1, 46, ALL, (), _FULL, True),
    ("flavor_v47", "flavor", 47, _X, ALL, (), _FULL, True),
    ("hostId", "hostId", 1, _X, ALL, (), _FULL, True),
    ("id", "id", 1, _X, ALL, (), _FULL + "L", True),
    ("image", "image", 1, 97, ALL, (), _FULL, True),
    ("image_v98", "image", 98, _X, ALL, (), _FULL, True),
    ("links", "links", 1, _X, ALL, (), _FULL + "L", True),
    ("metadata", "metadata", 1, _X, ALL, (), _FULL, True),
    ("name", "name", 1, _X, ALL, (), _FULL + "L", True),
    ("status", "status", 1, _X, ALL, (), _FULL, True),
    ("tenant_id", "tenant_id", 1, _X, ALL, (), _FULL, True),
    ("user_id", "user_id", 1, _X, ALL, (), _FULL, True),
    ("updated", "updated", 1, _X, ALL, (), _FULL, True),
    ("diskConfig", "OS-DCF:diskConfig", 1, _X, ALL, ("OS-DCF",), _FULL, True),
    ("fault_admin", "fault", 1, _X, ADMIN, (), _FULL, True),
    ("fault_user", "fault", 1, _X, USER, (), _FULL, True),
    ("progress", "progress", 1, _X, ALL, (), _FULL, True),
    ("availability_zone", "OS-EXT-AZ:availability_zone", 1, _X, ALL, ("OS-EXT-AZ",), _FULL, False),
    ("config_drive", "config_drive", 1, _X, ALL, ("os-config-drive",), _FULL, False),
    ("key_name", "key_name", 1, _X, ALL, ("os-keypairs",), _FULL, False),
    ("key_name", "key_name", 54, _X, ALL, ("os-keypairs",), "R", True),
    ("launched_at", "OS-SRV-USG:launched_at", 1, _X, ALL, ("OS-SRV-USG",), _FULL, False),
    ("terminated_at", "OS-SRV-USG:terminated_at", 1, _X, ALL, ("OS-SRV-USG",), _FULL, False),
    ("security_groups", "security_groups", 1, _X, ALL, ("os-security-groups",), _FULL, False),
    ("host", "OS-EXT-SRV-ATTR:host", 1, _X, ADMIN, _SRV, _FULL, False),
    ("instance_name", "OS-EXT-SRV-ATTR:instance_name", 1, _X, ADMIN, _SRV, _FULL, False),
    ("hypervisor_hostname", "OS-EXT-SRV-ATTR:hypervisor_hostname", 1, _X, ADMIN, _SRV, _FULL, False),
    ("hostname", "OS-EXT-SRV-ATTR:hostname", 3, _X, ADMIN, _SRV, _FULL, False),
    ("kernel_id", "OS-EXT-SRV-ATTR:kernel_id", 3, _X, ADMIN, _SRV, _FULL, False),
    ("launch_index", "OS-EXT-SRV-ATTR:launch_index", 3, _X, ADMIN, _SRV, _FULL, False),
    ("ramdisk_id", "OS-EXT-SRV-ATTR:ramdisk_id", 3, _X, ADMIN, _SRV, _FULL, False),
    ("reservation_id", "OS-EXT-SRV-ATTR:reservation_id", 3, _X, ADMIN, _SRV, _FULL, False),
    ("root_device_name", "OS-EXT-SRV-ATTR:root_device_name", 3, _X, ADMIN, _SRV, _FULL, False),
    # rebuild leaves it out (show_user_data=False) and adds a plain user_data from 2.57
    ("srv_user_data", "OS-EXT-SRV-ATTR:user_data", 3, _X, ADMIN, _SRV, "SDU", False),
    ("task_state", "OS-EXT-STS:task_state", 1, _X, ALL, ("OS-EXT-STS",), _FULL, False),
    ("vm_state", "OS-EXT-STS:vm_state", 1, _X, ALL, ("OS-EXT-STS",), _FULL, False),
    ("power_state", "OS-EXT-STS:power_state", 1, _X, ALL, ("OS-EXT-STS",), _FULL, False),
    ("volumes_attached", "os-extended-volumes:volumes_attached", 1, 2, ALL, ("os-extended-volumes",), _FULL, False),
    ("volumes_attached_v3", "os-extended-volumes:volumes_attached", 3, _X, ALL, ("os-extended-volumes",), _FULL, False),
    ("locked", "locked", 9, _X, ALL, (), _FULL, True),
    ("host_status", "host_status", 16, _X, ADMIN, (), _FULL, False),
    ("description", "description", 19, _X, ALL, (), _FULL, True),
    ("tags", "tags", 26, _X, ALL, (), _FULL, True),
    ("trusted_image_certificates", "trusted_image_certificates", 63, _X, ALL, (), _FULL, True),
    ("server_groups", "server_groups", 71, _X, ALL, (), "SUR", True),
    ("locked_reason", "locked_reason", 73, _X, ALL, (), _FULL, True),
    # 2.90: shown whatever the policy; admins already have it with the attributes above.
    ("hostname", "OS-EXT-SRV-ATTR:hostname", 90, _X, USER, _SRV, _FULL, False),
    ("pinned_availability_zone", "pinned_availability_zone", 96, _X, ALL, (), _FULL, False),
    ("scheduler_hints", "scheduler_hints", 100, _X, ALL, (), _FULL, False),
    ("user_data", "user_data", 57, _X, ALL, (), "R", True),
))

# Fragment index = position of its first row.
FRAGMENTS: tuple[str, ...] = tuple(dict.fromkeys(r.fragment for r in ROWS))
FRAGMENT_INDEX: dict[str, int] = {name: i for i, name in enumerate(FRAGMENTS)}
N_FRAGMENTS = len(FRAGMENTS)


# -- rendering ------------------------------------------------------------------------------
# PERF: render_server runs once per applied change in cellsync (issue 6: >= 50,000 changes/s).
# What it costs is Python calls and the JSON encoder's per-call set-up, not bytes, so:
# - scalars are encoded without json.dumps (the C string encoder json itself uses, int repr);
# - a fragment whose inputs are shared by many servers (status, flavor snapshot, image, host,
#   the empty fault...) is memoized by those inputs: a state change re-renders the state
#   fragments and the few fragments unique to a server (id, name, times, addresses), and
#   everything else is a dict hit;
# - fragments rendered from the same input (the four addresses variants, flavor / flavor_v47,
#   image / image_v98, the two faults, the two volume lists) come from one producer.
# The bytes are exactly those of json.dumps(value, ensure_ascii=True) (Nova's
# jsonutils.dumps): tests/unit/test_views_render.py pins them.
_str = json.encoder.encode_basestring_ascii  # C; what json.dumps uses with ensure_ascii


def _dumps(value: Any) -> str:
    """json.dumps(value) with ensure_ascii and the default separators (Nova's jsonutils)."""
    t = type(value)
    if t is str:
        return _str(value)  # type: ignore[no-any-return]
    if value is None:
        return "null"
    if t is bool:
        return "true" if value else "false"
    if t is int:
        return int.__repr__(value)
    return json.dumps(value, ensure_ascii=True)


# Dates of days seen (bounded): the date part of a timestamp is a dict hit.
_DAYS: dict[int, tuple[str, str]] = {}
_MEMO_MAX = 4096  # entries per memo before it starts again (memory bound, not a policy)


def _day(day: int) -> tuple[str, str]:
    """(strftime '%Y-%m-%dT', isoformat 'YYYY-MM-DDT') of day number ``day`` (UTC)."""
    d = _DAYS.get(day)
    if d is None:
        dt = datetime.fromtimestamp(day * 86_400, UTC)
        d = (dt.strftime("%Y-%m-%dT"), dt.date().isoformat() + "T")
        if len(_DAYS) >= _MEMO_MAX:
            _DAYS.clear()
        _DAYS[day] = d
    return d


_HH = tuple(f"{h:02d}:" for h in range(24))
_MMSS = tuple(f"{m:02d}:{s:02d}" for m in range(60) for s in range(60))


def _isotime(us: int | None) -> str | None:
    """utils.isotime: '2013-09-03T04:01:32Z' (UTC, whole seconds)."""
    if us is None:
        return None
    day, sod = divmod(us // 1_000_000, 86_400)
    h, ms = divmod(sod, 3600)
    return (_DAYS.get(day) or _day(day))[0] + _HH[h] + _MMSS[ms] + "Z"


def _naive_iso(us: int | None) -> str | None:
    """OS-SRV-USG: str of a TZ-naive datetime through jsonutils: '2013-09-23T13:37:00.880302'
    (datetime.isoformat: no fraction when the microseconds are 0)."""
    if us is None:
        return None
    sec, micro = divmod(us, 1_000_000)
    day, sod = divmod(sec, 86_400)
    h, ms = divmod(sod, 3600)
    t = (_DAYS.get(day) or _day(day))[1] + _HH[h] + _MMSS[ms]
    return f"{t}.{micro:06d}" if micro else t


def _time_json(us: int | None) -> str:
    return "null" if us is None else f'"{_isotime(us)}"'


def _naive_json(us: int | None) -> str:
    return "null" if us is None else f'"{_naive_iso(us)}"'


def host_id(project_id: str, host: str | None) -> str:
    """utils.generate_hostid: sha224(project + host), '' without a host."""
    if not host:
        return ""
    return hashlib.sha224((project_id + host).encode("utf-8")).hexdigest()


def _link(placeholder: str, suffix: str) -> str:
    # '"\x00S/servers/<id>"': the placeholder goes inside the JSON string, raw.
    return '"' + placeholder + _str(suffix)[1:]  # type: ignore[no-any-return]


def _links_json(collection: str, ident: str) -> str:
    return (f'[{{"rel": "self", "href": {_link(SELF, f"/{collection}/{ident}")}}}, '
            f'{{"rel": "bookmark", "href": {_link(BOOKMARK, f"/{collection}/{ident}")}}}]')


def _bookmark_json(collection: str, ident: str) -> str:
    return f'[{{"rel": "bookmark", "href": {_link(BOOKMARK, f"/{collection}/{ident}")}}}]'


def _addresses(rec: dict[str, Any]) -> tuple[str, str, str, str]:
    """addresses with OS-EXT-IPS and OS-EXT-IPS-MAC, with IPS only, MAC only, neither."""
    # Nova hides addresses while building (ViewBuilder._get_addresses).
    if rec["vm_state"] == "building" or not rec["addresses"]:
        return ("{}",) * 4  # type: ignore[return-value]
    both: list[str] = []
    ips: list[str] = []
    mac: list[str] = []
    plain: list[str] = []
    for net, entries in rec["addresses"].items():
        b, i, m, p = [], [], [], []
        for a in entries:
            head = '{"version": ' + _dumps(a["version"]) + ', "addr": ' + _dumps(a["addr"])
            t = ', "OS-EXT-IPS:type": ' + _dumps(a["type"])
            mc = ', "OS-EXT-IPS-MAC:mac_addr": ' + _dumps(a["mac"]) + "}"
            b.append(head + t + mc)
            i.append(head + t + "}")
            m.append(head + mc)
            p.append(head + "}")
        k = _str(net) + ": ["
        both.append(k + ", ".join(b) + "]")
        ips.append(k + ", ".join(i) + "]")
        mac.append(k + ", ".join(m) + "]")
        plain.append(k + ", ".join(p) + "]")
    return ("{" + ", ".join(both) + "}", "{" + ", ".join(ips) + "}",
            "{" + ", ".join(mac) + "}", "{" + ", ".join(plain) + "}")


def _flavors(rec: dict[str, Any]) -> tuple[str, str]:
    f = rec["flavor"]
    fid = f["id"]
    v1 = f'{{"id": {_dumps(fid)}, "links": {_bookmark_json("flavors", fid)}}}'
    # extra_specs: policy servers:show:flavor-extra-specs, PROJECT_READER_OR_ADMIN: everyone.
    v47 = _dumps({"vcpus": f["vcpus"], "ram": f["ram"], "disk": f["disk"],
                  "ephemeral": f["ephemeral"], "swap": f["swap"],
                  "original_name": f["name"], "extra_specs": f["extra_specs"]})
    return v1, v47


def _images(rec: dict[str, Any]) -> tuple[str, str]:
    img = rec["image"]
    if not img:
        return '""', '""'  # booted from volume
    s = f'{{"id": {_dumps(img["id"])}, "links": {_bookmark_json("images", img["id"])}'
    return s + "}", s + f', "properties": {_dumps(img["properties"])}}}'


def _faults(rec: dict[str, Any]) -> tuple[str | None, str | None]:
    f = rec["fault"]
    if not f or rec["status"] not in FAULT_STATUSES:
        return None, None
    d: dict[str, Any] = {"code": f["code"], "created": _isotime(f["created"]),
                         "message": f["message"]}
    user = admin = _dumps(d)
    # details: to admins, and to others unless the fault is a 500 (ViewBuilder._get_fault)
    if f["details"]:
        d["details"] = f["details"]
        admin = _dumps(d)
        if f["code"] != 500:
            user = admin
    return admin, user


def _volumes(rec: dict[str, Any]) -> tuple[str, str]:
    v1: list[str] = []
    v3: list[str] = []
    for v in rec["volumes_attached"]:
        i = '{"id": ' + _dumps(v["id"])
        v1.append(i + "}")
        v3.append(f'{i}, "delete_on_termination": {_dumps(v["delete_on_termination"])}}}')
    return "[" + ", ".join(v1) + "]", "[" + ", ".join(v3) + "]"


def _text_or_empty(v: str | None) -> str:
    return _dumps(v or "")


def _bool(v: Any) -> str:
    return "true" if v else "false"


def _items(d: dict[str, Any]) -> tuple[Any, ...]:
    """A memo key for a map whose values may be of any JSON type (True and 1 differ)."""
    return (tuple(d.items()), tuple(map(type, d.values())))


def _hints(rec: dict[str, Any]) -> tuple[str]:
    h = rec["scheduler_hints"]
    return (_dumps(h) if h else "{}",)  # values are often lists: no memo key


class Field(NamedTuple):
    """A fragment that shows one scalar field of the record.

    ``value``: its JSON (None: key absent).  ``memo``: the field takes few values across
    servers (states, hosts, zones...), so its fragment is kept per value; the record's
    validated types make the value a sound key (never True for 1).
    """

    fragment: str
    field: str
    value: Callable[[Any], str | None] = _dumps
    memo: bool = True


Renderer = Callable[[dict[str, Any]], tuple[str | None, ...]]
MemoKey = Callable[[dict[str, Any]], Any]


class Producer(NamedTuple):
    """Renders the values of one or more fragments from the same inputs.

    ``memo``: the inputs as a hashable key (the JSON is a function of it alone, given the
    record's validated types), or None when they are unique to a server (ids, times).
    """

    fragments: tuple[str, ...]
    render: Renderer
    memo: MemoKey | None = None


class _NoMemo:
    """A memo key that is never stored (a fault: rare, and unique to its server)."""

    __hash__ = None  # type: ignore[assignment]


_NO_MEMO = _NoMemo()


_faulty = FAULT_STATUSES.__contains__
_progress = PROGRESS_STATUSES.__contains__

# In fragment order (checked below); a value of None = key absent.
RENDERERS: tuple[Field | Producer, ...] = (
    Field("accessIPv4", "access_ip_v4", _text_or_empty),
    Field("accessIPv6", "access_ip_v6", _text_or_empty),
    Producer(("addresses", "addresses_ips", "addresses_mac", "addresses_plain"), _addresses),
    Field("created", "created_at", _time_json, memo=False),
    Producer(("flavor", "flavor_v47"), _flavors, lambda r: (
        (f := r["flavor"])["id"], f["name"], f["vcpus"], f["ram"], f["disk"], f["ephemeral"],
        f["swap"], tuple(f["extra_specs"].items()))),
    Producer(("hostId",), lambda r: (_dumps(host_id(r["project_id"], r["host"])),),
             lambda r: (r["project_id"], r["host"])),
    Field("id", "uuid", memo=False),
    Producer(("image", "image_v98"), _images, lambda r: (
        None if not (i := r["image"]) else (i["id"], _items(i["properties"])))),
    Producer(("links",), lambda r: (_links_json("servers", r["uuid"]),)),
    Producer(("metadata",), lambda r: (_dumps(r["metadata"]),),
             lambda r: tuple(r["metadata"].items())),  # a map of strings
    Field("name", "name", memo=False),
    Field("status", "status"),
    Field("tenant_id", "project_id", _text_or_empty),
    Field("user_id", "user_id", _text_or_empty),
    Field("updated", "updated_at", _time_json, memo=False),
    Field("diskConfig", "disk_config"),
    Producer(("fault_admin", "fault_user"), _faults, lambda r: (
        None if not r["fault"] or not _faulty(r["status"]) else _NO_MEMO)),
    Producer(("progress",), lambda r: (_dumps(r["progress"]) if _progress(r["status"]) else None,),
             lambda r: (r["status"], r["progress"])),
    Field("availability_zone", "availability_zone", _text_or_empty),
    Field("config_drive", "config_drive"),
    Field("key_name", "key_name"),
    Field("launched_at", "launched_at", _naive_json, memo=False),
    Field("terminated_at", "terminated_at", _naive_json),  # mostly null
    # Nova adds the key only when the server has groups (_add_security_grps).
    Producer(("security_groups",), lambda r: (
        _dumps([{"name": g} for g in r["security_groups"]]) if r["security_groups"] else None,),
        lambda r: tuple(r["security_groups"])),
    Field("host", "host"),
    Field("instance_name", "instance_name", memo=False),
    Field("hypervisor_hostname", "node"),
    Field("hostname", "hostname", memo=False),
    Field("kernel_id", "kernel_id"),
    Field("launch_index", "launch_index"),
    Field("ramdisk_id", "ramdisk_id"),
    Field("reservation_id", "reservation_id", memo=False),
    Field("root_device_name", "root_device_name"),
    Field("srv_user_data", "user_data", memo=False),
    Field("task_state", "task_state"),
    Field("vm_state", "vm_state"),
    Field("power_state", "power_state"),
    Producer(("volumes_attached", "volumes_attached_v3"), _volumes),
    Field("locked", "locked", _bool),
    # Nova's get_instance_host_status gives '' for a server without a host, never null.
    Field("host_status", "host_status", _text_or_empty),
    Field("description", "description", memo=False),
    Producer(("tags",), lambda r: (_dumps(r["tags"]),), lambda r: tuple(r["tags"])),
    Producer(("trusted_image_certificates",), lambda r: (_dumps(r["trusted_image_certificates"]),),
             lambda r: None if (c := r["trusted_image_certificates"]) is None else tuple(c)),
    Producer(("server_groups",), lambda r: (_dumps(r["server_groups"]),),
             lambda r: tuple(r["server_groups"])),
    Field("locked_reason", "locked_reason"),
    Field("pinned_availability_zone", "pinned_availability_zone"),
    Producer(("scheduler_hints",), _hints),
    Field("user_data", "user_data", memo=False),
)

KEY_OF: dict[str, str] = {}
for _r in ROWS:
    if KEY_OF.setdefault(_r.fragment, _r.key) != _r.key:
        raise AssertionError(f"fragment {_r.fragment} has two keys")
del _r
if tuple(n for r in RENDERERS
         for n in (r.fragments if isinstance(r, Producer) else (r.fragment,))) != FRAGMENTS:
    raise AssertionError("RENDERERS must render FRAGMENTS, in fragment-index order")


def _prefix(fragment: str) -> str:
    return f"{_dumps(KEY_OF[fragment])}: "


def _fragment(prefix: str, value: str | None) -> bytes:
    return b"" if value is None else (prefix + value).encode("ascii")


# The compiled plan of render_fragments (PERF: flat loops over tuples, no call per
# fragment on a memo hit):
# memoized fields: (index, field, memo, prefix, value); unique fields: (index, field, prefix,
# value); producers: (indexes, prefixes, render, memo key, memo).
_FieldMemo = tuple[int, str, dict[Any, bytes], str, Callable[[Any], str | None]]
_FieldPlain = tuple[int, str, str, Callable[[Any], str | None]]
_Produce = tuple[tuple[int, ...], tuple[str, ...], Renderer, MemoKey | None,
                 dict[Any, tuple[bytes, ...]]]
_FIELDS_MEMO: tuple[_FieldMemo, ...] = tuple(
    (FRAGMENT_INDEX[r.fragment], r.field, {}, _prefix(r.fragment), r.value)
    for r in RENDERERS if isinstance(r, Field) and r.memo)
_FIELDS_PLAIN: tuple[_FieldPlain, ...] = tuple(
    (FRAGMENT_INDEX[r.fragment], r.field, _prefix(r.fragment), r.value)
    for r in RENDERERS if isinstance(r, Field) and not r.memo)
_PRODUCERS: tuple[_Produce, ...] = tuple(
    (tuple(FRAGMENT_INDEX[n] for n in r.fragments), tuple(_prefix(n) for n in r.fragments),
     r.render, r.memo, {})
    for r in RENDERERS if isinstance(r, Producer))


def clear_memos() -> None:
    """Forget every memoized fragment (tests; a memo only ever holds correct bytes)."""
    for m in _FIELDS_MEMO:
        m[2].clear()
    for p in _PRODUCERS:
        p[4].clear()
    _DAYS.clear()


def render_fragments(rec: dict[str, Any]) -> list[bytes]:
    """Every fragment of ``rec``, in fragment-index order (b'' for an absent key)."""
    out = [b""] * N_FRAGMENTS
    for i, field, memo, prefix, value in _FIELDS_MEMO:
        v = rec[field]
        try:
            b = memo.get(v)
        except TypeError:  # not a record's scalar (unvalidated input): render, keep nothing
            out[i] = _fragment(prefix, value(v))
            continue
        if b is None:
            b = _fragment(prefix, value(v))
            if len(memo) >= _MEMO_MAX:
                memo.clear()
            memo[v] = b
        out[i] = b
    for i, field, prefix, value in _FIELDS_PLAIN:
        v = rec[field]
        out[i] = _fragment(prefix, value(v))
    for idx, prefixes, render, key_of, pmemo in _PRODUCERS:
        got = None
        if key_of is not None:
            key = key_of(rec)
            try:
                got = pmemo.get(key)
            except TypeError:  # unhashable inputs (a fault): rendered, not kept
                key_of = None
        if got is None:
            got = tuple(map(_fragment, prefixes, render(rec)))
            if key_of is not None:
                if len(pmemo) >= _MEMO_MAX:
                    pmemo.clear()
                pmemo[key] = got
        for i, b in zip(idx, got, strict=True):
            out[i] = b
    return out

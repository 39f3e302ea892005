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
def _dumps(value: Any) -> str:
    # ensure_ascii as Nova's jsonutils.dumps: the bytes are ASCII, \\x00 never raw.
    return json.dumps(value, ensure_ascii=True)


def _isotime(us: int | None) -> str | None:
    """utils.isotime: '2013-09-03T04:01:32Z' (UTC, whole seconds)."""
    if us is None:
        return None
    return datetime.fromtimestamp(us // 1_000_000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _naive_iso(us: int | None) -> str | None:
    """OS-SRV-USG: str of a TZ-naive datetime through jsonutils: '2013-09-23T13:37:00.880302'."""
    if us is None:
        return None
    dt = datetime.fromtimestamp(us // 1_000_000, UTC).replace(
        microsecond=us % 1_000_000, tzinfo=None)
    return dt.isoformat()


def host_id(project_id: str, host: str | None) -> str:
    """utils.generate_hostid: sha224(project + host), '' without a host."""
    if not host:
        return ""
    return hashlib.sha224((project_id + host).encode("utf-8")).hexdigest()


def _link(placeholder: str, suffix: str) -> str:
    # '"\x00S/servers/<id>"': the placeholder goes inside the JSON string, raw.
    return '"' + placeholder + _dumps(suffix)[1:]


def _links_json(collection: str, ident: str) -> str:
    return (f'[{{"rel": "self", "href": {_link(SELF, f"/{collection}/{ident}")}}}, '
            f'{{"rel": "bookmark", "href": {_link(BOOKMARK, f"/{collection}/{ident}")}}}]')


def _bookmark_json(collection: str, ident: str) -> str:
    return f'[{{"rel": "bookmark", "href": {_link(BOOKMARK, f"/{collection}/{ident}")}}}]'


def _addresses(rec: dict[str, Any], ips: bool, mac: bool) -> str:
    # Nova hides addresses while building (ViewBuilder._get_addresses).
    if rec["vm_state"] == "building":
        return "{}"
    out: dict[str, list[dict[str, Any]]] = {}
    for net, entries in rec["addresses"].items():
        items = []
        for a in entries:
            item: dict[str, Any] = {"version": a["version"], "addr": a["addr"]}
            if ips:
                item["OS-EXT-IPS:type"] = a["type"]
            if mac:
                item["OS-EXT-IPS-MAC:mac_addr"] = a["mac"]
            items.append(item)
        out[net] = items
    return _dumps(out)


def _flavor_v1(rec: dict[str, Any]) -> str:
    fid = rec["flavor"]["id"]
    return f'{{"id": {_dumps(fid)}, "links": {_bookmark_json("flavors", fid)}}}'


def _flavor_v47(rec: dict[str, Any]) -> str:
    f = rec["flavor"]
    # extra_specs: policy servers:show:flavor-extra-specs, PROJECT_READER_OR_ADMIN: everyone.
    return _dumps({"vcpus": f["vcpus"], "ram": f["ram"], "disk": f["disk"],
                   "ephemeral": f["ephemeral"], "swap": f["swap"],
                   "original_name": f["name"], "extra_specs": f["extra_specs"]})


def _image(rec: dict[str, Any], properties: bool) -> str:
    img = rec["image"]
    if not img:
        return '""'  # booted from volume
    s = f'{{"id": {_dumps(img["id"])}, "links": {_bookmark_json("images", img["id"])}'
    if properties:
        s += f', "properties": {_dumps(img["properties"])}'
    return s + "}"


def _fault(rec: dict[str, Any], admin: bool) -> str | None:
    f = rec["fault"]
    if not f or rec["status"] not in FAULT_STATUSES:
        return None
    d: dict[str, Any] = {"code": f["code"], "created": _isotime(f["created"]),
                         "message": f["message"]}
    # details: to admins, and to others unless the fault is a 500 (ViewBuilder._get_fault)
    if f["details"] and (admin or f["code"] != 500):
        d["details"] = f["details"]
    return _dumps(d)


def _volumes(rec: dict[str, Any], v3: bool) -> str:
    if v3:
        return _dumps([{"id": v["id"], "delete_on_termination": v["delete_on_termination"]}
                       for v in rec["volumes_attached"]])
    return _dumps([{"id": v["id"]} for v in rec["volumes_attached"]])


def _j(field: str) -> Callable[[dict[str, Any]], str]:
    return lambda rec: _dumps(rec[field])


# fragment -> value renderer (the JSON of the value; None = key absent).
RENDER: dict[str, Callable[[dict[str, Any]], str | None]] = {
    "accessIPv4": lambda r: _dumps(r["access_ip_v4"] or ""),
    "accessIPv6": lambda r: _dumps(r["access_ip_v6"] or ""),
    "addresses": lambda r: _addresses(r, True, True),
    "addresses_ips": lambda r: _addresses(r, True, False),
    "addresses_mac": lambda r: _addresses(r, False, True),
    "addresses_plain": lambda r: _addresses(r, False, False),
    "created": lambda r: _dumps(_isotime(r["created_at"])),
    "flavor": _flavor_v1,
    "flavor_v47": _flavor_v47,
    "hostId": lambda r: _dumps(host_id(r["project_id"], r["host"])),
    "id": _j("uuid"),
    "image": lambda r: _image(r, False),
    "image_v98": lambda r: _image(r, True),
    "links": lambda r: _links_json("servers", r["uuid"]),
    "metadata": _j("metadata"),
    "name": _j("name"),
    "status": _j("status"),
    "tenant_id": lambda r: _dumps(r["project_id"] or ""),
    "user_id": lambda r: _dumps(r["user_id"] or ""),
    "updated": lambda r: _dumps(_isotime(r["updated_at"])),
    "diskConfig": _j("disk_config"),
    "fault_admin": lambda r: _fault(r, True),
    "fault_user": lambda r: _fault(r, False),
    "progress": lambda r: _dumps(r["progress"]) if r["status"] in PROGRESS_STATUSES else None,
    "availability_zone": lambda r: _dumps(r["availability_zone"] or ""),
    "config_drive": _j("config_drive"),
    "key_name": _j("key_name"),
    "launched_at": lambda r: _dumps(_naive_iso(r["launched_at"])),
    "terminated_at": lambda r: _dumps(_naive_iso(r["terminated_at"])),
    # Nova adds the key only when the server has groups (_add_security_grps).
    "security_groups": lambda r: (_dumps([{"name": g} for g in r["security_groups"]])
                                  if r["security_groups"] else None),
    "host": _j("host"),
    "instance_name": _j("instance_name"),
    "hypervisor_hostname": _j("node"),
    "hostname": _j("hostname"),
    "kernel_id": _j("kernel_id"),
    "launch_index": _j("launch_index"),
    "ramdisk_id": _j("ramdisk_id"),
    "reservation_id": _j("reservation_id"),
    "root_device_name": _j("root_device_name"),
    "srv_user_data": _j("user_data"),
    "task_state": _j("task_state"),
    "vm_state": _j("vm_state"),
    "power_state": _j("power_state"),
    "volumes_attached": lambda r: _volumes(r, False),
    "volumes_attached_v3": lambda r: _volumes(r, True),
    "locked": lambda r: _dumps(bool(r["locked"])),
    # Nova's get_instance_host_status gives '' for a server without a host, never null.
    "host_status": lambda r: _dumps(r["host_status"] or ""),
    "description": _j("description"),
    "tags": _j("tags"),
    "trusted_image_certificates": _j("trusted_image_certificates"),
    "server_groups": _j("server_groups"),
    "locked_reason": _j("locked_reason"),
    "pinned_availability_zone": _j("pinned_availability_zone"),
    "scheduler_hints": _j("scheduler_hints"),
    "user_data": _j("user_data"),
}

KEY_OF: dict[str, str] = {}
for _r in ROWS:
    if KEY_OF.setdefault(_r.fragment, _r.key) != _r.key:
        raise AssertionError(f"fragment {_r.fragment} has two keys")
del _r
if set(RENDER) != set(FRAGMENTS):
    raise AssertionError(f"renderers and fragments differ: {set(RENDER) ^ set(FRAGMENTS)}")


def render_fragments(rec: dict[str, Any]) -> list[bytes]:
    """Every fragment of ``rec``, in fragment-index order (b'' for an absent key)."""
    out: list[bytes] = []
    for name in FRAGMENTS:
        value = RENDER[name](rec)
        out.append(b"" if value is None else f"{_dumps(KEY_OF[name])}: {value}".encode("ascii"))
    return out

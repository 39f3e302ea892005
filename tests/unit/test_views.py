"""Server views: roles, extension switches, escaping, faults, links, blob handling."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from fastpath.api import views
from fastpath.api.views import table
from fastpath.store.samples import sample_record

BASE = b"http://fastpath.test:8774"
ADMIN_ONLY = {"OS-EXT-SRV-ATTR:host", "OS-EXT-SRV-ATTR:instance_name",
              "OS-EXT-SRV-ATTR:hypervisor_hostname", "OS-EXT-SRV-ATTR:kernel_id",
              "OS-EXT-SRV-ATTR:launch_index", "OS-EXT-SRV-ATTR:ramdisk_id",
              "OS-EXT-SRV-ATTR:reservation_id", "OS-EXT-SRV-ATTR:root_device_name",
              "OS-EXT-SRV-ATTR:user_data", "host_status"}


@pytest.fixture(autouse=True)
def _all_groups_on() -> Iterator[None]:
    views.configure(frozenset())
    yield
    views.configure(frozenset())


def show(rec: dict[str, Any], version: int = 104, admin: bool = True,
         kind: int = table.SHOW, **kw: Any) -> dict[str, Any]:
    blob = views.render_server(rec)[views.VIEW_ID]
    return json.loads(views.server_json(blob, version, admin, BASE, kind=kind, **kw))


def test_the_assembly_is_compiled() -> None:
    from fastpath import _core
    assert views.server_json is _core.server_json
    assert views.servers_json_join is _core.servers_json_join


def test_plans_come_from_the_table() -> None:
    keys = [table.KEY_OF[table.FRAGMENTS[i]] for i in views.plan(table.SHOW, 104, True)]
    assert len(keys) == len(set(keys))  # one fragment per key
    assert keys[:3] == ["accessIPv4", "accessIPv6", "addresses"]  # Nova's order
    assert views.plan(table.SUMMARY, 50, False) == tuple(
        table.FRAGMENT_INDEX[n] for n in ("id", "links", "name"))


def test_non_admins_never_see_admin_only_keys() -> None:
    for version in range(1, 105):
        _roles_at(version)


def _roles_at(version: int) -> None:
    rec = sample_record(seed=version)
    blob = views.render_server(rec)[views.VIEW_ID]
    for kind in (table.SHOW, table.DETAIL, table.UPDATE):
        user = json.loads(views.server_json(blob, version, False, BASE, kind=kind))
        admin = json.loads(views.server_json(blob, version, True, BASE, kind=kind))
        assert not ADMIN_ONLY & set(user)
        assert set(user) <= set(admin)
        # 2.90: the hostname shows to everyone
        if kind == table.SHOW or version >= 75:
            assert ("OS-EXT-SRV-ATTR:hostname" in user) == (version >= 90)
            assert ("OS-EXT-SRV-ATTR:hostname" in admin) == (version >= 3)
            assert ("host_status" in admin) == (version >= 16)
        if kind == table.DETAIL:
            assert "server_groups" not in admin
        else:
            assert ("server_groups" in admin) == (version >= 71)


@pytest.mark.parametrize(("version", "flavor_keys"), [
    (1, {"id", "links"}), (46, {"id", "links"}),
    (47, {"vcpus", "ram", "disk", "ephemeral", "swap", "original_name", "extra_specs"}),
])
def test_flavor_by_version(version: int, flavor_keys: set[str]) -> None:
    assert set(show(sample_record(), version, False)["flavor"]) == flavor_keys


def test_versioned_keys() -> None:
    rec = sample_record()
    assert set(show(rec, 2)["os-extended-volumes:volumes_attached"][0]) == {"id"}
    assert set(show(rec, 3)["os-extended-volumes:volumes_attached"][0]) == {
        "id", "delete_on_termination"}
    assert "properties" not in show(rec, 97)["image"]
    assert show(rec, 98)["image"]["properties"] == rec["image"]["properties"]
    for key, since in [("locked", 9), ("description", 19), ("tags", 26),
                       ("trusted_image_certificates", 63), ("locked_reason", 73),
                       ("pinned_availability_zone", 96), ("scheduler_hints", 100)]:
        assert key not in show(rec, since - 1, False)
        assert key in show(rec, since, False)


def test_reduced_update_and_rebuild_before_2_75() -> None:
    rec = sample_record()
    upd = show(rec, 74, True, table.UPDATE)
    assert not {k for k in upd if k.startswith(("OS-EXT", "OS-SRV", "os-"))}
    assert "key_name" not in upd and "security_groups" not in upd
    assert set(upd["addresses"]["private"][0]) == {"version", "addr"}
    reb = show(rec, 74, True, table.REBUILD)
    assert reb["key_name"] == rec["key_name"] and reb["user_data"] == rec["user_data"]
    assert "key_name" not in show(rec, 53, True, table.REBUILD)
    assert "user_data" not in show(rec, 56, True, table.REBUILD)
    full = show(rec, 75, True, table.REBUILD)
    assert "OS-EXT-SRV-ATTR:user_data" not in full and "user_data" in full
    assert show(rec, 75, True, table.UPDATE) == show(rec, 75, True, table.SHOW)


@pytest.mark.parametrize(("group", "keys"), [
    ("OS-EXT-SRV-ATTR", {k for k in ADMIN_ONLY if k.startswith("OS-EXT-SRV-ATTR")}
     | {"OS-EXT-SRV-ATTR:hostname"}),
    ("OS-EXT-STS", {"OS-EXT-STS:task_state", "OS-EXT-STS:vm_state", "OS-EXT-STS:power_state"}),
    ("OS-EXT-AZ", {"OS-EXT-AZ:availability_zone"}),
    ("OS-SRV-USG", {"OS-SRV-USG:launched_at", "OS-SRV-USG:terminated_at"}),
    ("OS-DCF", {"OS-DCF:diskConfig"}),
    ("os-extended-volumes", {"os-extended-volumes:volumes_attached"}),
    ("os-config-drive", {"config_drive"}),
    ("os-keypairs", {"key_name"}),
    ("os-security-groups", {"security_groups"}),
])
def test_a_disabled_group_hides_its_keys(group: str, keys: set[str]) -> None:
    rec = sample_record()
    blob = views.render_server(rec)[views.VIEW_ID]
    on = {v: json.loads(views.server_json(blob, v, True, BASE)) for v in (1, 50, 104)}
    views.configure(frozenset({group}))
    for v in (1, 50, 104):
        off = json.loads(views.server_json(blob, v, True, BASE))  # the same blob
        assert not keys & set(off)
        assert set(on[v]) - set(off) == keys & set(on[v])
        assert {k: x for k, x in on[v].items() if k not in keys} == off


@pytest.mark.parametrize(("disabled", "entry_keys"), [
    (set(), {"version", "addr", "OS-EXT-IPS:type", "OS-EXT-IPS-MAC:mac_addr"}),
    ({"OS-EXT-IPS"}, {"version", "addr", "OS-EXT-IPS-MAC:mac_addr"}),
    ({"OS-EXT-IPS-MAC"}, {"version", "addr", "OS-EXT-IPS:type"}),
    ({"OS-EXT-IPS", "OS-EXT-IPS-MAC"}, {"version", "addr"}),
])
def test_address_groups(disabled: set[str], entry_keys: set[str]) -> None:
    views.configure(frozenset(disabled))
    for kind in (table.SHOW, table.DETAIL):
        for entry in show(sample_record(), 60, False, kind)["addresses"]["private"]:
            assert set(entry) == entry_keys
    assert set(show(sample_record(), 60, False, table.UPDATE)["addresses"]["private"][0]) == {
        "version", "addr"}


def test_an_unknown_group_is_refused() -> None:
    with pytest.raises(ValueError, match="OS-EXT-NOPE"):
        views.configure(frozenset({"OS-EXT-NOPE"}))


def test_unicode_and_escaping() -> None:
    name = 'Ünïcødé "quoted" \\ back\x00S\x00B ☃ \U0001f600'
    meta = {"ключ": "значение", "ctl": "\x00\x01\n\t", "S": "\x00S"}
    rec = sample_record(name=name, metadata=meta, description="d\u2028e")
    blob = views.render_server(rec)[views.VIEW_ID]
    raw = views.server_json(blob, 104, False, BASE)
    raw.decode("ascii")  # ensure_ascii, as Nova
    assert b"\x00" not in raw and b"\x00" not in blob.replace(b"\x00S/", b"").replace(
        b"\x00B/", b"")[4:][4 * (table.N_FRAGMENTS + 1):]
    d = json.loads(raw)
    assert d["name"] == name and d["metadata"] == meta and d["description"] == "d\u2028e"
    assert json.loads(views.server_summary_json(blob, BASE))["name"] == name


def test_empty_addresses_and_building() -> None:
    assert show(sample_record(addresses={}))["addresses"] == {}
    building = sample_record(vm_state="building", task_state="spawning")
    d = show(building)
    assert d["addresses"] == {} and d["status"] == "BUILD" and d["progress"] == 0


def test_nulls_and_absent_keys() -> None:
    rec = sample_record(vm_state="stopped", power_state=4, security_groups=[], host=None,
                        node=None, availability_zone=None, key_name=None, image=None,
                        access_ip_v4=None, launched_at=None, host_status=None,
                        progress=None, hostname=None)
    d = show(rec)
    assert d["status"] == "SHUTOFF"
    assert "progress" not in d  # only for ACTIVE, BUILD, REBUILD, RESIZE, ...
    assert "security_groups" not in d  # Nova adds the key only with groups
    assert d["image"] == "" and d["hostId"] == "" and d["OS-EXT-AZ:availability_zone"] == ""
    assert d["accessIPv4"] == "" and d["key_name"] is None
    assert d["OS-SRV-USG:launched_at"] is None and d["OS-EXT-SRV-ATTR:host"] is None
    assert d["host_status"] == "" and d["OS-EXT-SRV-ATTR:hostname"] is None
    assert "fault" not in d


@pytest.mark.parametrize("vm_state", ["error", "deleted"])
def test_fault(vm_state: str) -> None:
    created = 1_378_181_000_000_000
    f500 = {"code": 500, "message": "No valid host", "details": "Traceback ...",
            "created": created}
    rec = sample_record(vm_state=vm_state, fault=f500)
    admin, user = show(rec), show(rec, admin=False)
    assert admin["fault"] == {"code": 500, "created": "2013-09-03T04:03:20Z",
                              "message": "No valid host", "details": "Traceback ..."}
    assert user["fault"] == {"code": 500, "created": "2013-09-03T04:03:20Z",
                             "message": "No valid host"}
    f404 = dict(f500, code=404)
    assert show(sample_record(vm_state=vm_state, fault=f404), admin=False)["fault"][
        "details"] == "Traceback ..."
    assert "details" not in show(sample_record(vm_state=vm_state, fault=dict(f500, details=None)))[
        "fault"]
    assert "progress" not in admin
    # a fault of a server that recovered is not shown
    assert "fault" not in show(sample_record(fault=f500))


def test_links_follow_nova() -> None:
    rec = sample_record(project_id="p-owner")
    uid = rec["uuid"]
    # /v2.1/servers/{id}: no project in the URL, none in the links
    lp = views.link_project(b"http://h/v2.1/servers/" + uid.encode(), "p-admin")
    assert lp == b""
    d = show(rec, link_project=lp)
    assert [x["href"] for x in d["links"]] == [
        f"{BASE.decode()}/v2.1/servers/{uid}", f"{BASE.decode()}/servers/{uid}"]
    assert d["flavor"]["original_name"]
    assert d["image"]["links"][0]["href"] == f"{BASE.decode()}/images/{rec['image']['id']}"
    # legacy /v2.1/{project}/servers/{id}: the caller's project, not the server's
    lp = views.link_project(b"http://h/v2.1/p-admin/servers/" + uid.encode(), "p-admin")
    d = show(rec, 1, link_project=lp)
    assert [x["href"] for x in d["links"]] == [
        f"{BASE.decode()}/v2.1/p-admin/servers/{uid}", f"{BASE.decode()}/p-admin/servers/{uid}"]
    assert d["flavor"]["links"][0]["href"] == f"{BASE.decode()}/p-admin/flavors/1"
    # the legacy /v2 endpoint
    d = show(rec, root=b"/v2")
    assert d["links"][0]["href"] == f"{BASE.decode()}/v2/servers/{uid}"


def test_list_join() -> None:
    recs = [sample_record(seed=i) for i in range(5)]
    blobs: list[Any] = [views.render_server(r)[views.VIEW_ID] for r in recs]
    blobs[1] = memoryview(blobs[1])  # LMDB buffers
    for summary in (False, True):
        raw = views.servers_json_join(blobs, 90, False, BASE, summary)
        got = json.loads(b"[" + raw + b"]")
        assert [s["id"] for s in got] == [r["uuid"] for r in recs]
        one = (views.server_summary_json(blobs[0], BASE) if summary
               else views.server_json(blobs[0], 90, False, BASE, kind=table.DETAIL))
        assert got[0] == json.loads(one)
    assert views.servers_json_join([], 90, False, BASE, False) == b""


def test_bad_input_is_refused() -> None:
    blob = views.render_server(sample_record())[views.VIEW_ID]
    with pytest.raises(ValueError):
        views.server_json(blob[:-1], 1, True, BASE)
    with pytest.raises(ValueError):
        views.server_json(b"\x02" + blob[1:], 1, True, BASE)
    with pytest.raises(ValueError):
        views.server_json(blob, 105, True, BASE)
    with pytest.raises(ValueError):
        views.server_json(blob, 0, True, BASE)
    with pytest.raises(ValueError):
        views.server_json(blob, 1, True, BASE, kind=9)
    with pytest.raises(ValueError):
        views.servers_json_join([blob, b"junk"], 1, True, BASE, False)
    assert views.parse_blob(blob)[table.FRAGMENT_INDEX["id"]].startswith(b'"id": ')

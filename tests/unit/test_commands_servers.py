"""POST /servers, PUT/DELETE /servers/{id} and POST /servers/{id}/action in process: Nova's
validation per microversion and its messages, quota, scheduling, state and lock rules; the
provisional record and pending overlay (visible at once); the outbox entries; and the
budget -- 1 read + 1 write transaction per accepted command, 0 writes when refused."""

from __future__ import annotations

import copy
import json
import re
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastpath.api import views
from fastpath.api.server_commands import BDM_INVALID, CREATE, fast_create_ok
from fastpath.store import Batch, Upsert
from fastpath.store import record as R
from fastpath.store.changes import Catalog, CatalogPut
from fastpath.store.samples import sample_record
from tests.unit.catalog_support import ADMIN_TOKEN, BASE, PROJECT, TOKEN, Server, sample
from tests.unit.command_support import cmd, get
from tests.unit.command_support import err as fault
from tests.unit.conftest import Response, request

IMAGE = "70a599e0-31e7-49b7-b260-868f441e862b"
OTHER = "0ther0000000000000000000000000000"
U = "1f0e5b7a-3c55-4a43-9f0e-6f6b7a3c2d10"
UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")
FLAVOR1 = {"id": "1", "name": "m1.tiny", "vcpus": 1, "ram": 512, "disk": 1}
FLAVOR2 = {"id": "2", "name": "m1.small", "vcpus": 1, "ram": 2048, "disk": 20}
FLAVOR6 = {"id": "6", "name": "m1.tiny.specs", "vcpus": 1, "ram": 512, "disk": 1,
           "extra_specs": {"hw:numa_nodes": "1"}}
HOSTS = {"cell1": {"hosts": {"c1-h1": {"vcpus": 64, "ram_mb": 262144, "disk_gb": 4000,
                                       "vcpus_used": 0, "ram_mb_used": 0, "disk_gb_used": 0,
                                       "status": "enabled", "availability_zone": "us-west"}}},
         "cell2": {"hosts": {"c2-h1": {"vcpus": 64, "ram_mb": 262144, "disk_gb": 4000,
                                       "vcpus_used": 0, "ram_mb_used": 0, "disk_gb_used": 0,
                                       "status": "enabled", "availability_zone": "nova"}}}}


def seed_catalog(s: Server, cells: bool = True) -> None:
    puts = [CatalogPut(Catalog.FLAVORS, f["id"], f) for f in (FLAVOR1, FLAVOR2, FLAVOR6)]
    puts.append(CatalogPut(Catalog.IMAGES, IMAGE, {
        "id": IMAGE, "name": "cirros", "status": "active", "size": 25165824, "min_ram": 0,
        "min_disk": 0, "properties": {"architecture": "x86_64"}, "visibility": "public"}))
    puts.append(CatalogPut(Catalog.IMAGES, "a2459075-d96c-40d5-893e-577ff92e721c", {
        "id": "a2459075-d96c-40d5-893e-577ff92e721c", "name": "big", "status": "active",
        "size": 1, "min_ram": 4096, "min_disk": 0, "properties": {}, "visibility": "public"}))
    puts.append(CatalogPut(Catalog.KEYPAIRS, ("fake", "mykey"), {
        "name": "mykey", "user_id": "fake", "public_key": "ssh-rsa AAA", "fingerprint": "f",
        "type": "ssh"}))
    if cells:
        puts += [CatalogPut(Catalog.CELLS, name, v) for name, v in HOSTS.items()]
    s.plan.context.store.apply(Batch(catalog=puts))


@pytest.fixture
def srv(make_server: Any) -> Server:
    s: Server = make_server(extra_routes=False)
    seed_catalog(s)
    return s


def put_server(s: Server, uuid: str = U, version: int = 1, **fields: Any) -> None:
    rec = sample_record(uuid, version=version, seed=1, **fields)
    s.plan.context.store.apply(Batch([Upsert(uuid, version, rec)]), views.render_server)


def show(s: Server, uuid: str, version: str = "2.1", token: str = ADMIN_TOKEN) -> dict[str, Any]:
    r = get(s, f"/v2.1/servers/{uuid}", token, version)
    assert r.status == 200, (r.status, r.body)
    return dict(r.json()["server"])


def outbox(s: Server) -> list[dict[str, Any]]:
    with s.plan.context.store.read() as r:
        return [msgpack.unpackb(v, raw=False) for _, v in r.dump()["outbox"]]


def validate_all(s: Server) -> int:
    """Every stored record is a complete, valid record; the store's invariants hold."""
    with s.plan.context.store.read() as rd:
        n = 0
        for u in rd.page(None, limit=10_000):
            rec = rd.get_server(u)
            assert rec is not None
            R.validate(rec)
            n += 1
        assert rd.check() == []
    return n


def create_body(**server: Any) -> dict[str, Any]:
    body = {"name": "new-server-test", "imageRef": IMAGE, "flavorRef": "1"}
    body.update(server)
    return {"server": {k: v for k, v in body.items() if v is not None}}


def create(s: Server, version: str = "2.1", token: str = TOKEN, **server: Any) -> Response:
    return cmd(s, "POST", "/v2.1/servers", create_body(**server), token, version)


# -- create ---------------------------------------------------------------------------------
def test_create_sample_request_at_2_1(srv: Server) -> None:
    body = sample("servers/server-create-req.json")
    r = cmd(srv, "POST", "/v2.1/servers", body)
    assert r.status == 202, r.body
    got = r.json()["server"]
    want = sample("servers/server-create-resp.json")["server"]
    assert sorted(got) == sorted(want)
    uid = got["id"]
    assert UUID_RE.match(uid)
    assert re.fullmatch(r"[2-9A-HJ-NP-Za-km-z]{12}", got["adminPass"])
    assert got["OS-DCF:diskConfig"] == "AUTO"
    assert got["security_groups"] == [{"name": "default"}]
    assert got["links"] == [{"href": f"{BASE}/v2.1/servers/{uid}", "rel": "self"},
                            {"href": f"{BASE}/servers/{uid}", "rel": "bookmark"}]
    # Visible at once: the provisional BUILD record.
    v = show(srv, uid, "2.3")
    assert (v["status"], v["OS-EXT-STS:task_state"], v["OS-EXT-STS:vm_state"]) == (
        "BUILD", "scheduling", "building")
    assert v["name"] == "new-server-test"
    assert v["metadata"] == {"My Server Name": "Apache1"}
    assert (v["accessIPv4"], v["accessIPv6"]) == ("1.2.3.4", "80fe::")
    assert v["OS-EXT-AZ:availability_zone"] == "us-west"
    assert v["OS-EXT-SRV-ATTR:hostname"] == "new-server-test"
    assert v["OS-EXT-SRV-ATTR:reservation_id"].startswith("r-")
    # The outbox entry for the cell that holds us-west.
    (entry,) = outbox(srv)
    assert (entry["cell"], entry["server"]) == ("cell1", uid)
    p = entry["payload"]
    assert (p["action"], p["host"], p["project_id"], p["user_id"]) == ("create", "c1-h1", PROJECT, "fake")
    assert p["request_id"] == entry["id"] and entry["id"].startswith("req-")
    assert p["server"]["uuid"] == uid and p["server"]["flavor"]["id"] == "1"
    assert p["server"]["image_ref"] == IMAGE and p["server"]["user_data"].startswith("IyEv")
    assert p["server"]["scheduler_hints"] == {"same_host": "48e6a9f6-30af-47e0-bc04-acaed113bb4e"}
    with srv.plan.context.store.read() as rd:
        assert rd.quota_usage(PROJECT) == {"instances": 1, "cores": 1, "ram": 512}
        assert not rd.check()
        stored = rd.get_server(uid)
    assert stored is not None
    R.validate(stored)  # the provisional record is a complete, valid record
    assert stored["version"] == 0 and stored["cell"] == "cell1" and stored["pending"] == {}
    # Listed too.
    ids = [x["id"] for x in get(srv, "/v2.1/servers").json()["servers"]]
    assert ids == [uid]


def test_create_2_37_networks(srv: Server) -> None:
    r = create(srv, "2.37")
    msg = fault(r, 400)
    assert msg.startswith("Invalid input for field/attribute server. Value: {'name': 'new-server-test'")
    assert msg.endswith(". 'networks' is a required property")
    assert create(srv, "2.37", networks="auto").status == 202
    assert create(srv, "2.37", networks="none").status == 202
    assert create(srv, "2.37", networks=[{"uuid": "ff608d40-75e9-48cb-b745-77bb55b5eaf2"}]).status == 202
    msg = fault(create(srv, "2.36", networks="auto"), 400)
    assert msg == "Invalid input for field/attribute networks. Value: auto. 'auto' is not of type 'array'"
    msg = fault(create(srv, "2.37", networks="some"), 400)
    assert msg.startswith("Invalid input for field/attribute networks. Value: some. 'some' is not valid")


def test_create_validation_messages(srv: Server) -> None:
    assert fault(cmd(srv, "POST", "/v2.1/servers", b"{not json"), 400) == "Malformed request body"
    assert fault(cmd(srv, "POST", "/v2.1/servers", {"server": {"name": "x"}}), 400) == (
        "Invalid input for field/attribute server. Value: {'name': 'x'}. 'flavorRef' is a required property")
    assert fault(create(srv, name=" lead"), 400) == (
        "An invalid 'name' value was provided. The name must be: printable characters. "
        "Can not start or end with whitespace.")
    # jsonschema's own text, as Nova shows it (it words this one by version).
    assert fault(create(srv, name=""), 400) in (
        "Invalid input for field/attribute name. Value: . '' is too short",
        "Invalid input for field/attribute name. Value: . '' should be non-empty")
    assert fault(create(srv, foo=1), 400).endswith(
        "Additional properties are not allowed ('foo' was unexpected)")
    assert fault(create(srv, user_data="not base64!"), 400) == (
        "Invalid input for field/attribute user_data. Value: not base64!. "
        "'not base64!' is not a 'base64'")
    assert fault(create(srv, metadata={"k": 1}), 400) == (
        "Invalid input for field/attribute k. Value: 1. 1 is not of type 'string'")
    assert fault(create(srv, accessIPv4="1.2.3"), 400) == (
        "Invalid input for field/attribute accessIPv4. Value: 1.2.3. '1.2.3' is not a 'ipv4'")
    assert fault(create(srv, min_count=3, max_count=2), 400) == "min_count must be <= max_count"
    assert fault(cmd(srv, "POST", "/v2.1/servers", {"server": create_body()["server"], "x": 1}),
                 400) == "Additional properties are not allowed ('x' was unexpected)"
    # per microversion
    assert fault(create(srv, "2.18", description="d"), 400).endswith(
        "Additional properties are not allowed ('description' was unexpected)")
    assert create(srv, "2.19", description="d").status == 202
    # From 2.37 'networks' is required, and "required" comes before "additionalProperties".
    assert fault(create(srv, "2.51", tags=["a"]), 400).endswith("'networks' is a required property")
    assert fault(create(srv, "2.51", tags=["a"], networks="none"), 400).endswith(
        "('tags' was unexpected)")
    assert fault(create(srv, "2.89", hostname="h1", networks="none"), 400).endswith(
        "('hostname' was unexpected)")
    assert fault(create(srv, "2.57", personality=[], networks="none"), 400).endswith(
        "('personality' was unexpected)")


def test_create_catalogue_errors(srv: Server) -> None:
    assert fault(create(srv, flavorRef="99"), 400) == "Invalid flavorRef provided."
    assert create(srv, flavorRef="http://openstack.example.com/flavors/1").status == 202
    assert create(srv, flavorRef=1).status == 202
    missing = "c0ffee00-0000-4000-8000-000000000000"
    assert fault(create(srv, imageRef=missing), 400) == f"Image {missing} could not be found."
    assert fault(create(srv, imageRef="a2459075-d96c-40d5-893e-577ff92e721c"), 400) == (
        "Flavor's memory is too small for requested image.")
    assert fault(create(srv, key_name="nokey"), 400) == "Invalid key_name provided."
    assert create(srv, key_name="mykey").status == 202
    assert fault(create(srv, availability_zone="mars"), 400) == (
        "The requested availability zone is not available")
    assert fault(create(srv, imageRef=""), 400) == "Missing imageRef attribute"
    assert fault(create(srv, imageRef=None), 400) == "Missing imageRef attribute"
    assert fault(create(srv, imageRef="", block_device_mapping_v2=[
        {"source_type": "blank", "destination_type": "volume", "volume_size": 1}]), 400) == BDM_INVALID
    # An image-backed root disk through block_device_mapping_v2.
    r = create(srv, imageRef="", block_device_mapping_v2=[
        {"source_type": "image", "destination_type": "local", "boot_index": 0, "uuid": IMAGE}])
    assert r.status == 202
    assert show(srv, r.json()["server"]["id"])["image"]["id"] == IMAGE
    # Volume-backed: no image.
    r = create(srv, imageRef="", block_device_mapping_v2=[
        {"source_type": "volume", "destination_type": "volume", "boot_index": "0",
         "uuid": "9c5a4b2e-d2f3-4bd3-a1c8-1f2a7c0e2a5b"}])
    assert r.status == 202
    v = show(srv, r.json()["server"]["id"])
    assert v["image"] == ""
    assert v["os-extended-volumes:volumes_attached"] == [{"id": "9c5a4b2e-d2f3-4bd3-a1c8-1f2a7c0e2a5b"}]
    assert validate_all(srv) == 5


def test_create_microversion_fields(srv: Server) -> None:
    r = create(srv, "2.90", description="hello", tags=["a", "b"], hostname="my-host",
               networks="auto")
    assert r.status == 202
    v = show(srv, r.json()["server"]["id"], "2.90")
    assert (v["description"], v["tags"], v["OS-EXT-SRV-ATTR:hostname"]) == ("hello", ["a", "b"], "my-host")
    assert fault(create(srv, "2.90", hostname="bad_host!", networks="auto"), 400).startswith(
        "Invalid input for field/attribute hostname.")
    assert create(srv, "2.94", hostname="host.example.com", networks="auto").status == 202
    assert validate_all(srv) == 2


def test_create_quota(srv: Server) -> None:
    store = srv.plan.context.store
    store.apply(Batch(catalog=[CatalogPut(Catalog.QUOTA_LIMITS, PROJECT, {"instances": 2, "cores": 20})]))
    assert create(srv).status == 202
    assert create(srv).status == 202
    assert fault(create(srv), 403) == (
        "Quota exceeded for instances: Requested 1, but already used 2 of 2 instances")
    store.apply(Batch(catalog=[CatalogPut(Catalog.QUOTA_LIMITS, PROJECT,
                                          {"instances": 10, "cores": 3, "ram": 2560})]))
    assert fault(create(srv, flavorRef="2"), 403) == (
        "Quota exceeded for ram: Requested 2048, but already used 1024 of 2560 ram")
    assert fault(create(srv, min_count=2, flavorRef="1"), 403) == (
        "Quota exceeded for cores: Requested 2, but already used 2 of 3 cores")
    # min 1, max 3 with room for one: one server.
    r = create(srv, min_count=1, max_count=3, return_reservation_id=True)
    assert r.status == 202
    rid = r.json()["reservation_id"]
    assert re.fullmatch(r"r-[a-z0-9]{8}", rid)
    with store.read() as rd:
        assert rd.quota_usage(PROJECT) == {"instances": 3, "cores": 3, "ram": 1536}
    # Metadata items quota.
    store.apply(Batch(catalog=[CatalogPut(Catalog.QUOTA_LIMITS, PROJECT, {"metadata_items": 1})]))
    assert fault(create(srv, metadata={"a": "1", "b": "2"}), 403) == (
        "Maximum number of metadata items exceeds 1")


def test_multi_create(srv: Server) -> None:
    r = create(srv, "2.52", min_count=3, name="web", tags=["t"], networks="auto")
    assert r.status == 202
    servers = get(srv, "/v2.1/servers/detail", ADMIN_TOKEN, "2.52").json()["servers"]
    assert sorted(x["name"] for x in servers) == ["web-1", "web-2", "web-3"]
    assert len({x["OS-EXT-SRV-ATTR:reservation_id"] for x in servers}) == 1
    assert sorted(x["OS-EXT-SRV-ATTR:launch_index"] for x in servers) == [0, 1, 2]
    assert r.json()["server"]["id"] in {x["id"] for x in servers}
    box = outbox(srv)
    assert len(box) == 3 and len({e["id"] for e in box}) == 3
    assert validate_all(srv) == 3


def test_concurrent_creates_share_commits_and_never_over_admit(srv: Server) -> None:
    store = srv.plan.context.store
    store.apply(Batch(catalog=[CatalogPut(Catalog.QUOTA_LIMITS, PROJECT, {"instances": 5})]))
    raw = json.dumps(create_body()).encode()
    writes = store.write_txns
    conns = [srv.exchange(request("/v2.1/servers", f"X-Auth-Token: {TOKEN}", method="POST",
                                  body=raw)) for _ in range(12)]
    statuses = sorted(c.wait(1)[0].status for c in conns)
    assert statuses == [202] * 5 + [403] * 7
    assert store.write_txns - writes < 12  # grouped
    with store.read() as rd:
        assert rd.quota_usage(PROJECT)["instances"] == 5
        assert rd.count(b"servers") == 5
    assert len(outbox(srv)) == 5


def test_create_without_any_cell(make_server: Any) -> None:
    s: Server = make_server(extra_routes=False)
    seed_catalog(s, cells=False)
    msg = fault(create(s), 503)
    assert msg.startswith("No valid host was found.")
    # A cell known only from its sync cursor is enough (no capacity data: host None).
    s.plan.context.store.apply(Batch(cursor=("cell9", 1)))
    r = create(s)
    assert r.status == 202
    (entry,) = outbox(s)
    assert (entry["cell"], entry["payload"]["host"]) == ("cell9", None)


def test_create_when_no_host_fits_goes_to_a_cell_without_host(srv: Server) -> None:
    full = copy.deepcopy(HOSTS)
    for c in full.values():
        for h in c["hosts"].values():
            h["ram_mb_used"] = h["ram_mb"]
    srv.plan.context.store.apply(Batch(catalog=[CatalogPut(Catalog.CELLS, n, v) for n, v in full.items()]))
    assert create(srv).status == 202
    (entry,) = outbox(srv)
    assert entry["payload"]["host"] is None and entry["cell"] in HOSTS


# -- actions ----------------------------------------------------------------------------------
def action(s: Server, body: Any, uuid: str = U, token: str = TOKEN, version: str = "2.1") -> Response:
    return cmd(s, "POST", f"/v2.1/servers/{uuid}/action", body, token, version)


def last_payload(s: Server) -> dict[str, Any]:
    return dict(outbox(s)[-1]["payload"])


def test_reboot_shows_at_once_and_conflicts(srv: Server) -> None:
    put_server(srv)
    r = action(srv, {"reboot": {"type": "SOFT"}})
    assert (r.status, r.body) == (202, b"")
    v = show(srv, U, "2.3")
    assert (v["status"], v["OS-EXT-STS:task_state"]) == ("REBOOT", "rebooting")
    p = last_payload(srv)
    assert (p["action"], p["type"], p["project_id"], p["user_id"]) == ("reboot", "SOFT", PROJECT, "fake")
    assert outbox(srv)[-1]["cell"] == "cell1" and outbox(srv)[-1]["server"] == U
    assert fault(action(srv, {"reboot": {"type": "SOFT"}}), 409) == (
        f"Cannot 'reboot' instance {U} while it is in task_state rebooting")
    assert action(srv, {"reboot": {"type": "hard"}}).status == 202
    assert show(srv, U)["status"] == "HARD_REBOOT"
    assert fault(action(srv, {"os-stop": None}), 409) == (
        f"Cannot 'stop' instance {U} while it is in task_state rebooting_hard")
    assert fault(action(srv, {"reboot": {"type": "soft-ish"}}), 400).startswith(
        "Invalid input for field/attribute type. Value: soft-ish.")
    assert fault(action(srv, {"reboot": {}}), 400).endswith("'type' is a required property")


def test_simple_actions_and_vm_state_conflicts(srv: Server) -> None:
    put_server(srv)
    assert fault(action(srv, {"os-start": None}), 409) == (
        f"Cannot 'start' instance {U} while it is in vm_state active")
    assert fault(action(srv, {"unpause": None}), 409) == (
        f"Cannot 'unpause' instance {U} while it is in vm_state active")
    assert fault(action(srv, {"resume": None}), 409) == (
        f"Cannot 'resume' instance {U} while it is in vm_state active")
    assert fault(action(srv, {"confirmResize": None}), 409) == (
        f"Cannot 'confirmResize' instance {U} while it is in vm_state active")
    assert action(srv, {"pause": None}).status == 202
    assert show(srv, U, "2.3")["OS-EXT-STS:task_state"] == "pausing"
    assert last_payload(srv)["action"] == "pause"
    put_server(srv, version=2, vm_state="stopped", power_state=4)  # the cell has not echoed
    assert show(srv, U, "2.3")["OS-EXT-STS:task_state"] == "pausing"  # pending survives
    put_server(srv, version=3, vm_state="stopped", power_state=4,
               done_commands=[outbox(srv)[-1]["id"]])
    assert show(srv, U)["status"] == "SHUTOFF"
    assert action(srv, {"os-start": None}).status == 202
    assert last_payload(srv)["action"] == "start"
    assert show(srv, U, "2.3")["OS-EXT-STS:task_state"] == "powering-on"
    put_server(srv, version=4, vm_state="active", done_commands=[outbox(srv)[-1]["id"]])
    for act, task in (("suspend", "suspending"), ("os-stop", "powering-off")):
        put_server(srv, version=5 if act == "suspend" else 6)
        assert action(srv, {act: None}).status == 202, act
        assert show(srv, U, "2.3")["OS-EXT-STS:task_state"] == task
        put_server(srv, version=7 if act == "suspend" else 8,
                   done_commands=[outbox(srv)[-1]["id"]])


def test_unknown_actions_and_servers(srv: Server) -> None:
    put_server(srv)
    assert fault(action(srv, {"fly": None}), 400) == "There is no such action: fly"
    assert fault(action(srv, {"pause": None, "unpause": None}), 400) == "Malformed request body"
    assert fault(action(srv, b"[1"), 400) == "Malformed request body"
    missing = "c0ffee00-0000-4000-8000-000000000000"
    assert fault(action(srv, {"pause": None}, missing), 404) == f"Instance {missing} could not be found."
    # Another project's server is not found either; an admin's action works.
    put_server(srv, "c0ffee00-0000-4000-8000-000000000001", project_id=OTHER)
    other = "c0ffee00-0000-4000-8000-000000000001"
    assert fault(action(srv, {"pause": None}, other), 404) == f"Instance {other} could not be found."
    assert fault(cmd(srv, "DELETE", f"/v2.1/servers/{other}"), 404)
    assert action(srv, {"pause": None}, other, ADMIN_TOKEN).status == 202


def test_lock_unlock(srv: Server) -> None:
    put_server(srv)
    assert action(srv, {"lock": {"locked_reason": "maintenance"}}, version="2.73").status == 202
    v = show(srv, U, "2.73")
    assert (v["locked"], v["locked_reason"]) == (True, "maintenance")
    assert last_payload(srv) == {"action": "lock", "reason": "maintenance", "locked_by": "owner",
                                 "project_id": PROJECT, "user_id": "fake",
                                 "request_id": outbox(srv)[-1]["id"]}
    assert fault(action(srv, {"os-stop": None}), 409) == f"Instance {U} is locked"
    assert fault(cmd(srv, "DELETE", f"/v2.1/servers/{U}"), 409) == f"Instance {U} is locked"
    assert action(srv, {"os-stop": None}, token=ADMIN_TOKEN).status == 202  # admins may
    assert fault(action(srv, {"lock": {"locked_reason": ""}}, version="2.73"), 400) == (
        "Invalid input for field/attribute lock. Value: {'locked_reason': ''}. "
        "{'locked_reason': ''} is not valid under any of the given schemas")
    assert action(srv, {"unlock": None}).status == 202
    assert show(srv, U, "2.73")["locked"] is False
    # Locked by an admin: the owner may not unlock.
    assert action(srv, {"lock": None}, token=ADMIN_TOKEN).status == 202
    assert fault(action(srv, {"unlock": None}), 403) == (
        "Policy doesn't allow os_compute_api:os-lock-server:unlock:unlock_override to be performed.")
    # Before 2.73 the body of lock is not looked at.
    assert action(srv, {"unlock": None}, token=ADMIN_TOKEN).status == 202
    assert action(srv, {"lock": {"locked_reason": "x"}}, version="2.72").status == 202
    assert show(srv, U, "2.73")["locked_reason"] is None


def test_delete(srv: Server) -> None:
    put_server(srv)
    r = cmd(srv, "DELETE", f"/v2.1/servers/{U}")
    assert (r.status, r.body) == (204, b"")
    v = show(srv, U, "2.3")
    assert (v["status"], v["OS-EXT-STS:task_state"]) == ("ACTIVE", "deleting")
    assert last_payload(srv)["action"] == "delete"


def test_update(srv: Server) -> None:
    put_server(srv)
    r = cmd(srv, "PUT", f"/v2.1/servers/{U}", {"server": {"name": "renamed"}})
    assert r.status == 200
    body = r.json()["server"]
    assert body["name"] == "renamed" and body["id"] == U
    want = sample("servers/server-update-resp.json")["server"]
    assert sorted(body) == sorted(want)
    assert show(srv, U)["name"] == "renamed"
    assert last_payload(srv)["action"] == "update" and last_payload(srv)["name"] == "renamed"
    assert fault(cmd(srv, "PUT", f"/v2.1/servers/{U}", {"server": {"description": "d"}}), 400).endswith(
        "('description' was unexpected)")
    r = cmd(srv, "PUT", f"/v2.1/servers/{U}", {"server": {"description": "d"}}, version="2.19")
    assert r.status == 200 and r.json()["server"]["description"] == "d"
    r = cmd(srv, "PUT", f"/v2.1/servers/{U}", {"server": {"hostname": "new-host"}}, version="2.90")
    assert r.status == 200 and r.json()["server"]["OS-EXT-SRV-ATTR:hostname"] == "new-host"
    assert fault(cmd(srv, "PUT", f"/v2.1/servers/{U}", {"server": {"name": " x"}}), 400).startswith(
        "An invalid 'name' value")


def test_resize_confirm_revert(srv: Server) -> None:
    put_server(srv)  # flavor id "1" in the sample record
    assert fault(action(srv, {"resize": {"flavorRef": "1"}}), 400) == (
        "When resizing, instances must change flavor!")
    assert fault(action(srv, {"resize": {"flavorRef": "99"}}), 400) == "Unable to locate requested flavor."
    assert fault(action(srv, {"resize": {"flavorRef": "6"}}), 400) == (
        "Resizing to a smaller disk flavor is not allowed.")
    assert fault(action(srv, {"resize": {}}), 400).endswith("'flavorRef' is a required property")
    r = action(srv, {"resize": {"flavorRef": "2"}})
    assert r.status == 202
    assert show(srv, U)["status"] == "RESIZE"
    p = last_payload(srv)
    assert p["action"] == "resize" and p["flavor"]["id"] == "2" and p["flavor"]["ram"] == 2048
    # The cell finished: VERIFY_RESIZE.
    put_server(srv, version=2, vm_state="resized", done_commands=[outbox(srv)[-1]["id"]])
    assert show(srv, U)["status"] == "VERIFY_RESIZE"
    r = action(srv, {"revertResize": None})
    assert r.status == 202 and show(srv, U)["status"] == "REVERT_RESIZE"
    put_server(srv, version=3, vm_state="resized", done_commands=[outbox(srv)[-1]["id"]])
    r = action(srv, {"confirmResize": None})
    assert (r.status, r.body) == (204, b"")
    assert last_payload(srv)["action"] == "confirmResize"


def test_rebuild(srv: Server) -> None:
    put_server(srv)
    r = action(srv, {"rebuild": {"imageRef": IMAGE, "name": "rebuilt", "adminPass": "secret"}})
    assert r.status == 202
    body = r.json()["server"]
    assert body["adminPass"] == "secret" and body["status"] == "REBUILD" and body["name"] == "rebuilt"
    want = sample("servers/server-action-rebuild-resp.json")["server"]
    assert sorted(body) == sorted(want)
    p = last_payload(srv)
    assert (p["action"], p["image_ref"], p["name"]) == ("rebuild", IMAGE, "rebuilt")
    assert fault(action(srv, {"rebuild": {"imageRef": IMAGE}}), 409) == (
        f"Cannot 'rebuild' instance {U} while it is in task_state rebuilding")
    missing = "c0ffee00-0000-4000-8000-000000000000"
    put_server(srv, version=2, done_commands=[outbox(srv)[-1]["id"]])
    assert fault(action(srv, {"rebuild": {"imageRef": missing}}), 400) == (
        f"Image {missing} could not be found.")
    assert fault(action(srv, {"rebuild": {"name": "x"}}), 400).endswith(
        "'imageRef' is a required property")


def test_create_image(srv: Server) -> None:
    put_server(srv)
    r = action(srv, {"createImage": {"name": "snap", "metadata": {"k": "v"}}}, version="2.45")
    assert r.status == 202
    image_id = r.json()["image_id"]
    assert UUID_RE.match(image_id)
    assert show(srv, U, "2.3")["OS-EXT-STS:task_state"] == "image_snapshot"
    with srv.plan.context.store.read() as rd:
        img = rd.image(image_id)
    assert img is not None and img["name"] == "snap" and img["properties"]["k"] == "v"
    assert last_payload(srv)["image_id"] == image_id
    put_server(srv, version=2, done_commands=[outbox(srv)[-1]["id"]])
    r = action(srv, {"createImage": {"name": "snap2"}}, version="2.44")
    assert (r.status, r.body) == (202, b"")
    assert re.fullmatch(r"http://compute\.test:9292/images/[0-9a-f-]{36}", r["Location"])
    assert fault(action(srv, {"createImage": {}}), 400).endswith("'name' is a required property")


# -- the fast acceptance path of create bodies ---------------------------------------------------
_text = st.one_of(st.text(max_size=8), st.sampled_from(
    ["vm", " vm", "vm ", "a" * 256, "", "x\n", "\u00a0y", "ok name", "k:e.y-_ 1"]))
_value = st.one_of(_text, st.integers(-2, 2), st.booleans(), st.none(),
                   st.sampled_from([IMAGE, IMAGE.upper(), "none", "auto", "1"]),
                   st.dictionaries(_text, st.one_of(_text, st.integers()), max_size=3),
                   st.lists(_text, max_size=2))
_keys = st.sampled_from(["name", "flavorRef", "imageRef", "networks", "key_name",
                         "availability_zone", "metadata", "adminPass", "description", "tags",
                         "min_count", "other"])


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(server=st.dictionaries(_keys, _value, max_size=7), version=st.sampled_from([1, 19, 36, 37, 90]),
       wrap=st.booleans())
def test_fast_create_path_never_accepts_what_the_schema_refuses(
        server: dict[str, Any], version: int, wrap: bool) -> None:
    body: Any = {"server": server} if wrap else server
    if fast_create_ok(body, version):
        CREATE(version).validate(body)  # must not raise


def test_fast_create_path_takes_the_common_bodies() -> None:
    assert fast_create_ok(create_body(), 1)
    assert fast_create_ok(create_body(networks="none", metadata={"a": "b"}, key_name="k"), 37)
    assert not fast_create_ok(create_body(), 37)  # networks missing: the schema's message
    assert not fast_create_ok(create_body(networks=[]), 37)  # lists: the schema decides


def test_create_on_a_requested_host_2_74(srv: Server) -> None:
    assert fault(create(srv, "2.74", host="c2-h1", networks="none"), 403) == (
        "Policy doesn't allow compute:servers:create:requested_destination to be performed.")
    assert fault(create(srv, "2.74", ADMIN_TOKEN, host="nowhere", networks="none"), 400) == (
        "Compute host nowhere could not be found.")
    assert fault(create(srv, "2.73", ADMIN_TOKEN, host="c2-h1", networks="none"), 400).endswith(
        "('host' was unexpected)")
    assert create(srv, "2.74", ADMIN_TOKEN, host="c2-h1", networks="none").status == 202
    (entry,) = outbox(srv)
    assert (entry["cell"], entry["payload"]["host"]) == ("cell2", "c2-h1")


def test_content_type(srv: Server) -> None:
    raw = json.dumps(create_body()).encode()
    store = srv.plan.context.store
    writes = store.write_txns
    r = srv.exchange(request("/v2.1/servers", f"X-Auth-Token: {TOKEN}", "Content-Type: text/plain",
                             method="POST", body=raw)).wait(1)[0]
    assert (r.status, r.json()) == (415, {"badMediaType": {"code": 415, "message": "Unsupported Content-Type"}})
    assert store.write_txns == writes
    r = srv.exchange(request("/v2.1/servers", f"X-Auth-Token: {TOKEN}",
                             "Content-Type: application/json; charset=UTF-8",
                             method="POST", body=raw)).wait(1)[0]
    assert r.status == 202
    r = srv.exchange(request("/v2.1/servers", f"X-Auth-Token: {TOKEN}", method="POST",
                             body=raw)).wait(1)[0]
    assert r.status == 202  # no Content-Type: JSON


def test_create_forced_host_through_the_zone(srv: Server) -> None:
    assert fault(create(srv, availability_zone="nova:c2-h1"), 403) == (
        "Policy doesn't allow os_compute_api:servers:create:forced_host to be performed.")
    assert fault(create(srv, token=ADMIN_TOKEN, availability_zone="nova:nowhere"), 400) == (
        "Compute host nowhere could not be found.")
    assert create(srv, token=ADMIN_TOKEN, availability_zone="nova:c2-h1").status == 202
    assert create(srv, token=ADMIN_TOKEN, availability_zone=":c1-h1").status == 202
    assert [(e["cell"], e["payload"]["host"]) for e in outbox(srv)] == [
        ("cell2", "c2-h1"), ("cell1", "c1-h1")]


def test_command_id_is_the_answers_request_id(srv: Server) -> None:
    """docs/commands.md: the command id is the id the client saw on the 202/204, so the
    instance action a client looks up by its request id is this command's."""
    r = create(srv)
    (entry,) = outbox(srv)
    assert r.header("X-OpenStack-Request-ID") == entry["id"]
    assert r.header("X-Compute-Request-ID") == entry["id"]
    put_server(srv)
    r = action(srv, {"reboot": {"type": "SOFT"}})
    assert r.header("X-OpenStack-Request-ID") == outbox(srv)[-1]["id"]
    # Requests that take no id still get a fresh one each.
    a = get(srv, f"/v2.1/servers/{U}").header("X-OpenStack-Request-ID")
    b = get(srv, f"/v2.1/servers/{U}").header("X-OpenStack-Request-ID")
    assert a != b and a.startswith("req-")


def test_instance_actions_list_at_once(srv: Server) -> None:
    """Nova records the instance action in the API: it lists right after the command."""
    r = create(srv)
    uid = r.json()["server"]["id"]
    acts = get(srv, f"/v2.1/servers/{uid}/os-instance-actions").json()["instanceActions"]
    assert [(a["action"], a["request_id"]) for a in acts] == [("create", outbox(srv)[0]["id"])]
    put_server(srv)
    action(srv, {"reboot": {"type": "SOFT"}})
    rid = outbox(srv)[-1]["id"]
    acts = get(srv, f"/v2.1/servers/{U}/os-instance-actions").json()["instanceActions"]
    assert (acts[0]["action"], acts[0]["request_id"], acts[0]["user_id"]) == ("reboot", rid, "fake")
    one = get(srv, f"/v2.1/servers/{U}/os-instance-actions/{rid}").json()["instanceAction"]
    assert one["action"] == "reboot"
    # The cell's own entry (with its events) replaces the prediction; no duplicate.
    cell_action = {"request_id": rid, "action": "reboot", "project_id": PROJECT, "user_id": "fake",
                   "start_time": 1, "updated_at": 2, "message": None,
                   "events": [{"event": "compute_reboot_instance", "start_time": 1,
                               "finish_time": None, "result": None, "traceback": None,
                               "host": None, "details": None}]}
    put_server(srv, version=2, actions=[cell_action])
    acts = get(srv, f"/v2.1/servers/{U}/os-instance-actions").json()["instanceActions"]
    assert [a["request_id"] for a in acts] == [rid]
    # An update records none (as Nova).
    cmd(srv, "PUT", f"/v2.1/servers/{U}", {"server": {"name": "n"}})
    acts = get(srv, f"/v2.1/servers/{U}/os-instance-actions").json()["instanceActions"]
    assert [a["request_id"] for a in acts] == [rid]

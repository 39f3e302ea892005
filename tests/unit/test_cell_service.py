"""The cell service's commands of issue 7 (docs/commands.md "Inbox payloads"), on a real SQLite
cell with the simulated driver; time is passed in."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fastpath.cell import SqliteCellDB
from fastpath.cell.driver import NO_VALID_HOST, HostSpec
from fastpath.cell.service import CellService
from tests.unit.cell_support import cell_db, make_service

U1 = "11111111-1111-4111-8111-111111111111"
U2 = "22222222-2222-4222-8222-222222222222"
U3 = "33333333-3333-4333-8333-333333333333"
SMALL: dict[str, Any] = {"id": "1", "name": "m1.small", "vcpus": 2, "ram": 2048, "disk": 20, "ephemeral": 0,
         "swap": 0, "extra_specs": {}}
BIG: dict[str, Any] = {"id": "2", "name": "m1.big", "vcpus": 4, "ram": 4096, "disk": 40, "ephemeral": 0,
       "swap": 0, "extra_specs": {"hw:cpu_policy": "shared"}}
T0 = 1_700_000_000.0


@pytest.fixture()
def db(tmp_path: Path) -> Iterator[SqliteCellDB]:
    yield from cell_db(tmp_path)


def make(db: SqliteCellDB, hosts: list[HostSpec] | None = None, **kw: Any) -> CellService:
    kw.setdefault("build_delay", 0.0)
    kw.setdefault("action_delay", 1.0)
    return make_service(db, hosts, **kw)


class Clock:
    def __init__(self) -> None:
        self.t = T0


def send(db: SqliteCellDB, cid: str, uuid: str, action: str, **extra: Any) -> None:
    payload = {"action": action, "project_id": "p1", "user_id": "u1", "request_id": cid, **extra}
    assert db.accept_command(cid, payload, uuid)


def create(db: SqliteCellDB, uuid: str = U1, cid: str | None = None, host: str | None = None,
           flavor: dict[str, Any] | None = None) -> None:
    send(db, cid or f"c-{uuid[:4]}", uuid, "create", host=host, server={
        "uuid": uuid, "project_id": "p1", "user_id": "u1", "name": "vm",
        "flavor": flavor or SMALL, "image_ref": "img-1", "metadata": {"a": "1"},
        "tags": ["t1"], "created_at": int(T0 * 1e6)})


def settle(svc: SqliteCellDB | CellService, db: SqliteCellDB, clock: Clock,
           observe: str = U1) -> list[str | None]:
    """Step one second at a time until idle; the task_states ``observe`` showed."""
    assert isinstance(svc, CellService)
    seen: list[str | None] = []
    for _ in range(100):
        svc.step(clock.t)
        rows = db.load_instance(observe)
        if rows is not None and (not seen or seen[-1] != rows["instance"]["task_state"]):
            seen.append(rows["instance"]["task_state"])
        if not db.pending_commands() and svc.next_due() is None:
            return seen
        clock.t += 1
    raise AssertionError("the service did not settle")


def inst(db: SqliteCellDB, uuid: str = U1) -> dict[str, Any]:
    rows = db.load_instance(uuid)
    assert rows is not None
    return rows


def state(db: SqliteCellDB, uuid: str = U1) -> tuple[str, str | None, int]:
    i = inst(db, uuid)["instance"]
    return i["vm_state"], i["task_state"], i["power_state"]


def finished(db: SqliteCellDB, cid: str) -> str:
    row = db._conn.execute("SELECT state FROM inbox WHERE command_id = ?", (cid,)).fetchone()
    return str(row[0])


def actions(db: SqliteCellDB, uuid: str = U1) -> list[dict[str, Any]]:
    """The server's instance actions, newest first, each with its events."""
    c = db._conn
    out = []
    for aid, action, message in c.execute(
            "SELECT id, action, message FROM instance_actions WHERE instance_uuid = ?"
            " ORDER BY start_time DESC, id DESC", (uuid,)).fetchall():
        events = [{"event": e, "result": r} for e, r in c.execute(
            "SELECT event, result FROM instance_actions_events WHERE action_id = ?"
            " ORDER BY id", (aid,))]
        out.append({"action": action, "message": message, "events": events})
    return out


def usage(db: SqliteCellDB) -> dict[str, tuple[int, int, int]]:
    out = {}
    for name in ("c1", "c2"):
        h = db.host(name)
        if h is not None:
            out[name] = (h["vcpus_used"], h["ram_mb_used"], h["disk_gb_used"])
    return out


@pytest.fixture()
def active(db: SqliteCellDB) -> tuple[CellService, Clock]:
    svc, clock = make(db), Clock()
    create(db)
    settle(svc, db, clock)
    assert state(db) == ("active", None, 1)
    return svc, clock


def test_create_uses_the_scheduled_host_when_it_has_room(db: SqliteCellDB) -> None:
    svc, clock = make(db), Clock()
    create(db, U1, host="c1")  # c2 has more free RAM, but the API chose c1
    create(db, U2, host="c1")
    create(db, U3, host="c1")  # c1 is full: another host, not an error
    settle(svc, db, clock)
    assert [inst(db, u)["instance"]["host"] for u in (U1, U2, U3)] == ["c1", "c1", "c2"]
    assert all(state(db, u)[0] == "active" for u in (U1, U2, U3))
    assert usage(db) == {"c1": (4, 4096, 40), "c2": (2, 2048, 20)}


def test_create_with_no_room_anywhere_is_an_error_row_not_a_silent_refusal(
        db: SqliteCellDB) -> None:
    svc, clock = make(db, hosts=[HostSpec("c1", 2, 2048, 20)]), Clock()
    create(db, U1, host="c1", flavor=BIG)
    settle(svc, db, clock)
    rows = inst(db, U1)
    assert state(db, U1) == ("error", None, 0) and rows["instance"]["host"] is None
    assert rows["fault"]["message"] == NO_VALID_HOST
    assert rows["done_commands"] == ["c-1111"] and finished(db, "c-1111") == "failed"


def test_lock_and_unlock_in_one_phase(db: SqliteCellDB,
                                      active: tuple[CellService, Clock]) -> None:
    svc, clock = active
    v = inst(db)["instance"]["version"]
    send(db, "l1", U1, "lock", reason="maintenance", locked_by="admin")
    assert svc.step(clock.t) == 1
    i = inst(db)["instance"]
    assert (i["locked"], i["locked_by"], i["locked_reason"]) == (True, "admin", "maintenance")
    assert i["version"] == v + 1 and finished(db, "l1") == "done"
    send(db, "l2", U1, "unlock")
    svc.step(clock.t)
    i = inst(db)["instance"]
    assert (i["locked"], i["locked_by"], i["locked_reason"]) == (False, None, None)
    assert inst(db)["done_commands"][-2:] == ["l1", "l2"]
    assert [a["action"] for a in actions(db)][:2] == ["unlock", "lock"]


def test_update_metadata_and_tags(db: SqliteCellDB, active: tuple[CellService, Clock]) -> None:
    svc, clock = active
    send(db, "u1", U1, "update", name="renamed", description="d", hostname="h-1")
    send(db, "m1", U1, "metadata", op="merge", metadata={"b": "2"})
    send(db, "m2", U1, "metadata", op="set", key="c", value="3")
    send(db, "m3", U1, "metadata", op="delete", key="a")
    send(db, "t1", U1, "tags", op="add", tag="t2")
    send(db, "t2", U1, "tags", op="delete", tag="t1")
    v = inst(db)["instance"]["version"]
    # One change per server per transaction: one command per step, each its own version.
    assert [svc.step(clock.t) for _ in range(7)] == [1, 1, 1, 1, 1, 1, 0]
    assert inst(db)["instance"]["version"] == v + 6
    rows = inst(db)
    i = rows["instance"]
    assert (i["name"], i["description"], i["hostname"]) == ("renamed", "d", "h-1")
    assert rows["metadata"] == {"b": "2", "c": "3"} and rows["tags"] == ["t2"]
    send(db, "m4", U1, "metadata", op="replace", metadata={"z": "9"})
    send(db, "t3", U1, "tags", op="replace", tags=["x", "y"])
    settle(svc, db, clock)
    assert inst(db)["metadata"] == {"z": "9"} and inst(db)["tags"] == ["x", "y"]
    send(db, "t4", U1, "tags", op="clear")
    send(db, "bad", U1, "tags", op="explode")
    settle(svc, db, clock)
    assert inst(db)["tags"] == [] and finished(db, "bad") == "failed"
    assert all(finished(db, c) == "done" for c in ("u1", "m1", "m2", "m3", "t1", "t2", "t3"))
    # Nova records no instance action for these (only the create, and the refused one).
    assert [a["action"] for a in actions(db)] == ["tags", "create"]


def test_resize_then_confirm(db: SqliteCellDB, active: tuple[CellService, Clock]) -> None:
    svc, clock = active
    assert usage(db) == {"c1": (0, 0, 0), "c2": (2, 2048, 20)}
    send(db, "r1", U1, "resize", flavor=BIG)
    seen = settle(svc, db, clock)
    assert seen == ["resize_prep", "resize_migrating", "resize_finish", None]
    rows = inst(db)
    assert state(db) == ("resized", None, 1)
    assert rows["flavor"]["flavor_id"] == "2" and rows["flavor"]["extra_specs"] == BIG["extra_specs"]
    assert rows["instance"]["host"] == "c2"  # the same host had room
    assert usage(db)["c2"] == (6, 6144, 60)  # old and new claims held until confirmed
    send(db, "r2", U1, "confirmResize")
    svc.step(clock.t)
    assert state(db) == ("active", None, 1)
    assert usage(db)["c2"] == (4, 4096, 40)
    assert finished(db, "r1") == finished(db, "r2") == "done"
    events = {a["action"]: [e["event"] for e in a["events"]] for a in actions(db)}
    assert events["resize"] == ["compute_resize_instance"]
    assert events["confirmResize"] == ["compute_confirm_resize"]


def test_resize_then_revert_restores_the_old_flavor(
        db: SqliteCellDB, active: tuple[CellService, Clock]) -> None:
    svc, clock = active
    send(db, "s1", U1, "stop")
    send(db, "r1", U1, "resize", flavor=BIG)
    settle(svc, db, clock)
    assert state(db) == ("resized", None, 4)
    send(db, "r2", U1, "revertResize")
    seen = settle(svc, db, clock)
    assert seen == ["resize_reverting", None]
    assert state(db) == ("stopped", None, 4)  # a stopped server comes back stopped
    assert inst(db)["flavor"]["flavor_id"] == "1"
    assert usage(db)["c2"] == (2, 2048, 20)
    send(db, "r3", U1, "revertResize")  # nothing to revert any more
    svc.step(clock.t)
    assert finished(db, "r3") == "failed" and state(db) == ("stopped", None, 4)


def test_resize_to_another_host_and_no_room(db: SqliteCellDB) -> None:
    svc, clock = make(db, hosts=[HostSpec("c1", 4, 8192, 100), HostSpec("c2", 2, 4096, 40)]), \
        Clock()
    create(db, U1, host="c2")
    settle(svc, db, clock)
    send(db, "r1", U1, "resize", flavor=BIG)  # c2 cannot hold both: c1
    settle(svc, db, clock)
    assert inst(db)["instance"]["host"] == "c1"
    assert usage(db) == {"c1": (4, 4096, 40), "c2": (2, 2048, 20)}
    send(db, "r2", U1, "confirmResize")
    svc.step(clock.t)
    assert usage(db) == {"c1": (4, 4096, 40), "c2": (0, 0, 0)}
    huge = {**BIG, "id": "3", "vcpus": 64}
    v = inst(db)["instance"]["version"]
    send(db, "r3", U1, "resize", flavor=huge)
    svc.step(clock.t)
    rows = inst(db)
    assert state(db) == ("active", None, 1) and rows["flavor"]["flavor_id"] == "2"
    assert rows["fault"]["message"] == NO_VALID_HOST and finished(db, "r3") == "failed"
    assert rows["instance"]["version"] == v + 1  # the fault and done_commands, one step
    assert usage(db) == {"c1": (4, 4096, 40), "c2": (0, 0, 0)}


def test_rebuild(db: SqliteCellDB, active: tuple[CellService, Clock]) -> None:
    svc, clock = active
    send(db, "b1", U1, "rebuild", image_ref="img-2", name="rebuilt", metadata={"k": "v"})
    seen = settle(svc, db, clock)
    assert seen == ["rebuilding", "rebuild_spawning", None]
    rows = inst(db)
    assert state(db) == ("active", None, 1)
    assert (rows["instance"]["image_ref"], rows["instance"]["name"]) == ("img-2", "rebuilt")
    assert rows["metadata"] == {"k": "v"} and finished(db, "b1") == "done"
    assert rows["instance"]["launched_at"] == int((clock.t) * 1e6)
    send(db, "s1", U1, "stop")
    send(db, "b2", U1, "rebuild", image_ref="img-3")
    settle(svc, db, clock)
    assert state(db) == ("stopped", None, 4) and inst(db)["instance"]["image_ref"] == "img-3"
    assert inst(db)["metadata"] == {"k": "v"} and inst(db)["instance"]["name"] == "rebuilt"


def test_create_image(db: SqliteCellDB, active: tuple[CellService, Clock]) -> None:
    svc, clock = active
    send(db, "i1", U1, "createImage", image_id="img-snap", name="snap")
    seen = settle(svc, db, clock)
    assert seen == ["image_snapshot", "image_pending_upload", None]
    assert state(db) == ("active", None, 1) and finished(db, "i1") == "done"


def test_a_failed_snapshot_leaves_the_server_as_it_was(db: SqliteCellDB) -> None:
    svc, clock = make(db), Clock()
    create(db)
    settle(svc, db, clock)
    svc.driver.failure_rate = 1.0  # type: ignore[attr-defined]
    send(db, "i1", U1, "createImage", image_id="img-snap", name="snap")
    settle(svc, db, clock)
    rows = inst(db)
    assert state(db) == ("active", None, 1) and "snapshot" in rows["fault"]["message"]
    assert finished(db, "i1") == "failed"
    assert actions(db)[0]["message"] == "Error"


@pytest.mark.parametrize("action,extra", [
    ("start", {}), ("unpause", {}), ("resume", {}), ("confirmResize", {}),
    ("revertResize", {}), ("resize", {}), ("rebuild", {}),
])
def test_conflicting_or_bad_commands_fail_without_change_but_finish(
        db: SqliteCellDB, active: tuple[CellService, Clock], action: str,
        extra: dict[str, Any]) -> None:
    svc, clock = active
    before = inst(db)
    send(db, "x1", U1, action, **extra)
    svc.step(clock.t)
    after = inst(db)
    assert finished(db, "x1") == "failed" and after["done_commands"][-1] == "x1"
    for k in ("vm_state", "task_state", "power_state", "image_ref", "host"):
        assert after["instance"][k] == before["instance"][k]
    assert after["flavor"] == before["flavor"]
    assert actions(db)[0]["action"] == action and actions(db)[0]["message"] == "Error"
    assert svc.step(clock.t + 10) == 0  # finished exactly once


def test_commands_for_a_deleted_server_fail(db: SqliteCellDB,
                                            active: tuple[CellService, Clock]) -> None:
    svc, clock = active
    send(db, "d1", U1, "delete")
    send(db, "l1", U1, "lock")
    settle(svc, db, clock)
    assert state(db)[0] == "deleted" and finished(db, "l1") == "failed"
    assert inst(db)["instance"]["locked"] is False


def test_a_restarted_driver_takes_its_claims_back(db: SqliteCellDB) -> None:
    svc, clock = make(db), Clock()
    create(db, U1)
    create(db, U2)
    settle(svc, db, clock)
    send(db, "r1", U2, "resize", flavor=BIG)
    settle(svc, db, clock, observe=U2)
    before = usage(db)
    ips = {inst(db, u)["ips"][0]["addr"] for u in (U1, U2)}
    macs = {inst(db, u)["vifs"][0]["mac"] for u in (U1, U2)}

    svc2 = make(db)  # a new process: the driver starts empty and restores from the database
    assert usage(db) == before
    create(db, U3, cid="c3")
    settle(svc2, db, clock, observe=U3)
    ip3 = inst(db, U3)["ips"][0]["addr"]
    assert ip3 not in ips and inst(db, U3)["vifs"][0]["mac"] not in macs
    assert ipaddress.ip_address(ip3) in ipaddress.ip_network("192.168.7.0/24")
    # The unconfirmed resize still holds both claims: confirming releases the old one.
    send(db, "r2", U2, "confirmResize")
    settle(svc2, db, clock, observe=U2)
    host2 = inst(db, U2)["instance"]["host"]
    total = {h: sum(x) for h, x in usage(db).items()}
    expect = {"c1": 0, "c2": 0}
    for u, f in ((U1, SMALL), (U2, BIG), (U3, SMALL)):
        h = inst(db, u)["instance"]["host"]
        expect[h] += f["vcpus"] + f["ram"] + f["disk"]
    assert total == expect and host2 in expect
    # Deleting a restored server gives its address back for the next one.
    ip1 = inst(db, U1)["ips"][0]["addr"]
    send(db, "d1", U1, "delete")
    settle(svc2, db, clock)
    u4 = "44444444-4444-4444-8444-444444444444"
    create(db, u4, cid="c4")
    settle(svc2, db, clock, observe=u4)
    assert inst(db, u4)["ips"][0]["addr"] == ip1


def test_a_restart_mid_phase_resumes_the_command_once(db: SqliteCellDB) -> None:
    svc, clock = make(db), Clock()
    create(db)
    settle(svc, db, clock)
    send(db, "r1", U1, "resize", flavor=BIG)
    svc.step(clock.t)
    clock.t += 1
    svc.step(clock.t)
    assert state(db)[1] == "resize_migrating"
    svc2 = make(db)  # the first service died with the phase in memory
    seen = settle(svc2, db, clock)
    assert seen[0] == "resize_migrating" and state(db) == ("resized", None, 1)
    assert usage(db)["c2"] == (6, 6144, 60)
    resize = [a for a in actions(db) if a["action"] == "resize"]
    assert len(resize) == 1 and len(resize[0]["events"]) == 1
    assert resize[0]["events"][0]["result"] == "Success"
    assert inst(db)["done_commands"].count("r1") == 1


def test_create_with_networks_none_gets_no_address(db: SqliteCellDB) -> None:
    svc, clock = make(db), Clock()
    send(db, "n1", U1, "create", networks="none", server={
        "uuid": U1, "project_id": "p1", "user_id": "u1", "name": "vm", "flavor": SMALL})
    create(db, U2)
    settle(svc, db, clock)
    assert state(db, U1) == ("active", None, 1)
    assert inst(db, U1)["ips"] == [] and inst(db, U1)["vifs"] == []
    assert inst(db, U2)["ips"][0]["addr"] == "192.168.7.2"  # the first address is still free


def test_update_and_rebuild_take_every_field_the_api_sends(
        db: SqliteCellDB, active: tuple[CellService, Clock]) -> None:
    svc, clock = active
    send(db, "u1", U1, "update", access_ip_v4="10.9.9.9", access_ip_v6=None,
         disk_config="AUTO", description=None)
    send(db, "u2", U1, "update", name=None)  # the cell never writes a null name
    settle(svc, db, clock)
    i = inst(db)["instance"]
    assert (i["access_ip_v4"], i["disk_config"], i["description"], i["name"]) == \
        ("10.9.9.9", "AUTO", None, "vm")
    assert finished(db, "u1") == "done" and finished(db, "u2") == "failed"
    send(db, "b1", U1, "rebuild", image_ref="img-2", key_name="k2", user_data="ZGF0YQ==",
         image_properties={"os_distro": "debian"}, trusted_image_certificates=["c1"])
    settle(svc, db, clock)
    rows = inst(db)
    assert (rows["instance"]["key_name"], rows["instance"]["user_data"]) == ("k2", "ZGF0YQ==")
    assert rows["extra"]["image_properties"] == {"os_distro": "debian"}
    assert rows["extra"]["trusted_certs"] == ["c1"]
    send(db, "r1", U1, "resize", flavor=BIG, disk_config="MANUAL")
    settle(svc, db, clock)
    assert inst(db)["instance"]["disk_config"] == "MANUAL"
    assert state(db) == ("resized", None, 1)


def test_a_refused_resize_holds_no_claim(db: SqliteCellDB,
                                         active: tuple[CellService, Clock]) -> None:
    svc, clock = active
    before = usage(db)
    send(db, "r1", U1, "resize", flavor=BIG, disk_config=7)  # not a string
    send(db, "r2", U1, "resize", flavor={"id": "9", "name": "broken"})  # no vcpus/ram/disk
    settle(svc, db, clock)
    assert finished(db, "r1") == finished(db, "r2") == "failed"
    assert state(db) == ("active", None, 1) and usage(db) == before
    assert svc.driver.hosts_of(U1) == ["c2"]

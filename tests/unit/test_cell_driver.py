"""The simulated compute driver and the cell service's state machine (fastpath.cell.service)."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fastpath.cell import SqliteCellDB
from fastpath.cell.driver import NO_VALID_HOST, DriverFault, HostSpec, SimulatedDriver
from fastpath.cell.service import CellService
from tests.unit.cell_support import cell_db, make_service

U1 = "11111111-1111-4111-8111-111111111111"
U2 = "22222222-2222-4222-8222-222222222222"
FLAVOR = {"id": "1", "name": "m1.small", "vcpus": 2, "ram": 2048, "disk": 20, "ephemeral": 0,
          "swap": 0, "extra_specs": {}}
T0 = 1_700_000_000.0


@pytest.fixture()
def db(tmp_path: Path) -> Iterator[SqliteCellDB]:
    yield from cell_db(tmp_path)


def make(db: SqliteCellDB, hosts: list[HostSpec] | None = None, **kw: Any) -> CellService:
    kw.setdefault("build_delay", 5.0)
    kw.setdefault("action_delay", 2.0)
    return make_service(db, hosts, **kw)


def create(db: SqliteCellDB, uuid: str = U1, cid: str = "req-c1") -> None:
    db.accept_command(cid, {"action": "create", "server": {
        "uuid": uuid, "project_id": "p1", "user_id": "u1", "name": "vm", "flavor": FLAVOR}},
        uuid)


def inst(db: SqliteCellDB, uuid: str = U1) -> dict[str, Any]:
    rows = db.load_instance(uuid)
    assert rows is not None
    return rows


def test_driver_places_most_free_ram_and_releases() -> None:
    d = SimulatedDriver([HostSpec("a", 4, 4096, 100), HostSpec("b", 4, 8192, 100)],
                        ip_pool=ipaddress.ip_network("10.1.0.0/29"), seed=3)
    s1 = d.spawn(U1, FLAVOR)
    assert s1.host == "b" and s1.ip == "10.1.0.2" and s1.mac.startswith("fa:16:3e:")
    s2 = d.spawn(U2, FLAVOR)
    assert s2.host == "b" and s2.ip == "10.1.0.3"  # b still has the most free RAM
    assert d.destroy(U1) == "b" and d.destroy(U1) is None
    assert d.spawn("u3", FLAVOR).ip == "10.1.0.2"  # released addresses come back first
    usage = {u.spec.name: (u.vcpus_used, u.ram_mb_used, u.disk_gb_used) for u in d.hosts()}
    assert usage == {"a": (0, 0, 0), "b": (4, 4096, 40)}
    with pytest.raises(DriverFault):
        d.reboot("nope")


def test_create_goes_build_then_active_with_ip_and_host(db: SqliteCellDB) -> None:
    svc = make(db)
    create(db)
    assert svc.step(T0) == 1
    rows = inst(db)
    i = rows["instance"]
    assert (i["vm_state"], i["task_state"], i["power_state"]) == ("building", "spawning", 0)
    assert i["host"] == "c2" and rows["ips"] == []
    assert db.host("c2")["vcpus_used"] == 2  # type: ignore[index]
    assert svc.step(T0 + 4.9) == 0
    assert svc.step(T0 + 5) == 1
    rows = inst(db)
    i = rows["instance"]
    assert (i["vm_state"], i["task_state"], i["power_state"]) == ("active", None, 1)
    assert (i["host"], i["node"], i["launched_at"]) == ("c2", "c2", int((T0 + 5) * 1e6))
    ip = rows["ips"][0]["addr"]
    assert ipaddress.ip_address(ip) in ipaddress.ip_network("192.168.7.0/24")
    assert rows["vifs"][0]["mac"].startswith("fa:16:3e:")
    assert rows["done_commands"] == ["req-c1"]
    assert db.pending_commands() == []
    assert [v for _, _, v, _ in db.changes_after(0, 100)] == [1, 2]


def test_no_capacity_is_error_with_no_valid_host(db: SqliteCellDB) -> None:
    svc = make(db, hosts=[HostSpec("tiny", 2, 2048, 20)], build_delay=0.0)
    create(db, U1, "c1")
    create(db, U2, "c2")
    svc.step(T0)
    assert inst(db, U1)["instance"]["vm_state"] == "active"
    rows = inst(db, U2)
    assert rows["instance"]["vm_state"] == "error" and rows["instance"]["host"] is None
    assert rows["fault"]["message"] == NO_VALID_HOST and rows["fault"]["code"] == 500
    assert rows["done_commands"] == ["c2"]


def test_injected_failure_is_error_with_fault(db: SqliteCellDB) -> None:
    svc = make(db, failure_rate=1.0)
    create(db)
    svc.step(T0)
    assert inst(db)["instance"]["vm_state"] == "building"
    svc.step(T0 + 5)
    rows = inst(db)
    assert (rows["instance"]["vm_state"], rows["instance"]["task_state"]) == ("error", None)
    assert "Simulated failure" in rows["fault"]["message"]
    assert db.host("c2")["vcpus_used"] == 0  # type: ignore[index]


def test_reboot_stop_start_delete_with_task_states_midway(db: SqliteCellDB) -> None:
    svc = make(db, build_delay=0.0)
    create(db)
    svc.step(T0)
    t = T0
    for cid, payload, mid, end in [
        ("r1", {"action": "reboot", "type": "HARD"}, "rebooting_hard", ("active", 1)),
        ("s1", {"action": "stop"}, "powering-off", ("stopped", 4)),
        ("s2", {"action": "start"}, "powering-on", ("active", 1)),
        ("p1", {"action": "pause"}, "pausing", ("paused", 3)),
        ("p2", {"action": "unpause"}, "unpausing", ("active", 1)),
    ]:
        db.accept_command(cid, payload, U1)
        t += 10
        svc.step(t)
        assert inst(db)["instance"]["task_state"] == mid
        svc.step(t + 1)
        assert inst(db)["instance"]["task_state"] == mid
        svc.step(t + 2)
        i = inst(db)["instance"]
        assert (i["vm_state"], i["power_state"], i["task_state"]) == (*end, None)
    db.accept_command("d1", {"action": "delete"}, U1)
    svc.step(t + 10)
    assert inst(db)["instance"]["task_state"] == "deleting"
    svc.step(t + 12)
    i = inst(db)["instance"]
    assert i["vm_state"] == "deleted" and i["deleted_at"] == int((t + 12) * 1e6)
    assert db.host("c2")["vcpus_used"] == 0  # type: ignore[index]
    assert db.all_instance_versions()[0][2] == "delete"
    assert inst(db)["done_commands"][-1] == "d1"


def test_commands_for_one_server_run_in_order(db: SqliteCellDB) -> None:
    svc = make(db)
    create(db)
    db.accept_command("s1", {"action": "stop"}, U1)
    svc.step(T0)  # the stop waits for the build
    assert inst(db)["instance"]["task_state"] == "spawning"
    svc.step(T0 + 5)  # build done, stop taken in the same step
    assert inst(db)["instance"]["task_state"] == "powering-off"
    svc.step(T0 + 7)
    assert inst(db)["instance"]["vm_state"] == "stopped"


def test_invalid_state_fails_the_command_without_change(db: SqliteCellDB) -> None:
    svc = make(db, build_delay=0.0)
    create(db)
    svc.step(T0)
    version = inst(db)["instance"]["version"]
    db.accept_command("x1", {"action": "start"}, U1)  # already active
    svc.step(T0 + 1)
    rows = inst(db)
    assert rows["instance"]["vm_state"] == "active"
    assert "x1" in rows["done_commands"]
    assert rows["instance"]["version"] == version + 1  # only the done_commands change
    assert db.pending_commands() == []


def test_duplicate_command_executes_once(db: SqliteCellDB) -> None:
    svc = make(db, build_delay=0.0, action_delay=0.0)
    create(db)
    svc.step(T0)
    assert db.accept_command("r1", {"action": "reboot"}, U1)
    assert not db.accept_command("r1", {"action": "reboot"}, U1)
    before = len(db.changes_after(0, 100))
    assert svc.step(T0 + 1) == 2
    assert svc.step(T0 + 2) == 0
    assert not db.accept_command("r1", {"action": "reboot"}, U1)
    assert svc.step(T0 + 3) == 0
    assert len(db.changes_after(0, 100)) == before + 2
    conn = db._conn
    assert conn.execute("SELECT COUNT(*) FROM instance_actions WHERE request_id = 'r1'"
                        ).fetchone()[0] == 1
    assert conn.execute("SELECT state FROM inbox WHERE command_id = 'r1'").fetchone()[0] == "done"


def test_every_transition_appends_to_feed_and_bumps_version(db: SqliteCellDB) -> None:
    svc = make(db)
    create(db)
    db.accept_command("s1", {"action": "stop"}, U1)
    db.accept_command("d1", {"action": "delete"}, U1)
    t, seen = T0, []
    while db.pending_commands() or svc.next_due() is not None:
        n = svc.step(t)
        feed = db.changes_after(0, 100)
        if n:
            seen.append((n, feed[-1][2], inst(db)["instance"]["version"]))
        t += 1
    feed = db.changes_after(0, 100)
    assert [v for _, _, v, _ in feed] == list(range(1, len(feed) + 1))
    assert len(feed) == 6  # create, active, powering-off, stopped, deleting, deleted
    assert feed[-1][3] == "delete"
    assert all(fv == iv for _, fv, iv in seen)
    actions = db._conn.execute("SELECT action, message FROM instance_actions ORDER BY id"
                               ).fetchall()
    assert actions == [("create", None), ("stop", None), ("delete", None)]
    events = db._conn.execute("SELECT event, result FROM instance_actions_events ORDER BY id"
                              ).fetchall()
    assert events == [("compute_build_and_run_instance", "Success"),
                      ("compute_stop_instance", "Success"),
                      ("compute_terminate_instance", "Success")]

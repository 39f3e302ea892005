"""GET /servers/{id}/os-instance-actions[/{request_id}]: the cell's instance_actions and
events tables -> projection -> the record's ``actions`` -> Nova's samples at 2.1, 2.21, 2.51,
2.58, 2.62, 2.66 and 2.84; policy, paging and filters, deleted servers; one read transaction
per request (also for every error)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cellsync.projection import project_change, project_record
from fastpath.api.views import render_server
from fastpath.cell import SqliteCellDB
from fastpath.store import Batch, Tombstone
from fastpath.store.record import validate
from fastpath.store.samples import sample_record
from tests.unit.catalog_support import ADMIN_TOKEN, PROJECT, Server, call, fault, sample
from tests.unit.test_projection import cell_values_of

A = "os-instance-actions"


def us(t: str) -> int:
    from fastpath.api.query import parse_isotime

    v = parse_isotime(t)
    assert v is not None
    return v


@pytest.fixture()
def cell(tmp_path: Path) -> Iterator[SqliteCellDB]:
    d = SqliteCellDB(str(tmp_path / "cell.sqlite"))
    yield d
    d.close()


@pytest.fixture()
def srv(make_server: Any) -> Server:
    s: Server = make_server(extra_routes=False)
    return s


def make_server(cell: SqliteCellDB, uuid: str, project: str = PROJECT) -> None:
    rec = sample_record(uuid, project_id=project, seed=3)
    cell.create_instance(cell_values_of(rec))


def record_action(cell: SqliteCellDB, uuid: str, a: dict[str, Any],
                  events: list[dict[str, Any]], message: str | None = None) -> None:
    """One action with its events, in one cell transaction with a state change (as the cell
    service writes them: that steps the server's version)."""
    with cell.transaction():
        cell.update_instance(uuid, task_state=None)
        aid = cell.record_action(uuid, a["request_id"], a["action"], a["project_id"],
                                 a["user_id"], start_time=us(a["start_time"]))
        for e in events:
            cell.add_action_event(aid, e["event"], result=e.get("result"), host=e.get("host"),
                                  traceback=e.get("traceback"), details=e.get("details"),
                                  start_time=us(e["start_time"]),
                                  finish_time=us(e["finish_time"]) if e.get("finish_time") else None)
        if message is not None:
            cell.finish_action(aid, message=message)


def sync(srv: Server, cell: SqliteCellDB, uuid: str) -> dict[str, Any]:
    """What cellsync does for one server: load, project, apply; returns the record."""
    rows = cell.load_instance(uuid)
    assert rows is not None
    change = project_change(rows, "cell1")
    srv.plan.context.store.apply(Batch([change]), render_server)
    rec = project_record(rows, "cell1")
    validate(rec)
    return rec


def seed_get_sample(srv: Server, cell: SqliteCellDB, body: dict[str, Any],
                    host: str | None = "compute") -> str:
    """The server and action of a get sample (events as the sample shows them)."""
    a = body["instanceAction"]
    uuid = a["instance_uuid"]
    make_server(cell, uuid)
    record_action(cell, uuid, a, [{"host": host, "details": None, **e} for e in a["events"]])
    sync(srv, cell, uuid)
    return str(uuid)


GET_SAMPLES = [
    # (folder, versions, admin)
    ("", ["2.1", "2.20"], True),
    ("v2.21/", ["2.21", "2.50"], True),
    ("v2.51/", ["2.51", "2.57"], True),
    ("v2.58/", ["2.58", "2.61"], True),
    ("v2.62/", ["2.62", "2.83"], True),
    ("v2.84/", ["2.84", "2.104"], True),
    ("v2.51/", ["2.51", "2.57"], False),
    ("v2.58/", ["2.58", "2.61"], False),
    ("v2.62/", ["2.62", "2.83"], False),
    ("v2.84/", ["2.84", "latest"], False),
]


@pytest.mark.parametrize("folder,versions,admin", GET_SAMPLES)
def test_get_samples(srv: Server, cell: SqliteCellDB, folder: str, versions: list[str],
                     admin: bool) -> None:
    name = "instance-action-get-resp.json" if admin else "instance-action-get-non-admin-resp.json"
    want = sample(f"os-instance-actions/{folder}{name}")
    a = want["instanceAction"]
    # Admin samples show traceback; non-admin ones not: the cell holds it anyway.
    for e in a["events"]:
        e.setdefault("traceback", None)
    uuid = seed_get_sample(srv, cell, {"instanceAction": {
        **a, "events": [{k: v for k, v in e.items() if k not in ("hostId",)} for e in a["events"]]}})
    for e in a["events"]:
        if not admin:
            e.pop("traceback")
    token = ADMIN_TOKEN if admin else f"{a['user_id']}:{PROJECT}"
    for v in versions:
        r = call(srv, f"/v2.1/servers/{uuid}/{A}/{a['request_id']}", token, v)
        assert r.status == 200, r.body
        assert r.json() == want, v


def test_non_admin_sees_no_events_before_251(srv: Server, cell: SqliteCellDB) -> None:
    want = sample("os-instance-actions/v2.21/instance-action-get-resp.json")
    uuid = seed_get_sample(srv, cell, want)
    rid = want["instanceAction"]["request_id"]
    body = call(srv, f"/v2.1/servers/{uuid}/{A}/{rid}", f"fake:{PROJECT}", "2.50").json()
    assert "events" not in body["instanceAction"]
    assert body["instanceAction"]["action"] == "stop"


LIST = "os-instance-actions/{}instance-actions-list-resp.json"


def seed_list_sample(srv: Server, cell: SqliteCellDB, actions: list[dict[str, Any]]) -> str:
    """The actions of a list sample; each action's updated_at (its latest event finish)."""
    uuid = actions[0]["instance_uuid"]
    make_server(cell, uuid)
    for a in reversed(actions):  # oldest first, as they happened
        finish = a.get("updated_at", a["start_time"])
        record_action(cell, uuid, a, [{"event": f"compute_{a['action']}", "result": "Success",
                                      "start_time": a["start_time"], "finish_time": finish}])
    sync(srv, cell, uuid)
    return str(uuid)


@pytest.mark.parametrize("folder,versions", [("", ["2.1", "2.57"]), ("v2.58/", ["2.58", "2.104"])])
def test_list_samples(srv: Server, cell: SqliteCellDB, folder: str, versions: list[str]) -> None:
    want = sample(LIST.format(folder))
    uuid = seed_list_sample(srv, cell, want["instanceActions"])
    user = want["instanceActions"][0]["user_id"]
    for v in versions:
        for token in (ADMIN_TOKEN, f"{user}:{PROJECT}"):
            r = call(srv, f"/v2.1/servers/{uuid}/{A}", token, v)
            assert r.status == 200 and r.json() == want, (v, token)


def test_paging_and_changes_filters(srv: Server, cell: SqliteCellDB) -> None:
    full = sample(LIST.format("v2.58/"))["instanceActions"]
    uuid = seed_list_sample(srv, cell, full)
    stop, create = full
    # limit=1: the newest action and a next link with its request id (the 2.58 sample).
    want = sample("os-instance-actions/v2.58/instance-actions-list-with-limit-resp.json")
    want["links"][0]["href"] = want["links"][0]["href"].replace(
        want["instanceActions"][0]["instance_uuid"], uuid).replace(
        want["instanceActions"][0]["request_id"], stop["request_id"])
    r = call(srv, f"/v2.1/{PROJECT}/servers/{uuid}/{A}?limit=1", ADMIN_TOKEN, "2.58")
    assert r.json() == {"instanceActions": [stop], "links": want["links"]}
    # marker: what follows it (a full page has a next link, as in Nova, even if last).
    r = call(srv, f"/v2.1/servers/{uuid}/{A}?limit=1&marker={stop['request_id']}", ADMIN_TOKEN,
             "2.58")
    assert r.json()["instanceActions"] == [create]
    assert r.json()["links"][0]["href"].endswith(f"?limit=1&marker={create['request_id']}")
    r = call(srv, f"/v2.1/servers/{uuid}/{A}?limit=2&marker={stop['request_id']}", ADMIN_TOKEN,
             "2.58")
    assert r.json() == {"instanceActions": [create]}
    r = call(srv, f"/v2.1/servers/{uuid}/{A}?marker={create['request_id']}", ADMIN_TOKEN, "2.58")
    assert r.json() == {"instanceActions": []}
    r = call(srv, f"/v2.1/servers/{uuid}/{A}?limit=0", ADMIN_TOKEN, "2.58")
    assert r.json() == {"instanceActions": []}
    # changes-since / changes-before on updated_at, bounds included.
    since = stop["updated_at"]
    r = call(srv, f"/v2.1/servers/{uuid}/{A}?changes-since={since}", ADMIN_TOKEN, "2.58")
    assert r.json() == {"instanceActions": [stop]}
    before = create["updated_at"]
    r = call(srv, f"/v2.1/servers/{uuid}/{A}?changes-before={before}", ADMIN_TOKEN, "2.66")
    assert r.json() == {"instanceActions": [create]}
    r = call(srv, f"/v2.1/servers/{uuid}/{A}?changes-since=2018-04-25T01:26:25Z"
                  "&changes-before=2030-01-01T00:00:00Z", ADMIN_TOKEN, "2.66")
    assert r.json() == {"instanceActions": [stop, create]}


def test_query_errors(srv: Server, cell: SqliteCellDB) -> None:
    full = sample(LIST.format("v2.58/"))["instanceActions"]
    uuid = seed_list_sample(srv, cell, full)
    base = f"/v2.1/servers/{uuid}/{A}"
    msg = fault(call(srv, base + "?marker=req-nope", ADMIN_TOKEN, "2.58"), 400)
    assert msg == "Marker None could not be found."  # sic: Nova's actions_get
    r = call(srv, base + "?marker=req-nope&limit=0", ADMIN_TOKEN, "2.58")
    assert r.json() == {"instanceActions": []}  # limit 0 answers before the marker lookup
    msg = fault(call(srv, base + "?limit=-1", ADMIN_TOKEN, "2.58"), 400)
    assert msg.startswith("Invalid input for query parameters limit. Value: -1.")
    msg = fault(call(srv, base + "?changes-since=yesterday", ADMIN_TOKEN, "2.58"), 400)
    assert msg == ("Invalid input for query parameters changes-since. Value: yesterday. "
                   "'yesterday' is not a 'date-time'")
    # changes-before only from 2.66; unknown parameters are refused from 2.58.
    msg = fault(call(srv, base + "?changes-before=2018-01-01T00:00:00Z", ADMIN_TOKEN, "2.65"), 400)
    assert msg == "Additional properties are not allowed ('changes-before' was unexpected)"
    msg = fault(call(srv, base + "?changes-since=2019-01-01T00:00:00Z"
                            "&changes-before=2018-01-01T00:00:00Z", ADMIN_TOKEN, "2.66"), 400)
    assert msg == "The value of changes-since must be less than or equal to changes-before."
    # Before 2.58 the query is not looked at.
    r = call(srv, base + "?limit=1&whatever=1", ADMIN_TOKEN, "2.57")
    assert len(r.json()["instanceActions"]) == 2
    # Shows refuse any query parameter from 2.102.
    rid = full[0]["request_id"]
    fault(call(srv, f"{base}/{rid}?x=1", ADMIN_TOKEN, "2.102"), 400)
    assert call(srv, f"{base}/{rid}?x=1", ADMIN_TOKEN, "2.101").status == 200


def test_not_found_and_other_projects(srv: Server, cell: SqliteCellDB) -> None:
    full = sample(LIST.format("v2.58/"))["instanceActions"]
    uuid = seed_list_sample(srv, cell, full)
    base = f"/v2.1/servers/{uuid}/{A}"
    assert fault(call(srv, base + "/req-none", ADMIN_TOKEN), 404) == "Action req-none not found"
    for bad in ("not-a-uuid", "00000000-0000-4000-8000-000000000000"):
        assert fault(call(srv, f"/v2.1/servers/{bad}/{A}", ADMIN_TOKEN), 404) == (
            f"Instance {bad} could not be found.")
    # Another project's server is not found for a non-admin (list and show).
    assert fault(call(srv, base, "fake:other"), 404) == f"Instance {uuid} could not be found."
    assert fault(call(srv, f"{base}/{full[0]['request_id']}", "fake:other"), 404)
    assert call(srv, base, "admin:other").status == 200


def test_deleted_server_from_221(srv: Server, cell: SqliteCellDB) -> None:
    full = sample(LIST.format(""))["instanceActions"]
    uuid = seed_list_sample(srv, cell, full)
    with cell.transaction():
        cell.delete_instance(uuid, deleted_at=us("2018-04-25T02:00:00"))
    rows = cell.load_instance(uuid)
    assert rows is not None
    change = project_change(rows, "cell1")
    assert isinstance(change, Tombstone)
    srv.plan.context.store.apply(Batch([change]), render_server)
    base = f"/v2.1/servers/{uuid}/{A}"
    assert fault(call(srv, base, ADMIN_TOKEN, "2.20"), 404) == f"Instance {uuid} could not be found."
    r = call(srv, base, ADMIN_TOKEN, "2.21")
    assert r.json() == {"instanceActions": full}
    r = call(srv, f"{base}/{full[0]['request_id']}", f"fake:{PROJECT}", "2.21")
    assert r.json()["instanceAction"]["action"] == "stop"
    assert fault(call(srv, base, "fake:other", "2.21"), 404)


def test_actions_follow_the_cell(srv: Server, cell: SqliteCellDB) -> None:
    """A running action (event open) then finished: updated_at and events follow the cell's
    rows at each version; an error event shows its traceback to admins only."""
    uuid = "5c7b2f3e-8f7a-4a57-9d43-2b7f1f0b6a01"
    make_server(cell, uuid)
    with cell.transaction():
        cell.update_instance(uuid, task_state="rebooting")
        aid = cell.record_action(uuid, "req-r1", "reboot", PROJECT, "fake", start_time=1_000_000)
        eid = cell.add_action_event(aid, "compute_reboot_instance", start_time=2_000_000)
    sync(srv, cell, uuid)
    base = f"/v2.1/servers/{uuid}/{A}/req-r1"
    a = call(srv, base, ADMIN_TOKEN, "2.84").json()["instanceAction"]
    assert a["updated_at"] == "1970-01-01T00:00:02.000000"
    assert a["events"] == [{"event": "compute_reboot_instance",
                            "start_time": "1970-01-01T00:00:02.000000", "finish_time": None,
                            "result": None, "traceback": None, "host": None, "hostId": "",
                            "details": None}]
    with cell.transaction():
        cell.update_instance(uuid, task_state=None, vm_state="error")
        cell.finish_action_event(eid, "Error", "Traceback: boom", finish_time=3_000_000)
        cell.finish_action(aid, message="Error", finish_time=3_000_000)
    sync(srv, cell, uuid)
    a = call(srv, base, ADMIN_TOKEN, "2.84").json()["instanceAction"]
    assert (a["updated_at"], a["message"]) == ("1970-01-01T00:00:03.000000", "Error")
    assert a["events"][0]["result"] == "Error" and a["events"][0]["traceback"] == "Traceback: boom"
    e = call(srv, base, f"fake:{PROJECT}", "2.84").json()["instanceAction"]["events"][0]
    assert "traceback" not in e and "host" not in e and "details" not in e


def test_projection_orders_newest_first(cell: SqliteCellDB) -> None:
    uuid = "5c7b2f3e-8f7a-4a57-9d43-2b7f1f0b6a02"
    make_server(cell, uuid)
    with cell.transaction():
        a1 = cell.record_action(uuid, "req-1", "create", PROJECT, "u", start_time=10)
        cell.add_action_event(a1, "e1", start_time=11, finish_time=12, result="Success")
        cell.add_action_event(a1, "e2", start_time=13, finish_time=None)
        cell.record_action(uuid, "req-2", "stop", PROJECT, "u", start_time=20)
        cell.record_action(uuid, "req-3", "start", PROJECT, "u", start_time=20)
    rows = cell.load_instance(uuid)
    assert rows is not None
    rec = project_record(rows, "cell1")
    assert [a["request_id"] for a in rec["actions"]] == ["req-3", "req-2", "req-1"]
    assert [e["event"] for e in rec["actions"][2]["events"]] == ["e2", "e1"]
    assert rec["actions"][2]["updated_at"] == 13
    assert rec["actions"][0]["updated_at"] == 20 and rec["actions"][0]["events"] == []


def test_end_to_end_through_the_cell(srv: Server, tmp_path: Path) -> None:
    """API command -> outbox -> forwarder -> cell inbox -> cell service -> feed -> cellsync ->
    store: the reboot's action and events come up (GET os-instance-actions), the metadata
    command's pending overlay gives way to the cell's own value, with no flicker."""
    from cellsync.sync import CellSync
    from fastpath.forwarder import Forwarder
    from tests.unit.cell_support import make_service
    from tests.unit.command_support import cmd, get

    data_dir = srv.data_dir
    (Path(data_dir) / "cells").mkdir(exist_ok=True)
    cell = SqliteCellDB(str(Path(data_dir) / "cells" / "cell1.sqlite"))
    store = srv.plan.context.store
    try:
        svc = make_service(cell, build_delay=0.0, action_delay=0.0)
        sync = CellSync(store, {"cell1": cell})
        forwarder = Forwarder(store, data_dir, ring=lambda name: None)
        uuid = "7d2a0a9e-1c1b-4f0e-9a55-0b7e1f2d3c4a"
        flavor = {"id": "1", "name": "m1.small", "vcpus": 1, "ram": 512, "disk": 1,
                  "ephemeral": 0, "swap": 0, "extra_specs": {}}
        cell.accept_command("req-create-1", {
            "action": "create", "project_id": PROJECT, "user_id": "fake",
            "request_id": "req-create-1", "server": {
                "uuid": uuid, "project_id": PROJECT, "user_id": "fake", "name": "vm",
                "flavor": flavor, "image_ref": "img-1", "metadata": {"a": "1"}}}, uuid)

        def settle() -> None:
            for _ in range(20):
                forwarder.run_until_idle()
                svc.step(2e9)
                sync.sync_once("cell1")
                with store.read() as r:
                    rec = r.get_server(uuid)
                    idle = r.count(b"outbox") == 0
                if idle and rec is not None and not rec["pending"] and not cell.pending_commands():
                    return
            raise AssertionError("did not settle")

        settle()
        base = f"/v2.1/servers/{uuid}"
        assert get(srv, base, version="2.84").json()["server"]["status"] == "ACTIVE"
        r = cmd(srv, "POST", base + "/metadata", {"metadata": {"b": "2"}}, version="2.84")
        assert r.json() == {"metadata": {"a": "1", "b": "2"}}
        assert get(srv, base + "/metadata").json() == {"metadata": {"a": "1", "b": "2"}}
        r = cmd(srv, "POST", base + "/action", {"reboot": {"type": "SOFT"}}, version="2.84")
        assert r.status == 202, r.body
        # The reboot's pending task state refuses a metadata write now (409, as Nova).
        r = cmd(srv, "POST", base + "/metadata", {"metadata": {"c": "3"}}, version="2.84")
        assert r.status == 409
        with store.read() as r2:
            entries = [msgpack_unpack(v) for _, v in r2.txn.cursor(db=r2.dbs.outbox)]
        assert [e["payload"]["action"] for e in entries] == ["metadata", "reboot"]
        reboot_id = entries[1]["id"]
        settle()
        assert get(srv, base + "/metadata").json() == {"metadata": {"a": "1", "b": "2"}}
        listed = get(srv, base + "/os-instance-actions", version="2.84").json()["instanceActions"]
        assert [a["action"] for a in listed] == ["reboot", "create"]
        assert listed[0]["request_id"] == reboot_id and listed[1]["request_id"] == "req-create-1"
        shown = get(srv, f"{base}/os-instance-actions/{reboot_id}", ADMIN_TOKEN, "2.84").json()
        events = shown["instanceAction"]["events"]
        assert [e["event"] for e in events] == ["compute_reboot_instance"]
        assert events[0]["result"] == "Success" and events[0]["finish_time"] is not None
        with store.read() as r3:
            assert r3.check() == []
    finally:
        cell.close()


def msgpack_unpack(raw: Any) -> Any:
    import msgpack

    return msgpack.unpackb(raw, raw=False)

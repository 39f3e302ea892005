"""The cell database (fastpath.cell.db): schema, write helpers, the change feed, the inbox."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fastpath.cell import CellDBError, SqliteCellDB
from fastpath.cell.db import INSTANCE_COLUMNS

U1 = "11111111-1111-4111-8111-111111111111"
U2 = "22222222-2222-4222-8222-222222222222"


def instance_values(uuid: str = U1, **over: Any) -> dict[str, Any]:
    values: dict[str, Any] = {
        "uuid": uuid, "project_id": "p1", "user_id": "u1", "name": "vm", "vm_state": "building",
        "flavor": {"id": "1", "name": "m1.small", "vcpus": 1, "ram": 2048, "disk": 20,
                   "ephemeral": 0, "swap": 0, "extra_specs": {"hw:cpu_policy": "shared"}},
    }
    values.update(over)
    return values


@pytest.fixture()
def db(tmp_path: Path) -> Iterator[SqliteCellDB]:
    d = SqliteCellDB(str(tmp_path / "cell.sqlite"))
    yield d
    d.close()


def feed(db: SqliteCellDB) -> list[tuple[int, str, int, str]]:
    return db.changes_after(0, 1_000_000)


def test_schema_created_in_wal_with_every_table(tmp_path: Path) -> None:
    path = str(tmp_path / "c.sqlite")
    SqliteCellDB(path).close()
    again = SqliteCellDB(path)  # reopening an existing database is fine
    again.close()
    conn = sqlite3.connect(path)
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"instances", "instance_flavor", "instance_extra", "instance_metadata",
            "instance_tags", "instance_security_groups", "virtual_interfaces", "ip_addresses",
            "volume_attachments", "instance_faults", "instance_actions",
            "instance_actions_events", "hosts", "inbox", "changes", "meta",
            "consumers"} <= tables
    triggers = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'")}
    assert {"hosts_insert", "hosts_update", "hosts_delete"} <= triggers
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    cols = {r[1] for r in conn.execute("PRAGMA table_info(instances)")}
    assert set(INSTANCE_COLUMNS) == cols
    conn.close()


def test_create_update_delete_each_append_one_change(db: SqliteCellDB) -> None:
    db.create_instance(instance_values())
    assert feed(db) == [(1, U1, 1, "upsert")]
    db.update_instance(U1, vm_state="active", power_state=1)
    assert feed(db)[1:] == [(2, U1, 2, "upsert")]
    db.delete_instance(U1)
    assert feed(db)[2:] == [(3, U1, 3, "delete")]
    rows = db.load_instance(U1)
    assert rows is not None
    assert rows["instance"]["vm_state"] == "deleted"
    assert rows["instance"]["deleted_at"] is not None
    assert rows["instance"]["version"] == 3
    assert db.all_instance_versions() == [(U1, 3, "delete")]


def test_one_transaction_is_one_version_step_per_server(db: SqliteCellDB) -> None:
    with db.transaction():
        db.create_instance(instance_values(U1))
        db.create_instance(instance_values(U2))
        db.set_metadata(U1, {"a": "b"})
        db.set_tags(U1, ["x"])
        db.update_instance(U1, vm_state="active")
    assert [(u, v, k) for _, u, v, k in feed(db)] == [(U1, 1, "upsert"), (U2, 1, "upsert")]


def test_failure_inside_transaction_leaves_neither_row_nor_feed(db: SqliteCellDB) -> None:
    db.create_instance(instance_values())
    with pytest.raises(RuntimeError), db.transaction():
        db.update_instance(U1, vm_state="active")
        db.set_metadata(U1, {"k": "v"})
        raise RuntimeError("driver blew up")
    rows = db.load_instance(U1)
    assert rows is not None
    assert rows["instance"]["vm_state"] == "building"
    assert rows["instance"]["version"] == 1
    assert rows["metadata"] == {}
    assert feed(db) == [(1, U1, 1, "upsert")]
    with pytest.raises(CellDBError):  # a failing create leaves nothing either
        db.create_instance(instance_values(U2, bogus=1))
    assert db.load_instance(U2) is None
    assert len(feed(db)) == 1


def test_refusals(db: SqliteCellDB) -> None:
    with pytest.raises(CellDBError):
        db.update_instance(U1, vm_state="active")  # unknown server
    db.create_instance(instance_values())
    with pytest.raises(CellDBError):
        db.create_instance(instance_values())  # duplicate uuid
    with pytest.raises(CellDBError):
        db.update_instance(U1, version=99)  # the version is not for callers to set
    with pytest.raises(CellDBError):
        db.create_instance(instance_values(U2, version=5))
    with pytest.raises(CellDBError):
        db.create_instance({k: v for k, v in instance_values(U2).items() if k != "flavor"})
    assert len(feed(db)) == 1


def test_versions_only_grow(db: SqliteCellDB) -> None:
    db.create_instance(instance_values())
    seen = [1]
    for i in range(20):
        if i % 3 == 0:
            db.set_tags(U1, [f"t{i}"])
        elif i % 3 == 1:
            db.add_fault(U1, 500, f"boom {i}")
        else:
            db.update_instance(U1, progress=i)
        rows = db.load_instance(U1)
        assert rows is not None
        seen.append(rows["instance"]["version"])
    db.delete_instance(U1)
    versions = [v for _, _, v, _ in feed(db)]
    assert versions == sorted(set(versions)) == list(range(1, 23))
    assert seen == list(range(1, 22))
    seqs = [s for s, _, _, _ in feed(db)]
    assert seqs == sorted(set(seqs))


def test_command_inbox_is_idempotent(db: SqliteCellDB) -> None:
    db.create_instance(instance_values())
    assert db.accept_command("req-1", {"action": "reboot"}, U1) is True
    assert db.accept_command("req-1", {"action": "reboot"}, U1) is False
    assert db.accept_command("req-2", {"action": "stop"}, U1) is True
    assert [c for c, _, _ in db.pending_commands()] == ["req-1", "req-2"]
    assert db.pending_commands()[0][2] == {"action": "reboot"}
    n = len(feed(db))
    db.finish_command("req-1")
    assert len(feed(db)) == n + 1  # the server's record now lists the command as done
    rows = db.load_instance(U1)
    assert rows is not None and rows["done_commands"] == ["req-1"]
    assert db.accept_command("req-1", {"action": "reboot"}, U1) is False  # still a duplicate
    assert [c for c, _, _ in db.pending_commands()] == ["req-2"]


def test_changes_after_pages_in_order(db: SqliteCellDB) -> None:
    for i in range(25):
        db.create_instance(instance_values(f"00000000-0000-4000-8000-{i:012d}"))
    got: list[tuple[int, str, int, str]] = []
    cursor = 0
    while page := db.changes_after(cursor, 10):
        assert len(page) <= 10
        got.extend(page)
        cursor = page[-1][0]
    assert [s for s, _, _, _ in got] == list(range(1, 26))
    assert db.max_seq() == 25
    assert db.changes_after(25, 10) == []


def test_prune_and_min_seq(db: SqliteCellDB) -> None:
    assert (db.min_seq(), db.max_seq()) == (1, 0)
    for i in range(5):
        db.create_instance(instance_values(f"00000000-0000-4000-8000-{i:012d}"))
    assert (db.min_seq(), db.max_seq()) == (1, 5)
    assert db.prune_changes(3) == 3
    assert (db.min_seq(), db.max_seq()) == (4, 5)
    assert [s for s, _, _, _ in feed(db)] == [4, 5]
    assert db.prune_changes(5) == 2
    # Empty feed: seqs are never reused, so a consumer at 5 is current and one at 3 has a gap.
    assert (db.min_seq(), db.max_seq()) == (6, 5)
    db.update_instance("00000000-0000-4000-8000-000000000000", progress=1)
    assert feed(db) == [(6, "00000000-0000-4000-8000-000000000000", 2, "upsert")]


def test_load_instance_returns_every_child_row(db: SqliteCellDB) -> None:
    db.upsert_host("compute-01", "compute-01.example.com", 16, 65536, 1000, "nova")
    db.create_instance(instance_values(
        host="compute-01", image_ref="img-1", metadata={"a": "1"}, tags=["b", "a"],
        security_groups=["default", "web"],
        network=[{"mac": "fa:16:3e:00:00:01", "network": "private",
                  "ips": [{"addr": "10.0.0.2", "version": 4}]}],
        volumes=[{"id": "vol-1", "delete_on_termination": True}],
        image_properties={"os_distro": "cirros"}, scheduler_hints={"group": "g"}))
    db.add_fault(U1, 500, "old")
    db.add_fault(U1, 404, "new", details="tb")
    action = db.record_action(U1, "req-1", "create", "p1", "u1")
    assert db.record_action(U1, "req-1", "create", "p1", "u1") == action
    db.add_action_event(action, "compute_build_and_run_instance", result="Success")
    rows = db.load_instance(U1)
    assert rows is not None
    assert rows["metadata"] == {"a": "1"}
    assert rows["tags"] == ["a", "b"]
    assert rows["security_groups"] == ["default", "web"]
    assert rows["ips"][0]["addr"] == "10.0.0.2" and rows["vifs"][0]["network"] == "private"
    assert rows["volumes"] == [{"id": "vol-1", "device_name": None,
                                "delete_on_termination": True}]
    assert rows["fault"]["message"] == "new"
    assert rows["host"]["vcpus"] == 16
    assert rows["extra"]["image_properties"] == {"os_distro": "cirros"}
    assert rows["flavor"]["extra_specs"] == {"hw:cpu_policy": "shared"}
    assert db.load_instance(U2) is None


def test_a_second_connection_sees_committed_changes_only(tmp_path: Path) -> None:
    path = str(tmp_path / "cell.sqlite")
    writer, reader = SqliteCellDB(path), SqliteCellDB(path)
    try:
        with writer.transaction():
            writer.create_instance(instance_values())
            assert reader.changes_after(0, 10) == []
            assert reader.load_instance(U1) is None
        assert reader.changes_after(0, 10) == [(1, U1, 1, "upsert")]
    finally:
        writer.close()
        reader.close()


# -- feed state, consumers and pruning, epochs, hosts, done_commands (issue 6) ------------------
def uid(i: int) -> str:
    return f"00000000-0000-4000-8000-{i:012d}"


def test_read_feed_is_entries_and_state_in_one_snapshot(db: SqliteCellDB) -> None:
    empty = db.read_feed(0, 10)
    assert (empty.entries, empty.min_seq, empty.max_seq, empty.epoch, empty.hosts_version) == (
        [], 1, 0, 0, 0)
    for i in range(3):
        db.create_instance(instance_values(uid(i)))
    f = db.read_feed(1, 1)
    assert [(e.seq, e.uuid, e.version, e.kind) for e in f.entries] == [(2, uid(1), 1, "upsert")]
    assert f.entries[0].at > 0 and (f.min_seq, f.max_seq) == (1, 3)
    db.prune_changes(3)
    assert (db.read_feed(0, 10).min_seq, db.read_feed(0, 10).max_seq) == (4, 3)


def test_hosts_version_moves_with_every_host_change(db: SqliteCellDB) -> None:
    db.upsert_host("h1", "h1.example", 16, 65536, 1000, "az1")
    v1 = db.read_feed(0, 1).hosts_version
    assert v1 >= 1
    db.set_host_usage("h1", 2, 4096, 40)
    v2 = db.read_feed(0, 1).hosts_version
    assert v2 > v1
    db.create_instance(instance_values())  # a server change is not a host change
    assert db.read_feed(0, 1).hosts_version == v2
    assert db.hosts() == {"h1": {
        "node": "h1.example", "availability_zone": "az1", "vcpus": 16, "ram_mb": 65536,
        "disk_gb": 1000, "vcpus_used": 2, "ram_mb_used": 4096, "disk_gb_used": 40,
        "status": "UP", "updated_at": db.hosts()["h1"]["updated_at"]}}


def test_prune_acked_waits_for_every_live_consumer(db: SqliteCellDB) -> None:
    from fastpath.cell.db import Retention

    for i in range(10):
        db.create_instance(instance_values(uid(i)))
    now = db.read_feed(0, 100).entries[-1].at + 10
    loose = Retention(feed_min_age=0, feed_keep=0, consumer_timeout=60)
    assert db.prune_acked(now, loose) == 0  # no consumer ever recorded: keep everything
    db.ack("api-a", 4, at=now)
    db.ack("api-b", 7, at=now)
    assert db.consumers() == {"api-a": (4, now), "api-b": (7, now)}
    assert db.prune_acked(now, loose) == 4 and db.min_seq() == 5  # the slowest consumer
    db.ack("api-a", 9, at=now)
    # The 6 newest are kept (5..10), then the 5 newest: seq 5 goes (b acked 7).
    assert db.prune_acked(now, Retention(feed_min_age=0, feed_keep=6, consumer_timeout=60)) == 0
    assert db.prune_acked(now, Retention(feed_min_age=0, feed_keep=5, consumer_timeout=60)) == 1
    # A consumer silent past the timeout holds nothing back; it will find a gap and resync.
    later = now + 120 * 10**6
    db.ack("api-a", 10, at=later)
    assert db.prune_acked(later, loose) == 5 and db.min_seq() == 11
    # Entries younger than feed_min_age stay, whatever the cursors say.
    db.update_instance(uid(0), name="x")
    assert db.prune_acked(later, Retention(feed_min_age=3600, feed_keep=0)) == 0


def test_maintenance_runs_at_its_interval_and_records_done_commands_kept(
        db: SqliteCellDB) -> None:
    from fastpath.cell.db import Retention

    db.create_instance(instance_values())
    for n in range(5):
        db.accept_command(f"cmd-{n}", {"action": "reboot"}, U1)
        db.finish_command(f"cmd-{n}")
    rows = db.load_instance(U1)
    assert rows is not None and rows["done_commands"] == [f"cmd-{n}" for n in range(5)]
    db.ack("api", db.max_seq())
    r = Retention(feed_min_age=0, feed_keep=0, done_commands_kept=2, interval=10)
    t = time.time() + 5  # maintenance takes time.time(), seconds
    db.update_instance(U1, name="y")
    assert db.maintenance(t, r) == 6  # all but the entry after the ack
    rows = db.load_instance(U1)
    assert rows is not None and rows["done_commands"] == ["cmd-3", "cmd-4"]  # the last two
    db.ack("api", db.max_seq())
    assert db.maintenance(t + 1, r) == 0  # too soon
    assert db.maintenance(t + 11, r) == 1


def test_start_epoch_lifts_every_version_and_writes_the_feed(db: SqliteCellDB) -> None:
    from fastpath.cell.db import EPOCH_SHIFT

    db.create_instance(instance_values(U1))
    db.create_instance(instance_values(U2))
    db.delete_instance(U2)
    top = db.max_seq()
    assert db.epoch() == 0
    assert db.start_epoch() == 1 and db.epoch() == 1
    base = 1 << EPOCH_SHIFT
    assert db.all_instance_versions() == [(U1, base | 1, "upsert"), (U2, base | 1, "delete")]
    assert [(u, v, k) for _, u, v, k in db.changes_after(top, 10)] == [
        (U1, base | 1, "upsert"), (U2, base | 1, "delete")]
    db.update_instance(U1, name="after")
    assert db.all_instance_versions()[0][1] == base | 2
    u3 = uid(3)
    db.create_instance(instance_values(u3))  # a new server starts in the epoch too
    assert dict((u, v) for u, v, _ in db.all_instance_versions())[u3] == base | 1
    assert db.start_epoch(at_least=7) == 7 and db.read_feed(0, 1).epoch == 7
    assert db.start_epoch() == 8

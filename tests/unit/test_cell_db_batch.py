"""SqliteCellDB.load_instances: many servers in a few queries, exactly what load_instance
gives for each of them (cellsync's batch read, issue 6)."""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fastpath.cell import SqliteCellDB
from fastpath.cell.db import Retention


def uid(i: int) -> str:
    return f"{i:08x}-0000-4000-8000-{i:012x}"


def values(i: int, rnd: random.Random) -> dict[str, Any]:
    n_ips = rnd.randrange(3)
    return {
        "uuid": uid(i), "project_id": f"p{i % 3}", "user_id": "u1", "name": f"vm-{i}",
        "vm_state": rnd.choice(["building", "active", "stopped"]),
        "host": rnd.choice([None, "compute-01", "compute-02", "gone-host"]),
        "image_ref": rnd.choice([None, "img-1"]),
        "flavor": {"id": str(i % 4), "name": "m1", "vcpus": 1 + i % 2, "ram": 512, "disk": 1,
                   "ephemeral": 0, "swap": 0, "extra_specs": {"k": str(i % 5)}},
        "metadata": {f"k{j}": str(j * i) for j in range(rnd.randrange(4))},
        "tags": rnd.sample(["a", "b", "c", "d"], rnd.randrange(5)),
        "security_groups": rnd.sample(["default", "web", "db"], rnd.randrange(4)),
        "network": [{"mac": f"fa:16:3e:00:{i % 256:02x}:{k:02x}", "network": f"net{k}",
                     "ips": [{"addr": f"10.{k}.{i % 250}.{j + 2}", "version": 4}
                             for j in range(n_ips)]} for k in range(rnd.randrange(3))],
        "volumes": [{"id": f"vol-{i}-{k}", "delete_on_termination": bool(k % 2)}
                    for k in range(rnd.randrange(3))],
        "image_properties": {"os_distro": "cirros"} if i % 2 else {},
        "scheduler_hints": {"group": "g"} if i % 3 == 0 else {},
    }


@pytest.fixture()
def db(tmp_path: Path) -> Iterator[SqliteCellDB]:
    d = SqliteCellDB(str(tmp_path / "cell.sqlite"))
    yield d
    d.close()


def populate(db: SqliteCellDB, n: int, seed: int = 1) -> list[str]:
    rnd = random.Random(seed)
    db.upsert_host("compute-01", "compute-01.example.com", 16, 65536, 1000, "nova")
    db.upsert_host("compute-02", "compute-02.example.com", 8, 32768, 500, "az2")
    with db.transaction():
        for i in range(n):
            db.create_instance(values(i, rnd))
    for i in range(0, n, 7):
        db.add_fault(uid(i), 500, "old")
        db.add_fault(uid(i), 404, f"new-{i}", details="tb" if i % 2 else None)
    for i in range(0, n, 5):
        for k in range(1 + i % 3):
            a = db.record_action(uid(i), f"req-{i}-{k}", "reboot", "p1", "u1")
            db.add_action_event(a, "compute_reboot_instance", result="Success")
            db.add_action_event(a, "compute_second_step")
            db.accept_command(f"cmd-{i}-{k}", {"action": "reboot"}, uid(i))
            db.finish_command(f"cmd-{i}-{k}")
        db.accept_command(f"cmd-{i}-pending", {"action": "stop"}, uid(i))
    for i in range(3, n, 11):
        db.delete_instance(uid(i))
    return [uid(i) for i in range(n)]


def test_same_rows_as_load_instance(db: SqliteCellDB) -> None:
    uuids = populate(db, 120)
    got = db.load_instances(uuids)
    assert list(got) == uuids
    for u in uuids:
        assert got[u] == db.load_instance(u), u
    assert any(r["fault"] for r in got.values()) and any(r["actions"] for r in got.values())
    assert any(r["host"] for r in got.values()) and any(r["done_commands"] for r in got.values())


def test_order_duplicates_unknown_and_empty(db: SqliteCellDB) -> None:
    uuids = populate(db, 20)
    ask = [uuids[5], "no-such-server", uuids[2], uuids[5], uuids[19]]
    got = db.load_instances(ask)
    assert list(got) == [uuids[5], uuids[2], uuids[19]]
    assert got[uuids[2]] == db.load_instance(uuids[2])
    assert db.load_instances([]) == {}
    assert db.load_instances(["nope"]) == {}


def test_done_commands_kept_applies_per_server(db: SqliteCellDB) -> None:
    uuids = populate(db, 30)
    db.ack("api", db.max_seq())
    db.maintenance(time.time() + 5, Retention(feed_min_age=0, feed_keep=0,
                                              done_commands_kept=2, interval=10))
    got = db.load_instances(uuids)
    assert any(len(r["done_commands"]) == 2 for r in got.values())
    for u in uuids:
        assert got[u] == db.load_instance(u)


def test_more_servers_than_sql_variables(db: SqliteCellDB) -> None:
    uuids = populate(db, 1500)  # one JSON parameter, not one variable per uuid
    got = db.load_instances(list(reversed(uuids)))
    assert list(got) == list(reversed(uuids))
    for u in uuids[::97]:
        assert got[u] == db.load_instance(u)


def test_inside_a_write_transaction_sees_its_own_writes(db: SqliteCellDB) -> None:
    uuids = populate(db, 3)
    with db.transaction():
        db.update_instance(uuids[0], name="renamed")
        assert db.load_instances(uuids)[uuids[0]]["instance"]["name"] == "renamed"


def test_only_the_newest_actions_go_up(db: SqliteCellDB) -> None:
    """A long history does not make every change of the server cost more: both loaders give
    the newest ACTIONS_KEPT actions (each with all its events); the cell keeps them all."""
    from fastpath.cell.db import ACTIONS_KEPT

    uuids = populate(db, 3)
    extra = ACTIONS_KEPT + 20
    for k in range(extra):
        a = db.record_action(uuids[1], f"req-long-{k:04d}", "reboot", "p1", "u1")
        db.add_action_event(a, "compute_reboot_instance", result="Success")
    one = db.load_instance(uuids[1])
    assert one is not None
    assert len(one["actions"]) == ACTIONS_KEPT
    assert one["actions"][0]["request_id"] == f"req-long-{extra - 1:04d}"  # newest first
    assert all(len(a["events"]) == 1 for a in one["actions"])
    assert db.load_instances(uuids)[uuids[1]] == one
    with db.transaction():
        total = db._conn.execute("SELECT COUNT(*) FROM instance_actions WHERE instance_uuid = ?",
                                 (uuids[1],)).fetchone()[0]
    assert total > ACTIONS_KEPT

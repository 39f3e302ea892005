"""cellsync.projection: a cell's normalized rows -> the canonical record, Upsert, Tombstone."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cellsync.projection import ProjectionError, project_change, project_record
from fastpath.api.views import render_server
from fastpath.cell import SqliteCellDB
from fastpath.store.changes import Tombstone, Upsert
from fastpath.store.record import make_record, validate
from fastpath.store.samples import sample_record

U = "0c0a5c1e-5b5a-4b7e-9a44-3b8a0f6d2c11"


@pytest.fixture()
def db(tmp_path: Path) -> Iterator[SqliteCellDB]:
    d = SqliteCellDB(str(tmp_path / "cell.sqlite"))
    yield d
    d.close()


def cell_values_of(rec: dict[str, Any]) -> dict[str, Any]:
    """The create_instance values that hold everything of a sample record."""
    scalar = ("uuid", "project_id", "user_id", "name", "hostname", "description", "vm_state",
              "task_state", "power_state", "progress", "locked", "locked_by", "locked_reason",
              "created_at", "updated_at", "launched_at", "terminated_at", "host", "node",
              "instance_name", "availability_zone", "pinned_availability_zone", "key_name",
              "config_drive", "disk_config", "access_ip_v4", "access_ip_v6", "reservation_id",
              "launch_index", "kernel_id", "ramdisk_id", "root_device_name", "user_data")
    values = {k: rec[k] for k in scalar}
    values["image_ref"] = rec["image"]["id"] if rec["image"] else None
    values["image_properties"] = rec["image"]["properties"] if rec["image"] else {}
    values["flavor"] = rec["flavor"]
    values["metadata"] = rec["metadata"]
    values["tags"] = rec["tags"]
    values["security_groups"] = rec["security_groups"]
    values["volumes"] = rec["volumes_attached"]
    values["scheduler_hints"] = rec["scheduler_hints"]
    values["server_groups"] = rec["server_groups"]
    values["trusted_image_certificates"] = rec["trusted_image_certificates"]
    # One VIF per (network, MAC): two ports on one network show under the same label.
    vifs: dict[tuple[str, str], dict[str, Any]] = {}
    for net, entries in rec["addresses"].items():
        for a in entries:
            vif = vifs.setdefault((net, a["mac"]), {"mac": a["mac"], "network": net, "ips": []})
            vif["ips"].append({"addr": a["addr"], "version": a["version"], "type": a["type"]})
    values["network"] = list(vifs.values())
    return values


def test_full_instance_projects_to_the_same_record(db: SqliteCellDB) -> None:
    want = sample_record(U, version=1, cell="cell1", seed=7)
    want["tags"] = sorted(want["tags"])  # the cell keeps tags as a set, listed sorted
    want["metadata"] = dict(sorted(want["metadata"].items()))
    db.upsert_host(want["host"], want["node"], 32, 131072, 2000, "nova")
    db.create_instance(cell_values_of(want))
    rows = db.load_instance(U)
    assert rows is not None
    got = project_record(rows, "cell1")
    validate(got)
    assert got == make_record(want)
    views = render_server(got)
    assert views and all(isinstance(v, bytes) and v for v in views.values())
    change = project_change(rows, "cell1")
    assert isinstance(change, Upsert)
    assert (change.uuid, change.version, change.record) == (U, 1, got)


def test_every_cell_field_reflects_later_changes(db: SqliteCellDB) -> None:
    rec = sample_record(U, version=1, cell="cell1", seed=3)
    db.create_instance(cell_values_of(rec))
    with db.transaction():
        db.update_instance(U, vm_state="error", task_state=None, locked=True,
                           locked_by="admin", locked_reason="why")
        db.add_fault(U, 500, "No valid host", details="Traceback...", created_at=123)
        db.set_tags(U, ["z"])
        db.set_metadata(U, {"k": "v"})
        db.detach_volume(U, rec["volumes_attached"][0]["id"])
        db.update_extra(U, server_groups=["g1"])
        db.accept_command("req-9", {"action": "lock"}, U)
        db.finish_command("req-9")
    rows = db.load_instance(U)
    assert rows is not None
    got = project_record(rows, "cell7")
    assert got["version"] == 2 and got["cell"] == "cell7"
    assert got["status"] == "ERROR"
    assert got["fault"] == {"code": 500, "message": "No valid host", "details": "Traceback...",
                            "created": 123}
    assert (got["locked"], got["locked_by"], got["locked_reason"]) == (True, "admin", "why")
    assert got["tags"] == ["z"] and got["metadata"] == {"k": "v"}
    assert got["volumes_attached"] == [] and got["server_groups"] == ["g1"]
    assert got["done_commands"] == ["req-9"]
    assert got["pending"] == {}  # API-owned: never from the cell
    assert got["host_status"] == "UNKNOWN"  # the host is not declared in this cell
    render_server(got)


def test_addresses_carry_mac_type_and_network_order(db: SqliteCellDB) -> None:
    values = cell_values_of(sample_record(U, seed=1))
    values["network"] = [
        {"mac": "fa:16:3e:00:00:02", "network": "public",
         "ips": [{"addr": "172.24.4.10", "version": 4, "type": "floating"},
                 {"addr": "2001:db8::10", "version": 6}]},
        {"mac": "fa:16:3e:00:00:01", "network": "private",
         "ips": [{"addr": "10.0.0.5", "version": 4}]},
    ]
    db.create_instance(values)
    rows = db.load_instance(U)
    assert rows is not None
    addrs = project_record(rows, "cell1")["addresses"]
    assert list(addrs) == ["public", "private"]
    assert addrs["public"] == [
        {"addr": "172.24.4.10", "version": 4, "mac": "fa:16:3e:00:00:02", "type": "floating"},
        {"addr": "2001:db8::10", "version": 6, "mac": "fa:16:3e:00:00:02", "type": "fixed"}]
    assert addrs["private"] == [
        {"addr": "10.0.0.5", "version": 4, "mac": "fa:16:3e:00:00:01", "type": "fixed"}]


def test_volume_backed_server_has_no_image(db: SqliteCellDB) -> None:
    values = cell_values_of(sample_record(U, seed=2))
    values["image_ref"] = None
    db.create_instance(values)
    rows = db.load_instance(U)
    assert rows is not None
    rec = project_record(rows, "cell1")
    assert rec["image"] is None
    render_server(rec)


def test_deleted_instance_projects_to_a_tombstone(db: SqliteCellDB) -> None:
    rec = sample_record(U, seed=5)
    db.create_instance(cell_values_of(rec))
    db.delete_instance(U, deleted_at=rec["created_at"] + 60_000_000)
    rows = db.load_instance(U)
    assert rows is not None
    change = project_change(rows, "cell1")
    assert isinstance(change, Tombstone)
    assert change.version == 2 and change.uuid == U
    assert change.project_id == rec["project_id"] and change.created_at == rec["created_at"]
    assert change.deleted_at == rec["created_at"] + 60_000_000
    assert change.record is not None
    assert change.record["status"] == "DELETED"
    assert change.record["vm_state"] == "deleted"
    assert change.record["terminated_at"] == change.deleted_at
    validate(change.record)
    render_server(dict(change.record))


def test_missing_flavor_is_a_projection_error(db: SqliteCellDB) -> None:
    db.create_instance(cell_values_of(sample_record(U, seed=4)))
    rows = db.load_instance(U)
    assert rows is not None
    rows["flavor"] = None
    with pytest.raises(ProjectionError):
        project_record(rows, "cell1")
    rows = db.load_instance(U)
    assert rows is not None
    rows["instance"]["power_state"] = "on"  # a bad value is named, not passed on
    with pytest.raises(ProjectionError, match=U):
        project_record(rows, "cell1")


def test_feed_projected_into_the_store_converges_and_deletes_stay_deleted(
        db: SqliteCellDB, tmp_path: Path) -> None:
    from fastpath.store import Batch, Store

    rec = sample_record(U, seed=6)
    db.create_instance(cell_values_of(rec))
    early = db.load_instance(U)  # a stale read, replayed after the delete below
    assert early is not None
    db.update_instance(U, vm_state="active", task_state=None)
    db.delete_instance(U)
    store = Store.open(tmp_path / "api", map_size=64 << 20, sync=False, metasync=False)
    try:
        changes = db.changes_after(0, 100)
        batch = [project_change(r, "cell1") for r in
                 (db.load_instance(u) for _, u, _, _ in changes) if r is not None]
        store.apply(Batch(batch, cursor=("cell1", changes[-1][0])), render_server)
        store.apply(Batch([project_change(early, "cell1")]), render_server)  # late, old
        with store.read() as r:
            assert r.get_server(U) is None
            tomb = r.tombstone(U)
            assert tomb is not None and tomb.version == 3
            assert tomb.record is not None and tomb.record["status"] == "DELETED"
            assert r.check() == []
    finally:
        store.close()

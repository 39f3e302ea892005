"""The projection: a cell's normalized rows -> the store's canonical server record.

THE one place where the rows of one server, as :meth:`fastpath.cell.db.CellDB.load_instance`
returns them, become the denormalized record of :mod:`fastpath.store.record` and the change
that :meth:`fastpath.store.Store.apply` takes.  cellsync (feed tailing), resync and
``fastpath verify`` all go through here, so they cannot disagree about what a server looks
like.

- Every cell-owned field of the record is set from the rows (never left to a default that
  would hide a missing mapping); ``pending`` is API-owned and never sent.
- ``version`` is the instance row's version at the time of the read, which may be newer than
  the feed entry that led here: the store keeps the highest version, so that is harmless, and
  the later feed entries for the same server are then dropped as stale (P2, P3).
- The server's instance actions and their events ride in the record (``actions``): the
  cell writes them in the transaction of the state change they belong to, which steps the
  server's version, so they come up with it, and a deleted server keeps them in its
  tombstone's final record (os-instance-actions shows deleted servers from 2.21).
- A server whose row has ``deleted_at`` becomes a :class:`Tombstone` carrying its final record
  (status ``DELETED``), so ``changes-since`` can render it; any other server an
  :class:`Upsert`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fastpath.store.changes import Tombstone, Upsert
from fastpath.store.errors import RecordError
from fastpath.store.record import make_record


class ProjectionError(RecordError):
    """The rows of a server cannot make a valid record (missing flavor, bad values...)."""


def _flavor(f: Mapping[str, Any] | None, uuid: str) -> dict[str, Any]:
    if f is None:
        raise ProjectionError(f"instance {uuid} has no flavor snapshot")
    return {
        "id": str(f["flavor_id"]),
        "name": f["name"],
        "vcpus": f["vcpus"],
        "ram": f["memory_mb"],
        "disk": f["root_gb"],
        "ephemeral": f["ephemeral_gb"],
        "swap": f["swap"],
        "extra_specs": dict(f["extra_specs"]),
    }


def _addresses(vifs: list[Mapping[str, Any]], ips: list[Mapping[str, Any]]) -> dict[str, Any]:
    """``{network label: [{addr, version, mac, type}]}``: networks in VIF order, IPs in theirs."""
    by_vif = {v["uuid"]: v for v in vifs}
    out: dict[str, list[dict[str, Any]]] = {v["network"]: [] for v in vifs}
    for ip in ips:
        vif = by_vif.get(ip["vif_uuid"])
        if vif is None:
            continue  # the foreign key makes this impossible in SQLite; be safe elsewhere
        out[vif["network"]].append(
            {"addr": ip["addr"], "version": ip["version"], "mac": vif["mac"], "type": ip["type"]})
    return out


def _actions(actions: list[Mapping[str, Any]] | None) -> list[dict[str, Any]]:
    """The record's ``actions`` from the cell's instance actions and events (newest first, as
    :meth:`~fastpath.cell.db.CellDB.load_instance` lists them).

    ``updated_at`` (shown from 2.58) is what Nova keeps in its column: the latest of the
    action's start and of its events' starts and finishes (Nova bumps it as each event starts
    and finishes).  The action's own ``finish_time`` is not shown by the API.
    """
    out: list[dict[str, Any]] = []
    for a in actions or ():
        events = [{"event": e["event"], "start_time": e["start_time"],
                   "finish_time": e["finish_time"], "result": e["result"],
                   "traceback": e["traceback"], "host": e["host"], "details": e["details"]}
                  for e in a["events"]]
        times = [a["start_time"]] + [t for e in events
                                     for t in (e["start_time"], e["finish_time"]) if t is not None]
        out.append({"request_id": a["request_id"], "action": a["action"],
                    "project_id": a["project_id"], "user_id": a["user_id"],
                    "start_time": a["start_time"], "updated_at": max(times),
                    "message": a["message"], "events": events})
    return out


def project_record(rows: Mapping[str, Any], cell: str) -> dict[str, Any]:
    """The complete, validated record of one server of ``cell`` from its rows."""
    i = rows["instance"]
    uuid = i["uuid"]
    extra = rows["extra"]
    fault = rows["fault"]
    host = rows["host"]
    values: dict[str, Any] = {
        "uuid": uuid,
        "version": i["version"],
        "cell": cell,
        "project_id": i["project_id"],
        "user_id": i["user_id"],
        "name": i["name"],
        "hostname": i["hostname"],
        "description": i["description"],
        "vm_state": i["vm_state"],
        "task_state": i["task_state"],
        "power_state": i["power_state"],
        "progress": i["progress"],
        "locked": bool(i["locked"]),
        "locked_by": i["locked_by"],
        "locked_reason": i["locked_reason"],
        "created_at": i["created_at"],
        "updated_at": i["updated_at"],
        "launched_at": i["launched_at"],
        "terminated_at": i["terminated_at"],
        "deleted_at": i["deleted_at"],
        "host": i["host"],
        "node": i["node"],
        # Nova's host_status: from the compute service of the host; unknown host -> UNKNOWN.
        "host_status": None if i["host"] is None else (host["status"] if host else "UNKNOWN"),
        "instance_name": i["instance_name"],
        "availability_zone": i["availability_zone"],
        "pinned_availability_zone": i["pinned_availability_zone"],
        "flavor": _flavor(rows["flavor"], uuid),
        "image": None if not i["image_ref"] else {
            "id": i["image_ref"], "properties": dict(extra.get("image_properties") or {})},
        "key_name": i["key_name"],
        "config_drive": i["config_drive"],
        "disk_config": i["disk_config"],
        "trusted_image_certificates": extra.get("trusted_certs"),
        "addresses": _addresses(rows["vifs"], rows["ips"]),
        "access_ip_v4": i["access_ip_v4"],
        "access_ip_v6": i["access_ip_v6"],
        "security_groups": list(rows["security_groups"]),
        "metadata": dict(rows["metadata"]),
        "tags": list(rows["tags"]),
        "volumes_attached": [{"id": v["id"], "delete_on_termination": v["delete_on_termination"]}
                             for v in rows["volumes"]],
        "server_groups": list(extra.get("server_groups") or []),
        "scheduler_hints": dict(extra.get("scheduler_hints") or {}),
        "reservation_id": i["reservation_id"],
        "launch_index": i["launch_index"],
        "kernel_id": i["kernel_id"],
        "ramdisk_id": i["ramdisk_id"],
        "root_device_name": i["root_device_name"],
        "user_data": i["user_data"],
        "fault": None if fault is None else {
            "code": fault["code"], "message": fault["message"], "details": fault["details"],
            "created": fault["created_at"]},
        "done_commands": list(rows["done_commands"]),
        "actions": _actions(rows.get("actions")),
    }
    try:
        return make_record(values)
    except ProjectionError:
        raise
    except RecordError as e:
        raise ProjectionError(f"instance {uuid}: {e}") from e


def project_change(rows: Mapping[str, Any], cell: str) -> Upsert | Tombstone:
    """The change that brings one server's current rows into the store."""
    rec = project_record(rows, cell)
    if rec["deleted_at"] is not None:
        return Tombstone(rec["uuid"], rec["version"], rec["project_id"], rec["created_at"],
                         rec["deleted_at"], rec)
    return Upsert(rec["uuid"], rec["version"], rec)

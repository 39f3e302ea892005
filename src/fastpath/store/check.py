"""The layout's invariants, checked over a whole store (tests, ``fastpath verify``).

P11 (research notes): the record and every index change together, so in any committed
state:

- every live server has its ``by_project`` and ``by_created`` entries, equal to the index
  entry of its record, its current ``by_changed`` entry and its ``by_cell`` entry under
  its record's cell; no other such entries exist;
- every tombstone has its current ``by_changed`` entry and its ``tomb_age`` entry, and no
  server is both live and tombstoned;
- view fragments and API-owned fields belong to live servers only;
- quota usage is the sum over the live servers;
- frames agree with their records.

Superseded ``by_changed`` entries are allowed (the log is trimmed lazily; see ``layout``).
"""

from __future__ import annotations

from typing import Any

import lmdb
import msgpack

from fastpath.store import layout as L
from fastpath.store import record as R
from fastpath.store.dbs import Dbs


def check(txn: lmdb.Transaction, d: Dbs) -> list[str]:
    problems: list[str] = []
    live: dict[bytes, tuple[int, int, bytes, bytes]] = {}
    by_cell: set[bytes] = set()
    usage: dict[str, list[int]] = {}
    for k, v in txn.cursor(db=d.servers):
        u = bytes(k)
        version, created, updated, project, off = L.unpack_frame_head(v)
        rec = R.unpack(v[off:])
        if (rec["version"], rec["uuid"], rec["created_at"], rec["updated_at"]) != (
            version, L.uuid_str(u), created, updated,
        ) or rec["project_id"].encode() != project:
            problems.append(f"{L.uuid_str(u)}: frame and record disagree")
        live[u] = (created, updated, project, R.pack_index(R.index_entry(R.effective(rec))))
        by_cell.add(L.by_cell_key(str(rec["cell"]).encode(), u))
        totals = usage.setdefault(rec["project_id"], [0, 0, 0])
        totals[0] += 1
        totals[1] += rec["flavor"]["vcpus"]
        totals[2] += rec["flavor"]["ram"]

    tombs: dict[bytes, int] = {}
    for k, v in txn.cursor(db=d.tombstones):
        u = bytes(k)
        tombs[u] = L.unpack_frame_head(v)[2]
        if u in live:
            problems.append(f"{L.uuid_str(u)}: both live and tombstoned")

    for name, db, expect in (
        ("by_project", d.by_project,
         {L.by_project_key(p, c, u): iv for u, (c, _, p, iv) in live.items()}),
        ("by_created", d.by_created,
         {L.by_created_key(c, u): iv for u, (c, _, _, iv) in live.items()}),
    ):
        seen = {bytes(k): bytes(v) for k, v in txn.cursor(db=db)}
        if seen != expect:
            extra = len(set(seen) - set(expect))
            missing = len(set(expect) - set(seen))
            differ = sum(1 for key in set(seen) & set(expect) if seen[key] != expect[key])
            problems.append(f"{name}: {extra} extra, {missing} missing, {differ} stale entries")

    cell_keys = {bytes(k) for k, _ in txn.cursor(db=d.by_cell)}
    if cell_keys != by_cell:
        problems.append(f"by_cell: {len(cell_keys - by_cell)} extra, "
                        f"{len(by_cell - cell_keys)} missing entries")

    changed = {bytes(k): bytes(v) for k, v in txn.cursor(db=d.by_changed)}
    for u, (_, updated, _, _) in live.items():
        if changed.get(L.by_changed_key(updated, u)) != L.CHANGED_LIVE:
            problems.append(f"by_changed: no current entry for {L.uuid_str(u)}")
    for u, deleted in tombs.items():
        if changed.get(L.by_changed_key(deleted, u)) != L.CHANGED_DELETED:
            problems.append(f"by_changed: no current entry for deleted {L.uuid_str(u)}")

    ages = {bytes(k) for k, _ in txn.cursor(db=d.tomb_age)}
    if ages != {L.tomb_age_key(t, u) for u, t in tombs.items()}:
        problems.append("tomb_age does not match the tombstones")

    for name, db in (("views", d.views), ("api_fields", d.api_fields)):
        owners = {bytes(k[:16]) for k, _ in txn.cursor(db=db)}
        orphans = owners - set(live)
        if orphans:
            problems.append(f"{name}: entries of {len(orphans)} server(s) that are not live")

    stored: dict[str, Any] = {
        bytes(k).decode(): msgpack.unpackb(v, raw=False) for k, v in txn.cursor(db=d.quota_usage)
    }
    want = {
        p: {"instances": n, "cores": c, "ram": m} for p, (n, c, m) in usage.items() if n or c or m
    }
    if stored != want:
        problems.append(f"quota_usage {stored} is not the sum over the servers {want}")
    return problems

"""cellsync.verify: compare the API store with every cell (DESIGN.md "Sync correctness" 5).

For each server of each cell, the cell's ``(version, deleted?)`` must match the store:

- a live server: a store record of exactly that version, of that cell;
- a deleted server: no live record, and a tombstone of exactly that version -- or no
  tombstone at all once the store has purged tombstones (horizon set), since tombstones
  only live for a retention window (P9 of DESIGN.md; research notes P10).

Live store records of a cell that the cell does not have are divergent too (orphans),
except version-0 records: the API's provisional BUILD records (P6) not yet in the cell.

The last line ``checked N servers in C cells: D divergent`` (:func:`summary_line`) is a
contract of ``fastpath verify``.
"""

from __future__ import annotations

from collections.abc import Mapping

from cellsync.sync import store_servers_of
from fastpath.cell.db import CellDB
from fastpath.store import Store


def summary_line(checked: int, cells: int, divergent: int) -> str:
    return f"checked {checked} servers in {cells} cells: {divergent} divergent"


def verify(store: Store, cells: Mapping[str, CellDB]) -> tuple[int, list[str]]:
    """``(servers checked, one line per divergence)``."""
    checked = 0
    out: list[str] = []
    for cell, db in cells.items():
        versions = db.all_instance_versions()
        present = set()
        with store.read() as r:
            horizon = r.tombstone_horizon()
            for uuid, version, kind in versions:
                present.add(uuid)
                checked += 1
                rec = r.get_server(uuid)
                tomb = r.tombstone(uuid)
                if kind == "upsert":
                    if rec is None:
                        what = "missing" if tomb is None else f"tombstone v{tomb.version}"
                        out.append(f"{cell} {uuid}: cell v{version} live, store {what}")
                    elif rec["version"] != version:
                        out.append(f"{cell} {uuid}: cell v{version} live, "
                                   f"store v{rec['version']} live")
                    elif rec.get("cell") != cell:
                        out.append(f"{cell} {uuid}: v{version} live, store says cell "
                                   f"{rec.get('cell')!r}")
                else:
                    if rec is not None:
                        out.append(f"{cell} {uuid}: cell v{version} deleted, "
                                   f"store v{rec['version']} live")
                    elif tomb is None:
                        if not horizon:
                            out.append(f"{cell} {uuid}: cell v{version} deleted, "
                                       "store has no tombstone")
                    elif tomb.version != version:
                        out.append(f"{cell} {uuid}: cell v{version} deleted, "
                                   f"store tombstone v{tomb.version}")
            for uuid, version, _, _ in store_servers_of(r, cell):
                if uuid not in present and version > 0:
                    checked += 1
                    out.append(f"{cell} {uuid}: not in the cell, store v{version} live")
    return checked, out

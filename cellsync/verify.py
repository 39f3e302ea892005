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

from fastpath.cell.db import CellDB
from fastpath.store import Store
from fastpath.store import layout as L


def summary_line(checked: int, cells: int, divergent: int) -> str:
    return f"checked {checked} servers in {cells} cells: {divergent} divergent"


def verify(store: Store, cells: Mapping[str, CellDB]) -> tuple[int, list[str]]:
    """``(servers checked, one line per divergence)``.

    Per cell: one read transaction, one walk of the cell's servers in the store's
    ``by_cell`` index (frame heads, no record decoded); the other servers of the store are
    not visited.
    """
    checked = 0
    out: list[str] = []
    for cell, db in cells.items():
        versions = db.all_instance_versions()
        with store.read() as r:
            horizon = r.tombstone_horizon()
            mine = {L.uuid_str(u): h.version for u, h in r.cell_servers(cell)}
            for uuid, version, kind in versions:
                checked += 1
                stored = mine.pop(uuid, None)
                if kind == "upsert":
                    if stored is not None:
                        if stored != version:
                            out.append(f"{cell} {uuid}: cell v{version} live, "
                                       f"store v{stored} live")
                        continue
                    rec = r.get_server(uuid)  # not under this cell: elsewhere, or gone
                    if rec is not None:
                        out.append(f"{cell} {uuid}: v{version} live, store says cell "
                                   f"{rec.get('cell')!r} v{rec['version']}")
                        continue
                    tomb = r.tombstone(uuid)
                    what = "missing" if tomb is None else f"tombstone v{tomb.version}"
                    out.append(f"{cell} {uuid}: cell v{version} live, store {what}")
                else:
                    if stored is None:
                        head = r.head(uuid)
                        stored = None if head is None else head.version
                    if stored is not None:
                        out.append(f"{cell} {uuid}: cell v{version} deleted, store v{stored} live")
                        continue
                    tomb = r.tombstone(uuid)
                    if tomb is None:
                        if not horizon:
                            out.append(f"{cell} {uuid}: cell v{version} deleted, "
                                       "store has no tombstone")
                    elif tomb.version != version:
                        out.append(f"{cell} {uuid}: cell v{version} deleted, "
                                   f"store tombstone v{tomb.version}")
            for uuid, version in mine.items():  # what is left: the store's, not the cell's
                if version > 0:
                    checked += 1
                    out.append(f"{cell} {uuid}: not in the cell, store v{version} live")
    return checked, out

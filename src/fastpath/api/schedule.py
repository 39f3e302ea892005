"""Scheduling inside the create's read transaction: which cell, which host.

No network call and no second store call: the choice is made from what the one read
transaction of the create sees -- the store's ``cells`` database (cellsync copies each
cell's ``hosts`` rows there: ``{name: {"hosts": {host: {vcpus, ram_mb, disk_gb,
vcpus_used, ram_mb_used, disk_gb_used, status, availability_zone}}}}``), and the cells
known from sync cursors.

The capacity seen here lags the cells (sync delay), and every worker schedules on its own,
so the choice is a *weighted random* pick among the hosts that fit -- weight = free RAM --
rather than "the emptiest host", which every concurrent create would pick.  The cell's
driver makes the real claim; a create that no longer fits goes to ERROR with a fault there
("No valid host"), as in Nova, where scheduling is asynchronous too.

- Hosts that fit (enabled, in the requested zone, free vcpus/ram/disk >= the flavor's):
  a weighted random host; its cell.
- Hosts known but none fits: the cell with the most free RAM in the zone (or any known
  cell), host None: the cell answers with ERROR "No valid host was found".
- No capacity data at all (cells not synced yet): a random known cell, host None.
- No cell known at all: :class:`NoCells` (the API answers 503: nothing can run the server).
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fastpath.store.reader import Reader


class NoCells(Exception):
    """No compute cell is known to this API store."""


@dataclass(frozen=True, slots=True)
class Placement:
    cell: str
    host: str | None
    availability_zone: str | None  # the host's zone when a host was chosen


def _free(h: Mapping[str, Any]) -> tuple[int, int, int]:
    return (int(h.get("vcpus", 0)) - int(h.get("vcpus_used", 0)),
            int(h.get("ram_mb", 0)) - int(h.get("ram_mb_used", 0)),
            int(h.get("disk_gb", 0)) - int(h.get("disk_gb_used", 0)))


def _enabled(h: Mapping[str, Any]) -> bool:
    return str(h.get("status") or "enabled").lower() in ("enabled", "up", "")


def known_zones(cells: Mapping[str, Mapping[str, Any]], catalog: list[dict[str, Any]]) -> set[str]:
    """Availability zones a create may ask for: the zones catalogue and the hosts' zones."""
    zones = {str(z["name"]) for z in catalog if z.get("name") and z.get("available", True)}
    for c in cells.values():
        for h in (c.get("hosts") or {}).values():
            az = h.get("availability_zone")
            if az:
                zones.add(str(az))
    return zones


def cell_names(r: Reader, cells: Mapping[str, Any]) -> list[str]:
    return sorted(set(cells) | set(r.cursors()))


def choose(r: Reader, cells: Mapping[str, Mapping[str, Any]], flavor: Mapping[str, Any],
           zone: str | None, count: int = 1, rng: random.Random | None = None) -> list[Placement]:
    """``count`` placements for servers of ``flavor`` in ``zone`` (None: any zone).

    A host chosen for one server has the flavor deducted before the next is placed, so a
    multi-create spreads as the capacity allows.
    """
    pick: Any = rng if rng is not None else random
    need_v, need_r, need_d = int(flavor["vcpus"]), int(flavor["ram"]), \
        int(flavor["disk"]) + int(flavor.get("ephemeral", 0))
    free: dict[tuple[str, str], list[int]] = {}
    zones: dict[tuple[str, str], str | None] = {}
    for cname, c in cells.items():
        for hname, h in (c.get("hosts") or {}).items():
            if not _enabled(h):
                continue
            az = h.get("availability_zone")
            if zone is not None and az != zone:
                continue
            free[(cname, hname)] = list(_free(h))
            zones[(cname, hname)] = az
    out: list[Placement] = []
    for _ in range(count):
        fits = [(k, f) for k, f in free.items() if f[0] >= need_v and f[1] >= need_r and f[2] >= need_d]
        if fits:
            weights = [max(f[1] - need_r, 0) + 1 for _, f in fits]
            (cname, hname), f = pick.choices(fits, weights=weights)[0]
            f[0] -= need_v
            f[1] -= need_r
            f[2] -= need_d
            out.append(Placement(cname, hname, zones[(cname, hname)]))
        elif free:
            # Known hosts, none fits: the cell with most free RAM says "No valid host".
            by_cell: dict[str, int] = {}
            for (cname, _), f in free.items():
                by_cell[cname] = max(by_cell.get(cname, f[1]), f[1])
            best = max(sorted(by_cell), key=lambda n: by_cell[n])
            out.append(Placement(best, None, zone))
        else:
            names = cell_names(r, cells)
            if not names:
                raise NoCells("no compute cell is known to this API store (cellsync has not seen any)")
            out.append(Placement(pick.choice(names), None, zone))
    return out


__all__ = ["NoCells", "Placement", "choose", "known_zones"]

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

PERF: decoding the ``cells`` database and laying out the hosts costs ~1 ms at 512 hosts, so
a :class:`Scheduler` (one per worker) keeps them per *generation* of the table (raised by
``apply`` in every transaction that changes it; read in the create's own transaction, so
the cache is exactly what that transaction would decode).  A pick draws hosts by weight
(bisect on cumulative free RAM) until one fits, scanning the zone only when a few draws
missed: O(log hosts) per server in the common case.
"""

from __future__ import annotations

import bisect
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from fastpath.store.changes import Catalog
from fastpath.store.reader import Reader

DRAWS = 8  # weighted draws before a full scan of the zone


class NoCells(Exception):
    """No compute cell is known to this API store."""


@dataclass(frozen=True, slots=True)
class Placement:
    cell: str
    host: str | None
    availability_zone: str | None  # the host's zone when a host was chosen


@dataclass(slots=True)
class _Host:
    cell: str
    name: str
    zone: str | None
    free: tuple[int, int, int]  # vcpus, ram MiB, disk GiB


@dataclass(slots=True)
class _Pool:
    """The enabled hosts of one zone (None: all), with cumulative weights."""

    hosts: list[_Host] = field(default_factory=list)
    cum: list[int] = field(default_factory=list)


def _enabled(h: Mapping[str, Any]) -> bool:
    return str(h.get("status") or "enabled").lower() in ("enabled", "up", "")


def _free(h: Mapping[str, Any]) -> tuple[int, int, int]:
    return (int(h.get("vcpus", 0)) - int(h.get("vcpus_used", 0)),
            int(h.get("ram_mb", 0)) - int(h.get("ram_mb_used", 0)),
            int(h.get("disk_gb", 0)) - int(h.get("disk_gb_used", 0)))


class Capacity:
    """The ``cells`` table of one generation, laid out for picking."""

    def __init__(self, cells: Mapping[str, Mapping[str, Any]]) -> None:
        self.cells = dict(cells)
        self.hosts: list[_Host] = []
        self.zones: set[str] = set()
        for cname in sorted(cells):
            for hname, h in sorted((cells[cname].get("hosts") or {}).items()):
                az = h.get("availability_zone")
                if az:
                    self.zones.add(str(az))
                if _enabled(h):
                    self.hosts.append(_Host(cname, hname, az, _free(h)))
        self._pools: dict[str | None, _Pool] = {}

    def pool(self, zone: str | None) -> _Pool:
        p = self._pools.get(zone)
        if p is None:
            p = _Pool()
            total = 0
            for h in self.hosts:
                if zone is None or h.zone == zone:
                    total += max(h.free[1], 0) + 1
                    p.hosts.append(h)
                    p.cum.append(total)
            self._pools[zone] = p
        return p

    def host_cell(self, host: str) -> str | None:
        for cname, c in self.cells.items():
            if host in (c.get("hosts") or {}):
                return cname
        return None


class Scheduler:
    """One per worker: :class:`Capacity` cached per generation of the ``cells`` table.

    ``max_age`` (seconds, default 0: exact): a newer generation is decoded only once the
    cached one is that old (a cache without hosts is always refreshed).  PERF: under create
    load cellsync raises the generation ~100 times a second (every batch that moves a host's
    usage), and rebuilding costs ~1 ms at 512 hosts: ~270 us a create in the whole cloud
    (load_commands, c=8, 256 vs 16 hosts a cell).  The capacity seen lags the cells anyway.
    """

    def __init__(self, rng: random.Random | None = None, max_age: float = 0.0) -> None:
        self.rng: Any = rng if rng is not None else random
        self.max_age = max_age
        self._gen = -1
        self._built = 0.0
        self._cap = Capacity({})

    def capacity(self, r: Reader) -> Capacity:
        gen = r.generation(Catalog.CELLS)
        if gen != self._gen:
            now = time.monotonic()
            if not self._cap.hosts or now - self._built >= self.max_age:
                self._cap = Capacity(r.cells())
                self._gen = gen
                self._built = now
        return self._cap

    def known_zones(self, r: Reader) -> set[str]:
        """Availability zones a create may ask for: the zones catalogue and the hosts'."""
        zones = set(self.capacity(r).zones)
        zones.update(str(z["name"]) for z in r.availability_zones()
                     if z.get("name") and z.get("available", True))
        return zones

    def choose(self, r: Reader, flavor: Mapping[str, Any], zone: str | None,
               count: int = 1) -> list[Placement]:
        """``count`` placements for servers of ``flavor`` in ``zone`` (None: any zone).

        A host chosen for one server has the flavor deducted before the next is placed, so
        a multi-create spreads as the capacity allows.
        """
        cap = self.capacity(r)
        pool = cap.pool(zone)
        need = (int(flavor["vcpus"]), int(flavor["ram"]),
                int(flavor["disk"]) + int(flavor.get("ephemeral", 0)))
        used: dict[int, list[int]] = {}  # pool index -> taken by this request

        def fits(i: int) -> bool:
            f = pool.hosts[i].free
            u = used.get(i, (0, 0, 0))
            return all(f[k] - u[k] >= need[k] for k in range(3))

        out: list[Placement] = []
        for _ in range(count):
            i = self._draw(pool, fits)
            if i is not None:
                u = used.setdefault(i, [0, 0, 0])
                for k in range(3):
                    u[k] += need[k]
                h = pool.hosts[i]
                out.append(Placement(h.cell, h.name, h.zone))
            elif pool.hosts:
                # Known hosts, none fits: the cell with most free RAM says "No valid host".
                best = max(pool.hosts, key=lambda h: (h.free[1], h.cell))
                out.append(Placement(best.cell, None, zone))
            else:
                names = sorted(set(cap.cells) | set(r.cursors()))
                if not names:
                    raise NoCells("no compute cell is known to this API store "
                                  "(cellsync has not seen any)")
                out.append(Placement(self.rng.choice(names), None, zone))
        return out

    def _draw(self, pool: _Pool, fits: Any) -> int | None:
        """A pool index by weight that fits, or None if no host fits."""
        if not pool.hosts:
            return None
        total = pool.cum[-1]
        for _ in range(DRAWS):
            i = bisect.bisect_right(pool.cum, self.rng.random() * total)
            i = min(i, len(pool.hosts) - 1)
            if fits(i):
                return i
        candidates = [i for i in range(len(pool.hosts)) if fits(i)]
        if not candidates:
            return None
        weights = [pool.cum[i] - (pool.cum[i - 1] if i else 0) for i in candidates]
        return int(self.rng.choices(candidates, weights=weights)[0])


__all__ = ["Capacity", "NoCells", "Placement", "Scheduler"]

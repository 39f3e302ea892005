"""The create's scheduler (fastpath.api.schedule) on a real store: fit, zones, weights,
multi-create deductions, the fallbacks, and its per-generation cache of the cells table."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fastpath.api.schedule import NoCells, Scheduler
from fastpath.store import Batch, Store
from fastpath.store.changes import Catalog, CatalogPut

FLAVOR = {"vcpus": 2, "ram": 1024, "disk": 10, "ephemeral": 0}


def host(vcpus: int = 8, ram: int = 8192, disk: int = 100, az: str = "nova", **used: Any) -> dict[str, Any]:
    return {"vcpus": vcpus, "ram_mb": ram, "disk_gb": disk, "vcpus_used": used.get("v", 0),
            "ram_mb_used": used.get("r", 0), "disk_gb_used": used.get("d", 0),
            "status": used.get("status", "enabled"), "availability_zone": az}


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store.open(tmp_path, map_size=1 << 22)
    yield s
    s.close()


def put_cells(store: Store, cells: dict[str, dict[str, Any]]) -> None:
    store.apply(Batch(catalog=[CatalogPut(Catalog.CELLS, n, {"hosts": h}) for n, h in cells.items()]))


def choose(store: Store, sched: Scheduler, zone: str | None = None, count: int = 1,
           flavor: dict[str, Any] = FLAVOR) -> list[tuple[str, str | None]]:
    with store.read() as r:
        return [(p.cell, p.host) for p in sched.choose(r, flavor, zone, count)]


def test_only_fitting_enabled_hosts_of_the_zone(store: Store) -> None:
    put_cells(store, {
        "cell1": {"full": host(r=8000), "off": host(status="disabled"), "ok": host()},
        "cell2": {"west": host(az="west"), "tiny": host(vcpus=1)},
    })
    sched = Scheduler(random.Random(1))
    picks = Counter(choose(store, sched)[0] for _ in range(200))
    assert set(picks) == {("cell1", "ok"), ("cell2", "west")}
    assert {choose(store, sched, "west")[0] for _ in range(20)} == {("cell2", "west")}
    with store.read() as r:
        assert sched.known_zones(r) == {"nova", "west"}


def test_weighted_by_free_ram(store: Store) -> None:
    put_cells(store, {"cell1": {"big": host(ram=64 * 1024), "small": host(ram=2048)}})
    sched = Scheduler(random.Random(2))
    picks = Counter(choose(store, sched)[0][1] for _ in range(400))
    assert picks["big"] > 10 * picks["small"] > 0


def test_multi_create_deducts_each_placement(store: Store) -> None:
    put_cells(store, {"cell1": {"a": host(vcpus=2, ram=1024)}, "cell2": {"b": host(vcpus=4, ram=2048)}})
    places = choose(store, Scheduler(random.Random(3)), count=4)
    # 3 fit (a: 1, b: 2); the 4th goes to the cell with most free RAM, no host.
    assert Counter(places) == {("cell1", "a"): 1, ("cell2", "b"): 2, ("cell2", None): 1}


def test_fallbacks(store: Store) -> None:
    sched = Scheduler(random.Random(4))
    with pytest.raises(NoCells):
        choose(store, sched)
    store.apply(Batch(cursor=("cell7", 3)))  # known from its cursor only
    assert choose(store, sched) == [("cell7", None)]
    put_cells(store, {"cell1": {"a": host(vcpus=1)}})  # known, nothing fits
    assert choose(store, sched) == [("cell1", None)]


def test_cache_follows_the_generation(store: Store) -> None:
    sched = Scheduler(random.Random(5))
    put_cells(store, {"cell1": {"a": host()}})
    assert choose(store, sched) == [("cell1", "a")]
    cap = sched._cap
    assert choose(store, sched) == [("cell1", "a")] and sched._cap is cap  # not decoded again
    put_cells(store, {"cell1": {"a": host(r=8192)}, "cell2": {"b": host()}})
    assert choose(store, sched) == [("cell2", "b")]


def test_max_age_keeps_a_young_cache_but_never_an_empty_one(store: Store) -> None:
    clock = [100.0]
    sched = Scheduler(random.Random(6), max_age=0.1)
    import fastpath.api.schedule as S
    real = S.time.monotonic
    S.time.monotonic = lambda: clock[0]  # type: ignore[assignment]
    try:
        with pytest.raises(NoCells):
            choose(store, sched)  # nothing known yet: an empty cache
        put_cells(store, {"cell1": {"a": host()}})
        assert choose(store, sched) == [("cell1", "a")]  # an empty cache is always refreshed
        put_cells(store, {"cell1": {"a": host(r=8192)}, "cell2": {"b": host()}})
        assert choose(store, sched) == [("cell1", "a")]  # 0 s old: kept
        clock[0] += 0.2
        assert choose(store, sched) == [("cell2", "b")]  # old enough: the new generation
    finally:
        S.time.monotonic = real  # type: ignore[assignment]

"""The command layer, without HTTP: the read phase of a create (body validation, the one
read transaction, scheduling, the provisional record and its views) and the group commit
of creates (one durable LMDB write transaction for N commands: provisional records,
quota usage, outbox entries), for groups of 1, 16 and 128.

creates/s of a group = N / median; the read phase runs on the event loop, the group in the
committer thread, so a worker's ceiling is about 1 / (read phase + group share).

Run: ``pytest benchmarks/bench_commands.py --benchmark-only``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from fastpath._loader import load_core
from fastpath.api import server_commands as SC
from fastpath.api import views
from fastpath.api.context import ApiContext
from fastpath.seed import FLAVORS, IMAGES, catalog
from fastpath.settings import load
from fastpath.store import Batch, Store
from fastpath.store.changes import Catalog, CatalogPut
from fastpath.store.commands import CommandTxn, run_group

_core = load_core()

PROJECT = "b3c1d2e3f4a5b6c7d8e9f0a1b2c3d4e5"
BODY = {"server": {"name": "bench", "flavorRef": FLAVORS[0]["id"], "imageRef": IMAGES[0]["id"],
                   "networks": "none"}}
HOSTS = {f"h{i}": {"vcpus": 10**6, "ram_mb": 1 << 40, "disk_gb": 1 << 40, "vcpus_used": 0,
                   "ram_mb_used": 0, "disk_gb_used": 0, "status": "enabled",
                   "availability_zone": "nova"} for i in range(256)}


class _Req:
    project = PROJECT
    user = "bench"
    is_admin = False
    version = 37

    @property
    def request_id(self) -> str:  # a fresh command id per create, as each request has
        return str(_core.make_request_id())


Req = _Req()


@pytest.fixture(scope="module")
def commands(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SC.ServerCommands]:
    data = tmp_path_factory.mktemp("bench-commands")
    store = Store.open(data, map_size=1 << 32)
    store.apply(Batch(catalog=[*catalog(1), CatalogPut(Catalog.CELLS, "cell1", {"hosts": HOSTS}),
                               CatalogPut(Catalog.CELLS, "cell2", {"hosts": HOSTS}),
                               CatalogPut(Catalog.QUOTA_LIMITS, PROJECT, {
                                   "instances": -1, "cores": -1, "ram": -1})]))
    ctx = ApiContext.create(load(None, {"data_dir": str(data)}), store)
    yield SC.ServerCommands(ctx)
    store.close()


def _plan(cmds: SC.ServerCommands) -> Any:
    if not SC.fast_create_ok(BODY, 37):
        SC.CREATE(37).validate(BODY)
    with cmds.store.read() as r:
        return cmds._plan_create(r, Req, BODY, BODY["server"], 37)


def bench_create_read_phase(benchmark: Any, commands: SC.ServerCommands) -> None:
    plan = benchmark(_plan, commands)
    assert len(plan.servers) == 1


def _work(plan: Any) -> Any:
    def work(c: CommandTxn) -> int:
        n = SC.instances_allowed(c.reader, plan.project, plan.flavor, plan.min_count,
                                 len(plan.servers))
        c.put_provisional([p.prepared for p in plan.servers[:n]])
        for p in plan.servers[:n]:
            c.put_outbox_packed(p.outbox)
        return n
    return work


@pytest.mark.parametrize("group", [1, 16, 128])
def bench_create_group_commit(benchmark: Any, commands: SC.ServerCommands, group: int) -> None:
    """One durable commit of ``group`` creates (fresh servers every round)."""

    def setup() -> tuple[tuple[list[Any]], dict[str, Any]]:
        return ([_work(_plan(commands)) for _ in range(group)],), {}

    def commit(works: list[Any]) -> Any:
        return run_group(commands.store, works, views.render_server, lambda kind: None)

    result = benchmark.pedantic(commit, setup=setup, rounds=12, iterations=1)
    assert all(ok for ok, _ in result.outcomes)

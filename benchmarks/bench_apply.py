"""The store's write path: ``Store.apply`` of 1,000 changes per durable write transaction,
as cellsync applies a batch (issue 6's goal: >= 50,000 changes/s applied).

Each round applies a fresh batch (new versions of the same 1,000 servers, so every change
wins and rewrites record, index entries and view blob).  One change = one server.  Report
changes/s as 1,000 / median.  Rendering the views is measured apart (cellsync renders
before it opens the write transaction).  ``prepared``: the changes as cellsync's workers hand
them over (``store.Prepared``: record, index entry and views packed before the transaction),
so the transaction only checks versions and puts bytes.
"""

from __future__ import annotations

import itertools
import uuid as uuidlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fastpath.api import views
from fastpath.api.views import table
from fastpath.store import Batch, Store, Upsert, prepare_upsert
from fastpath.store.samples import EPOCH_2024, sample_record

N = 1000


def _uid(i: int) -> str:
    return str(uuidlib.uuid5(uuidlib.NAMESPACE_URL, f"bench-apply/{i}"))


@pytest.fixture(scope="module")
def records() -> list[dict[str, Any]]:
    return [sample_record(_uid(i), 1, created_at=EPOCH_2024 + i, seed=i) for i in range(N)]


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    views.configure(frozenset())
    s = Store.open(tmp_path, map_size=1 << 30)
    yield s
    s.close()


def _batches(records: list[dict[str, Any]], form: str) -> Iterator[tuple[Batch, Any]]:
    for version in itertools.count(2):
        recs = [{**r, "version": version, "updated_at": r["created_at"] + version}
                for r in records]
        if form == "prepared":
            yield Batch([prepare_upsert(r, views.render_server) for r in recs]), None
            continue
        rendered = {r["uuid"]: views.render_server(r) for r in recs} if form != "record" else None
        batch = Batch([Upsert(r["uuid"], version, r) for r in recs])
        yield batch, (lambda rec, m=rendered: m[rec["uuid"]]) if rendered else None


@pytest.mark.parametrize("form", ["record", "record+views", "prepared"])
def bench_apply_1000_durable(benchmark: Any, store: Store, records: list[dict[str, Any]],
                             form: str) -> None:
    gen = _batches(records, form)
    store.apply(*next(gen))  # the servers exist: every round is an update

    def setup() -> tuple[tuple[Batch, Any], dict[str, Any]]:
        return next(gen), {}

    result = benchmark.pedantic(store.apply, setup=setup, rounds=8, iterations=1)
    assert result.applied == N


def bench_render_views(benchmark: Any, records: list[dict[str, Any]]) -> None:
    """One server rendered again and again (every memoized fragment hits)."""
    views.configure(frozenset())
    rec = records[0]
    out = benchmark(views.render_server, rec)
    assert out


def bench_render_1000_state_changes(benchmark: Any, records: list[dict[str, Any]]) -> None:
    """1,000 distinct servers, each after a state change (reboot started or finished, a new
    version and updated_at): what cellsync renders per batch.  us/server = median / 1,000."""
    views.configure(frozenset())
    table.clear_memos()
    versions = itertools.count(2)

    def setup() -> tuple[tuple[list[dict[str, Any]]], dict[str, Any]]:
        v = next(versions)
        task = "rebooting" if v % 2 else None
        recs = [{**r, "version": v, "updated_at": r["created_at"] + v * 1_000_000,
                 "task_state": task, "status": "REBOOT" if task else "ACTIVE"}
                for r in records]
        return (recs,), {}

    out = benchmark.pedantic(lambda recs: [views.render_server(r) for r in recs], setup=setup,
                             rounds=10)
    assert len(out) == N

"""The create's writes packed before the write transaction (``prepare_provisional`` +
``CommandTxn.put_provisional``, ``pack_outbox`` + ``put_outbox_packed``) leave the store
exactly as apply's upsert path (``upsert_provisional``) and ``put_outbox`` do: byte for
byte, for plain records, records carrying API fields, views rendered in the transaction,
several servers at once, and a uuid with stray API fields (the fallback)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from fastpath.api import views
from fastpath.store import Store
from fastpath.store import layout as L
from fastpath.store import record as R
from fastpath.store.commands import (
    CommandTxn,
    pack_outbox,
    prepare_pending,
    prepare_provisional,
    run_group,
)
from fastpath.store.errors import RecordError
from fastpath.store.samples import sample_record

U1 = "11111111-2222-4333-8444-555555555555"
U2 = "21111111-2222-4333-8444-555555555555"


@pytest.fixture
def stores(tmp_path: Path) -> Iterator[tuple[Store, Store]]:
    a = Store.open(tmp_path / "a", map_size=1 << 22)
    b = Store.open(tmp_path / "b", map_size=1 << 22)
    yield a, b
    a.close()
    b.close()


def commit(store: Store, work: Callable[[CommandTxn], Any], render: Any = views.render_server) -> Any:
    (ok, value), = run_group(store, [work], render, lambda kind: None).outcomes
    if not ok:
        raise value
    return value


def provisional(uuid: str, **kw: Any) -> dict[str, Any]:
    return sample_record(uuid, 0, vm_state="building", task_state="scheduling",
                         done_commands=[], **kw)


def both(stores: tuple[Store, Store], recs: list[dict[str, Any]], rendered: bool = True,
         render: Any = views.render_server) -> None:
    a, b = stores

    def slow(c: CommandTxn) -> None:
        for rec in recs:
            c.upsert_provisional(rec, views.render_server(rec) if rendered else None)
            c.put_outbox(rec["cell"], rec["uuid"], "req-" + rec["uuid"], {"action": "create"},
                         rec["created_at"])

    prepared = [prepare_provisional(rec, views.render_server(rec) if rendered else None)
                for rec in recs]
    entries = [pack_outbox(rec["cell"], rec["uuid"], "req-" + rec["uuid"],
                           {"action": "create"}, rec["created_at"]) for rec in recs]

    def fast(c: CommandTxn) -> None:
        c.put_provisional(prepared)
        for e in entries:
            c.put_outbox_packed(e)

    commit(a, slow, render)
    commit(b, fast, render)
    with a.read() as ra, b.read() as rb:
        assert ra.dump() == rb.dump()
        assert not rb.check()


def test_one_server_same_bytes(stores: tuple[Store, Store]) -> None:
    both(stores, [provisional(U1)])
    with stores[1].read() as r:
        assert r.quota_usage(provisional(U1)["project_id"])["instances"] == 1
        assert r.view(U1, views.VIEW_ID) is not None


def test_several_servers_and_views_rendered_in_the_txn(stores: tuple[Store, Store]) -> None:
    both(stores, [provisional(U1), provisional(U2)], rendered=False)


def test_no_renderer_writes_no_views(stores: tuple[Store, Store]) -> None:
    both(stores, [provisional(U1)], rendered=False, render=None)
    with stores[1].read() as r:
        assert r.view(U1, views.VIEW_ID) is None


def test_api_fields_of_the_record_are_dropped_as_apply_does(stores: tuple[Store, Store]) -> None:
    rec = provisional(U1)
    rec["pending"] = {"req-x": {"at": 1, "fields": {"task_state": "deleting"}}}
    both(stores, [rec])


def test_stray_api_fields_take_apply_path(stores: tuple[Store, Store]) -> None:
    at = R.now_us()  # a live prediction (R.PENDING_TTL_US drops old ones), the same in both
    for s in stores:
        with s._env.begin(write=True) as txn:
            txn.put(L.uuid_key(U1), R.pack({"pending": {"req-y": {
                "at": at, "fields": {"task_state": "rebooting"}}}}), db=s.dbs.api_fields)
    both(stores, [provisional(U1)])
    with stores[1].read() as r:
        got = r.get_server(U1)
        assert got is not None and got["pending"]  # merged, as apply's upsert merges


def test_a_taken_uuid_is_refused(stores: tuple[Store, Store]) -> None:
    _, b = stores
    p = prepare_provisional(provisional(U1))
    commit(b, lambda c: c.put_provisional([p]))
    with pytest.raises(RecordError, match="exists already"):
        commit(b, lambda c: c.put_provisional([p]))
    with pytest.raises(RecordError, match="version 0"):
        prepare_provisional(sample_record(U2, 3))


def _live(store: Store, uuid: str, **fields: Any) -> None:
    from fastpath.store import Batch, Upsert
    store.apply(Batch([Upsert(uuid, 1, sample_record(uuid, 1, **fields))]), views.render_server)


def test_planned_pending_writes_what_set_pending_writes(stores: tuple[Store, Store]) -> None:
    a, b = stores
    for s in stores:
        _live(s, U1)
    steps: list[tuple[str, dict[str, Any], int]] = [
        ("req-1", {"task_state": "powering-off"}, 1000),
        ("req-2", {"locked": True, "locked_by": "owner", "locked_reason": None}, 900)]
    for cid, fields, at in steps:  # the second one's ``at`` is raised past the first's
        def slow(c: CommandTxn, cid: str = cid, fields: dict[str, Any] = fields,
                 at: int = at) -> Any:
            return c.set_pending(U1, cid, fields, at)

        e1 = commit(a, slow)
        with b.read() as r:
            plan = prepare_pending(r, U1, cid, fields, at, views.render_server)
        assert plan is not None

        def fast(c: CommandTxn, plan: Any = plan) -> Any:
            assert c.pending_is_current(plan)
            return c.put_pending(plan)

        e2 = commit(b, fast)
        assert e1 == e2
    with a.read() as ra, b.read() as rb:
        assert ra.dump() == rb.dump()
        assert not rb.check()
    assert e2["task_state"] == "powering-off" and e2["locked"]


def test_a_stale_plan_is_not_current(stores: tuple[Store, Store]) -> None:
    _, b = stores
    _live(b, U1)
    with b.read() as r:
        plan = prepare_pending(r, U1, "req-1", {"task_state": "pausing"}, 1000, None)
        assert prepare_pending(r, U2, "req-1", {"task_state": "pausing"}, 1000, None) is None
    assert plan is not None
    commit(b, lambda c: c.set_pending(U1, "req-0", {"task_state": "rebooting"}, 500))
    assert commit(b, lambda c: c.pending_is_current(plan)) is False
    with pytest.raises(RecordError, match="not allowed"):
        with b.read() as r:
            prepare_pending(r, U1, "req-9", {"uuid": "x"}, 1000, None)

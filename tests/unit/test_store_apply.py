"""The store's write rule (versions, tombstones, cursor, indexes) and its read API."""

from __future__ import annotations

import uuid as uuidlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest

from fastpath.store import (
    Batch,
    Catalog,
    CatalogPut,
    MarkerNotFound,
    RecordError,
    Store,
    Tombstone,
    Upsert,
    prepare_upsert,
)
from fastpath.store import layout as L
from fastpath.store import record as R
from fastpath.store.samples import EPOCH_2024, sample_record

P1 = "project-one"
P2 = "project-two"


def uid(i: int) -> str:
    return str(uuidlib.UUID(int=(i + 1) * 0x9E3779B97F4A7C15 % 2**128, version=4))


def rec(i: int, v: int, project: str = P1, **kw: Any) -> dict[str, Any]:
    kw.setdefault("created_at", EPOCH_2024 + i * 1_000_000)
    kw.setdefault("updated_at", kw["created_at"] + v * 1000)
    return sample_record(uid(i), v, project_id=project, seed=i * 1000 + v, **kw)


def up(i: int, v: int, project: str = P1, **kw: Any) -> Upsert:
    return Upsert(uid(i), v, rec(i, v, project, **kw))


def tomb(
    i: int, v: int, project: str = P1, record: dict[str, Any] | None = None,
    created: int | None = None,
) -> Tombstone:
    created = EPOCH_2024 + i * 1_000_000 if created is None else created
    return Tombstone(uid(i), v, project, created, created + v * 1000 + 500, record)


def render(record: Any) -> dict[bytes, bytes]:
    return {
        b"show": msgpack.packb([record["uuid"], record["version"]]),
        b"name": record["name"].encode(),
    }


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    # sync off: these tests are about logic; durability has its own tests (test_store_env).
    s = Store.open(tmp_path, map_size=64 << 20, sync=False, metasync=False)
    yield s
    s.close()


def logical(store: Store) -> dict[str, list[tuple[bytes, bytes]]]:
    with store.read() as r:
        return r.dump(logical=True)


def assert_consistent(store: Store) -> None:
    with store.read() as r:
        assert r.check() == []


# -- the version rule -------------------------------------------------------------------------
def test_upsert_creates_record_indexes_and_usage(store: Store) -> None:
    s = store.apply(Batch([up(1, 1), up(2, 1, P2)]), render)
    assert (s.applied, s.skipped_stale, s.tombstoned) == (2, 0, 0)
    with store.read() as r:
        assert r.get_server(uid(1)) == rec(1, 1)
        assert r.head(uid(1)) == (1, P1, rec(1, 1)["created_at"], rec(1, 1)["updated_at"])
        assert [L.uuid_str(u) for u in r.page(P1)] == [uid(1)]
        assert [L.uuid_str(u) for u in r.page(None)] == [uid(2), uid(1)]
        assert r.quota_usage(P1) == {"instances": 1, "cores": 1, "ram": 2048}
        assert bytes(r.views(uid(1))[b"name"]) == rec(1, 1)["name"].encode()
        assert r.check() == []


def test_higher_version_replaces_equal_and_lower_are_dropped(store: Store) -> None:
    store.apply(Batch([up(1, 2)]))
    s = store.apply(Batch([up(1, 1), up(1, 2, name="other")]))
    assert (s.applied, s.skipped_stale) == (0, 2)
    s = store.apply(Batch([up(1, 3)]))
    assert s.applied == 1
    with store.read() as r:
        assert r.get_server(uid(1)) == rec(1, 3)
    assert_consistent(store)


def test_update_rewrites_indexes_and_usage(store: Store) -> None:
    store.apply(Batch([up(1, 1), up(2, 1)]))
    bigger = dict(rec(1, 1)["flavor"], id="2", vcpus=4, ram=8192)
    store.apply(Batch([up(1, 2, vm_state="stopped", power_state=4, status="SHUTOFF",
                          flavor=bigger)]))
    with store.read() as r:
        entries = dict(r.page_entries(P1))
        assert entries[L.uuid_key(uid(1))].status == "SHUTOFF"
        assert entries[L.uuid_key(uid(1))].flavor_id == "2"
        assert r.quota_usage(P1) == {"instances": 2, "cores": 5, "ram": 8192 + 2048}
        changed = [(c.updated_at, L.uuid_str(c.uuid)) for c in r.changes()]
        assert changed == sorted([(rec(2, 1)["updated_at"], uid(2)),
                                  (rec(1, 2)["updated_at"], uid(1))])
        assert r.check() == []


def test_a_server_that_changes_project_moves_in_the_indexes(store: Store) -> None:
    store.apply(Batch([up(1, 1, P1)]))
    store.apply(Batch([up(1, 2, P2, created_at=EPOCH_2024 + 5)]))
    with store.read() as r:
        assert r.page(P1) == [] and [L.uuid_str(u) for u in r.page(P2)] == [uid(1)]
        assert r.quota_usage(P1)["instances"] == 0 and r.quota_usage(P2)["instances"] == 1
        assert r.check() == []


def cell_of(store: Store, cell: str) -> list[tuple[str, int]]:
    with store.read() as r:
        return sorted((L.uuid_str(u), h.version) for u, h in r.cell_servers(cell))


def test_by_cell_follows_creates_moves_and_tombstones(store: Store) -> None:
    store.apply(Batch([up(1, 1, cell="c1"), up(2, 1, cell="c1"), up(3, 1, cell="c2")]))
    assert cell_of(store, "c1") == sorted([(uid(1), 1), (uid(2), 1)])
    before = logical(store)["by_cell"]
    store.apply(Batch([up(1, 2, cell="c1")]))  # same cell: the entry stays as it was
    assert logical(store)["by_cell"] == before
    store.apply(Batch([up(2, 2, cell="c2")]))  # moved
    assert cell_of(store, "c1") == [(uid(1), 2)]
    assert cell_of(store, "c2") == sorted([(uid(2), 2), (uid(3), 1)])
    # A tombstone whose final record names the right cell, another cell, or has no record.
    final = rec(1, 3, vm_state="deleted", status="DELETED", cell="c1")
    wrong = rec(2, 3, vm_state="deleted", status="DELETED", cell="c1")
    store.apply(Batch([tomb(1, 3, record=final), tomb(2, 3, record=wrong), tomb(3, 2)]))
    assert cell_of(store, "c1") == [] and cell_of(store, "c2") == []
    assert_consistent(store)
    assert cell_of(store, "") == [] and cell_of(store, "nul\x00") == []  # no such cell names


def test_tombstone_removes_record_indexes_and_views(store: Store) -> None:
    store.apply(Batch([up(1, 1), up(2, 1)]), render)
    final = rec(1, 2, vm_state="deleted", status="DELETED")
    s = store.apply(Batch([tomb(1, 2, record=final)]), render)
    assert s.tombstoned == 1
    with store.read() as r:
        assert r.get_server(uid(1)) is None and r.head(uid(1)) is None
        assert r.views(uid(1)) == {} and r.view(uid(1), b"show") is None
        assert [L.uuid_str(u) for u in r.page(P1)] == [uid(2)]
        t = r.tombstone(uid(1))
        assert t is not None and (t.version, t.project_id) == (2, P1) and t.record == final
        deleted = [c for c in r.changes() if c.deleted]
        assert [(L.uuid_str(c.uuid), c.updated_at) for c in deleted] == [
            (uid(1), tomb(1, 2).deleted_at)]
        entry = r.index_entry(uid(1))
        assert entry is not None and entry.deleted and entry.status == "DELETED"
        assert r.quota_usage(P1) == {"instances": 1, "cores": 1, "ram": 2048}
        assert r.check() == []


def test_tombstone_without_record_keeps_no_record(store: Store) -> None:
    store.apply(Batch([up(1, 1)]))
    store.apply(Batch([tomb(1, 2)]))
    with store.read() as r:
        t = r.tombstone(uid(1))
        assert t is not None and t.record is None
        entry = r.index_entry(uid(1))
        assert entry is not None and entry.deleted and entry.project_id == P1


def test_no_resurrection_when_updates_arrive_after_the_tombstone(store: Store) -> None:
    store.apply(Batch([up(1, 1)]))
    store.apply(Batch([tomb(1, 3)]))
    s = store.apply(Batch([up(1, 2), up(1, 3), up(1, 1)]), render)
    assert (s.applied, s.skipped_stale, s.blocked_by_tombstone) == (0, 3, 3)
    with store.read() as r:
        assert r.get_server(uid(1)) is None and r.views(uid(1)) == {}
        assert r.tombstone(uid(1)) is not None
    assert_consistent(store)


def test_no_resurrection_when_the_tombstone_arrives_first(store: Store) -> None:
    s = store.apply(Batch([tomb(1, 5)]))
    assert s.tombstoned == 1
    s = store.apply(Batch([up(1, v) for v in (1, 5, 3)]))
    assert (s.applied, s.blocked_by_tombstone) == (0, 3)
    with store.read() as r:
        assert r.get_server(uid(1)) is None and r.page(P1) == []
        assert r.quota_usage(P1)["instances"] == 0
    assert_consistent(store)


def test_a_newer_version_than_the_tombstone_lives_again(store: Store) -> None:
    store.apply(Batch([tomb(1, 3)]))
    s = store.apply(Batch([up(1, 4)]))
    assert s.applied == 1
    with store.read() as r:
        assert r.tombstone(uid(1)) is None
        assert r.get_server(uid(1)) == rec(1, 4)
        assert [c.deleted for c in r.changes()] == [False]
    assert_consistent(store)


def test_tombstone_wins_a_tie_and_loses_to_a_newer_record(store: Store) -> None:
    store.apply(Batch([up(1, 3), up(2, 5)]))
    s = store.apply(Batch([tomb(1, 3), tomb(2, 4)]))
    assert (s.tombstoned, s.skipped_stale) == (1, 1)
    with store.read() as r:
        assert r.get_server(uid(1)) is None and r.tombstone(uid(1)) is not None
        assert r.get_server(uid(2)) == rec(2, 5) and r.tombstone(uid(2)) is None
    assert_consistent(store)


def test_a_newer_tombstone_replaces_an_older_one(store: Store) -> None:
    store.apply(Batch([tomb(1, 3)]))
    s = store.apply(Batch([tomb(1, 2), tomb(1, 3), tomb(1, 6)]))
    assert (s.tombstoned, s.skipped_stale) == (1, 2)
    with store.read() as r:
        t = r.tombstone(uid(1))
        assert t is not None and (t.version, t.deleted_at) == (6, tomb(1, 6).deleted_at)
        assert [c.updated_at for c in r.changes()] == [tomb(1, 6).deleted_at]
        assert r.count(L.TOMB_AGE) == 1
    assert_consistent(store)


def test_a_change_must_agree_with_its_record(store: Store) -> None:
    with pytest.raises(RecordError):
        store.apply(Batch([Upsert(uid(1), 2, rec(1, 1))]))
    with pytest.raises(RecordError):
        store.apply(Batch([Upsert(uid(2), 1, rec(1, 1))]))
    with pytest.raises(RecordError):
        store.apply(Batch([tomb(1, 2, record=rec(1, 1))]))
    with pytest.raises(RecordError):
        store.apply(Batch([Upsert("not-a-uuid", 1, rec(1, 1))]))
    partial = {k: v for k, v in rec(1, 1).items() if k != "flavor"}
    with pytest.raises(RecordError, match="not a complete record"):
        store.apply(Batch([Upsert(uid(1), 1, partial)]))
    with pytest.raises(RecordError, match="not a change"):
        store.apply(Batch(["nonsense"]))  # type: ignore[list-item]
    with store.read() as r:
        assert r.count(L.SERVERS) == 0


# -- idempotence, atomicity, the cursor -------------------------------------------------------
def mixed_batch(cursor: int) -> Batch:
    return Batch(
        [up(1, 1), up(2, 1), up(3, 1, P2), up(1, 2), tomb(2, 2), tomb(4, 1), up(5, 3)],
        cursor=("cell1", cursor),
        catalog=[CatalogPut(Catalog.FLAVORS, "1", {"id": "1", "name": "m1.small"})],
    )


def test_the_same_batch_twice_gives_the_same_store(store: Store) -> None:
    first = store.apply(mixed_batch(10), render)
    before = logical(store)
    with store.read() as r:
        raw_before = r.dump()
    again = store.apply(mixed_batch(10), render)
    assert (first.applied, first.tombstoned) == (5, 2)
    assert (again.applied, again.tombstoned, again.skipped_stale) == (0, 0, 7)
    assert again.cursor == 10 and not again.cursor_moved
    assert logical(store) == before
    with store.read() as r:
        assert r.dump() == raw_before  # not even a superseded log entry more
    assert_consistent(store)


def test_replaying_an_earlier_batch_keeps_the_later_state_and_cursor(store: Store) -> None:
    store.apply(mixed_batch(10), render)
    later = Batch([up(1, 3), up(3, 2, P2), tomb(5, 4)], cursor=("cell1", 20))
    store.apply(later, render)
    expected = logical(store)
    s = store.apply(mixed_batch(10), render)
    assert s.applied == 0 and s.cursor == 20 and not s.cursor_moved
    assert logical(store) == expected
    with store.read() as r:
        assert r.cursor("cell1") == 20


def test_reset_cursor_moves_it_back(store: Store) -> None:
    store.apply(Batch(cursor=("cell1", 50)))
    s = store.apply(Batch(cursor=("cell1", 7), reset_cursor=True))
    assert s.cursor == 7 and s.cursor_moved
    store.apply(Batch(cursor=("cell2", 3)))
    with store.read() as r:
        assert r.cursors() == {"cell1": 7, "cell2": 3}
        assert r.cursor("cell3") is None


def test_a_cursor_keeps_the_mark_of_its_entry(store: Store) -> None:
    store.apply(Batch(cursor=("cell1", 5), cursor_mark=1234))
    with store.read() as r:
        assert (r.cursor("cell1"), r.cursor_mark("cell1")) == (5, 1234)
        assert r.cursor_mark("nope") == 0 and r.cursor_mark("") == 0
    store.apply(Batch(cursor=("cell1", 4), cursor_mark=99))  # behind: ignored, mark too
    store.apply(Batch(cursor=("cell1", 6)))  # forward without a mark: none recorded
    with store.read() as r:
        assert (r.cursor("cell1"), r.cursor_mark("cell1")) == (6, 0)
    s = store.apply(Batch(cursor=("cell1", 6), cursor_mark=7, reset_cursor=True))
    assert s.cursor_moved  # same seq, another entry there: a reset records it
    with store.read() as r:
        assert r.cursor_mark("cell1") == 7 and r.cursors() == {"cell1": 6}
    with pytest.raises(RecordError):
        store.apply(Batch(cursor=("cell1", 7), cursor_mark=-1))


def test_bad_cursor_is_refused(store: Store) -> None:
    for bad in (-1, 2**64, True):
        with pytest.raises(RecordError):
            store.apply(Batch(cursor=("cell1", bad)))  # type: ignore[arg-type]


def test_a_failure_inside_the_batch_writes_nothing(store: Store) -> None:
    store.apply(Batch([up(1, 1)], cursor=("cell1", 1)), render)
    before = logical(store)

    def broken(record: Any) -> dict[bytes, bytes]:
        if record["uuid"] == uid(3):
            raise RuntimeError("renderer bug")
        return render(record)

    with pytest.raises(RuntimeError):
        store.apply(Batch([up(1, 2), up(2, 1), up(3, 1)], cursor=("cell1", 2)), broken)
    assert logical(store) == before
    with store.read() as r:
        assert r.cursor("cell1") == 1


# -- views and API-owned fields ---------------------------------------------------------------
def test_views_follow_the_winning_record(store: Store) -> None:
    calls: list[tuple[str, int]] = []

    def counting(record: Any) -> dict[bytes, bytes]:
        calls.append((record["uuid"], record["version"]))
        views = render(record)
        if record["version"] >= 2:
            del views[b"name"]  # a view the new record no longer has goes away
            views[b"extra"] = b"{}"
        return views

    store.apply(Batch([up(1, 1)]), counting)
    store.apply(Batch([up(1, 1), up(1, 2)]), counting)
    assert calls == [(uid(1), 1), (uid(1), 2)]  # the stale duplicate is not rendered
    with store.read() as r:
        views = {k: bytes(v) for k, v in r.views(uid(1)).items()}
    assert views == {b"show": msgpack.packb([uid(1), 2]), b"extra": b"{}"}
    with pytest.raises(RecordError):
        store.apply(Batch([up(1, 3)]), lambda record: {b"": b"x"})
    with pytest.raises(RecordError):
        store.apply(Batch([up(1, 3)]), lambda record: {b"v" * 65: b"x"})


def put_api_fields(store: Store, i: int, fields: dict[str, Any]) -> None:
    """What the command path (a later step) does: write the API-owned part of a server."""
    store._write(lambda txn: txn.put(L.uuid_key(uid(i)), R.pack(fields), db=store.dbs.api_fields))


def test_cell_records_never_overwrite_api_owned_fields(store: Store) -> None:
    store.apply(Batch([up(1, 1)]))
    pending = {"cmd-1": {"task_state": "deleting"}, "cmd-2": {"name": "new"}}
    put_api_fields(store, 1, {"pending": pending})
    # The cell sends a record claiming API-owned values: ignored, the stored ones stay.
    store.apply(Batch([up(1, 2, pending={"evil": {}})]), render)
    with store.read() as r:
        server = r.get_server(uid(1))
        assert server is not None and server["pending"] == pending
    # The cell reports cmd-1 done: its pending values go, cmd-2's stay.
    store.apply(Batch([up(1, 3, done_commands=["cmd-1"])]))
    with store.read() as r:
        server = r.get_server(uid(1))
        assert server is not None and server["pending"] == {"cmd-2": {"name": "new"}}
    store.apply(Batch([up(1, 4, done_commands=["cmd-1", "cmd-2"])]))
    with store.read() as r:
        server = r.get_server(uid(1))
        assert server is not None and server["pending"] == {}
        assert r.count(L.API_FIELDS) == 0
    # Without stored API fields, a cell's claim is dropped too.
    store.apply(Batch([up(2, 1, pending={"evil": {}})]))
    with store.read() as r:
        server = r.get_server(uid(2))
        assert server is not None and server["pending"] == {}
    assert_consistent(store)


def test_prepared_upserts_store_what_upserts_store(tmp_path: Path) -> None:
    """A Prepared upsert (packed ahead, as cellsync's workers send them) leaves the store
    byte for byte as the Upsert of the same record does: new servers, updates, a move to
    another project and cell, a stale one, one over a tombstone, one carrying API-owned
    values (dropped), and servers with pending commands (merged and rendered in the
    transaction from the effective record, with apply's renderer)."""
    now = R.now_us()
    pending = {"c1": {"at": now, "fields": {"task_state": "rebooting", "name": "renamed"}},
               "c2": {"at": now, "fields": {"name": "x"}}}
    steps: list[list[dict[str, Any]]] = [
        [rec(1, 1), rec(2, 1, P2), rec(3, 1)],
        [rec(1, 2), rec(2, 3, P1, cell="cell2"), rec(3, 1)],  # moved; a stale replay
        [rec(1, 4, done_commands=["c2"]), rec(4, 5, pending={"evil": {}})],
        [rec(3, 7)],  # after its tombstone (below) at 6: lives again
    ]
    stores = [Store.open(tmp_path / n, map_size=64 << 20, sync=False, metasync=False)
              for n in ("upsert", "prepared")]
    try:
        for store, prepared in zip(stores, (False, True), strict=True):
            for n, step in enumerate(steps):
                changes = [prepare_upsert(r, render) if prepared else Upsert(r["uuid"],
                           r["version"], r) for r in step]
                s = store.apply(Batch(changes, cursor=("cell1", n)), render)
                assert s.applied + s.skipped_stale == len(step)
                if n == 0:
                    put_api_fields(store, 1, {"pending": pending})
                if n == 2:
                    store.apply(Batch([tomb(3, 6)]))
        assert logical(stores[0]) == logical(stores[1])
        with stores[1].read() as r:
            one = r.get_server(uid(1))
            assert one is not None and one["pending"] == {"c1": pending["c1"]}
            views = {k: bytes(v) for k, v in r.views(uid(1)).items()}
            assert views == render(R.effective(one)) and views[b"name"] == b"renamed"
            four = r.get_server(uid(4))
            assert four is not None and four["pending"] == {}
            assert r.check() == []
    finally:
        for store in stores:
            store.close()


def test_pending_entries_expire_with_the_next_cell_record(store: Store) -> None:
    """A prediction whose command the cell never reports done (lost, or beyond the kept
    done_commands) does not overlay the server forever: past R.PENDING_TTL_US the next
    cell record of the server drops it; a recent one stays."""
    store.apply(Batch([up(1, 1)]))
    now = R.now_us()
    pending = {"old": {"at": now - R.PENDING_TTL_US - 1, "fields": {"task_state": "rebooting"}},
               "new": {"at": now, "fields": {"name": "renamed"}}}
    put_api_fields(store, 1, {"pending": pending})
    store.apply(Batch([up(1, 2)]), render)
    with store.read() as r:
        server = r.get_server(uid(1))
        assert server is not None and server["pending"] == {"new": pending["new"]}
    assert_consistent(store)


def test_tombstone_removes_api_owned_fields(store: Store) -> None:
    store.apply(Batch([up(1, 1)]))
    put_api_fields(store, 1, {"pending": {"c": {}}})
    store.apply(Batch([tomb(1, 2)]))
    with store.read() as r:
        assert r.count(L.API_FIELDS) == 0


# -- lists ------------------------------------------------------------------------------------
@pytest.fixture
def listed(store: Store) -> Store:
    # 30 servers in P1, 10 in P2; created_at repeats so that ties need the uuid tie-break.
    changes = [up(i, 1, P1, created_at=EPOCH_2024 + (i % 7) * 1000) for i in range(30)]
    changes += [up(i, 1, P2, created_at=EPOCH_2024 + i) for i in range(30, 40)]
    store.apply(Batch(changes))
    return store


def expected_order(store: Store, project: str | None) -> list[bytes]:
    with store.read() as r:
        heads = [(u, r.head(u)) for u in (L.uuid_key(uid(i)) for i in range(40))]
    rows = [(h.created_at, u) for u, h in heads if h and (project is None or h.project_id == project)]
    return [u for _, u in sorted(rows, reverse=True)]  # created_at desc, id desc


@pytest.mark.parametrize("project", [P1, P2, None])
def test_pages_follow_novas_default_order(listed: Store, project: str | None) -> None:
    want = expected_order(listed, project)
    with listed.read() as r:
        assert r.page(project) == want
        assert r.page(project, reverse=True) == want[::-1]
        assert r.page(project, limit=5) == want[:5]
        assert r.page(project, limit=0) == []


@pytest.mark.parametrize("project", [P1, None])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("limit", [1, 3, 7, 1000])
def test_marker_pagination_lists_every_server_once(
    listed: Store, project: str | None, reverse: bool, limit: int
) -> None:
    want = expected_order(listed, project)
    if reverse:
        want = want[::-1]
    got: list[bytes] = []
    marker: bytes | None = None
    for _ in range(100):
        with listed.read() as r:
            page = r.page(project, marker=marker, limit=limit, reverse=reverse)
        got += page
        if len(page) < limit:
            break
        marker = page[-1]
    assert got == want


def test_predicates_filter_on_index_entries(listed: Store) -> None:
    listed.apply(Batch([up(3, 2, vm_state="error", status="ERROR", tags=["x"])]))
    with listed.read() as r:
        errors = r.page(P1, predicate=lambda e: e.status == "ERROR")
        assert [L.uuid_str(u) for u in errors] == [uid(3)]
        tagged = r.page_entries(None, predicate=lambda e: "x" in e.tags)
        assert [L.uuid_str(u) for u, _ in tagged] == [uid(3)]
        assert r.page(P1, predicate=lambda e: e.status == "ACTIVE", limit=4) == [
            u for u in expected_order(listed, P1) if u != L.uuid_key(uid(3))][:4]


def test_bad_markers(listed: Store) -> None:
    with listed.read() as r:
        for bad in ("nope", uid(999), uid(35)):  # not a uuid, unknown, another project's
            with pytest.raises(MarkerNotFound):
                r.page(P1, marker=bad)
    everyone = expected_order(listed, None)
    at = everyone.index(L.uuid_key(uid(35)))
    with listed.read() as r:
        assert r.page(None, marker=uid(35)) == everyone[at + 1 :]  # all_tenants: any marker


def test_a_deleted_marker_still_pages_from_its_place(listed: Store) -> None:
    want = expected_order(listed, P1)
    victim = want[10]
    with listed.read() as r:
        head = r.head(victim)
    assert head is not None
    listed.apply(Batch([tomb(_index_of(victim), 2, created=head.created_at)]))
    with listed.read() as r:
        assert r.page(P1, marker=victim) == want[11:]
        assert r.page(P1, marker=victim, reverse=True) == want[:10][::-1]


def _index_of(u: bytes) -> int:
    return next(i for i in range(40) if L.uuid_key(uid(i)) == u)


def test_projects_with_unusable_names_have_no_servers(listed: Store) -> None:
    with listed.read() as r:
        assert r.page("bad\x00project") == [] and r.page("x" * 300) == []


# -- changes-since ----------------------------------------------------------------------------
def test_changes_bounds_order_project_and_deleted(store: Store) -> None:
    store.apply(Batch([up(1, 1), up(2, 1, P2), up(3, 1)]))
    store.apply(Batch([up(1, 2), tomb(3, 2)]))
    times = {
        uid(1): rec(1, 2)["updated_at"], uid(2): rec(2, 1)["updated_at"],
        uid(3): tomb(3, 2).deleted_at,
    }
    with store.read() as r:
        allc = [(L.uuid_str(c.uuid), c.updated_at, c.deleted, c.project_id) for c in r.changes()]
        assert allc == sorted(
            [(uid(1), times[uid(1)], False, P1), (uid(2), times[uid(2)], False, P2),
             (uid(3), times[uid(3)], True, P1)], key=lambda x: x[1])
        assert [c.updated_at for c in r.changes(reverse=True)] == sorted(times.values())[::-1]
        t = sorted(times.values())
        assert [c.updated_at for c in r.changes(t[1])] == t[1:]  # since: inclusive
        assert [c.updated_at for c in r.changes(before=t[1])] == t[:2]  # before: inclusive
        assert [c.updated_at for c in r.changes(t[1], before=t[1], reverse=True)] == [t[1]]
        assert {L.uuid_str(c.uuid) for c in r.changes(project=P1)} == {uid(1), uid(3)}


def test_trim_removes_superseded_log_entries_only(store: Store) -> None:
    store.apply(Batch([up(i, 1) for i in range(10)]))
    for v in (2, 3, 4):
        store.apply(Batch([up(i, v) for i in range(0, 10, 2)]))
    store.apply(Batch([tomb(1, 5), tomb(3, 5)]))
    with store.read() as r:
        before = list(r.changes())
        assert r.changes_log_size() == (10 + 15 + 2, 10)
    first = store.trim_changes(limit=7)  # later calls resume where it stopped
    assert first.walked == 7 and not first.at_end
    sweep = [first]
    while not sweep[-1].at_end:
        sweep.append(store.trim_changes(limit=7))
    assert sum(t.walked for t in sweep) == 27 and sum(t.removed for t in sweep) == 17
    again = store.trim_changes(limit=10)  # a new sweep: nothing left to remove
    assert again == (10, 0, True)
    assert store.trim_changes(limit=7) == (7, 0, False)  # and the next starts over
    with store.read() as r:
        assert list(r.changes()) == before
        assert r.changes_log_size() == (10, 10)
        assert r.check() == []


def test_a_batch_trims_the_log_in_its_own_transaction(store: Store) -> None:
    """Batch.trim: the walk of trim_changes, inside the batch's transaction (one commit),
    resuming where the last walk stopped; the batch's own entries are current, kept."""
    store.apply(Batch([up(i, 1) for i in range(10)]))
    store.apply(Batch([up(i, 2) for i in range(10)]))  # 10 superseded entries
    writes = store.counters.writes
    s = store.apply(Batch([up(i, 3) for i in range(5)], trim=8))
    # The log in time order: server 0 at v1, v2, v3, server 1 at v1, v2, v3, server 2...
    # the first 8 entries hold 6 superseded ones.
    assert (s.applied, s.trim_walked, s.trim_removed) == (5, 8, 6)
    with store.read() as r:
        assert r.changes_log_size() == (10 + 10 + 5 - 6, 10)
    s = store.apply(Batch([], trim=100))  # the rest of the sweep: to the end of the log
    assert (s.trim_walked, s.trim_removed) == (25 - 8, 15 - 6)
    with store.read() as r:
        assert r.changes_log_size() == (10, 10)
        assert r.check() == []
    assert store.counters.writes == writes + 2  # one write transaction per batch


# -- tombstone retention ----------------------------------------------------------------------
def test_purge_removes_old_tombstones_and_guards_against_resurrection(store: Store) -> None:
    store.apply(Batch([up(i, 1) for i in range(4)]))
    store.apply(Batch([tomb(0, 2), tomb(1, 2)]))
    store.apply(Batch([tomb(2, 2)]))
    horizon = tomb(1, 2).deleted_at + 1  # after 0's and 1's deletion, before 2's
    assert tomb(2, 2).deleted_at >= horizon
    assert store.purge_tombstones(horizon, batch_size=1) == 2
    with store.read() as r:
        assert r.tombstone(uid(0)) is None and r.tombstone(uid(1)) is None
        assert r.tombstone(uid(2)) is not None
        assert r.tombstone_horizon() == horizon
        assert {L.uuid_str(c.uuid) for c in r.changes() if c.deleted} == {uid(2)}
        assert r.check() == []
    # A stale update of a purged server is refused: it is older than the horizon.
    s = store.apply(Batch([up(0, 1)]))
    assert (s.applied, s.skipped_stale) == (0, 1)
    # A new server (newer than the horizon) is welcome; anti-entropy may repair old ones.
    assert store.apply(Batch([up(9, 1, updated_at=horizon)])).applied == 1
    assert store.apply(Batch([up(0, 1)], repair=True)).applied == 1
    # The horizon never moves back.
    store.purge_tombstones(horizon - 10)
    with store.read() as r:
        assert r.tombstone_horizon() == horizon
        assert r.check() == []


# -- catalogue --------------------------------------------------------------------------------
def test_catalogue_puts_deletes_and_reads(store: Store) -> None:
    puts = [
        CatalogPut(Catalog.FLAVORS, "2", {"id": "2", "name": "m1.small"}),
        CatalogPut(Catalog.FLAVORS, "1", {"id": "1", "name": "m1.tiny"}),
        CatalogPut(Catalog.FLAVORS, "10", {"id": "10", "name": "m1.huge"}),
        CatalogPut(Catalog.IMAGES, "img", {"id": "img", "name": "cirros"}),
        CatalogPut(Catalog.KEYPAIRS, ("bob", "k2"), {"name": "k2"}),
        CatalogPut(Catalog.KEYPAIRS, ("bob", "k1"), {"name": "k1"}),
        CatalogPut(Catalog.KEYPAIRS, ("bobby", "k0"), {"name": "k0"}),
        CatalogPut(Catalog.QUOTA_LIMITS, "", {"instances": 10, "cores": 20, "ram": 51200}),
        CatalogPut(Catalog.QUOTA_LIMITS, P1, {"instances": 50}),
        CatalogPut(Catalog.AZS, "nova", {"name": "nova"}),
        CatalogPut(Catalog.CELLS, "cell1", {"name": "cell1"}),
    ]
    assert store.apply(Batch(catalog=puts)).catalog == len(puts)
    with store.read() as r:
        assert [f["id"] for f in r.flavors()] == ["1", "10", "2"]  # by flavor id, as a string
        assert r.flavor("10") == {"id": "10", "name": "m1.huge"}
        assert r.flavor("") is None and r.flavor("nope") is None and r.flavor("x" * 600) is None
        assert r.image("img") == {"id": "img", "name": "cirros"} and len(r.images()) == 1
        assert [k["name"] for k in r.keypairs("bob")] == ["k1", "k2"]
        assert r.keypair("bob", "k2") == {"name": "k2"} and r.keypair("bob", "zz") is None
        assert r.keypairs("nobody") == [] and r.keypair("bad\x00", "k") is None
        assert r.quota_limits(P1) == {"instances": 50, "cores": 20, "ram": 51200}
        assert r.quota_limits(P2) == {"instances": 10, "cores": 20, "ram": 51200}
        assert r.availability_zones() == [{"name": "nova"}] and r.cells() == {"cell1": {"name": "cell1"}}
    store.apply(Batch(catalog=[CatalogPut(Catalog.FLAVORS, "10", None)]))
    with store.read() as r:
        assert r.flavor("10") is None and len(r.flavors()) == 2
    with pytest.raises(RecordError):
        store.apply(Batch(catalog=[CatalogPut(Catalog.KEYPAIRS, "bob", {})]))
    with pytest.raises(RecordError):
        store.apply(Batch(catalog=[CatalogPut(Catalog.FLAVORS, ("a", "b"), {})]))


def test_catalogue_generations_move_when_a_table_changes(store: Store) -> None:
    def gens() -> dict[Catalog, int]:
        with store.read() as r:
            return {t: r.generation(t) for t in Catalog}

    assert set(gens().values()) == {0}
    tiny = CatalogPut(Catalog.FLAVORS, "1", {"id": "1", "name": "m1.tiny"})
    # Several puts of one table in one transaction: one step.
    store.apply(Batch(catalog=[tiny, CatalogPut(Catalog.FLAVORS, "2", {"id": "2", "name": "s"})]))
    assert gens() == {**dict.fromkeys(Catalog, 0), Catalog.FLAVORS: 1}
    # The same values again, a delete of nothing: no change, no step, no write (P3).
    with store.read() as r:
        before = r.dump()
    store.apply(Batch(catalog=[tiny, CatalogPut(Catalog.FLAVORS, "3", None)]))
    with store.read() as r:
        assert r.dump() == before
    # A changed value, a delete: a step each; other tables independently.
    store.apply(Batch(catalog=[CatalogPut(Catalog.FLAVORS, "1", {"id": "1", "name": "m1.tinier"})]))
    store.apply(Batch(catalog=[CatalogPut(Catalog.FLAVORS, "2", None),
                               CatalogPut(Catalog.IMAGES, "i", {"id": "i"})]))
    g = gens()
    assert (g[Catalog.FLAVORS], g[Catalog.IMAGES], g[Catalog.KEYPAIRS]) == (3, 1, 0)
    with store.read() as r:
        meta = dict(r.dump()["meta"])
        assert meta[b"gen:flavors"] == L.U64.pack(3)
        # History, not state: the logical dump leaves the generations out.
        assert not any(k.startswith(b"gen:") for k, _ in r.dump(logical=True)["meta"])
    # A batch that fails changes no generation.
    with pytest.raises(RecordError):
        store.apply(Batch(catalog=[CatalogPut(Catalog.FLAVORS, "9", {"id": "9"}),
                                   CatalogPut(Catalog.FLAVORS, ("a", "b"), {})]))
    assert gens()[Catalog.FLAVORS] == 3


# -- reads and counters -----------------------------------------------------------------------
def test_reads_of_unknown_or_malformed_ids(store: Store) -> None:
    with store.read() as r:
        for bad in ("", "nope", uid(1), "../etc"):
            assert r.get_server(bad) is None and r.server_raw(bad) is None
            assert r.head(bad) is None and r.tombstone(bad) is None
            assert r.view(bad, b"show") is None and r.views(bad) == {}
            assert r.index_entry(bad) is None


def test_server_raw_is_the_msgpack_record(store: Store) -> None:
    store.apply(Batch([up(1, 1)]))
    with store.read() as r:
        raw = r.server_raw(uid(1))
        assert raw is not None and msgpack.unpackb(raw) == rec(1, 1)
        assert r.server_raw(L.uuid_key(uid(1))) == raw  # raw uuid16 works too


def test_one_read_txn_per_read_and_one_write_txn_per_apply(store: Store) -> None:
    assert (store.read_txns, store.write_txns) == (0, 0)  # opening does not count
    with store.read() as r:
        r.get_server(uid(1))
        r.page(P1)
        r.flavors()
        r.quota_usage(P1)
    assert (store.read_txns, store.write_txns) == (1, 0)
    store.apply(Batch([up(1, 1), up(2, 1)]))
    assert (store.read_txns, store.write_txns) == (1, 1)
    for _ in range(5):
        with store.read() as r:
            r.get_server(uid(1))
    assert (store.read_txns, store.write_txns) == (6, 1)

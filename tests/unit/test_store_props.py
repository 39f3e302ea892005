"""Sync properties of apply, by Hypothesis (research notes P2-P4, P8, P11).

Any interleaving, duplication, reordering and batching of versioned upserts and tombstones
for a set of servers converges to the state determined by each server's highest version,
a tombstone winning a tie -- checked against a model and against a store that was given the
winning changes only.
"""

from __future__ import annotations

import shutil
import tempfile
import uuid as uuidlib
from typing import Any

import msgpack
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from fastpath.store import Batch, Prepared, Store, Tombstone, Upsert, prepare_upsert
from fastpath.store import layout as L
from fastpath.store.samples import EPOCH_2024, sample_record

NSERVERS = 4
MAXV = 6
PROJECTS = ("p-even", "p-odd")
CELLS = ("cell-a", "cell-b")
FAST: dict[str, Any] = {"sync": False, "metasync": False, "map_size": 32 << 20}

# ("up" | "prep" | "tomb", server index, version); "prep": the same upsert as "up", packed
# ahead (store.Prepared, as cellsync's workers send it).
Change = tuple[str, int, int]


def uid(i: int) -> str:
    return str(uuidlib.UUID(int=(i + 3) * 0x9E3779B97F4A7C15 % 2**128, version=4))


def created(i: int) -> int:
    return EPOCH_2024 + (i % 2) * 1000  # repeated created_at: the uuid tie-break matters


def record_for(i: int, v: int, deleted: bool = False) -> dict[str, Any]:
    """The one record of server i at version v: a function of (i, v), as a cell's would be."""
    vm_state = "deleted" if deleted else ("active", "stopped", "error")[v % 3]
    flavor = {"id": str(1 + v % 2), "name": "f", "vcpus": 1 + v % 3, "ram": 512 * (1 + v % 2),
              "disk": 1, "ephemeral": 0, "swap": 0, "extra_specs": {}}
    return sample_record(
        uid(i), v, project_id=PROJECTS[i % 2], created_at=created(i),
        updated_at=EPOCH_2024 + 10**6 + v * 10 + i, seed=i * 100 + v, vm_state=vm_state,
        status={"active": "ACTIVE", "stopped": "SHUTOFF", "error": "ERROR",
                "deleted": "DELETED"}[vm_state],
        name=f"server-{i}-v{v}", tags=[f"t{v % 3}"], flavor=flavor,
        cell=CELLS[(v // 2) % 2],  # servers move between cells: by_cell follows
    )


def to_change(c: Change) -> Upsert | Prepared | Tombstone:
    kind, i, v = c
    if kind == "up":
        return Upsert(uid(i), v, record_for(i, v))
    if kind == "prep":
        return prepare_upsert(record_for(i, v), render)
    final = record_for(i, v, deleted=True) if v % 2 else None  # with and without a record
    return Tombstone(uid(i), v, PROJECTS[i % 2], created(i), EPOCH_2024 + 10**6 + v * 10 + i + 5,
                     final)


def render(record: Any) -> dict[bytes, bytes]:
    views = {b"show": msgpack.packb([record["uuid"], record["version"], record["name"]])}
    if record["version"] % 2:
        views[b"odd"] = b"1"  # the set of views changes between versions too
    return views


def winners(changes: list[Change]) -> dict[int, Change]:
    """Each server's winning change: highest version, a tombstone winning a tie."""
    best: dict[int, Change] = {}
    for c in changes:
        kind, i, v = c
        if i not in best or (v, kind == "tomb") > (best[i][2], best[i][0] == "tomb"):
            best[i] = c
    return best


changes_st = st.tuples(
    st.sampled_from(["up", "prep", "tomb"]), st.integers(0, NSERVERS - 1), st.integers(0, MAXV)
)


def logical(store: Store) -> dict[str, list[tuple[bytes, bytes]]]:
    with store.read() as r:
        return r.dump(logical=True)


@settings(max_examples=60, deadline=None, database=None)
@given(history=st.lists(changes_st, min_size=1, max_size=25), data=st.data())
def test_any_delivery_converges_to_the_winning_changes(history: list[Change], data: Any) -> None:
    dups = data.draw(st.lists(st.sampled_from(history), max_size=10), label="duplicates")
    order = data.draw(st.permutations(history + dups), label="delivery order")
    cuts = sorted(data.draw(st.lists(st.integers(0, len(order)), max_size=6), label="batches"))
    batches = [order[a:b] for a, b in zip([0, *cuts], [*cuts, len(order)], strict=True)]

    tmp = tempfile.mkdtemp()
    try:
        with Store.open(f"{tmp}/a", **FAST) as delivered, Store.open(f"{tmp}/b", **FAST) as ref:
            for n, batch in enumerate(batches):
                delivered.apply(Batch([to_change(c) for c in batch], cursor=("c", n)), render)
            ref.apply(Batch([to_change(c) for c in winners(history).values()],
                            cursor=("c", len(batches) - 1)), render)
            state = logical(delivered)
            assert state == logical(ref)
            with delivered.read() as r:
                assert r.check() == []
            # Replaying everything, in another order, changes nothing (P3).
            delivered.apply(Batch([to_change(c) for c in reversed(order)]), render)
            assert logical(delivered) == state
    finally:
        shutil.rmtree(tmp)


class StoreMachine(RuleBasedStateMachine):
    """A cell feed delivered in any order, with duplicates, replays, trims and restarts."""

    def __init__(self) -> None:
        super().__init__()
        self.tmp = tempfile.mkdtemp()
        self.store = Store.open(self.tmp, **FAST)
        self.delivered: list[Change] = []
        self.cursor: int | None = None

    def teardown(self) -> None:
        self.store.close()
        shutil.rmtree(self.tmp)

    @rule(batch=st.lists(changes_st, min_size=1, max_size=6), cursor=st.integers(0, 40))
    def deliver(self, batch: list[Change], cursor: int) -> None:
        s = self.store.apply(Batch([to_change(c) for c in batch], cursor=("cell1", cursor)),
                             render)
        assert s.applied + s.tombstoned + s.skipped_stale == len(batch)
        self.delivered += batch
        self.cursor = cursor if self.cursor is None else max(self.cursor, cursor)
        assert s.cursor == self.cursor

    @precondition(lambda self: bool(self.delivered))
    @rule(data=st.data())
    def redeliver(self, data: Any) -> None:
        again = data.draw(st.lists(st.sampled_from(self.delivered), min_size=1, max_size=8))
        s = self.store.apply(Batch([to_change(c) for c in again]), render)
        assert s.applied == s.tombstoned == 0  # old news, all of it

    @rule(limit=st.integers(1, 12))
    def trim(self, limit: int) -> None:
        self.store.trim_changes(limit)

    @rule()
    def restart(self) -> None:
        self.store.close()
        self.store = Store.open(self.tmp, **FAST)

    @invariant()
    def every_server_is_its_winning_change(self) -> None:
        best = winners(self.delivered)
        with self.store.read() as r:
            live: dict[str, set[str]] = {p: set() for p in PROJECTS}
            for i in range(NSERVERS):
                server, tomb = r.get_server(uid(i)), r.tombstone(uid(i))
                views = {k: bytes(v) for k, v in r.views(uid(i)).items()}
                if i not in best:
                    assert server is None and tomb is None and views == {}
                    continue
                kind, _, v = best[i]
                if kind != "tomb":
                    assert server == record_for(i, v) and tomb is None
                    assert views == render(server)
                    live[PROJECTS[i % 2]].add(uid(i))
                else:
                    assert server is None and views == {}
                    assert tomb is not None and tomb.version == v
                    assert tomb.record == (record_for(i, v, deleted=True) if v % 2 else None)
            for p in PROJECTS:
                assert {L.uuid_str(u) for u in r.page(p)} == live[p]
            for cell in CELLS:  # each live server under its winning record's cell only
                want = {(uid(i), best[i][2]) for i in best
                        if best[i][0] != "tomb" and CELLS[(best[i][2] // 2) % 2] == cell}
                assert {(L.uuid_str(u), h.version) for u, h in r.cell_servers(cell)} == want
            current = {L.uuid_str(c.uuid) for c in r.changes()}
            assert current == {uid(i) for i in best}
            assert r.cursor("cell1") == self.cursor

    @invariant()
    def layout_is_consistent(self) -> None:
        with self.store.read() as r:
            assert r.check() == []


TestStoreMachine = StoreMachine.TestCase
TestStoreMachine.settings = settings(
    max_examples=40, stateful_step_count=25, deadline=None, database=None
)

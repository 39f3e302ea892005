"""Group commit and the command write transaction (fastpath.api.commit,
fastpath.store.commands) on a real LMDB store: grouping, per-command refusal through nested
transactions, bounds, map growth from the committer thread, the pending overlay and the
provisional record."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest

from fastpath.api import views
from fastpath.api.commit import Busy, GroupCommitter
from fastpath.errors import Conflict, HTTPFault
from fastpath.store import Batch, Store, Upsert
from fastpath.store import layout as L
from fastpath.store import record as R
from fastpath.store.changes import Catalog
from fastpath.store.commands import CommandTxn
from fastpath.store.samples import sample_record

UUID = "11111111-2222-4333-8444-555555555555"


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store.open(tmp_path, map_size=1 << 20, max_map_size=1 << 26)
    yield s
    s.close()


def run(coro: Any) -> Any:
    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(coro)
    finally:
        loop.close()


def outbox(store: Store) -> list[dict[str, Any]]:
    with store.read() as r:
        return [msgpack.unpackb(v, raw=False) for _, v in r.dump()["outbox"]]


def put_cmd(i: int) -> Any:
    def work(c: CommandTxn) -> int:
        return c.put_outbox("cell1", UUID, f"req-{i}", {"action": "reboot", "type": "SOFT"})
    return work


def test_one_command_is_one_write_transaction(store: Store) -> None:
    gc = GroupCommitter(store, views.render_server)
    reads, writes = store.read_txns, store.write_txns
    seq = run(gc.submit(put_cmd(0)))
    assert seq == 1
    assert (store.read_txns - reads, store.write_txns - writes) == (0, 1)
    (entry,) = outbox(store)
    assert entry["id"] == "req-0" and entry["cell"] == "cell1" and entry["server"] == UUID
    assert entry["payload"] == {"action": "reboot", "type": "SOFT"}
    assert isinstance(entry["at"], int)
    gc.close()


def test_concurrent_commands_share_commits(store: Store) -> None:
    gc = GroupCommitter(store, views.render_server)
    writes = store.write_txns

    async def many() -> list[int]:
        return list(await asyncio.gather(*(gc.submit(put_cmd(i)) for i in range(200))))

    seqs = run(many())
    # Keys follow commit order; every command got its own, exactly once.
    assert sorted(seqs) == list(range(1, 201))
    assert [e["id"] for e in outbox(store)] == [f"req-{i}" for i in range(200)]
    commits = store.write_txns - writes
    assert commits == gc.commits < 200, commits
    assert gc.commands == 200
    assert gc.held > 0 and gc.lock_wait >= 0  # time under the writer lock, summed
    gc.close()


def test_a_refusal_leaves_no_write_and_refuses_only_itself(store: Store) -> None:
    gc = GroupCommitter(store, views.render_server)

    def refuse(c: CommandTxn) -> None:
        c.put_outbox("cell1", UUID, "req-refused", {"action": "stop"})
        c.put_catalog(Catalog.KEYPAIRS, ("fake", "k"), {"name": "k"})
        raise Conflict("Cannot 'stop' instance")

    def bug(c: CommandTxn) -> None:
        c.put_outbox("cell1", UUID, "req-bug", {"action": "stop"})
        raise KeyError("oops")

    async def group() -> list[Any]:
        return list(await asyncio.gather(gc.submit(put_cmd(1)), gc.submit(refuse), gc.submit(bug),
                                         gc.submit(put_cmd(2)), return_exceptions=True))

    writes = store.write_txns
    a, b, c, d = run(group())
    assert store.write_txns - writes == 1  # one group
    assert (a, d) == (1, 2)  # the refused command's key was not used
    assert isinstance(b, Conflict) and b.status == 409
    assert isinstance(c, KeyError)
    assert [e["id"] for e in outbox(store)] == ["req-1", "req-2"]
    with store.read() as r:
        assert r.keypair("fake", "k") is None
        assert r.generation(Catalog.KEYPAIRS) == 0
    gc.close()


def test_queue_is_bounded(store: Store) -> None:
    gc = GroupCommitter(store, None, max_group=1, max_queue=2)

    async def flood() -> list[Any]:
        return list(await asyncio.gather(*(gc.submit(put_cmd(i)) for i in range(5)),
                                         return_exceptions=True))

    out = run(flood())
    busy = [x for x in out if isinstance(x, Busy)]
    assert len(busy) == 3 and gc.busy == 3
    assert busy[0].status == 503 and (b"Retry-After", b"1") in busy[0].headers
    assert len(outbox(store)) == 2
    gc.close()


def test_map_grows_from_the_committer_thread(store: Store) -> None:
    gc = GroupCommitter(store, None)
    before = store.info()["map_size"]

    def big(i: int) -> Any:
        def work(c: CommandTxn) -> int:
            return c.put_outbox("cell1", None, f"req-{i}", {"action": "x", "blob": "y" * 300_000})
        return work

    async def group() -> list[int]:
        return list(await asyncio.gather(*(gc.submit(big(i)) for i in range(8))))

    assert sorted(run(group())) == list(range(1, 9))
    assert store.info()["map_size"] > before
    assert len(outbox(store)) == 8
    gc.close()


def test_store_full_fails_every_command_of_the_group(tmp_path: Path) -> None:
    with Store.open(tmp_path, map_size=1 << 20, max_map_size=1 << 20) as store:
        gc = GroupCommitter(store, None)

        def huge(c: CommandTxn) -> None:
            c.put_outbox("cell1", None, "req-huge", {"blob": "z" * (2 << 20)})

        async def group() -> list[Any]:
            return list(await asyncio.gather(gc.submit(huge), gc.submit(put_cmd(1)),
                                             return_exceptions=True))

        a, b = run(group())
        assert isinstance(a, HTTPFault) and a.status == 503
        assert b is a
        assert outbox(store) == []
        # The committer goes on after a failed group.
        assert run(gc.submit(put_cmd(2))) == 1
        gc.close()


# -- servers: pending overlay and provisional record ------------------------------------------
def _view_status(store: Store, uuid: str) -> tuple[str, str | None]:
    with store.read() as r:
        blob = r.view(uuid, views.VIEW_ID)
        assert blob is not None
        body = json.loads(views.server_json(bytes(blob), 104, True, b"http://x", None))
        entry = r.index_entry(uuid)
        assert entry is not None and entry.status == body["status"]
        return body["status"], body["OS-EXT-STS:task_state"]


def test_pending_shows_at_once_and_survives_cell_updates_until_done(store: Store) -> None:
    rec = sample_record(UUID, 1)
    store.apply(Batch([Upsert(UUID, 1, rec)]), render=views.render_server)
    gc = GroupCommitter(store, views.render_server)

    at = R.now_us()  # a live prediction (R.PENDING_TTL_US drops old ones)

    def reboot(c: CommandTxn) -> str:
        eff = c.set_pending(UUID, "req-r", {"task_state": "rebooting"}, at=at)
        c.put_outbox("cell1", UUID, "req-r", {"action": "reboot", "type": "SOFT"})
        return str(eff["status"])

    assert run(gc.submit(reboot)) == "REBOOT"
    assert _view_status(store, UUID) == ("REBOOT", "rebooting")
    with store.read() as r:
        stored = r.get_server(UUID)
        assert stored is not None
        assert stored["task_state"] is None  # the cell's own field is untouched
        assert stored["pending"] == {"req-r": {"at": at, "fields": {"task_state": "rebooting"}}}
        assert not r.check()
    # A cell update that does not list the command keeps the overlay.
    store.apply(Batch([Upsert(UUID, 2, sample_record(UUID, 2, name="renamed"))]),
                render=views.render_server)
    assert _view_status(store, UUID) == ("REBOOT", "rebooting")
    # Once the cell lists it as done, its own fields speak.
    store.apply(Batch([Upsert(UUID, 3, sample_record(UUID, 3, done_commands=["req-r"]))]),
                render=views.render_server)
    assert _view_status(store, UUID) == ("ACTIVE", None)
    with store.read() as r:
        assert r.get_server(UUID)["pending"] == {}  # type: ignore[index]
        assert r.count(L.API_FIELDS) == 0
        assert not r.check()
    gc.close()


def test_effective_applies_pending_oldest_first() -> None:
    rec = sample_record(UUID, 1)
    rec["pending"] = {
        "b": {"at": 2, "fields": {"vm_state": "stopped", "task_state": None, "name": "two"}},
        "a": {"at": 1, "fields": {"task_state": "powering-off", "name": "one", "version": 99}},
    }
    eff = R.effective(rec)
    assert (eff["name"], eff["vm_state"], eff["task_state"], eff["status"]) == (
        "two", "stopped", None, "SHUTOFF")
    assert eff["version"] == 1  # not pendable
    assert rec["name"] != "two"  # the record itself is not changed
    plain = sample_record(UUID, 1)
    assert R.effective(plain) is plain


def test_set_pending_refuses_non_pendable_fields(store: Store) -> None:
    store.apply(Batch([Upsert(UUID, 1, sample_record(UUID, 1))]), render=views.render_server)
    gc = GroupCommitter(store, views.render_server)
    with pytest.raises(Exception, match="not allowed: version"):
        run(gc.submit(lambda c: c.set_pending(UUID, "req-x", {"version": 5})))
    gc.close()


def test_provisional_record_counts_quota_and_is_listed(store: Store) -> None:
    gc = GroupCommitter(store, views.render_server)
    rec = sample_record(UUID, 0, vm_state="building", task_state="scheduling", done_commands=[])

    def create(c: CommandTxn) -> dict[str, int]:
        c.upsert_provisional(rec)
        c.put_outbox("cell1", UUID, "req-c", {"action": "create"})
        return c.quota_usage(rec["project_id"])

    usage = run(gc.submit(create))
    assert usage == {"instances": 1, "cores": 1, "ram": 2048}
    assert _view_status(store, UUID) == ("BUILD", "scheduling")
    with store.read() as r:
        assert r.quota_usage(rec["project_id"])["instances"] == 1
        assert [L.uuid_str(u) for u in r.page(rec["project_id"])] == [UUID]
    # The same uuid again is refused (and only that command).
    with pytest.raises(Exception, match="exists already"):
        run(gc.submit(lambda c: c.upsert_provisional(rec)))
    # The cell's first version replaces it; usage stays one server.
    store.apply(Batch([Upsert(UUID, 1, sample_record(UUID, 1))]), render=views.render_server)
    with store.read() as r:
        assert r.quota_usage(rec["project_id"]) == {"instances": 1, "cores": 1, "ram": 2048}
        assert not r.check()
    gc.close()


def test_pending_follows_commit_order(store: Store) -> None:
    """A command read earlier but committed later still overlays last (the cell runs the
    commands in commit order)."""
    store.apply(Batch([Upsert(UUID, 1, sample_record(UUID, 1))]), render=views.render_server)
    gc = GroupCommitter(store, views.render_server)
    run(gc.submit(lambda c: c.set_pending(UUID, "req-b", {"name": "b"}, at=200)))
    eff = run(gc.submit(lambda c: c.set_pending(UUID, "req-a", {"name": "a"}, at=100)))
    assert eff["name"] == "a"
    with store.read() as r:
        rec = r.get_server(UUID)
    assert rec is not None and rec["pending"]["req-a"]["at"] == 201
    assert R.effective(rec)["name"] == "a"
    gc.close()

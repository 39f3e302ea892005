"""The write transaction of the store: the version rule, index maintenance, maintenance jobs.

Everything here runs inside one LMDB write transaction opened by
:meth:`fastpath.store.Store.apply` (or ``purge_tombstones``/``trim_changes``) and may run
again in a fresh one after the map grew: it keeps no state outside the transaction.

The version rule (DESIGN.md "Sync correctness"; research notes P2-P4), per server uuid:

==========================  =====================================  =========================
stored                      incoming upsert v                      incoming tombstone v
==========================  =====================================  =========================
nothing                     store (unless older than the horizon)  store the tombstone
record of version r         replace if v > r, else drop            remove record if v >= r
tombstone of version t      drop if v <= t, else drop tombstone    replace if v > t
                            and store (the server lives again)
==========================  =====================================  =========================

So for any delivery order, duplication or replay, a server ends in the state of its
highest-version change, a tombstone winning a tie.

Writes are kept to what changed (issue 6: the pages touched per change decide throughput):
an update that leaves the index entry alike rewrites neither ``by_project`` nor
``by_created``, and ``by_changed`` is append-only -- the superseded entry of a server is not
deleted on update (that would touch a random old page per change) but skipped by readers and
removed later by :func:`trim_some`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, NamedTuple

import lmdb
import msgpack

from fastpath.store import layout as L
from fastpath.store import record as R
from fastpath.store.changes import (
    ApplySummary,
    Batch,
    Catalog,
    CatalogPut,
    Prepared,
    Renderer,
    Tombstone,
    Upsert,
    ViewId,
)
from fastpath.store.dbs import Dbs
from fastpath.store.errors import RecordError

log = logging.getLogger("fastpath.store")

_NIL = b"\xc0"  # msgpack nil: a tombstone without a final record
Frame = bytes | memoryview  # a stored frame (layout.pack_frame)


class Apply:
    """One run of a batch inside one write transaction."""

    __slots__ = ("d", "txn", "render", "summary", "usage", "horizon", "changed_tables")

    def __init__(self, dbs: Dbs, txn: lmdb.Transaction, render: Renderer | None) -> None:
        self.d = dbs
        self.txn = txn
        self.render = render
        self.summary = ApplySummary()
        self.usage: dict[str, list[int]] = {}  # project -> [instances, cores, ram] deltas
        self.horizon = 0
        self.changed_tables: set[Catalog] = set()  # catalogue tables whose content changed

    def run(self, batch: Batch) -> ApplySummary:
        if not batch.repair:
            h = self.txn.get(L.META_HORIZON, db=self.d.meta)
            self.horizon = int(L.U64.unpack(h)[0]) if h is not None else 0
        for ch in batch.changes:
            try:
                if type(ch) is Prepared:
                    self.prepared(ch)
                elif type(ch) is Upsert:
                    self.upsert(ch)
                elif type(ch) is Tombstone:
                    self.tombstone(ch)
                else:
                    raise TypeError(f"not a change: {ch!r}")
            except (KeyError, TypeError) as exc:
                # apply trusts records built by record.make_record; say which one was not.
                raise RecordError(f"change {ch!r:.120}: not a complete record ({exc!r})") from exc
        if self.usage:
            self.flush_usage()
        for put in batch.catalog:
            self.catalog(put)
        for table in self.changed_tables:
            self.bump_generation(table)
        if batch.cursor is not None:
            self.cursor(batch.cursor, batch.reset_cursor, batch.cursor_mark)
        if batch.trim > 0:
            walked, removed, _ = trim_some(self.txn, self.d, batch.trim)
            self.summary.trim_walked, self.summary.trim_removed = walked, removed
        return self.summary

    # -- servers ---------------------------------------------------------------------------------
    def upsert(self, ch: Upsert) -> None:
        u = L.uuid_key(ch.uuid)
        rec = ch.record
        version = ch.version
        if rec["version"] != version or rec["uuid"] != ch.uuid:
            raise RecordError(
                f"upsert {ch.uuid} v{version}: the record says {rec['uuid']} v{rec['version']}"
            )
        admitted, old = self.admit(u, version, rec["updated_at"])
        if admitted:
            self.store_record(u, old, rec)

    def prepared(self, ch: Prepared) -> None:
        """An Upsert packed ahead (:class:`Prepared`): the same checks and the same writes,
        from its bytes; through :meth:`store_record` when API-owned values are stored."""
        d, txn = self.d, self.txn
        u = L.uuid_key(ch.uuid)
        admitted, old = self.admit(u, ch.version, ch.updated_at)
        if not admitted:
            return
        if txn.get(u, db=d.api_fields) is not None:
            rec = R.unpack(ch.body)
            if rec.get("version") != ch.version or rec.get("uuid") != ch.uuid:
                raise RecordError(f"prepared upsert {ch.uuid} v{ch.version}: its body says "
                                  f"{rec.get('uuid')} v{rec.get('version')}")
            self.store_record(u, old, rec)
            return
        project = L.name_bytes(ch.project_id, "project_id")
        self.write_live(u, old, ch.version, ch.created_at, ch.updated_at, project, ch.project_id,
                        ch.cell, ch.body, ch.index_value, ch.vcpus, ch.ram)
        self.put_views(u, ch.views)
        self.summary.applied += 1

    def admit(self, u: bytes, version: int, updated_at: int) -> tuple[bool, Frame | None]:
        """The version rule for an upsert of ``u`` at ``version``: (False, None) when it is
        refused (counted in the summary), else (True, the stored frame it replaces or None).
        A tombstone it beats is dropped here."""
        d, txn, summary = self.d, self.txn, self.summary
        old = txn.get(u, db=d.servers)
        if old is not None:
            if version <= L.unpack_frame_head(old)[0]:
                summary.skipped_stale += 1
                return False, None
            return True, old
        tomb = txn.get(u, db=d.tombstones)
        if tomb is not None:
            tomb_version, _, deleted_at, _, _ = L.unpack_frame_head(tomb)
            if tomb_version >= version:
                summary.skipped_stale += 1
                summary.blocked_by_tombstone += 1
                return False, None
            # Newer than its deletion: the cell says the server lives (e.g. it moved in
            # from another cell); the highest version decides, so the tombstone goes.
            self.drop_tombstone(u, deleted_at)
        elif self.horizon and updated_at < self.horizon:
            # Unknown and older than the purged tombstones: maybe a stale update of a
            # server whose tombstone is gone (P4).  Anti-entropy passes Batch.repair.
            summary.skipped_stale += 1
            return False, None
        return True, None

    def store_record(self, u: bytes, old: Frame | None, rec: Mapping[str, Any]) -> None:
        """Write an admitted upsert's record, index entries and views."""
        rec = self.merge_api_fields(u, rec)
        # Indexes and views show the effective record (pending commands overlaid,
        # docs/commands.md); the frame keeps the cell's fields and ``pending`` apart.
        eff = R.effective(rec)
        flavor = eff["flavor"]
        self.write_live(u, old, rec["version"], rec["created_at"], rec["updated_at"],
                        L.name_bytes(rec["project_id"], "project_id"), rec["project_id"],
                        rec["cell"], R.pack(rec), R.pack_index(R.index_entry(eff)),
                        flavor["vcpus"], flavor["ram"])
        if self.render is not None:
            self.put_views(u, self.render(eff))
        self.summary.applied += 1

    def write_live(self, u: bytes, old: Frame | None, version: int, created: int, updated: int,
                   project: bytes, project_id: str, cell: str, body: bytes, ival: bytes,
                   vcpus: int, ram: int) -> None:
        """The frame of a live server and its index entries (``old``: its frame until now)."""
        d, txn = self.d, self.txn
        txn.put(u, L.pack_frame(version, created, updated, project, body), db=d.servers)
        cell_key = L.by_cell_key(L.name_bytes(cell, "cell"), u)
        pkey = L.by_project_key(project, created, u)
        ckey = L.by_changed_key(updated, u)
        if old is None:
            txn.put(pkey, ival, db=d.by_project)
            txn.put(L.by_created_key(created, u), ival, db=d.by_created)
            txn.put(ckey, L.CHANGED_LIVE, db=d.by_changed)
            txn.put(cell_key, b"", db=d.by_cell)
            self.count(project_id, 1, vcpus, ram)
            return
        _, old_created, old_updated, old_project, _ = L.unpack_frame_head(old)
        # PERF: a get, no write, while the server stays in its cell (the common case);
        # the old record is decoded only when it moved, to find its old entry.
        if txn.get(cell_key, db=d.by_cell) is None:
            self.forget_cell(u, old)
            txn.put(cell_key, b"", db=d.by_cell)
        old_pkey = L.by_project_key(old_project, old_created, u)
        old_ival = txn.get(old_pkey, db=d.by_project)
        if old_pkey != pkey:
            txn.delete(old_pkey, db=d.by_project)
            txn.delete(L.by_created_key(old_created, u), db=d.by_created)
        if old_pkey != pkey or old_ival != ival:
            txn.put(pkey, ival, db=d.by_project)
            txn.put(L.by_created_key(created, u), ival, db=d.by_created)
            if old_ival is not None:
                o = R.unpack_index(old_ival)
                self.count(o.project_id, -1, -o.vcpus, -o.ram)
            self.count(project_id, 1, vcpus, ram)
        if old_updated != updated:
            # The old entry stays, superseded: readers skip it, trim_some removes it.
            txn.put(ckey, L.CHANGED_LIVE, db=d.by_changed)

    def tombstone(self, ch: Tombstone) -> None:
        d, txn, summary = self.d, self.txn, self.summary
        u = L.uuid_key(ch.uuid)
        version = ch.version
        final = ch.record
        if final is not None and (final["version"] != version or final["uuid"] != ch.uuid):
            raise RecordError(
                f"tombstone {ch.uuid} v{version}: its record says {final['uuid']} v{final['version']}"
            )
        old = txn.get(u, db=d.servers)
        if old is not None:
            old_version, old_created, _, old_project, _ = L.unpack_frame_head(old)
            if version < old_version:  # a tie goes to the tombstone
                summary.skipped_stale += 1
                return
            self.remove_live(u, old_project, old_created, old, None if final is None else final["cell"])
        else:
            tomb = txn.get(u, db=d.tombstones)
            if tomb is not None:
                tomb_version, _, deleted_at, _, _ = L.unpack_frame_head(tomb)
                if version <= tomb_version:
                    summary.skipped_stale += 1
                    return
                self.drop_tombstone(u, deleted_at)
        # The tombstone holds what its change holds, never the record it replaced: the
        # store must be a function of each server's winning change, whatever the order.
        project = L.name_bytes(ch.project_id, "project_id")
        body = R.pack(final) if final is not None else _NIL
        frame = L.pack_frame(version, ch.created_at, ch.deleted_at, project, body)
        txn.put(u, frame, db=d.tombstones)
        txn.put(L.by_changed_key(ch.deleted_at, u), L.CHANGED_DELETED, db=d.by_changed)
        txn.put(L.tomb_age_key(ch.deleted_at, u), b"", db=d.tomb_age)
        summary.tombstoned += 1

    def remove_live(self, u: bytes, project: bytes, created: int, frame: bytes | memoryview,
                    cell: str | None) -> None:
        """Remove a live server (``frame``: its stored frame) and every entry of it.

        ``cell``: where it probably is (the tombstone's final record says); only if that is
        wrong is the stored record decoded to find its ``by_cell`` entry.
        """
        d, txn = self.d, self.txn
        if cell is None or not txn.delete(L.by_cell_key(L.name_bytes(cell, "cell"), u), db=d.by_cell):
            self.forget_cell(u, frame)
        pkey = L.by_project_key(project, created, u)
        ival = txn.get(pkey, db=d.by_project)
        if ival is not None:
            o = R.unpack_index(ival)
            self.count(o.project_id, -1, -o.vcpus, -o.ram)
        txn.delete(pkey, db=d.by_project)
        txn.delete(L.by_created_key(created, u), db=d.by_created)
        txn.delete(u, db=d.servers)
        txn.delete(u, db=d.api_fields)
        self.put_views(u, {})
        # Its by_changed entry is superseded by the tombstone's (trim_some removes it).

    def forget_cell(self, u: bytes, frame: bytes | memoryview) -> None:
        """Delete the ``by_cell`` entry of the record in ``frame`` (decoded: the rare path)."""
        off = L.unpack_frame_head(frame)[4]
        cell = R.unpack(frame[off:]).get("cell")
        if isinstance(cell, str) and cell:
            self.txn.delete(L.by_cell_key(L.name_bytes(cell, "cell"), u), db=self.d.by_cell)

    def drop_tombstone(self, u: bytes, deleted_at: int) -> None:
        self.txn.delete(u, db=self.d.tombstones)
        self.txn.delete(L.tomb_age_key(deleted_at, u), db=self.d.tomb_age)

    def merge_api_fields(self, u: bytes, rec: Mapping[str, Any]) -> Mapping[str, Any]:
        """The record to store: the cell's fields plus the stored API-owned fields (rule 7)."""
        d, txn = self.d, self.txn
        stored = txn.get(u, db=d.api_fields)
        if stored is None:
            # PERF: the common case -- no API-owned values; keep the caller's dict unless the
            # cell (wrongly) sent some, which are not its to write.
            if any(rec.get(name) for name in R.API_FIELDS):
                rec = dict(rec)
                for name in R.API_FIELDS:
                    rec[name] = R.default_of(name)
            return rec
        api: dict[str, Any] = msgpack.unpackb(stored, raw=False)
        pending: dict[str, Any] = api.get("pending", {})
        done = rec["done_commands"]
        if pending:
            # The cell executed these commands: its own fields now carry their effect.  An
            # entry past its TTL goes too (R.PENDING_TTL_US); one without "at" is kept.
            horizon = R.now_us() - R.PENDING_TTL_US
            pending = {cid: v for cid, v in pending.items()
                       if cid not in done and v.get("at", horizon) >= horizon}
        api["pending"] = pending
        if any(api.values()):
            txn.put(u, R.pack(api), db=d.api_fields)
        else:
            txn.delete(u, db=d.api_fields)
        merged = dict(rec)
        for name in R.API_FIELDS:
            merged[name] = api[name] if name in api else R.default_of(name)
        return merged

    def put_views(self, u: bytes, views: Mapping[ViewId, bytes]) -> None:
        """Make the server's view fragments exactly ``views`` (writing only what changed)."""
        d, txn = self.d, self.txn
        existing: dict[bytes, bytes] = {}
        cur = txn.cursor(db=d.views)
        if cur.set_range(u):
            for key, value in cur:
                if key[:16] != u:
                    break
                existing[bytes(key[16:])] = bytes(value)
        for view_id, fragment in views.items():
            if not 0 < len(view_id) <= L.MAX_VIEW_ID:
                raise RecordError(f"view id {view_id!r}: 1 to {L.MAX_VIEW_ID} bytes")
            if existing.pop(view_id, None) != fragment:
                txn.put(u + view_id, fragment, db=d.views)
        for view_id in existing:
            txn.delete(u + view_id, db=d.views)

    # -- quota usage -----------------------------------------------------------------------------
    def count(self, project: str, instances: int, cores: int, ram: int) -> None:
        delta = self.usage.get(project)
        if delta is None:
            self.usage[project] = [instances, cores, ram]
        else:
            delta[0] += instances
            delta[1] += cores
            delta[2] += ram

    def flush_usage(self) -> None:
        # One read-modify-write per project per batch, not per change.
        d, txn = self.d, self.txn
        for project, (instances, cores, ram) in self.usage.items():
            if not (instances or cores or ram):
                continue
            key = L.name_bytes(project, "project_id")
            raw = txn.get(key, db=d.quota_usage)
            usage: dict[str, int] = msgpack.unpackb(raw, raw=False) if raw is not None else {}
            usage["instances"] = usage.get("instances", 0) + instances
            usage["cores"] = usage.get("cores", 0) + cores
            usage["ram"] = usage.get("ram", 0) + ram
            if any(usage.values()):
                txn.put(key, R.pack(usage), db=d.quota_usage)
            else:
                txn.delete(key, db=d.quota_usage)

    # -- catalogue and cursor --------------------------------------------------------------------
    def catalog(self, put: CatalogPut) -> None:
        db = getattr(self.d, put.table.value)
        key = catalog_key(put.table, put.key)
        if put.value is None:
            if self.txn.delete(key, db=db):
                self.changed_tables.add(put.table)
        else:
            value = R.pack(put.value)
            # One get more per put: an unchanged entry leaves the generation (and the
            # store: re-applying a batch writes nothing, P3) as it was.
            if self.txn.get(key, db=db) != value:
                self.txn.put(key, value, db=db)
                self.changed_tables.add(put.table)
        self.summary.catalog += 1

    def bump_generation(self, table: Catalog) -> None:
        """Raise the table's generation in ``meta`` (once per transaction that changed it)."""
        key = L.gen_key(table.value)
        raw = self.txn.get(key, db=self.d.meta)
        gen = int(L.U64.unpack(raw)[0]) if raw is not None else 0
        self.txn.put(key, L.U64.pack((gen + 1) & L.MAX_U64), db=self.d.meta)

    def cursor(self, cursor: tuple[str, int], reset: bool, mark: int = 0) -> None:
        cell, seq = cursor
        for v in (seq, mark):
            if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= L.MAX_U64:
                raise RecordError(f"cursor of cell {cell!r}: {v!r} is not an unsigned 64-bit integer")
        key = L.name_bytes(cell, "cell")
        raw = self.txn.get(key, db=self.d.cursors)
        old = int(L.U64.unpack_from(raw, 0)[0]) if raw is not None else None
        value = L.pack_cursor(seq, mark)
        if old is None or seq > old or (reset and raw != value):
            self.txn.put(key, value, db=self.d.cursors)
            self.summary.cursor = seq
            self.summary.cursor_moved = True
        else:
            if seq < old:
                log.warning("cell %s: cursor %d is behind the stored %d; kept %d", cell, seq, old, old)
            self.summary.cursor = old


def catalog_key(table: Catalog, key: str | tuple[str, str]) -> bytes:
    if table is Catalog.KEYPAIRS:
        if not isinstance(key, tuple):
            raise RecordError("a keypair's key is (user_id, name)")
        return L.keypair_key(*key)
    if not isinstance(key, str):
        raise RecordError(f"a {table.value} key is a string")
    if table is Catalog.QUOTA_LIMITS and key == "":
        return L.QUOTA_DEFAULTS
    return L.name_bytes(key, table.value)


# -- the changes log -----------------------------------------------------------------------------
def changed_is_current(txn: lmdb.Transaction, dbs: Dbs, t: int, u: bytes, kind: Any) -> bool:
    """Whether the ``by_changed`` entry (t, u, kind) is the server's current one.

    A live entry is current if the server is live with ``updated_at == t``; a deleted entry
    if the server is tombstoned with ``deleted_at == t``.  Equality, not order: a clock that
    went back cannot make a superseded entry look current.
    """
    if kind == L.CHANGED_LIVE:
        v = txn.get(u, db=dbs.servers)
    else:
        v = txn.get(u, db=dbs.tombstones)
    return v is not None and int(L.FRAME_T.unpack_from(v, 16)[0]) == t


class TrimResult(NamedTuple):
    walked: int
    removed: int
    at_end: bool  # this call reached the end of the log: the next one starts a new pass


def trim_some(txn: lmdb.Transaction, dbs: Dbs, limit: int) -> TrimResult:
    """Walk up to ``limit`` entries of ``by_changed`` from where the last call stopped and
    delete the superseded ones.

    Successive calls sweep the log from start to end, then start again; deleting in key
    order touches few pages.  The position is kept in ``meta`` (``b"trim_pos"``).
    """
    pos = txn.get(L.META_TRIM_POS, db=dbs.meta)
    cur = txn.cursor(db=dbs.by_changed)
    ok = cur.set_range(pos) if pos is not None else cur.first()
    if not ok and pos is not None:
        ok = cur.first()  # past the end: wrap
    walked = 0
    stale: list[bytes] = []
    while ok and walked < limit:
        key = bytes(cur.key())
        if not changed_is_current(txn, dbs, L.time_of_changed_key(key), key[8:24], cur.value()):
            stale.append(key)
        walked += 1
        ok = cur.next()
    if ok:
        txn.put(L.META_TRIM_POS, bytes(cur.key()), db=dbs.meta)
    else:
        txn.delete(L.META_TRIM_POS, db=dbs.meta)
    for key in stale:
        txn.delete(key, db=dbs.by_changed)
    return TrimResult(walked, len(stale), not ok)


def purge_some(txn: lmdb.Transaction, dbs: Dbs, older_than: int, limit: int) -> int:
    """Remove up to ``limit`` tombstones with ``deleted_at < older_than``; raise the horizon."""
    old = txn.get(L.META_HORIZON, db=dbs.meta)
    if old is None or L.U64.unpack(old)[0] < older_than:
        txn.put(L.META_HORIZON, L.U64.pack(older_than), db=dbs.meta)
    victims: list[tuple[int, bytes]] = []
    cur = txn.cursor(db=dbs.tomb_age)
    if cur.first():
        for key in cur.iternext(keys=True, values=False):
            t = L.time_of_changed_key(key)
            if t >= older_than or len(victims) >= limit:
                break
            victims.append((t, L.uuid_of_changed_key(key)))
    for t, u in victims:
        txn.delete(u, db=dbs.tombstones)
        txn.delete(L.by_changed_key(t, u), db=dbs.by_changed)
        txn.delete(L.tomb_age_key(t, u), db=dbs.tomb_age)
    return len(victims)

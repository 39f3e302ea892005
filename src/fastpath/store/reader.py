"""The read side of the store: one read transaction and everything a query reads in it."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, NamedTuple

import lmdb
import msgpack

from fastpath.store import layout as L
from fastpath.store import record as R
from fastpath.store.apply import changed_is_current
from fastpath.store.changes import Catalog, ViewId
from fastpath.store.errors import MarkerNotFound, RecordError

if TYPE_CHECKING:
    from fastpath.store.store import Store

# What a getter of a buffers=True read transaction returns (a memoryview into the map).
Buf = bytes | memoryview

MAX_SERVERS_PER_PAGE = 1000  # Nova's [api]max_limit default


class ServerHead(NamedTuple):
    version: int
    project_id: str
    created_at: int
    updated_at: int


class TombstoneInfo(NamedTuple):
    version: int
    project_id: str
    created_at: int
    deleted_at: int
    record: dict[str, Any] | None


class ChangedEntry(NamedTuple):
    updated_at: int  # deleted_at for a deleted server
    uuid: bytes
    deleted: bool
    project_id: str


class Reader:
    """One read transaction of the store; every getter runs inside it.

    Buffers returned (``server_raw``, ``view``, ``walk``) point into the map and are valid
    only until the ``with`` block ends (py-lmdb "buffers"): copy or render before leaving it.
    """

    __slots__ = ("_d", "_txn")

    def __init__(self, store: Store) -> None:
        self._d = store.dbs
        self._txn = store._begin_read()

    def __enter__(self) -> Reader:
        return self

    def __exit__(self, *exc: object) -> None:
        # A read txn ends by abort; with max_spare_txns=0 (and MDB_NOTLS, which py-lmdb
        # always sets) that frees its reader slot at once: nothing pins old pages between
        # requests.
        self._txn.abort()

    @property
    def txn(self) -> lmdb.Transaction:
        """The raw LMDB transaction, for the compiled request path (already counted)."""
        return self._txn

    @property
    def dbs(self) -> Any:
        """The store's database handles (``fastpath.store.dbs.Dbs``), for the compiled path."""
        return self._d

    # -- servers ---------------------------------------------------------------------------------
    def server_raw(self, u: str | bytes) -> Buf | None:
        """The msgpack bytes of a server's record (no decoding), or None."""
        k = L.parse_uuid(u)
        if k is None:
            return None
        v = self._txn.get(k, db=self._d.servers)
        if v is None:
            return None
        return v[L.FRAME_SIZE + v[L.FRAME_SIZE - 1] :]

    def get_server(self, u: str | bytes) -> dict[str, Any] | None:
        raw = self.server_raw(u)
        return None if raw is None else R.unpack(raw)

    def head(self, u: str | bytes) -> ServerHead | None:
        """Version, project and timestamps of a live server, without decoding its record."""
        k = L.parse_uuid(u)
        v = None if k is None else self._txn.get(k, db=self._d.servers)
        if v is None:
            return None
        version, created, updated, project, _ = L.unpack_frame_head(v)
        return ServerHead(version, project.decode(), created, updated)

    def tombstone(self, u: str | bytes) -> TombstoneInfo | None:
        k = L.parse_uuid(u)
        v = None if k is None else self._txn.get(k, db=self._d.tombstones)
        if v is None:
            return None
        version, created, deleted, project, off = L.unpack_frame_head(v)
        final = msgpack.unpackb(v[off:], raw=False)
        return TombstoneInfo(version, project.decode(), created, deleted, final)

    def tombstone_version(self, u: str | bytes) -> int | None:
        """The version of a server's tombstone, without decoding its final record."""
        k = L.parse_uuid(u)
        v = None if k is None else self._txn.get(k, db=self._d.tombstones)
        return None if v is None else L.frame_version(v)

    def view(self, u: str | bytes, view_id: ViewId) -> Buf | None:
        """A server's rendered view fragment (JSON bytes), or None."""
        k = L.parse_uuid(u)
        return None if k is None else self._txn.get(k + view_id, db=self._d.views)

    def views(self, u: str | bytes) -> dict[bytes, Buf]:
        """Every view fragment of a server, by view id."""
        k = L.parse_uuid(u)
        out: dict[bytes, Buf] = {}
        if k is None:
            return out
        cur = self._txn.cursor(db=self._d.views)
        if cur.set_range(k):
            for key, value in cur:
                if key[:16] != k:
                    break
                out[bytes(key[16:])] = value
        return out

    def index_entry(self, u: str | bytes) -> R.IndexEntry | None:
        """The index entry of a live server, or the DELETED entry of a tombstoned one."""
        k = L.parse_uuid(u)
        if k is None:
            return None
        v = self._txn.get(k, db=self._d.servers)
        if v is not None:
            _, created, _, project, _ = L.unpack_frame_head(v)
            ival = self._txn.get(L.by_project_key(project, created, k), db=self._d.by_project)
            return None if ival is None else R.unpack_index(ival)
        t = self.tombstone(k)
        if t is None:
            return None
        if t.record is not None:
            return R.index_entry(t.record, deleted=True)
        return R.deleted_entry(t.project_id, t.created_at)

    # -- lists -----------------------------------------------------------------------------------
    def walk(
        self, project: str | None = None, *, marker: str | bytes | None = None, reverse: bool = False
    ) -> Iterator[tuple[bytes, Buf]]:
        """(uuid16, packed index entry) of a project's servers (or all, ``project=None``).

        Forward: Nova's default order (created_at desc, id desc); ``reverse``: the exact
        opposite.  ``marker``: start after that server; raises :class:`MarkerNotFound` if it
        is neither a live nor a tombstoned server of the scope (a marker may be deleted
        while its tombstone lasts, P14).
        """
        if project is None:
            db, prefix = self._d.by_created, b""
        else:
            db, prefix = self._d.by_project, L.project_prefix(_project_bytes(project))
        start = None if marker is None else self._marker_key(project, marker)
        cur = self._txn.cursor(db=db)
        plen = len(prefix)
        if not reverse:
            if start is not None:
                ok = cur.set_range(start)
                if ok and cur.key() == start:
                    ok = cur.next()
            elif prefix:
                ok = cur.set_range(prefix)
            else:
                ok = cur.first()
            if not ok:
                return
            for key, value in cur:
                if plen and key[:plen] != prefix:
                    return
                yield L.uuid_of_index_key(key), value
        else:
            if start is not None:
                # At the marker (a live one) or at the first key after its place: step back.
                ok = cur.set_range(start)
                ok = cur.prev() if ok else cur.last()
            elif prefix:
                # The first key after every key of the prefix: project + b"\x01".
                ok = cur.set_range(prefix[:-1] + b"\x01")
                ok = cur.prev() if ok else cur.last()
            else:
                ok = cur.last()
            if not ok:
                return
            for key, value in cur.iterprev():
                if plen and key[:plen] != prefix:
                    return
                yield L.uuid_of_index_key(key), value

    def page(
        self,
        project: str | None = None,
        *,
        marker: str | bytes | None = None,
        limit: int = MAX_SERVERS_PER_PAGE,
        predicate: Callable[[R.IndexEntry], bool] | None = None,
        reverse: bool = False,
    ) -> list[bytes]:
        """uuid16 of up to ``limit`` servers after ``marker`` matching ``predicate``.

        PERF: without a predicate no index entry is decoded.
        """
        out: list[bytes] = []
        if limit <= 0:
            return out
        for u, value in self.walk(project, marker=marker, reverse=reverse):
            if predicate is not None and not predicate(R.unpack_index(value)):
                continue
            out.append(u)
            if len(out) >= limit:
                break
        return out

    def page_entries(
        self,
        project: str | None = None,
        *,
        marker: str | bytes | None = None,
        limit: int = MAX_SERVERS_PER_PAGE,
        predicate: Callable[[R.IndexEntry], bool] | None = None,
        reverse: bool = False,
    ) -> list[tuple[bytes, R.IndexEntry]]:
        """Like :meth:`page`, with each server's index entry."""
        out: list[tuple[bytes, R.IndexEntry]] = []
        if limit <= 0:
            return out
        for u, value in self.walk(project, marker=marker, reverse=reverse):
            entry = R.unpack_index(value)
            if predicate is not None and not predicate(entry):
                continue
            out.append((u, entry))
            if len(out) >= limit:
                break
        return out

    def _marker_key(self, project: str | None, marker: str | bytes) -> bytes:
        k = L.parse_uuid(marker)
        v = None
        if k is not None:
            v = self._txn.get(k, db=self._d.servers)
            if v is None:
                v = self._txn.get(k, db=self._d.tombstones)
        if k is None or v is None:
            raise MarkerNotFound(f"marker [{marker!r}] not found")
        _, created, _, mproject, _ = L.unpack_frame_head(v)
        if project is None:
            return L.by_created_key(created, k)
        if mproject != _project_bytes(project):
            raise MarkerNotFound(f"marker [{marker!r}] not found")
        return L.by_project_key(mproject, created, k)

    def changes(
        self,
        since: int | None = None,
        *,
        before: int | None = None,
        project: str | None = None,
        reverse: bool = False,
    ) -> Iterator[ChangedEntry]:
        """Servers changed or deleted with ``since <= time <= before``, by that time.

        Nova's ``changes-since``/``changes-before`` bounds are both inclusive.  Oldest first,
        newest first with ``reverse``.  Superseded log entries are skipped (one get each, in
        this transaction; see ``layout``).
        """
        txn, d = self._txn, self._d
        cur = txn.cursor(db=d.by_changed)
        pb = None if project is None else _project_bytes(project)
        if not reverse:
            if not cur.set_range(L.U64.pack(since if since is not None else 0)):
                return
            it = iter(cur)
        else:
            if before is not None and before < 2**63 - 1:
                ok = cur.set_range(L.U64.pack(before + 1))
                ok = cur.prev() if ok else cur.last()
            else:
                ok = cur.last()
            if not ok:
                return
            it = cur.iterprev()
        for key, kind in it:
            t = L.time_of_changed_key(key)
            if not reverse:
                if before is not None and t > before:
                    return
            elif since is not None and t < since:
                return
            u = bytes(key[8:24])
            deleted = kind != L.CHANGED_LIVE
            frame = txn.get(u, db=d.tombstones if deleted else d.servers)
            if frame is None or int(L.FRAME_T.unpack_from(frame, 16)[0]) != t:
                continue  # superseded
            fproject = bytes(frame[L.FRAME_SIZE : L.FRAME_SIZE + frame[L.FRAME_SIZE - 1]])
            if pb is not None and fproject != pb:
                continue
            yield ChangedEntry(t, u, deleted, fproject.decode())

    def changes_log_size(self) -> tuple[int, int]:
        """(entries in the changes log, of which current) -- for monitoring trimming."""
        total = current = 0
        for key, kind in self._txn.cursor(db=self._d.by_changed):
            total += 1
            if changed_is_current(self._txn, self._d, L.time_of_changed_key(key), bytes(key[8:24]), kind):
                current += 1
        return total, current

    # -- catalogue -------------------------------------------------------------------------------
    def _get_map(self, db: Any, key: bytes) -> dict[str, Any] | None:
        if not 0 < len(key) <= L.MAX_KEY:
            return None  # LMDB refuses such keys (MDB_BAD_VALSIZE); no entry has one
        v = self._txn.get(key, db=db)
        return None if v is None else msgpack.unpackb(v, raw=False)

    def _all_maps(self, db: Any, prefix: bytes = b"") -> list[dict[str, Any]]:
        cur = self._txn.cursor(db=db)
        out: list[dict[str, Any]] = []
        if not (cur.set_range(prefix) if prefix else cur.first()):
            return out
        for key, value in cur:
            if prefix and key[: len(prefix)] != prefix:
                break
            out.append(msgpack.unpackb(value, raw=False))
        return out

    def flavor(self, flavor_id: str) -> dict[str, Any] | None:
        return self._get_map(self._d.flavors, flavor_id.encode())

    def flavors(self) -> list[dict[str, Any]]:
        """Every flavor, by flavor id (Nova's default order)."""
        return self._all_maps(self._d.flavors)

    def image(self, image_id: str) -> dict[str, Any] | None:
        return self._get_map(self._d.images, image_id.encode())

    def images(self) -> list[dict[str, Any]]:
        return self._all_maps(self._d.images)

    def keypair(self, user_id: str, name: str) -> dict[str, Any] | None:
        try:
            return self._get_map(self._d.keypairs, L.keypair_key(user_id, name))
        except RecordError:
            return None

    def keypairs(self, user_id: str) -> list[dict[str, Any]]:
        """A user's keypairs by name."""
        try:
            prefix = L.keypair_prefix(user_id)
        except RecordError:
            return []
        return self._all_maps(self._d.keypairs, prefix)

    def quota_limits(self, project: str) -> dict[str, int]:
        """The project's limits: the defaults, overridden by the project's own."""
        limits: dict[str, int] = self._get_map(self._d.quota_limits, L.QUOTA_DEFAULTS) or {}
        own = self._get_map(self._d.quota_limits, project.encode())
        return {**limits, **own} if own else limits

    def quota_usage(self, project: str) -> dict[str, int]:
        """Resources in use by the project's servers, kept by ``apply``: instances, cores, ram."""
        usage = self._get_map(self._d.quota_usage, project.encode())
        return {"instances": 0, "cores": 0, "ram": 0, **(usage or {})}

    def availability_zones(self) -> list[dict[str, Any]]:
        return self._all_maps(self._d.azs)

    def cells(self) -> dict[str, dict[str, Any]]:
        """Every cell cellsync has seen, by name: ``{name, epoch, hosts_version, hosts}``.

        ``hosts``: host name -> ``{vcpus, ram_mb, disk_gb, vcpus_used, ram_mb_used,
        disk_gb_used, status, availability_zone}`` (the cell's ``hosts`` rows; what the
        scheduler picks a cell and a host from, in its one read transaction).
        """
        return {bytes(k).decode(): msgpack.unpackb(v, raw=False)
                for k, v in self._txn.cursor(db=self._d.cells)}

    def cell(self, name: str) -> dict[str, Any] | None:
        return self._get_map(self._d.cells, name.encode())

    def cell_servers(self, cell: str) -> Iterator[tuple[bytes, ServerHead]]:
        """(uuid16, head) of every live server of ``cell`` (``by_cell``; no record decoded)."""
        try:
            prefix = L.by_cell_prefix(L.name_bytes(cell, "cell"))
        except RecordError:
            return
        txn, d = self._txn, self._d
        cur = txn.cursor(db=d.by_cell)
        if not cur.set_range(prefix):
            return
        plen = len(prefix)
        for key in cur.iternext(keys=True, values=False):
            if key[:plen] != prefix:
                return
            u = bytes(key[plen:])
            v = txn.get(u, db=d.servers)
            if v is None:
                continue  # cannot happen in a consistent store (check() would say so)
            version, created, updated, project, _ = L.unpack_frame_head(v)
            yield u, ServerHead(version, project.decode(), created, updated)

    def cursor(self, cell: str) -> int | None:
        key = cell.encode()
        if not 0 < len(key) <= L.MAX_KEY:
            return None
        v = self._txn.get(key, db=self._d.cursors)
        return None if v is None else L.unpack_cursor(v)[0]

    def cursor_mark(self, cell: str) -> int:
        """The mark stored with the cell's cursor (``Batch.cursor_mark``; 0 if none)."""
        key = cell.encode()
        if not 0 < len(key) <= L.MAX_KEY:
            return 0
        v = self._txn.get(key, db=self._d.cursors)
        return 0 if v is None else L.unpack_cursor(v)[1]

    def cursors(self) -> dict[str, int]:
        cur = self._txn.cursor(db=self._d.cursors)
        return {bytes(k).decode(): L.unpack_cursor(v)[0] for k, v in cur}

    def generation(self, table: Catalog) -> int:
        """The catalogue table's generation (``layout``: ``gen:<table>``; 0 if never changed).

        It moves in every transaction that changes an entry of the table: something derived
        from the table in a transaction that read generation g is still valid in any later
        transaction that reads g.
        """
        v = self._txn.get(_GEN_KEYS[table], db=self._d.meta)
        return 0 if v is None else int(L.U64.unpack(v)[0])

    def tombstone_horizon(self) -> int:
        v = self._txn.get(L.META_HORIZON, db=self._d.meta)
        return 0 if v is None else int(L.U64.unpack(v)[0])

    # -- whole-store views (tests, verify) -------------------------------------------------------
    def dump(self, logical: bool = False) -> dict[str, list[tuple[bytes, bytes]]]:
        """Every key and value of every database (tests and debugging; not for requests).

        ``logical``: what the store means rather than how it got there -- without superseded
        ``by_changed`` entries, the trim position and the catalogue generations, which depend
        on the history of writes and trims, not on the state.
        """
        out = {
            name.decode(): [(bytes(k), bytes(v)) for k, v in self._txn.cursor(db=db)]
            for name, db in self._d.by_name.items()
        }
        if logical:
            out["by_changed"] = [
                (k, v) for k, v in out["by_changed"]
                if changed_is_current(self._txn, self._d, L.time_of_changed_key(k), k[8:24], v)
            ]
            out["meta"] = [
                (k, v) for k, v in out["meta"]
                if k != L.META_TRIM_POS and not k.startswith(L.META_GEN)
            ]
        return out

    def count(self, database: bytes) -> int:
        """Entries in one named database (``layout.SERVERS``, ...)."""
        return int(self._txn.stat(self._d.by_name[database])["entries"])

    def check(self) -> list[str]:
        """The layout's invariants (P11); the problems found, empty if consistent."""
        from fastpath.store.check import check

        return check(self._txn, self._d)


_GEN_KEYS = {table: L.gen_key(table.value) for table in Catalog}


def _project_bytes(project: str) -> bytes:
    try:
        return L.name_bytes(project, "project_id")
    except RecordError:
        # Such a project can own no server: give a key prefix that matches nothing.
        return b"\x00"

"""Layout of the API store: the named LMDB databases and every key and value encoding.

The store is one LMDB environment in ``DATA_DIR/store/`` (``data.mdb`` + ``lock.mdb``)
with the named databases below (``max_dbs``).  Integers in keys are big-endian so that
LMDB's default key order (memcmp, shorter key first on a common prefix) is numeric order.
``u64`` = 8-byte unsigned big-endian; ``uuid16`` = the 16 raw bytes of a server uuid;
``~x`` = every byte of ``x`` inverted (255 - b), which reverses its order; ``NUL`` = b"\\x00"
(project, user and cell names never contain it: :func:`name_bytes` refuses them).
Timestamps are microseconds since the Unix epoch (UTC); ``INV(t)`` = ``2**64 - 1 - t``.

==================  ==========================================  ==============================
database            key                                         value
==================  ==========================================  ==============================
``meta``            ASCII name                                  see below
``servers``         uuid16                                      server frame (below)
``by_project``      project NUL u64(INV(created_at)) ~uuid16    index entry (msgpack array)
``by_created``      u64(INV(created_at)) ~uuid16                index entry
``by_changed``      u64(updated_at) uuid16                      1 byte: 0 live, 1 deleted
``views``           uuid16 view_id                              rendered JSON fragment (bytes)
``api_fields``      uuid16                                      msgpack map of API-owned fields
``tombstones``      uuid16                                      tombstone frame (below)
``tomb_age``        u64(deleted_at) uuid16                      b"" (purge walks it in order)
``flavors``         flavor id (UTF-8)                           msgpack map
``images``          image id (UTF-8)                            msgpack map
``keypairs``        user_id NUL name (UTF-8)                    msgpack map
``quota_limits``    project (UTF-8); NUL = the defaults         msgpack map resource -> limit
``quota_usage``     project (UTF-8)                             msgpack map resource -> in use
``azs``             availability zone name (UTF-8)              msgpack map
``cells``           cell name (UTF-8)                           msgpack map
``cursors``         cell name (UTF-8)                           u64(feed seq applied) [u64 mark]
``outbox``          u64(sequence)                               msgpack map (a command)
``by_cell``         cell NUL uuid16                             b"" (a live server's cell)
==================  ==========================================  ==============================

Orders this gives (a forward cursor walk):

- ``by_project`` and ``by_created``: Nova's default list order, ``created_at`` desc then id
  desc.  Nova's tie-break is its integer ``instances.id``, which fastpath does not have; the
  uuid (also desc) is the deterministic tie-break (research notes P14).  A backward walk is
  the exact reverse (``sort_dir=asc``).
- ``by_changed``: ``updated_at`` asc, uuid asc (``changes-since``, ``changes-before``; a
  backward walk serves ``sort_key=updated_at``).  Tombstoned servers are in it at their
  ``deleted_at`` (value 1) until purged (Nova lists them as DELETED, DESIGN.md rule 9).
  It is append-only: ``updated_at`` keys cluster at "now", so the entries of a batch land
  on the same few pages, while deleting each server's previous entry would touch one random
  old page per change (issue 6: pages touched per change decide throughput).  So an entry
  is *current* only if the server's frame says the same time (``updated_at`` of the live
  record, ``deleted_at`` of the tombstone); readers skip the others, and
  ``Store.trim_changes`` deletes them in key order.  The value is one byte, so an entry
  is ~33 bytes and a page holds ~120.
- ``views``: the fragments of one server are adjacent (one page, one prefix walk).
- ``by_cell``: the live servers of one cell, adjacent (resync's orphan search and
  ``fastpath verify`` walk only that cell's servers).  ``apply`` keeps it: a put when a
  server becomes live, a delete when it is tombstoned or moves to another cell; an update
  in the same cell costs one get and no write.  Provisional API records (version 0) are in
  it under the cell the API chose.
- ``keypairs``: per user, by name (Nova's keypair list and marker order).
- ``flavors``: by flavor id as a string (Nova's default ``sort_key=flavorid``).

``meta`` holds ``b"layout"`` -> u64(:data:`LAYOUT_VERSION`), ``b"trim_pos"`` -> the
``by_changed`` key where the next trim continues, and ``b"tombstone_horizon"`` -> u64(t):
tombstones of servers deleted before ``t`` may have been purged, so an upsert of a
server the store does not know whose ``updated_at`` is older than ``t`` is refused as stale
(research notes P4: "absence of a tombstone after GC must be guarded by a GC watermark").
``b"gen:" + table`` (``gen:flavors``, ``gen:images``, ... one per catalogue table) -> u64:
the table's *generation*, raised by ``apply`` in the transaction that changes an entry of
the table (a put of the same value or a delete of nothing leaves it).  Absent = 0.  A
reader that cached something derived from the table may keep it while the generation read
in its transaction is the one it was derived at (the flavor responses, ``api/flavors.py``).

Server frame (value of ``servers``)::

    u64 version | i64 created_at | i64 updated_at | u8 len(project) | project | msgpack record

The fixed head lets ``apply`` decide the version rule and find the old index keys without
decoding the record (PERF: msgpack decoding is the costliest stage, issue 5).

Tombstone frame (value of ``tombstones``)::

    u64 version | i64 created_at | i64 deleted_at | u8 len(project) | project | msgpack rec|nil

``created_at`` and the project keep a marker naming a deleted server usable (P14): its
position in the index can still be computed.  The optional final record renders the
DELETED entries of ``changes-since``.

The index entry (value of ``by_project`` and ``by_created``) is
:class:`fastpath.store.record.IndexEntry` packed as a msgpack array in field order.

A server's ``uuid`` must be a canonical uuid (36 characters, hyphenated); anything else is
not a server id (the request path answers 404 for it, as Nova does).
"""

from __future__ import annotations

import struct

from fastpath.store.errors import RecordError

# 2: ``by_cell`` added.  A layout-1 store is migrated when opened (``store._migrate``):
# ``by_cell`` is built from the records in the same write transaction that records 2.
LAYOUT_VERSION = 2

# Database names (bytes, as LMDB wants them).  The order is the creation order only.
META = b"meta"
SERVERS = b"servers"
BY_PROJECT = b"by_project"
BY_CREATED = b"by_created"
BY_CHANGED = b"by_changed"
VIEWS = b"views"
API_FIELDS = b"api_fields"
TOMBSTONES = b"tombstones"
TOMB_AGE = b"tomb_age"
FLAVORS = b"flavors"
IMAGES = b"images"
KEYPAIRS = b"keypairs"
QUOTA_LIMITS = b"quota_limits"
QUOTA_USAGE = b"quota_usage"
AZS = b"azs"
CELLS = b"cells"
CURSORS = b"cursors"
OUTBOX = b"outbox"
BY_CELL = b"by_cell"

DATABASES: tuple[bytes, ...] = (
    META, SERVERS, BY_PROJECT, BY_CREATED, BY_CHANGED, VIEWS, API_FIELDS, TOMBSTONES,
    TOMB_AGE, FLAVORS, IMAGES, KEYPAIRS, QUOTA_LIMITS, QUOTA_USAGE, AZS, CELLS, CURSORS,
    OUTBOX, BY_CELL,
)
# Room for databases added by later layouts without changing max_dbs of older openers.
MAX_DBS = 32

META_LAYOUT = b"layout"
META_TRIM_POS = b"trim_pos"
CHANGED_LIVE = b"\x00"
CHANGED_DELETED = b"\x01"
# LMDB refuses empty keys (MDB_BAD_VALSIZE); no project id is NUL, so NUL names the defaults.
QUOTA_DEFAULTS = b"\x00"
META_HORIZON = b"tombstone_horizon"
META_GEN = b"gen:"  # + catalogue table name: that table's generation (u64)

MAX_U64 = 2**64 - 1
MAX_NAME = 255  # bytes of a project, user, cell, flavor or image id in a key
MAX_VIEW_ID = 64
MAX_KEY = 511  # LMDB's default MDB_MAXKEYSIZE

U64 = struct.Struct(">Q")
FRAME = struct.Struct(">QqqB")  # version, created_at, updated_at|deleted_at, len(project)
FRAME_SIZE = FRAME.size
FRAME_T = struct.Struct(">q")  # at offset 16: updated_at (record) or deleted_at (tombstone)

# bytes.translate table that inverts every byte: reverses the order of equal-length keys.
INVERT = bytes(range(255, -1, -1))


# -- uuids -------------------------------------------------------------------------------------
def parse_uuid(u: str | bytes) -> bytes | None:
    """uuid16 of a canonical uuid string (or of 16 raw bytes); None if it is not one."""
    if isinstance(u, bytes):
        return u if len(u) == 16 else None
    if len(u) != 36 or u[8] != "-" or u[13] != "-" or u[18] != "-" or u[23] != "-":
        return None
    try:
        b = bytes.fromhex(u[0:8] + u[9:13] + u[14:18] + u[19:23] + u[24:36])
    except ValueError:
        return None
    # bytes.fromhex skips ASCII whitespace: a uuid with spaces in it is not 16 bytes long.
    return b if len(b) == 16 else None


def uuid_key(u: str | bytes) -> bytes:
    """Like :func:`parse_uuid` but raises :class:`RecordError` for a non-uuid."""
    b = parse_uuid(u)
    if b is None:
        raise RecordError(f"not a canonical uuid: {u!r}")
    return b


def uuid_str(b: bytes | memoryview) -> str:
    """The canonical (lowercase, hyphenated) string of a uuid16."""
    h = bytes(b).hex()
    return f"{h[0:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}"


# -- names -------------------------------------------------------------------------------------
def name_bytes(name: str, what: str = "name") -> bytes:
    """UTF-8 of a project/user/cell/id that goes into a key: 1 to 255 bytes, no NUL.

    Empty is refused too: LMDB refuses empty keys, and an empty project would make index
    keys that start with NUL.
    """
    b = name.encode()
    if not 0 < len(b) <= MAX_NAME or b"\x00" in b:
        raise RecordError(f"{what} {name!r} cannot be used in a key (empty, NUL or over 255 bytes)")
    return b


def _ts(t: int) -> int:
    if not 0 <= t < 2**63:
        raise RecordError(f"timestamp {t!r} out of range (microseconds since the epoch)")
    return t


# -- index keys --------------------------------------------------------------------------------
def project_prefix(project: bytes) -> bytes:
    return project + b"\x00"


def by_project_key(project: bytes, created_at: int, u: bytes) -> bytes:
    return project + b"\x00" + U64.pack(MAX_U64 - _ts(created_at)) + u.translate(INVERT)


def by_created_key(created_at: int, u: bytes) -> bytes:
    return U64.pack(MAX_U64 - _ts(created_at)) + u.translate(INVERT)


def by_changed_key(updated_at: int, u: bytes) -> bytes:
    return U64.pack(_ts(updated_at)) + u


def tomb_age_key(deleted_at: int, u: bytes) -> bytes:
    return U64.pack(_ts(deleted_at)) + u


def uuid_of_index_key(key: bytes | memoryview) -> bytes:
    """uuid16 of a ``by_project`` or ``by_created`` key (the last 16 bytes, inverted)."""
    return bytes(key[-16:]).translate(INVERT)


def created_of_index_key(key: bytes | memoryview) -> int:
    """created_at of a ``by_project`` or ``by_created`` key."""
    return MAX_U64 - int(U64.unpack_from(key, len(key) - 24)[0])


def uuid_of_changed_key(key: bytes | memoryview) -> bytes:
    return bytes(key[8:24])


def time_of_changed_key(key: bytes | memoryview) -> int:
    """updated_at of a ``by_changed`` key (or deleted_at of a ``tomb_age`` key)."""
    return int(U64.unpack_from(key, 0)[0])


def by_cell_prefix(cell: bytes) -> bytes:
    return cell + b"\x00"


def by_cell_key(cell: bytes, u: bytes) -> bytes:
    return cell + b"\x00" + u


def view_key(u: bytes, view_id: bytes) -> bytes:
    return u + view_id


def keypair_key(user_id: str, name: str) -> bytes:
    return name_bytes(user_id, "user_id") + b"\x00" + name_bytes(name, "keypair name")


def keypair_prefix(user_id: str) -> bytes:
    return name_bytes(user_id, "user_id") + b"\x00"


def gen_key(table: str) -> bytes:
    """The ``meta`` key of a catalogue table's generation (``table``: ``Catalog.value``)."""
    return META_GEN + table.encode()


def pack_cursor(seq: int, mark: int = 0) -> bytes:
    """A ``cursors`` value: the feed seq, then (if not 0) the mark of the entry at it."""
    return U64.pack(seq) + (U64.pack(mark) if mark else b"")


def unpack_cursor(v: bytes | memoryview) -> tuple[int, int]:
    """(seq, mark) of a ``cursors`` value (mark 0: none recorded)."""
    seq = int(U64.unpack_from(v, 0)[0])
    return seq, int(U64.unpack_from(v, 8)[0]) if len(v) >= 16 else 0


def outbox_key(seq: int) -> bytes:
    return U64.pack(seq)


# -- frames ------------------------------------------------------------------------------------
def pack_frame(version: int, created_at: int, updated_at: int, project: bytes, body: bytes) -> bytes:
    return FRAME.pack(version, created_at, updated_at, len(project)) + project + body


def unpack_frame_head(buf: bytes | memoryview) -> tuple[int, int, int, bytes, int]:
    """(version, created_at, updated_or_deleted_at, project, offset of the msgpack body)."""
    version, created_at, t, plen = FRAME.unpack_from(buf, 0)
    end = FRAME_SIZE + plen
    return version, created_at, t, bytes(buf[FRAME_SIZE:end]), end


def frame_version(buf: bytes | memoryview) -> int:
    return int(U64.unpack_from(buf, 0)[0])

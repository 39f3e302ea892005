"""What the write side of the store takes and returns: changes, batches, the apply summary."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any, NamedTuple

from fastpath.store import record as R

ViewId = bytes
# render(record) -> {view id: rendered JSON fragment}; called by apply for every winning upsert.
Renderer = Callable[[Mapping[str, Any]], Mapping[ViewId, bytes]]


@dataclass(frozen=True, slots=True)
class Upsert:
    """A server's full record at ``version`` (a complete record: ``record.make_record``)."""

    uuid: str
    version: int
    record: Mapping[str, Any]


class Prepared(NamedTuple):
    """An :class:`Upsert` packed ahead of the write transaction (:func:`prepare_upsert`).

    What ``apply`` would compute from the record inside the transaction -- the packed
    record, the packed index entry and the rendered views -- is computed before, where it
    can run in another process (cellsync's projector workers), so the write transaction
    only checks versions and puts bytes.  ``apply`` stores it exactly as it would store
    ``Upsert(uuid, version, record)`` rendered with the renderer that made ``views``; when
    the store holds API-owned values for the server (pending commands) it unpacks ``body``
    and merges and renders as for an Upsert (with ``apply``'s renderer).

    PERF: a NamedTuple, not a dataclass: it crosses a process boundary by the thousand, and
    unpickling a frozen dataclass runs Python per field (2.0 vs 0.3 us a change).
    """

    uuid: str
    version: int
    project_id: str
    cell: str
    created_at: int
    updated_at: int
    vcpus: int  # the flavor's, for quota usage
    ram: int
    body: bytes  # record.pack(record): the record, API-owned fields at their defaults
    index_value: bytes  # record.pack_index(record.index_entry(record))
    views: Mapping[ViewId, bytes]  # render(record)


def prepare_upsert(record: Mapping[str, Any], render: Renderer) -> Prepared:
    """The :class:`Prepared` form of ``Upsert(record["uuid"], record["version"], record)``
    (``record`` complete: ``record.make_record``) with its views rendered by ``render``.

    The cell owns none of the API-owned fields: a value it sent for one is dropped (as
    ``apply`` drops it from an Upsert).
    """
    if any(record.get(name) for name in R.API_FIELDS):
        record = {**record, **{name: R.default_of(name) for name in R.API_FIELDS}}
    flavor = record["flavor"]
    return Prepared(record["uuid"], record["version"], record["project_id"], record["cell"],
                    record["created_at"], record["updated_at"], flavor["vcpus"],
                    flavor["ram"], R.pack(record), R.pack_index(R.index_entry(record)),
                    render(record))


@dataclass(frozen=True, slots=True)
class Tombstone:
    """A server deleted at ``version``.

    ``record``: the final (deleted) record, complete, at ``version`` -- what renders the
    server's DELETED entry in ``changes-since``.  Without it that entry has only the id,
    project, status and times.  The store never keeps the record the tombstone replaced in
    its stead: what is stored must depend only on each server's winning change, whatever
    the order changes arrive in.
    """

    uuid: str
    version: int
    project_id: str
    created_at: int
    deleted_at: int
    record: Mapping[str, Any] | None = None


class Catalog(Enum):
    """Catalogue tables written through :class:`CatalogPut` (last write wins)."""

    FLAVORS = "flavors"  # key: flavor id
    IMAGES = "images"  # key: image id
    KEYPAIRS = "keypairs"  # key: (user_id, name)
    QUOTA_LIMITS = "quota_limits"  # key: project id, or "" for the defaults
    AZS = "azs"  # key: availability zone name
    CELLS = "cells"  # key: cell name


@dataclass(frozen=True, slots=True)
class CatalogPut:
    """Put (or, with ``value=None``, delete) one catalogue entry."""

    table: Catalog
    key: str | tuple[str, str]
    value: Mapping[str, Any] | None


@dataclass(frozen=True, slots=True)
class Batch:
    """Everything one write transaction applies."""

    changes: Sequence[Upsert | Prepared | Tombstone] = ()
    cursor: tuple[str, int] | None = None  # (cell name, feed sequence covered)
    catalog: Sequence[CatalogPut] = ()
    reset_cursor: bool = False  # set the cursor even if lower (resync of a cell)
    repair: bool = False  # anti-entropy: accept servers older than the tombstone horizon
    # A fingerprint of the feed entry at the cursor (cellsync: its commit time), kept with
    # the cursor: a cell whose entry at that seq differs later has been restored (cellsync).
    cursor_mark: int = 0
    # Also walk up to this many entries of the changes log and delete the superseded ones
    # (apply.trim_some), in this transaction: no commit of its own for the upkeep.
    trim: int = 0


@dataclass(slots=True)
class ApplySummary:
    applied: int = 0  # upserts that created or replaced a record
    skipped_stale: int = 0  # changes dropped by the version rule
    blocked_by_tombstone: int = 0  # of those, upserts refused because of a tombstone
    tombstoned: int = 0  # tombstones stored (removing a record or not)
    catalog: int = 0  # catalogue entries written
    cursor: int | None = None  # the cell's cursor after this transaction
    cursor_moved: bool = False
    map_resizes: int = 0  # times the map grew while applying
    trim_walked: int = 0  # changes-log entries walked by Batch.trim
    trim_removed: int = 0  # ... and deleted (superseded)

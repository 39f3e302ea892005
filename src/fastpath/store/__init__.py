"""The API store: a denormalized, memory-mapped LMDB store of servers and their catalogue.

- :mod:`fastpath.store.layout` -- the named databases and every key/value encoding;
- :mod:`fastpath.store.record` -- the canonical server record (the one definition of it);
- :mod:`fastpath.store.store` -- :class:`Store` (open after fork, ``read()``, ``apply()``);
- :mod:`fastpath.store.apply` -- the write transaction: the version rule, index upkeep;
- :mod:`fastpath.store.reader` -- the read transaction and its getters;
- :mod:`fastpath.store.changes` -- what ``apply`` takes and returns;
- :mod:`fastpath.store.check` -- the layout's invariants (tests, verify).

See ``docs/store.md`` for the whole picture.
"""

from fastpath.store.changes import (
    ApplySummary,
    Batch,
    Catalog,
    CatalogPut,
    Prepared,
    Renderer,
    Tombstone,
    Upsert,
    prepare_upsert,
)
from fastpath.store.errors import (
    MarkerNotFound,
    RecordError,
    StoreError,
    StoreForkError,
    StoreFullError,
    StoreLayoutError,
)
from fastpath.store.reader import ChangedEntry, Reader, ServerHead, TombstoneInfo
from fastpath.store.record import SCHEMA_VERSION, IndexEntry, make_record
from fastpath.store.store import Store, TxnCounters

__all__ = [
    "SCHEMA_VERSION",
    "ApplySummary",
    "Batch",
    "Catalog",
    "CatalogPut",
    "ChangedEntry",
    "IndexEntry",
    "MarkerNotFound",
    "Prepared",
    "Reader",
    "RecordError",
    "Renderer",
    "ServerHead",
    "Store",
    "StoreError",
    "StoreForkError",
    "StoreFullError",
    "StoreLayoutError",
    "Tombstone",
    "TombstoneInfo",
    "TxnCounters",
    "Upsert",
    "make_record",
    "prepare_upsert",
]

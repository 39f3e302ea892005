"""The API store: a denormalized, memory-mapped LMDB store of servers and their catalogue.

- :mod:`fastpath.store.layout` -- the named databases and every key/value encoding;
- :mod:`fastpath.store.record` -- the canonical server record (the one definition of it);
- :mod:`fastpath.store.store` -- :class:`Store` (open after fork, ``read()``, ``apply()``).

See ``docs/store.md`` for the whole picture.
"""

from fastpath.store.errors import (
    MarkerNotFound,
    RecordError,
    StoreError,
    StoreForkError,
    StoreFullError,
    StoreLayoutError,
)
from fastpath.store.record import SCHEMA_VERSION, IndexEntry, make_record
from fastpath.store.store import (
    ApplySummary,
    Batch,
    Catalog,
    CatalogPut,
    ChangedEntry,
    Reader,
    Renderer,
    ServerHead,
    Store,
    Tombstone,
    TombstoneInfo,
    TxnCounters,
    Upsert,
)

__all__ = [
    "SCHEMA_VERSION",
    "ApplySummary",
    "Batch",
    "Catalog",
    "CatalogPut",
    "ChangedEntry",
    "IndexEntry",
    "MarkerNotFound",
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
]

"""The handles of the named databases of one open environment."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fastpath.store import layout as L


class Dbs:
    """One attribute per named database (PERF: an attribute, not a dict lookup, per call)."""

    __slots__ = (
        "meta", "servers", "by_project", "by_created", "by_changed", "views", "api_fields",
        "tombstones", "tomb_age", "flavors", "images", "keypairs", "quota_limits",
        "quota_usage", "azs", "cells", "cursors", "outbox", "by_cell", "by_name",
    )

    meta: Any
    servers: Any
    by_project: Any
    by_created: Any
    by_changed: Any
    views: Any
    api_fields: Any
    tombstones: Any
    tomb_age: Any
    flavors: Any
    images: Any
    keypairs: Any
    quota_limits: Any
    quota_usage: Any
    azs: Any
    cells: Any
    cursors: Any
    outbox: Any
    by_cell: Any
    by_name: dict[bytes, Any]

    def __init__(self, handles: Mapping[bytes, Any]) -> None:
        self.by_name: dict[bytes, Any] = dict(handles)
        for name in L.DATABASES:
            setattr(self, name.decode(), handles[name])

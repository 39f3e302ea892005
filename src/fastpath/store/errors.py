"""Errors of the store layer."""

from __future__ import annotations

from fastpath.errors import FastpathError


class StoreError(FastpathError):
    """The API store cannot do what was asked."""


class StoreFullError(StoreError):
    """The LMDB map reached its configured maximum; the operator must raise it."""


class StoreForkError(StoreError):
    """A store opened before fork() was used in the child; open it after fork instead."""


class StoreLayoutError(StoreError):
    """The store on disk was written with another layout version."""


class RecordError(StoreError, ValueError):
    """A server record or a change does not follow the record schema."""


class MarkerNotFound(StoreError):
    """A list marker names no server of the listed scope (the API answers 400)."""

"""What the Python read handlers share besides query strings and links: the
one-read-transaction wrapper every handler goes through, JSON bodies, policy refusals and
Nova's time formats.

Query strings (parsing, validation, Nova's messages, pagination) are in
:mod:`fastpath.api.query`; self, bookmark and next links in :mod:`fastpath.api.links`.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import Any

import orjson

from fastpath.api.context import ApiContext
from fastpath.errors import Forbidden, HTTPFault
from fastpath.store.reader import Reader

Handler = Callable[[Any], tuple[int, bytes]]

# Nova's answer when a method is not available at the requested microversion
# (VersionNotFoundForAPIMethod becomes a plain 404).
RESOURCE_NOT_FOUND = "The resource could not be found."


def read_route(ctx: ApiContext, fn: Callable[[Any, Reader], tuple[int, bytes]]) -> Handler:
    """A handler that runs ``fn(req, reader)`` inside exactly one store read transaction.

    Validation runs inside it too, so every answer -- errors included -- costs exactly one
    read transaction and no other store call (the budget of DESIGN.md, checked by tests
    through the store's counters).
    """

    def handler(req: Any) -> tuple[int, bytes]:
        with ctx.store.read() as r:
            return fn(req, r)

    handler.__name__ = handler.__qualname__ = getattr(fn, "__name__", "handler")
    return handler


def dumps(obj: Any) -> bytes:
    """A JSON body.  PERF: orjson (compact, UTF-8), ~12x the stdlib's speed here."""
    return orjson.dumps(obj)


def forbidden(rule: str) -> HTTPFault:
    """Nova's PolicyNotAuthorized."""
    return Forbidden(f"Policy doesn't allow {rule} to be performed.")


# -- values -----------------------------------------------------------------------------------


def isotime(us: int | None) -> str | None:
    """Nova's ``utils.isotime``: ``2011-01-01T01:02:03Z``, from microseconds since the epoch."""
    if us is None:
        return None
    t = dt.datetime.fromtimestamp(us // 1_000_000, dt.UTC)
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def db_time(us: int | None) -> str | None:
    """A naive DB datetime as Nova's JSON shows it: ``2014-05-07T12:06:13.681238``."""
    if us is None:
        return None
    t = dt.datetime(1970, 1, 1) + dt.timedelta(microseconds=us)
    return t.strftime("%Y-%m-%dT%H:%M:%S.%f")

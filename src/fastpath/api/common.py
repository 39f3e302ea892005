"""What the Python read handlers share, shaped as Nova's API layer behaves
(nova/api/openstack/common.py, nova/api/validation): query parameters and their
validation messages, pagination, links, policy refusals, JSON bodies, and the
one-read-transaction wrapper every handler goes through.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any
from urllib.parse import parse_qsl, urlencode

import orjson

from fastpath.api.context import ApiContext
from fastpath.errors import BadRequest, Forbidden, HTTPFault
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
    return orjson.dumps(obj)


def forbidden(rule: str) -> HTTPFault:
    """Nova's PolicyNotAuthorized."""
    return Forbidden(f"Policy doesn't allow {rule} to be performed.")


# -- query parameters -------------------------------------------------------------------------


class Query:
    """The query string as webob's ``req.GET``: ordered (name, value) pairs, blank values kept."""

    __slots__ = ("items",)

    def __init__(self, items: list[tuple[str, str]]) -> None:
        self.items = items

    @classmethod
    def of(cls, req: Any) -> Query:
        raw = req.query
        if not raw:
            return cls([])
        try:
            items = parse_qsl(raw.decode("latin-1"), keep_blank_values=True, encoding="utf-8",
                              errors="strict")
        except UnicodeDecodeError:
            raise BadRequest("Query string is not UTF-8 encoded") from None
        return cls(items)

    def __contains__(self, name: str) -> bool:
        return any(k == name for k, _ in self.items)

    def get(self, name: str, default: str | None = None) -> str | None:
        """The last value of ``name`` (webob's MultiDict ``get``)."""
        for k, v in reversed(self.items):
            if k == name:
                return v
        return default

    def first(self, name: str) -> str | None:
        for k, v in self.items:
            if k == name:
                return v
        return None

    def getall(self, name: str) -> list[str]:
        return [v for k, v in self.items if k == name]

    def names(self) -> list[str]:
        seen: dict[str, None] = {}
        for k, _ in self.items:
            seen.setdefault(k)
        return list(seen)


# Value checks of Nova's query schemas (parameter_types); each returns the jsonschema
# message of the first failing keyword, or None.
Check = Callable[[str], str | None]


def _integer(minimum: int) -> Check:
    def check(v: str) -> str | None:
        if not re.fullmatch(r"[0-9]*", v):
            return f"{v!r} does not match '^[0-9]*$'"
        if v and int(v) < minimum:
            return f"{int(v)} is less than the minimum of {minimum}"
        if not v:
            return f"{v!r} should be non-empty"
        return None

    return check


NON_NEGATIVE_INT = _integer(0)
POSITIVE_INT = _integer(1)


def any_string(v: str) -> str | None:
    return None


def enum(values: Sequence[str]) -> Check:
    allowed = list(values)

    def check(v: str) -> str | None:
        return None if v in allowed else f"{v!r} is not one of {allowed!r}"

    return check


def validate(q: Query, schema: Mapping[str, Check], additional: bool,
             patterns: Iterable[str] = ()) -> None:
    """Nova's ``validation.query_schema``: each value of each known parameter is checked
    (400 ``Invalid input for query parameters ...``); unknown parameters are refused when
    ``additional`` is False (from 2.75 on most routes), else ignored."""
    for name, check in schema.items():
        for value in q.getall(name):
            msg = check(value)
            if msg is not None:
                raise BadRequest(f"Invalid input for query parameters {name}. Value: {value}. {msg}")
    if not additional:
        pats = [re.compile(p) for p in patterns]
        extra = sorted(n for n in q.names() if n not in schema and not any(p.search(n) for p in pats))
        if extra:
            verb = "was" if len(extra) == 1 else "were"
            names = ", ".join(repr(e) for e in extra)
            raise BadRequest(f"Additional properties are not allowed ({names} {verb} unexpected)")


PAGINATION: dict[str, Check] = {"limit": NON_NEGATIVE_INT, "marker": any_string}


def limit_and_marker(q: Query, max_limit: int) -> tuple[int, str | None]:
    """Nova's ``common.get_limit_and_marker`` (after the schema accepted ``limit``)."""
    limit = max_limit
    v = q.get("limit")
    if v is not None:
        try:
            n = int(v)
        except ValueError:
            raise BadRequest("limit must be an integer") from None
        if n < 0:
            raise BadRequest("limit must be >= 0")
        limit = min(max_limit, n)
    return limit, q.get("marker")


# -- links ------------------------------------------------------------------------------------


class Links:
    """Nova's ViewBuilder links for one request: ``{base}/v2.1[/{project}]/{collection}/{id}``
    (self) and ``{base}[/{project}]/{collection}/{id}`` (bookmark).  The project id appears
    only when the request URL carried it (Nova's ``_get_project_id``)."""

    __slots__ = ("base", "project", "versioned")

    def __init__(self, req: Any) -> None:
        self.base = req.base_url.rstrip("/")
        up = req.url_project
        self.project = "/" + up.decode("utf-8", "replace") if up else ""
        self.versioned = self.base + "/v2.1" + self.project

    def self_href(self, collection: str, ident: str) -> str:
        return f"{self.versioned}/{collection}/{ident}"

    def bookmark(self, collection: str, ident: str) -> str:
        return f"{self.base}{self.project}/{collection}/{ident}"

    def pair(self, collection: str, ident: str) -> list[dict[str, str]]:
        return [
            {"href": self.self_href(collection, ident), "rel": "self"},
            {"href": self.bookmark(collection, ident), "rel": "bookmark"},
        ]

    def next(self, q: Query, collection: str, marker: str) -> dict[str, str]:
        """Nova's ``_get_next_link``: the request's parameters sorted, ``marker`` replaced."""
        params: dict[str, str] = {}
        for k, v in sorted(q.items):
            params[k] = v
        params["marker"] = marker
        return {"href": f"{self.versioned}/{collection}?{urlencode(params)}", "rel": "next"}


def collection_links(q: Query, links: Links, max_limit: int, count: int, collection: str,
                     last_id: str | None) -> list[dict[str, str]]:
    """Nova's ``_get_collection_links``: a next link when the page is full."""
    v = q.get("limit")
    max_items = max_limit if v is None else min(int(v), max_limit)
    if max_items and max_items == count and last_id is not None:
        return [links.next(q, collection, last_id)]
    return []


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


_TRUE = ("1", "t", "true", "on", "y", "yes")
_FALSE = ("0", "f", "false", "off", "n", "no")


def bool_from_string(v: str, strict: bool = False) -> bool:
    """oslo's ``strutils.bool_from_string``; strict: ValueError on anything else."""
    s = v.strip().lower()
    if s in _TRUE:
        return True
    if s in _FALSE or not strict:
        return False
    raise ValueError(v)

"""Server views: the JSON of a server at every microversion and role, rendered from the
record once, at write time, and assembled per request by selecting bytes.

The contract between the write side (``Store.apply(render=...)``) and the read handlers:

- :func:`render_server` is the ``render`` callable of ``Store.apply``: from a canonical
  record (fastpath.store.record) it returns ``{VIEW_ID: blob}``; the blob holds every JSON
  fragment any view of that server needs, with an offset table, stored in the ``views``
  database beside the record (one get at read time, no msgpack decoding).
- :func:`server_json` assembles the ``{...}`` object of one server (without the
  ``{"server": ...}`` wrapper) for a microversion (minor number, 1..104), a role and a
  base URL (``b"http://host:port"``); the links inside it are built from ``base_url``.
- :func:`server_summary_json` assembles the ``{"id", "links", "name"}`` object of
  ``GET /servers``.

The assembly runs in ``_core`` (compiled); this module defines fragments and view plans.
"""

from __future__ import annotations

VIEW_ID = b"server"


def render_server(record: dict) -> dict[bytes, bytes]:  # type: ignore[type-arg]
    raise NotImplementedError("server views: being written (issue 5)")


def server_json(blob: bytes, version: int, is_admin: bool, base_url: bytes) -> bytes:
    raise NotImplementedError("server views: being written (issue 5)")


def server_summary_json(blob: bytes, base_url: bytes) -> bytes:
    raise NotImplementedError("server views: being written (issue 5)")

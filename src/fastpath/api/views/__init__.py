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
- :func:`servers_json_join` assembles N servers into one buffer, ``obj, obj, ...`` (the
  inside of the ``"servers": [...]`` list) — detail (``summary=False``) or index.

The assembly runs in ``_core`` (``http/views.pxi``, compiled); this package defines the
fragments (``table``) and computes the view plans from the one table: for each (kind of
response, role, microversion) the fragment indexes to join, in Nova's key order.
:func:`configure` recomputes them for the disabled extension groups, at worker start.

Blob format (``BLOB_FORMAT`` 1), little-endian::

    u8 format | u8 count | u16 links | u32 offset[count + 1] | fragment bytes

``links`` counts the link placeholders in the fragment bytes (assembly sizes its buffer
with it);
``offset[i]`` is where fragment ``i`` starts in the fragment bytes, ``offset[count]`` their
total length; an empty fragment is a key that this server does not show.

Links (Nova's ``common.ViewBuilder``): the self link is
``application_url + [/project_id] + /servers/{id}`` and the bookmark
``application_url without its version + [/project_id] + /servers/{id}`` (flavor and image
bookmarks alike), where ``project_id`` is the *requesting context's* project and is
included only when it occurs in the request URL (``_get_project_id``: ``project_id in
request.url``) — so ``/v2.1/servers/...`` gives links without a project, the legacy
``/v2.1/{project_id}/servers/...`` gives links with the caller's project (an admin looking
at another project's server sees the admin's project, not the server's).  Callers pass that
project as ``link_project`` (:func:`link_project` computes it) and the API root of the
request (``/v2.1``, or ``/v2`` for the legacy endpoint) as ``root``.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from itertools import accumulate
from typing import Any

from fastpath._loader import load_core
from fastpath.api.views import table
from fastpath.api.views.table import (
    ADMIN,
    DETAIL,
    FRAGMENT_INDEX,
    FULL_UPDATE,
    GROUPS,
    KIND_LETTERS,
    MV_MAX,
    MV_MIN,
    N_FRAGMENTS,
    N_KINDS,
    REBUILD,
    ROWS,
    SHOW,
    SUMMARY,
    UPDATE,
    USER,
)

__all__ = [
    "ADMIN", "BLOB_FORMAT", "DETAIL", "GROUPS", "REBUILD", "SHOW", "SUMMARY", "UPDATE", "USER",
    "VIEW_ID", "compute_plans", "configure", "link_project", "parse_blob", "plan", "render_server",
    "server_json", "server_summary_json", "servers_json_join",
]

VIEW_ID = b"server"
BLOB_FORMAT = 1

_core = load_core()


# -- write time ----------------------------------------------------------------------------
_HEAD = struct.Struct(f"<BBH{N_FRAGMENTS + 1}I")


def render_server(record: Mapping[str, Any]) -> dict[bytes, bytes]:
    """``{VIEW_ID: blob}``: every fragment of every view of ``record``, rendered once."""
    frags = table.render_fragments(record if isinstance(record, dict) else dict(record))
    body = b"".join(frags)
    # Link placeholders are the only NULs (JSON escapes a NUL in a string as \u0000).
    head = _HEAD.pack(BLOB_FORMAT, N_FRAGMENTS, body.count(b"\x00"),
                      *accumulate(map(len, frags), initial=0))
    return {VIEW_ID: head + body}


def parse_blob(blob: bytes) -> list[bytes]:
    """The fragments of a blob (tests, debugging)."""
    fmt, count, _ = struct.unpack_from("<BBH", blob)
    if fmt != BLOB_FORMAT:
        raise ValueError(f"server view blob of format {fmt}, not {BLOB_FORMAT}")
    offsets = struct.unpack_from(f"<{count + 1}I", blob, 4)
    base = 4 + 4 * (count + 1)
    return [bytes(blob[base + offsets[i]:base + offsets[i + 1]]) for i in range(count)]


# -- plans ---------------------------------------------------------------------------------
def _row_applies(row: table.Row, kind: int, admin: bool, version: int,
                 disabled: frozenset[str]) -> bool:
    if not row.min <= version <= row.max:
        return False
    if row.role == ADMIN and not admin or row.role == USER and admin:
        return False
    if KIND_LETTERS[kind] not in row.kinds:
        return False
    if kind in (UPDATE, REBUILD) and version < FULL_UPDATE and not row.reduced:
        return False
    for g in row.groups:
        if (g[1:] not in disabled) if g.startswith("!") else (g in disabled):
            return False
    return True


def compute_plans(disabled: frozenset[str] = frozenset()) -> list[list[list[tuple[int, ...]]]]:
    """``plans[kind][admin][version]``: fragment indexes in Nova's key order."""
    unknown = disabled - GROUPS
    if unknown:
        raise ValueError(
            f"unknown extension group(s) in api.disabled_extensions: {', '.join(sorted(unknown))}"
            f" (known: {', '.join(sorted(GROUPS))})")
    plans: list[list[list[tuple[int, ...]]]] = []
    for kind in range(N_KINDS):
        by_role = []
        for admin in (False, True):
            by_version: list[tuple[int, ...]] = [()] * (MV_MAX + 1)
            for v in range(MV_MIN, MV_MAX + 1):
                idx = (FRAGMENT_INDEX[r.fragment] for r in ROWS
                       if _row_applies(r, kind, admin, v, disabled))
                by_version[v] = tuple(dict.fromkeys(idx))  # a fragment shows once
            by_role.append(by_version)
        plans.append(by_role)
    return plans


_plans: list[list[list[tuple[int, ...]]]] = []
_disabled: frozenset[str] = frozenset()


def configure(disabled: frozenset[str] = frozenset()) -> None:
    """Compute the plans for these disabled extension groups and hand them to ``_core``
    (worker start; the default, all groups on, is configured at import)."""
    global _plans, _disabled
    plans = compute_plans(frozenset(disabled))
    items: list[int] = []
    index: list[int] = []
    for kind in range(N_KINDS):
        for admin in (0, 1):
            for v in range(MV_MAX + 1):
                p = plans[kind][admin][v]
                index += (len(items), len(p))
                items += p
    _core.views_configure(N_FRAGMENTS, N_KINDS, MV_MAX,
                          struct.pack(f"<{len(items)}H", *items),
                          struct.pack(f"<{len(index)}I", *index))
    _plans = plans
    _disabled = frozenset(disabled)


def plan(kind: int, version: int, is_admin: bool) -> tuple[int, ...]:
    """The fragment indexes of one view (as configured)."""
    return _plans[kind][1 if is_admin else 0][version]


def link_project(url: bytes, project: str | None) -> bytes:
    """The project id of the links: the context's project when it occurs in the request
    URL (Nova's ``_get_project_id``, a substring test on the whole URL), else b''."""
    if project:
        p = project.encode("utf-8")
        if p in url:
            return p
    return b""


configure(frozenset())

# -- assembly (compiled) ---------------------------------------------------------------------
# server_json(blob, version, is_admin, base_url, link_project=b"", kind=SHOW, root=b"/v2.1")
server_json = _core.server_json
# server_summary_json(blob, base_url, link_project=b"", root=b"/v2.1")
server_summary_json = _core.server_summary_json
# servers_json_join(blobs, version, is_admin, base_url, summary, link_project=b"", root=b"/v2.1")
servers_json_join = _core.servers_json_join

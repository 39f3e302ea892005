"""Links in read API responses, as Nova's ``ViewBuilder`` builds them
(nova/api/openstack/common.py): ``self``/``bookmark`` pairs, and the ``next`` link of a
full page (``servers_links``, ``flavors_links``, ``images_links``, ``keypairs_links``).

The project id appears in a link only when the request URL carried it (Nova's
``_get_project_id``: the legacy ``/v2.1/{project_id}/...`` form, which ``_core`` has checked
equals the caller's project).  Base URLs come from ``_core`` without a trailing slash.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlencode

from fastpath.api.query import Query


def link_project(req: Any) -> bytes:
    """The project id of the request URL, or b"" (the form ``_core``'s views take)."""
    up = req.url_project
    return up if up is not None else b""


class Links:
    """Nova's links for one request: ``{base}/v2.1[/{project}]/{collection}/{id}`` (self) and
    ``{base}[/{project}]/{collection}/{id}`` (bookmark)."""

    __slots__ = ("base", "project", "versioned")

    def __init__(self, req: Any) -> None:
        self.base = req.base_url.rstrip("/")
        up = link_project(req)
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
        """Nova's ``_get_next_link``: the request's (validated, stripped) parameters sorted,
        one value per key (the last of the sorted ones), ``marker`` set to the page's last id."""
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


def page(name: str, rendered: list[Any], q: Query, links: Links, max_limit: int,
         collection: str, last_id: str | None) -> dict[str, Any]:
    """A list body: ``{name: rendered}``, plus ``{name}_links`` when the page is full."""
    body: dict[str, Any] = {name: rendered}
    nxt = collection_links(q, links, max_limit, len(rendered), collection, last_id)
    if nxt:
        body[name + "_links"] = nxt
    return body

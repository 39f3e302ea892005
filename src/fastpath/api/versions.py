"""The version documents (GET /, GET /v2.1/, GET /v2/), shaped as Nova's api_samples/versions.

Links are absolute, built from the request's base URL (Host header or http.public_url);
_core caches each rendered body per base URL.
"""

from __future__ import annotations

import json
from collections.abc import Callable

MIN_VERSION = "2.1"
MAX_VERSION = "2.104"
V21_UPDATED = "2013-07-23T11:33:21Z"
V20_UPDATED = "2025-07-04T12:00:00Z"
DOCS_LINK = {"href": "http://docs.openstack.org/", "rel": "describedby", "type": "text/html"}


# Per version document: (id, path, status, version, min_version, updated, media-type version).
_V21 = ("v2.1", "v2.1", "CURRENT", MAX_VERSION, MIN_VERSION, V21_UPDATED, "2.1")
_V20 = ("v2.0", "v2", "DEPRECATED", "", "", V20_UPDATED, "2")


def _doc(v: tuple[str, str, str, str, str, str, str], base: str, full: bool) -> dict[str, object]:
    vid, path, status, version, min_version, updated, media = v
    self_link = {"href": f"{base}/{path}/", "rel": "self"}
    doc: dict[str, object] = {
        "id": vid,
        "links": [self_link, DOCS_LINK] if full else [self_link],
        "status": status,
        "version": version,
        "min_version": min_version,
        "updated": updated,
    }
    if full:
        doc["media-types"] = [
            {"base": "application/json",
             "type": f"application/vnd.openstack.compute+json;version={media}"}
        ]
    return doc


def versions_doc(base: str) -> bytes:
    return json.dumps({"versions": [_doc(_V20, base, False), _doc(_V21, base, False)]}).encode()


def v21_doc(base: str) -> bytes:
    return json.dumps({"version": _doc(_V21, base, True)}).encode()


def v2_doc(base: str) -> bytes:
    return json.dumps({"version": _doc(_V20, base, True)}).encode()


# Index = the document kind _core asks for (0: GET /, 1: GET /v2.1/, 2: GET /v2/).
RENDERERS: tuple[Callable[[str], bytes], ...] = (versions_doc, v21_doc, v2_doc)

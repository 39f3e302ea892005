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


def _v21(base: str, full: bool) -> dict[str, object]:
    doc: dict[str, object] = {
        "id": "v2.1",
        "links": [{"href": f"{base}/v2.1/", "rel": "self"}],
        "status": "CURRENT",
        "version": MAX_VERSION,
        "min_version": MIN_VERSION,
        "updated": V21_UPDATED,
    }
    if full:
        doc["links"] = [{"href": f"{base}/v2.1/", "rel": "self"}, DOCS_LINK]
        doc["media-types"] = [
            {"base": "application/json", "type": "application/vnd.openstack.compute+json;version=2.1"}
        ]
    return doc


def _v20(base: str, full: bool) -> dict[str, object]:
    doc: dict[str, object] = {
        "id": "v2.0",
        "links": [{"href": f"{base}/v2/", "rel": "self"}],
        "status": "DEPRECATED",
        "version": "",
        "min_version": "",
        "updated": V20_UPDATED,
    }
    if full:
        doc["links"] = [{"href": f"{base}/v2/", "rel": "self"}, DOCS_LINK]
        doc["media-types"] = [
            {"base": "application/json", "type": "application/vnd.openstack.compute+json;version=2"}
        ]
    return doc


def versions_doc(base: str) -> bytes:
    return json.dumps({"versions": [_v20(base, False), _v21(base, False)]}).encode()


def v21_doc(base: str) -> bytes:
    return json.dumps({"version": _v21(base, True)}).encode()


def v2_doc(base: str) -> bytes:
    return json.dumps({"version": _v20(base, True)}).encode()


# Index = the document kind _core asks for (0: GET /, 1: GET /v2.1/, 2: GET /v2/).
RENDERERS: tuple[Callable[[str], bytes], ...] = (versions_doc, v21_doc, v2_doc)

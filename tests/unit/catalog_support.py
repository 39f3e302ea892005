"""Helpers of the catalogue route tests (test_api_*.py): seeding through ``Store.apply``,
requests that check the one-read-transaction budget, and Nova's reference samples."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fastpath.store import Batch
from fastpath.store.changes import Catalog, CatalogPut
from tests.unit.conftest import HOST, Response, Server, request

SAMPLES = Path("/work/shared/reference/nova-api/api_samples")
if not SAMPLES.is_dir():  # the reference lives beside the repository
    SAMPLES = Path(__file__).resolve().parents[3] / "shared/reference/nova-api/api_samples"

PROJECT = "6f70656e737461636b20342065766572"  # the project of Nova's samples
USER = "fake"
TOKEN = f"{USER}:{PROJECT}"
ADMIN_TOKEN = f"admin:{PROJECT}"
BASE = f"http://{HOST}"


def sample(path: str) -> Any:
    """A sample with its links made ours: our host, and /v2.1 where old samples say /v2."""
    text = (SAMPLES / path).read_text()
    text = text.replace("http://openstack.example.com/v2/", BASE + "/v2.1/")
    text = text.replace("http://openstack.example.com", BASE)
    return json.loads(text)


def seed(server: Server, table: Catalog, entries: dict[Any, Any]) -> None:
    store = server.plan.context.store
    store.apply(Batch(catalog=[CatalogPut(table, k, v) for k, v in entries.items()]))


def call(server: Server, target: str, token: str | None = TOKEN, version: str | None = None,
         *headers: str) -> Response:
    """One GET; asserts it cost exactly one store read transaction and no write."""
    hs = list(headers)
    if token is not None:
        hs.append(f"X-Auth-Token: {token}")
    if version is not None:
        hs.append(f"OpenStack-API-Version: compute {version}")
    store = server.plan.context.store
    reads, writes = store.read_txns, store.write_txns
    r = server.exchange(request(target, *hs)).one()
    assert (store.read_txns - reads, store.write_txns - writes) == (1, 0), (target, r.status, r.body)
    return r


def fault(r: Response, status: int) -> str:
    """The message of a Nova fault body, checking its shape."""
    names = {400: "badRequest", 403: "forbidden", 404: "itemNotFound"}
    assert r.status == status, (r.status, r.body)
    body = r.json()
    assert list(body) == [names[status]], body
    assert body[names[status]]["code"] == status
    return str(body[names[status]]["message"])

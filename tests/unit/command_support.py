"""Helpers of the write-route tests (test_*_commands.py): one request with the store budget
checked, and Nova's fault bodies."""

from __future__ import annotations

import json
from typing import Any

from tests.unit.catalog_support import TOKEN
from tests.unit.conftest import Response, Server, request

FAULT_NAMES = {400: "badRequest", 403: "forbidden", 404: "itemNotFound",
               409: "conflictingRequest", 415: "badMediaType", 503: "serviceUnavailable"}


def cmd(s: Server, method: str, target: str, body: Any = None, token: str = TOKEN,
        version: str = "2.1", budget: tuple[int, int] | None = None,
        noop_ok: bool = False) -> Response:
    """One write request; checks the store budget (read, write transactions): ``budget`` if
    given, else (1, 1) for a 2xx answer and (<= 1, 0) for a refusal.  ``noop_ok``: a 2xx
    may also be a no-op that wrote nothing (1, 0), e.g. adding a tag the server has."""
    raw = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    store = s.plan.context.store
    reads, writes = store.read_txns, store.write_txns
    hs = [f"X-Auth-Token: {token}", f"OpenStack-API-Version: compute {version}"]
    if raw is not None:
        hs.append("Content-Type: application/json")
    r = s.exchange(request(target, *hs, method=method, body=raw)).wait(1, timeout=30)[0]
    spent = (store.read_txns - reads, store.write_txns - writes)
    if budget is not None:
        assert spent == budget, (target, r.status, r.body, spent)
    elif r.status < 300:
        assert spent == (1, 1) or (noop_ok and spent == (1, 0)), (target, r.status, r.body, spent)
    else:
        assert spent[0] <= 1 and spent[1] == 0, (target, r.status, r.body, spent)
    return r


def get(s: Server, target: str, token: str = TOKEN, version: str = "2.1") -> Response:
    hs = [f"X-Auth-Token: {token}", f"OpenStack-API-Version: compute {version}"]
    return s.exchange(request(target, *hs)).one()


def err(r: Response, status: int) -> str:
    """The message of a Nova fault body with ``status``, checking its shape."""
    name = FAULT_NAMES[status]
    assert r.status == status, (r.status, r.body)
    body = r.json()
    assert list(body) == [name] and body[name]["code"] == status, body
    return str(body[name]["message"])

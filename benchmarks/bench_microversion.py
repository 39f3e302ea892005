"""Microversion negotiation, measured through the protocol (the negotiator is a C function).

Each benchmark is GET /v2.1/ with one way of asking for a version; compare with
``no header`` for the cost of the negotiation itself, and with the errors (400/406: a
Nova fault body is rendered) for the cost of refusing.
"""

from __future__ import annotations

import pytest
from _harness import request, status_of

CASES = [
    # id, version header, expected status, expected version in the answer (or None)
    ("no header", None, 200, b"2.1"),
    ("compute 2.79", b"OpenStack-API-Version: compute 2.79", 200, b"2.79"),
    ("legacy 2.79", b"X-OpenStack-Nova-API-Version: 2.79", 200, b"2.79"),
    ("latest", b"OpenStack-API-Version: compute latest", 200, b"2.104"),
    (
        "both headers",
        b"OpenStack-API-Version: compute 2.60\r\nX-OpenStack-Nova-API-Version: 2.1",
        200,
        b"2.60",
    ),
    (
        "service list",
        b"OpenStack-API-Version: placement 1.39, identity 3.14, compute 2.88",
        200,
        b"2.88",
    ),
    ("malformed (400)", b"OpenStack-API-Version: compute 2.x", 400, None),
    ("out of range (406)", b"OpenStack-API-Version: compute 2.999", 406, None),
]


@pytest.mark.parametrize(
    ("header", "status", "version"),
    [pytest.param(h, s, v, id=i) for i, h, s, v in CASES],
)
def bench_negotiate(benchmark, connect, header, status, version):
    data = request(b"/v2.1/", header) if header else request(b"/v2.1/")
    proto, transport = connect()
    proto.data_received(data)
    response = transport.out[-1]
    assert status_of(response) == status, response[:300]
    if version is not None:
        assert b"OpenStack-API-Version: compute " + version + b"\r\n" in response
    benchmark.group = "microversion: GET /v2.1/"
    benchmark(proto.data_received, data)
    assert not transport.closed

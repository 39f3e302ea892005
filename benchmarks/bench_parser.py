"""The parser layer alone: httptools (llhttp) with the callbacks fastpath registers.

These are floors for bench_protocol.py: the same request bytes fed to an
``httptools.HttpRequestParser`` whose callbacks do nothing.  The difference between a
protocol benchmark and its floor here is what fastpath's own code costs per request
(routing, auth, microversions, rendering, metrics, the write).
"""

from __future__ import annotations

import httptools
from _harness import request

V21 = request(b"/v2.1/")
V21_SDK = request(
    b"/v2.1/",
    b"User-Agent: openstacksdk/4.1.0 keystoneauth1/5.8.0 python-requests/2.32.3 CPython/3.11.7",
    b"Accept-Encoding: gzip, deflate",
    b"Accept: application/json",
    b"Connection: keep-alive",
    b"X-Auth-Token: notused",
    b"OpenStack-API-Version: compute 2.95",
    b"X-OpenStack-Nova-API-Version: 2.95",
)


class SameCallbacks:
    """The callbacks HttpProtocol registers (on_message_begin/url/header/headers_complete/
    body/message_complete), as empty Python methods."""

    def __init__(self) -> None:
        self.done = 0

    def on_message_begin(self) -> None:
        pass

    def on_url(self, url: bytes) -> None:
        pass

    def on_header(self, name: bytes, value: bytes) -> None:
        pass

    def on_headers_complete(self) -> None:
        pass

    def on_body(self, body: bytes) -> None:
        pass

    def on_message_complete(self) -> None:
        self.done += 1


class CompleteOnly:
    """Only on_message_complete: llhttp's own cost plus one callback."""

    def __init__(self) -> None:
        self.done = 0

    def on_message_complete(self) -> None:
        self.done += 1


def _run(benchmark, callbacks, data: bytes) -> None:
    parser = httptools.HttpRequestParser(callbacks)
    parser.feed_data(data)
    assert callbacks.done == 1
    benchmark.group = "parser: httptools floor"
    benchmark.extra_info["request_bytes"] = len(data)
    benchmark(parser.feed_data, data)
    assert callbacks.done > 1


def bench_httptools_same_callbacks(benchmark):
    """GET /v2.1/ with Host only (the load benchmark's request): floor of bench_get_v21."""
    _run(benchmark, SameCallbacks(), V21)


def bench_httptools_same_callbacks_sdk_headers(benchmark):
    """The openstacksdk request (8 headers): floor of bench_get_v21_sdk_headers."""
    _run(benchmark, SameCallbacks(), V21_SDK)


def bench_httptools_complete_only(benchmark):
    """GET /v2.1/ with only on_message_complete registered."""
    _run(benchmark, CompleteOnly(), V21)


def bench_httptools_complete_only_sdk_headers(benchmark):
    """The openstacksdk request with only on_message_complete registered."""
    _run(benchmark, CompleteOnly(), V21_SDK)

"""Shared fixtures of the micro-benchmarks: one in-process Worker and fake transports.

The request path is measured from ``HttpProtocol.data_received`` to the bytes handed to
``transport.write``: parsing (httptools), routing, auth, microversion negotiation,
rendering and metrics, with no event loop and no socket in between.  ``_core`` keeps its
per-process state in module-level C variables (one Worker per process), so the Worker is
built once per session and shared by every benchmark.

Run: ``pytest benchmarks/ --benchmark-only`` (``--benchmark-json=FILE`` to save,
``--benchmark-compare`` to compare with the last saved run).
"""

from __future__ import annotations

import platform
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from _harness import FakeTransport, Harness


@pytest.fixture(scope="session")
def harness() -> Iterator[Harness]:
    h = Harness()
    yield h
    h.close()


@pytest.fixture
def connect(harness: Harness) -> Iterator[Callable[..., tuple[Any, FakeTransport]]]:
    yield harness.connect
    harness.disconnect_all()


def pytest_benchmark_update_machine_info(config: Any, machine_info: dict[str, Any]) -> None:
    """Record what the figures depend on besides the code."""
    import os

    import httptools
    import uvloop

    machine_info["cpu_count"] = os.cpu_count()
    machine_info["kernel"] = platform.release()
    machine_info["httptools"] = httptools.__version__
    machine_info["uvloop"] = uvloop.__version__
    try:
        from fastpath import _loader

        machine_info["fastpath_core_source"] = _loader.load_core().SOURCE_HASH
    except Exception as exc:  # noqa: BLE001 - informational only
        machine_info["fastpath_core_source"] = f"unavailable: {exc}"

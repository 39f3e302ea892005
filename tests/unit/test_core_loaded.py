"""The compiled _core is the one running (there is no pure-Python twin), built from the
sources beside it; a stale or missing build is refused with a message saying how to build."""

from __future__ import annotations

import importlib
import os
from typing import Any

import pytest

import fastpath
from fastpath import _loader, _srchash
from fastpath.errors import CoreBuildError

PKG = os.path.dirname(os.path.abspath(fastpath.__file__))


def test_the_compiled_module_is_loaded(core: Any) -> None:
    assert core.__file__.endswith(".so"), core.__file__
    assert os.path.dirname(os.path.abspath(core.__file__)) == PKG
    assert importlib.import_module("fastpath._core") is core
    assert not os.path.exists(os.path.join(PKG, "_core.py"))  # no pure-Python twin
    assert core.Worker.__module__ == "fastpath._core"


def test_source_hash_matches_the_sources(core: Any) -> None:
    assert core.SOURCE_HASH == _srchash.source_hash(PKG)
    names = {os.path.relpath(p, PKG) for p in _srchash.source_files(PKG)}
    assert {"_core.pyx", "_core.pxd", "http/protocol.pxi", "http/router.pxi"} <= names


def test_load_core_returns_the_module(core: Any) -> None:
    assert _loader.load_core() is core


def test_a_stale_build_is_refused_with_how_to_build(
    monkeypatch: pytest.MonkeyPatch, core: Any
) -> None:
    monkeypatch.setattr(_loader, "_core", None)  # no cached module
    monkeypatch.setattr(_loader, "source_hash", lambda pkg_dir: "0123456789abcdef")
    with pytest.raises(CoreBuildError) as info:
        _loader.load_core()
    message = str(info.value)
    assert "stale" in message
    assert core.SOURCE_HASH in message and "0123456789abcdef" in message
    assert "pip install -e ." in message


def test_a_missing_build_is_refused_with_how_to_build(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_module(name: str) -> Any:
        raise ImportError(f"No module named {name!r}")

    monkeypatch.setattr(_loader, "_core", None)
    monkeypatch.setattr(_loader.importlib, "import_module", no_module)
    with pytest.raises(CoreBuildError) as info:
        _loader.load_core()
    assert "pip install -e ." in str(info.value)
    assert isinstance(info.value, ImportError)


PUBLIC = {
    "SOURCE_HASH": "var", "MIN_VERSION": "var", "MAX_VERSION": "var",
    "Worker": "class", "Request": "class", "Route": "class", "RouteNode": "class",
    "HttpProtocol": "class",
    "make_request_id": "def", "mark_api_root": "def", "clock_skew": "def", "sum_counters": "def",
    "views_configure": "def", "server_json": "def", "server_summary_json": "def",
    "servers_json_join": "def", "servers_page": "def", "server_show": "def",
}


def test_the_stub_lists_the_public_api(core: Any) -> None:
    with open(os.path.join(PKG, "_core.pyi")) as f:
        stub = f.read()
    mine = {"Worker", "Request", "Route", "RouteNode", "HttpProtocol"}
    for name, kind in PUBLIC.items():
        assert hasattr(core, name), name
        assert {"var": f"{name}:", "class": f"class {name}", "def": f"def {name}("}[kind] in stub
    # every Python-visible method of the classes is typed
    for cls in mine:
        for attr in vars(getattr(core, cls)):
            if attr.startswith("_") or attr in ("plan", "stopping", "routes"):
                continue
            assert f"def {attr}(" in stub or f"    {attr}: " in stub, f"{cls}.{attr}"
    # and nothing public in the module is forgotten (imports and the logger aside)
    imported = {"HTTPFault", "HttpParserCallbackError", "HttpParserError", "HttpParserUpgrade",
                "asyncio", "collections", "fault_name", "httptools", "json", "log", "logging",
                "os"}
    public = {n for n in dir(core) if not n.startswith("_")} - imported
    assert public == set(PUBLIC)

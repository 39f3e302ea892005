"""Pure-Python modules that setup.py also compiles with Cython, and the guard that keeps a
stale compiled copy from running.

cellsync's pipeline (rows -> record -> views -> store) is Python that runs once per change,
tens of thousands of times a second (issue 6).  Compiled as they are -- the same source, no
twin -- these modules take about a quarter less CPU per change, which on a busy machine is
the difference between keeping up with 10,000 changes/s and falling behind
(docs/benchmarks.md, issue 6, fourth pass).

A compiled module shadows its ``.py`` (an extension module is found first), so an edited
source would silently keep running the old compiled code.  setup.py therefore writes
:data:`MANIFEST` (each module's source fingerprint at build time) beside this file, and
:func:`install` -- run by ``fastpath/__init__.py`` before anything else is imported -- makes
Python import the ``.py`` of every module whose compiled copy was built from another source
(or whose fingerprint is unknown), logging once (a warning at every process start) which
ones and how to rebuild.  The ``.py`` is the same implementation, only slower;
:func:`status` tells which one runs (``python -c "import fastpath._accel as a;
print(a.status())"``).

They are compiled with ``annotation_typing`` off: the annotations stay documentation, so the
compiled code has the source's Python semantics exactly (with it on, Cython coerces typed
values: a bool inside a ``tuple[str, int]`` argument became an int and a bad cursor passed
``Apply.cursor``'s check; tests/unit runs against the compiled modules).

This file must stay importable without the package: setup.py runs it by path.
"""

from __future__ import annotations

import hashlib
import importlib.abc
import importlib.machinery
import importlib.util
import json
import logging
import os
import sys
from collections.abc import Sequence
from types import ModuleType

# Module name -> path of its source relative to the project root (setup.py's view).
MODULES: dict[str, str] = {
    "fastpath.store.layout": "src/fastpath/store/layout.py",
    "fastpath.store.record": "src/fastpath/store/record.py",
    "fastpath.store.changes": "src/fastpath/store/changes.py",
    "fastpath.store.apply": "src/fastpath/store/apply.py",
    "fastpath.api.views.table": "src/fastpath/api/views/table.py",
    "cellsync.projection": "cellsync/projection.py",
}
MANIFEST = "_accel.json"  # beside this file: {module: source fingerprint}, from setup.py

log = logging.getLogger("fastpath")


def fingerprint(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:16]


def write_manifest(root: str) -> None:
    """setup.py: record every module's source fingerprint (``root``: the project root)."""
    data = {name: fingerprint(os.path.join(root, rel)) for name, rel in MODULES.items()}
    path = os.path.join(root, "src", "fastpath", MANIFEST)
    with open(path, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.write("\n")


def _package_dir(top: str) -> str | None:
    """Where top-level package ``top`` lives, found without importing it (importing
    ``fastpath.store`` here would import the very modules this guard is about)."""
    if top == "fastpath":
        return os.path.dirname(os.path.abspath(__file__))
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        return None
    locations = None if spec is None else spec.submodule_search_locations
    return next(iter(locations), None) if locations else None


def _locate(name: str) -> tuple[str | None, str | None]:
    """(the compiled file, the source file) that an import of ``name`` would find."""
    top, *middle, leaf = name.split(".")
    base = _package_dir(top)
    if base is None:
        return None, None
    d = os.path.join(base, *middle)
    compiled = next((p for p in (os.path.join(d, leaf + s)
                                 for s in importlib.machinery.EXTENSION_SUFFIXES)
                     if os.path.exists(p)), None)
    source = os.path.join(d, leaf + ".py")
    return compiled, source if os.path.exists(source) else None


def plan(names: Sequence[str], manifest: dict[str, str]) -> dict[str, str]:
    """Per module: ``"compiled"`` (its compiled copy matches the source beside it, or no
    source ships beside it), ``"source"`` (not compiled), or ``"stale"`` (compiled from
    another source, or unknown to the manifest: the ``.py`` must run)."""
    out: dict[str, str] = {}
    for name in names:
        compiled, source = _locate(name)
        if compiled is None:
            out[name] = "source"
        elif source is None or manifest.get(name) == fingerprint(source):
            out[name] = "compiled"
        else:
            out[name] = "stale"
    return out


def strays(tops: Sequence[str] = ("fastpath", "cellsync")) -> dict[str, str]:
    """Compiled modules beside a ``.py`` that are not in :data:`MODULES` (``_core`` has
    its own check): left by an older build that compiled more; ``{module: its .py}``."""
    out: dict[str, str] = {}
    for top in tops:
        base = _package_dir(top)
        if base is None:
            continue
        for root, dirs, files in os.walk(base):
            dirs[:] = [d for d in dirs if d != "__pycache__"]
            for f in files:
                stem = next((f[:-len(s)] for s in importlib.machinery.EXTENSION_SUFFIXES
                             if f.endswith(s)), None)
                if stem is None or not os.path.exists(os.path.join(root, stem + ".py")):
                    continue
                rel = os.path.relpath(os.path.join(root, stem), base).replace(os.sep, ".")
                name = f"{top}.{rel}"
                if name not in MODULES and name != "fastpath._core":
                    out[name] = os.path.join(root, stem + ".py")
    return out


class _SourceFinder(importlib.abc.MetaPathFinder):
    """Imports the ``.py`` of the modules named, ahead of their stale compiled copies."""

    def __init__(self, sources: dict[str, str]) -> None:
        self.sources = sources

    def find_spec(self, fullname: str, path: Sequence[str] | None = None,
                  target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        src = self.sources.get(fullname)
        return None if src is None else importlib.util.spec_from_file_location(fullname, src)


_status: dict[str, str] = {}


def install() -> dict[str, str]:
    """Decide once per process which modules run compiled (:func:`plan`); route the stale
    ones to their source.  Returns (and keeps, for :func:`status`) the decision."""
    if _status:
        return _status
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        with open(os.path.join(here, MANIFEST)) as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        manifest = {}
    decided = plan(list(MODULES), manifest if isinstance(manifest, dict) else {})
    stale = {n: _locate(n)[1] for n, s in decided.items() if s == "stale"}
    if stale:
        log.warning("compiled modules older than their sources: %s; running the sources"
                    " (slower). Rebuild: pip install -e . (or make build)",
                    ", ".join(sorted(stale)))
    extra = strays()  # compiled by an older build: not run either
    if extra:
        log.warning("compiled modules that no build makes any more: %s; running the sources."
                    " Delete them (make clean, then make build)", ", ".join(sorted(extra)))
        decided.update(dict.fromkeys(extra, "stale"))
        stale.update(extra)
    if stale:
        sys.meta_path.insert(0, _SourceFinder({n: p for n, p in stale.items() if p}))
    _status.update(decided)
    return _status


def status() -> dict[str, str]:
    """Which modules run compiled, from source, or from source instead of a stale build."""
    return dict(install())

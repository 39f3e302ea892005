"""The pure-Python modules compiled by setup.py (fastpath/_accel.py): built, loaded, and a
compiled copy older than its source never runs."""

from __future__ import annotations

import importlib
import importlib.machinery
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from fastpath import _accel

ROOT = Path(__file__).resolve().parents[2]


def test_every_accelerated_module_runs_compiled() -> None:
    # The test environment is built as the README says (pip install -e .): all compiled.
    assert _accel.status() == {name: "compiled" for name in _accel.MODULES}
    for name in _accel.MODULES:
        mod = importlib.import_module(name)
        assert mod.__file__ is not None and mod.__file__.endswith(".so"), mod.__file__


def test_the_manifest_holds_the_sources_fingerprints() -> None:
    manifest = json.loads((ROOT / "src" / "fastpath" / _accel.MANIFEST).read_text())
    assert manifest == {name: _accel.fingerprint(str(ROOT / rel))
                        for name, rel in _accel.MODULES.items()}


@pytest.fixture
def fake_pkg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A top-level package ``accelfake`` with ``leaf.py`` and a "compiled" ``leaf`` that is
    not a loadable extension: importing it would fail, so a passing import proves the
    source ran."""
    pkg = tmp_path / "accelfake"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "leaf.py").write_text("WHERE = 'source'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield pkg
    for name in ("accelfake.leaf", "accelfake"):
        sys.modules.pop(name, None)


def so_of(pkg: Path) -> Path:
    return pkg / ("leaf" + importlib.machinery.EXTENSION_SUFFIXES[0])


def test_plan_tells_compiled_source_and_stale(fake_pkg: Path) -> None:
    assert _accel.plan(["accelfake.leaf"], {}) == {"accelfake.leaf": "source"}
    so_of(fake_pkg).write_bytes(b"not an ELF file")
    good = {"accelfake.leaf": _accel.fingerprint(str(fake_pkg / "leaf.py"))}
    assert _accel.plan(["accelfake.leaf"], good) == {"accelfake.leaf": "compiled"}
    (fake_pkg / "leaf.py").write_text("WHERE = 'source, edited'\n")
    assert _accel.plan(["accelfake.leaf"], good) == {"accelfake.leaf": "stale"}
    assert _accel.plan(["accelfake.leaf"], {}) == {"accelfake.leaf": "stale"}  # unknown
    (fake_pkg / "leaf.py").unlink()  # only the compiled copy ships: it runs
    assert _accel.plan(["accelfake.leaf"], {}) == {"accelfake.leaf": "compiled"}


def test_a_stale_compiled_module_is_bypassed_for_its_source(fake_pkg: Path) -> None:
    so_of(fake_pkg).write_bytes(b"not an ELF file")
    with pytest.raises(ImportError):
        importlib.import_module("accelfake.leaf")  # the extension is found first
    sys.modules.pop("accelfake.leaf", None)
    finder = _accel._SourceFinder({"accelfake.leaf": str(fake_pkg / "leaf.py")})
    sys.meta_path.insert(0, finder)
    try:
        mod = importlib.import_module("accelfake.leaf")
        assert mod.WHERE == "source" and mod.__file__ == str(fake_pkg / "leaf.py")
    finally:
        sys.meta_path.remove(finder)


def test_a_compiled_module_no_build_makes_is_a_stray(fake_pkg: Path) -> None:
    assert _accel.strays(("accelfake",)) == {}
    so_of(fake_pkg).write_bytes(b"not an ELF file")
    assert _accel.strays(("accelfake",)) == {"accelfake.leaf": str(fake_pkg / "leaf.py")}
    assert _accel.strays() == {}  # this tree: only what setup.py builds

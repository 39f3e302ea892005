"""Import the compiled ``_core`` and refuse a missing or stale build, saying how to fix it.

There is no pure-Python twin of the hot path: if the extension is not there, nothing serves.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

from fastpath._srchash import source_files, source_hash
from fastpath.errors import CoreBuildError

HOW_TO_BUILD = (
    "build it from the project root with `pip install -e .` "
    "(or `make build`, which runs `python setup.py build_ext --inplace`)"
)

_core: ModuleType | None = None


def load_core() -> ModuleType:
    global _core
    if _core is not None:
        return _core
    try:
        mod = importlib.import_module("fastpath._core")
    except ImportError as exc:
        raise CoreBuildError(
            f"fastpath's compiled extension fastpath._core is missing or cannot load ({exc}); {HOW_TO_BUILD}"
        ) from exc
    pkg_dir = os.path.dirname(os.path.abspath(__file__))
    if source_files(pkg_dir):  # sources ship beside the module; compare fingerprints
        expected = source_hash(pkg_dir)
        built = getattr(mod, "SOURCE_HASH", "")
        if built != expected:
            raise CoreBuildError(
                f"fastpath._core at {mod.__file__} is stale: it was built from sources {built!r} "
                f"but the sources beside it are {expected!r}; rebuild: {HOW_TO_BUILD}"
            )
    _core = mod
    return mod

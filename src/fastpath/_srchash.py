"""Fingerprint of the Cython sources, shared by setup.py and the import-time check.

setup.py bakes this fingerprint into the compiled ``_core`` module; ``fastpath._loader``
recomputes it from the sources next to the installed module.  A mismatch means the
extension was built from other sources (a stale build) and the import fails loudly.
This file must stay importable without the package (setup.py runs it by path).
"""

from __future__ import annotations

import hashlib
import os

SOURCE_SUFFIXES = (".pyx", ".pxd", ".pxi")


def source_files(package_dir: str) -> list[str]:
    found = []
    for root, dirs, files in os.walk(package_dir):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for name in files:
            if name.endswith(SOURCE_SUFFIXES):
                found.append(os.path.join(root, name))
    return sorted(found)


def source_hash(package_dir: str) -> str:
    digest = hashlib.sha256()
    for path in source_files(package_dir):
        rel = os.path.relpath(path, package_dir).replace(os.sep, "/")
        digest.update(rel.encode() + b"\0")
        with open(path, "rb") as f:
            digest.update(f.read())
        digest.update(b"\0")
    return digest.hexdigest()[:16]

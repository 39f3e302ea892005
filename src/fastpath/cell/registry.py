"""Where the cells of a data dir live, and opening them.

Standalone (embedded) cells keep their SQLite database at ``DATA_DIR/cells/NAME.sqlite``;
the cell's name is the file's stem (letters, digits, ``-`` and ``_``).  ``fastpath verify``,
``fastpath resync`` and ``cellsync`` find the cells of a data dir here.
"""

from __future__ import annotations

import os
import re

from fastpath.cell.db import SqliteCellDB

CELLS_DIR = "cells"
SUFFIX = ".sqlite"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$")


def cell_path(data_dir: str, name: str) -> str:
    if not NAME_RE.match(name):
        raise ValueError(f"invalid cell name {name!r}: letters, digits, '-' and '_' only")
    return os.path.join(data_dir, CELLS_DIR, name + SUFFIX)


def cell_names(data_dir: str) -> list[str]:
    """The cells of ``data_dir``, sorted by name."""
    try:
        entries = os.listdir(os.path.join(data_dir, CELLS_DIR))
    except FileNotFoundError:
        return []
    return sorted(
        e[: -len(SUFFIX)] for e in entries if e.endswith(SUFFIX) and NAME_RE.match(e[: -len(SUFFIX)])
    )


def open_cell(data_dir: str, name: str, create: bool = False) -> SqliteCellDB:
    path = cell_path(data_dir, name)
    if not create and not os.path.exists(path):
        raise FileNotFoundError(f"no cell {name!r} in {data_dir} (expected {path})")
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    return SqliteCellDB(path)


def open_cells(data_dir: str) -> dict[str, SqliteCellDB]:
    return {name: open_cell(data_dir, name) for name in cell_names(data_dir)}

"""The ``cellsync`` command: bring every cell's changes up to the API store.

    cellsync [--data-dir DIR] [--once] [--resync [--cell NAME]] [--interval SECONDS]

Without ``--once`` it runs until SIGTERM/SIGINT: :func:`cellsync.daemon.run_daemon`, the
same daemon that ``fastpath serve`` runs under its master (``--interval`` sets
``cellsync.poll_interval``, the longest sleep when every cell is idle).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import Any

from cellsync.daemon import run_daemon
from fastpath.errors import SettingsError

log = logging.getLogger("cellsync")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cellsync", description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default="./data", metavar="DIR")
    p.add_argument("--once", action="store_true", help="sync until idle, then exit")
    p.add_argument("--resync", action="store_true",
                   help="repair from a full scan of the cells (all, or --cell), then exit")
    p.add_argument("--cell", metavar="NAME", help="with --resync: only this cell")
    p.add_argument("--interval", type=float, default=None, metavar="SECONDS",
                   help="longest wait for the bell when every cell is idle "
                        "(default: the cellsync.poll_interval setting, 1 s)")
    return p


def open_all(data_dir: str, only: str | None = None) -> tuple[Any, dict[str, Any]]:
    from fastpath.api import views
    from fastpath.api.context import open_store
    from fastpath.cell.registry import open_cell, open_cells
    from fastpath.settings import load

    settings = load(None, {"data_dir": data_dir})
    views.configure(frozenset())
    cells = {only: open_cell(data_dir, only)} if only else open_cells(data_dir)
    return open_store(settings), cells


def resync_main(data_dir: str, cell: str | None) -> int:
    from cellsync.sync import CellSync

    store, cells = open_all(data_dir, cell)
    try:
        sync = CellSync(store, cells)
        for name in cells:
            result = sync.resync(name, reason="requested")
            print(f"resynced cell {name}: {result}")
    finally:
        store.close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s[%(process)d] %(levelname)s %(message)s")
    try:
        if args.resync:
            return resync_main(args.data_dir, args.cell)
        if args.once:
            return once_main(args.data_dir)
        from fastpath.settings import load
        from fastpath.sidecar import standalone_control

        overrides: dict[str, Any] = {"data_dir": args.data_dir}
        if args.interval is not None:
            overrides["cellsync.poll_interval"] = args.interval
        settings = load(None, overrides)
    except (FileNotFoundError, ValueError, SettingsError) as exc:
        print(f"cellsync: {exc}", file=sys.stderr)
        return 2
    ctl = standalone_control()
    try:
        return run_daemon(settings, ctl)
    finally:
        ctl.close()


def once_main(data_dir: str) -> int:
    from cellsync.sync import CellSync

    store, cells = open_all(data_dir)
    try:
        applied = CellSync(store, cells).run_until_idle()
        print(f"cellsync: applied {sum(applied.values())} changes from {len(cells)} cells")
        return 0
    finally:
        for db in cells.values():
            db.close()
        store.close()


if __name__ == "__main__":
    raise SystemExit(main())

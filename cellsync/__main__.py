"""The ``cellsync`` command: bring every cell's changes up to the API store.

    cellsync [--data-dir DIR] [--once] [--resync [--cell NAME]] [--interval SECONDS]

Without ``--once`` it runs until SIGTERM/SIGINT, syncing every cell of the data dir
(``DATA_DIR/cells/*.sqlite``) and sleeping ``--interval`` when all are idle.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import time
from collections.abc import Sequence
from typing import Any

log = logging.getLogger("cellsync")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cellsync", description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default="./data", metavar="DIR")
    p.add_argument("--once", action="store_true", help="sync until idle, then exit")
    p.add_argument("--resync", action="store_true",
                   help="repair from a full scan of the cells (all, or --cell), then exit")
    p.add_argument("--cell", metavar="NAME", help="with --resync: only this cell")
    p.add_argument("--interval", type=float, default=0.05, metavar="SECONDS",
                   help="sleep between rounds when every cell is idle (default 0.05)")
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
        from cellsync.sync import CellSync

        store, cells = open_all(args.data_dir)
    except (FileNotFoundError, ValueError) as exc:
        print(f"cellsync: {exc}", file=sys.stderr)
        return 2
    stop = {"now": False}

    def on_signal(signum: int, frame: Any) -> None:
        stop["now"] = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        sync = CellSync(store, cells)
        if args.once:
            applied = sync.run_until_idle()
            print(f"cellsync: applied {sum(applied.values())} changes from {len(cells)} cells")
            return 0
        log.info("syncing %d cell(s) of %s", len(cells), args.data_dir)
        while not stop["now"]:
            results = [sync.sync_once(name) for name in cells]
            if not any(r.applied for r in results):
                time.sleep(args.interval)
        return 0
    finally:
        store.close()


if __name__ == "__main__":
    raise SystemExit(main())

"""cellsync's shards (cellsync.shards): each takes every n-th cell of the data dir by name,
lets go of a cell that moved to another shard, and the stats of all reach one file."""

from __future__ import annotations

import json
from pathlib import Path

from cellsync.daemon import StatsFile, _discover
from cellsync.sync import CellSync
from fastpath.cell.registry import open_cell
from fastpath.store import Store


def make_cells(data: Path, *names: str) -> None:
    for name in names:
        open_cell(str(data), name, create=True).close()


def test_each_shard_takes_its_share_and_lets_moved_cells_go(tmp_path: Path) -> None:
    data = tmp_path / "data"
    make_cells(data, "cell1", "cell2", "cell3")
    store = Store.open(tmp_path / "store", map_size=64 << 20, sync=False, metasync=False)
    shards = [CellSync(store, {}) for _ in range(2)]
    try:
        for k, s in enumerate(shards):
            _discover(s, str(data), (k, 2))
        assert [sorted(s.cells) for s in shards] == [["cell1", "cell3"], ["cell2"]]
        alone = CellSync(store, {})
        _discover(alone, str(data))
        assert sorted(alone.cells) == ["cell1", "cell2", "cell3"]
        for db in alone.cells.values():
            db.close()
        # A cell added before the others: the shares move; each shard drops what it lost.
        make_cells(data, "cell0")
        for k, s in enumerate(shards):
            s.run_until_idle()
            _discover(s, str(data), (k, 2))
        assert [sorted(s.cells) for s in shards] == [["cell0", "cell2"], ["cell1", "cell3"]]
        assert all(set(s.stats()) == set(s.cells) for s in shards)
    finally:
        for s in shards:
            for db in s.cells.values():
                db.close()
        store.close()


def test_the_stats_file_holds_what_it_is_given_rate_limited(tmp_path: Path) -> None:
    path = tmp_path / "cellsync.json"
    stats = StatsFile(str(path))
    first = {"cell1": {"cursor": 1}, "cell2": {"cursor": 2}}
    assert stats.publish(first) is None
    assert json.loads(path.read_text())["cells"] == first
    held = stats.publish({**first, "cell2": {"cursor": 3}})  # within a second: held back
    assert held is not None and 0 < held <= 1.0
    assert json.loads(path.read_text())["cells"] == first
    stats.publish({**first, "cell2": {"cursor": 3}}, force=True)
    assert json.loads(path.read_text())["cells"]["cell2"] == {"cursor": 3}

"""A compute cell: its own normalized database, inbox and change feed (issue 6).

``fastpath.cell.db`` holds the database interface (:class:`CellDB`) and its embedded SQLite
implementation; the cell service and its compute driver come next.
"""

from fastpath.cell.db import CellDB, CellDBError, SqliteCellDB

__all__ = ["CellDB", "CellDBError", "SqliteCellDB"]

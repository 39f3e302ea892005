"""cellsync: tails each cell's change feed and applies it to the API store.

``import fastpath`` first: it decides whether this package's compiled modules may run
(fastpath/_accel.py) before any of them is imported.
"""

import fastpath  # noqa: F401

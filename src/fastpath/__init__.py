"""fastpath: the OpenStack Compute API (Nova v2.1) served from a local LMDB store."""

from fastpath import _accel

__version__ = "0.1.0"

# Before any other fastpath module is imported: a compiled module older than its source
# must not run (fastpath/_accel.py).
_accel.install()

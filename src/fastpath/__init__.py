"""fastpath: the OpenStack Compute API (Nova v2.1) served from a local LMDB store."""

__version__ = "0.1.0"

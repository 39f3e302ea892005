"""cellsync: tails each cell's change feed and applies it to the API store.

The daemon arrives with the cells issue; this package is its home.
"""

"""Entry point of the ``cellsync`` command."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    print("cellsync: no cells are configured yet (the cells issue brings the daemon)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())

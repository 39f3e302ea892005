"""The ``fastpath`` command: ``serve``, ``status``, ``settings``.

Exit codes: 0 success, 1 failure at run time (``status``: nothing is running for that
data dir), 2 bad usage or a bad setting.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from fastpath import __version__
from fastpath.errors import CoreBuildError, MasterError, SettingsError

EXIT_USAGE = 2


def _parse_set(values: Sequence[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in values:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise SettingsError(f"--set expects NAME=VALUE, got {item!r}")
        out[name.strip()] = value
    return out


def _settings_from_args(args: argparse.Namespace) -> tuple[Any, dict[str, Any]]:
    from fastpath import settings as settings_mod

    overrides: dict[str, Any] = _parse_set(args.set or [])
    for flag, name in (("data_dir", "data_dir"), ("bind", "bind"), ("workers", "workers")):
        value = getattr(args, flag, None)
        if value is not None:
            overrides[name] = value
    return settings_mod.load(args.config, overrides), overrides


def cmd_serve(args: argparse.Namespace) -> int:
    settings, overrides = _settings_from_args(args)  # a bad setting is refused first (exit 2)
    from fastpath.master.arbiter import Master

    master = Master(settings, config_file=args.config, overrides=overrides)
    return master.run()


def cmd_status(args: argparse.Namespace) -> int:
    from fastpath.master.status import status_main

    settings, _ = _settings_from_args(args)
    return status_main(settings["data_dir"], as_json=args.json)


def cmd_seed(args: argparse.Namespace) -> int:
    from fastpath.seed import seed_main

    settings, _ = _settings_from_args(args)
    if args.servers < 0 or args.projects < 1:
        raise SettingsError("seed: --servers must be >= 0 and --projects >= 1")
    return seed_main(settings["data_dir"], args.servers, args.projects, args.seed, args.jobs,
                     settings, direct=args.direct, wait=args.wait)


def cmd_verify(args: argparse.Namespace) -> int:
    """Compare the store with every cell; the last line is a contract (scripts parse it)."""
    from cellsync.__main__ import open_all
    from cellsync.verify import summary_line, verify

    settings, _ = _settings_from_args(args)
    store, cells = open_all(settings["data_dir"])
    try:
        checked, divergences = verify(store, cells)
    finally:
        store.close()
    for line in divergences:
        print(line)
    print(summary_line(checked, len(cells), len(divergences)))
    return 1 if divergences else 0


def cmd_resync(args: argparse.Namespace) -> int:
    from cellsync.__main__ import resync_main

    settings, _ = _settings_from_args(args)
    return resync_main(settings["data_dir"], args.cell)


def cmd_cell(args: argparse.Namespace) -> int:
    from fastpath.cell.main import cell_main
    from fastpath.cell.registry import NAME_RE

    settings, _ = _settings_from_args(args)
    if not NAME_RE.match(args.name):
        raise SettingsError(f"cell: invalid --name {args.name!r}: letters, digits, '-' and '_'")
    return cell_main(settings, args.name)


def cmd_forwarder(args: argparse.Namespace) -> int:
    from fastpath.forwarder import forwarder_main

    settings, _ = _settings_from_args(args)
    return forwarder_main(settings)


def cmd_settings(args: argparse.Namespace) -> int:
    from fastpath import settings as settings_mod

    if args.markdown:
        sys.stdout.write(settings_mod.markdown())
        return 0
    settings, _ = _settings_from_args(args)
    for name in settings:
        print(f"{name} = {settings[name]!r}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastpath", description="The OpenStack Compute API (Nova v2.1), fast."
    )
    parser.add_argument("--version", action="version", version=f"fastpath {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    def common(p: argparse.ArgumentParser, serve: bool = False) -> None:
        p.add_argument("--config", metavar="FILE", help="TOML settings file")
        p.add_argument("--data-dir", dest="data_dir", metavar="DIR", help="data directory (default ./data)")
        p.add_argument(
            "--set", action="append", metavar="NAME=VALUE",
            help="override any setting (see `fastpath settings --markdown`); repeatable",
        )
        if serve:
            p.add_argument("--bind", metavar="HOST:PORT", help="listen address (default 127.0.0.1:8774)")
            p.add_argument("--workers", metavar="N", help="worker processes (default: one per core)")

    p = sub.add_parser("serve", help="run the API: a master process and its workers")
    common(p, serve=True)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("status", help="list the running processes of a data dir")
    common(p)
    p.add_argument("--json", action="store_true", help="print a JSON list of process objects")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser(
        "seed", help="fill a data dir with a realistic catalogue and N servers, through its "
        "cells (idempotent)"
    )
    common(p)
    p.add_argument("--servers", type=int, default=1000, metavar="N", help="servers (default 1000)")
    p.add_argument("--projects", type=int, default=10, metavar="P",
                   help="projects the servers are spread over (default 10)")
    p.add_argument("--seed", type=int, default=1, help="varies the generated ids (default 1)")
    p.add_argument("--jobs", type=int, default=0, metavar="J",
                   help="processes writing the cells, or rendering with --direct (default: one per core)")
    p.add_argument("--direct", action="store_true",
                   help="write the API store directly instead of the cells (benchmarks)")
    p.add_argument("--wait", type=float, default=None, metavar="SECONDS",
                   help="longest wait for a running cellsync to bring the servers up "
                        "(default: 120 s plus 1 s per 500 servers); exit 1 after it")
    p.set_defaults(func=cmd_seed)

    p = sub.add_parser("cell", help="run one compute cell (database, inbox, simulated driver)")
    common(p)
    p.add_argument("--name", required=True, help="the cell's name (its database: cells/NAME.sqlite)")
    p.set_defaults(func=cmd_cell)

    p = sub.add_parser("forwarder", help="deliver the outbox's commands to the cells' inboxes")
    common(p)
    p.set_defaults(func=cmd_forwarder)

    p = sub.add_parser("verify", help="compare the API store with every cell (exit 1 if divergent)")
    common(p)
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("resync", help="repair the API store from a full scan of the cells")
    common(p)
    p.add_argument("--cell", metavar="NAME", help="only this cell")
    p.set_defaults(func=cmd_resync)

    p = sub.add_parser("settings", help="print the effective settings, or their documentation")
    common(p, serve=True)
    p.add_argument("--markdown", action="store_true", help="print the settings document")
    p.set_defaults(func=cmd_settings)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except SettingsError as exc:
        print(f"fastpath: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except CoreBuildError as exc:
        print(f"fastpath: {exc}", file=sys.stderr)
        return 1
    except MasterError as exc:
        print(f"fastpath: {exc}", file=sys.stderr)
        return 1
    except FileNotFoundError as exc:
        print(f"fastpath: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130

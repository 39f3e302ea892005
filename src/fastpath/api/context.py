"""What the API handlers of one worker share: settings, the store, derived limits.

Built once per worker process at start (after fork) by :func:`fastpath.api.routes.build_plan`;
handler modules receive it in their ``routes(ctx)`` function and close over it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from fastpath.settings import Settings
from fastpath.store import Store

if TYPE_CHECKING:
    from fastpath.api.commit import GroupCommitter


@dataclass
class ApiContext:
    settings: Settings
    store: Store
    max_limit: int = 1000
    disabled_extensions: frozenset[str] = field(default_factory=frozenset)
    # The worker's one write path (commands): group commit of every command's write txn.
    committer: GroupCommitter | None = None

    @classmethod
    def create(cls, settings: Settings, store: Store) -> ApiContext:
        from fastpath import wake
        from fastpath.api import views
        from fastpath.api.commit import GroupCommitter

        disabled = frozenset(
            x.strip() for x in settings["api.disabled_extensions"].split(",") if x.strip()
        )
        committer = GroupCommitter(
            store, views.render_server, max_group=settings["api.commit_group_max"],
            max_queue=settings["api.commit_queue_max"],
            bell=wake.bell_path(settings["data_dir"], "forwarder"))
        return cls(settings, store, settings["api.max_limit"], disabled, committer)


def open_store(settings: Settings, counters: tuple[object, int] | None = None) -> Store:
    """The API store of ``settings["data_dir"]``, opened in this process."""
    return Store.open(
        settings["data_dir"],
        map_size=min(settings["store.map_size"], settings["store.max_map_size"]),
        max_map_size=settings["store.max_map_size"],
        max_readers=settings["store.max_readers"],
        counters=counters,
    )

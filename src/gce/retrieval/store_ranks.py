"""The processes of one embedding job (``gce embed --nproc N``, ``torchrun -m gce embed``): who
embeds which shards, the count of images all have embedded, and the wait for the last one.

Every process gets a fixed share of the shards still missing (:func:`rank_share`): contiguous
runs of shards, as equal as whole shards allow, in shard order, so rank 0's share continues the
manifest's shards and a fresh job's manifest grows as rank 0 works. The counts travel through the
process group's key-value store (``torch.distributed``'s own, on rank 0): one ``add`` per batch,
no collective, so ranks never wait for each other until the end.
"""

from __future__ import annotations

import time
from typing import Any

from gce.distributed import CollectiveTimeout, DistContext

__all__ = ["JobProgress", "rank_share"]


def rank_share(missing: list[int], rank: int, world_size: int) -> list[int]:
    """Rank ``rank``'s shards of ``missing``: the ``rank``-th of ``world_size`` contiguous slices."""
    n = len(missing)
    return missing[rank * n // world_size : (rank + 1) * n // world_size]


def _group_store() -> Any:
    """The key-value store the process group was set up with (torchrun's ``MASTER_ADDR:PORT``)."""
    from torch.distributed import distributed_c10d

    return distributed_c10d._get_default_store()


class JobProgress:
    """Images embedded by all processes: rank 0 shows them in ``bar``; every rank adds its own.

    ``token`` (one per job, from rank 0) keeps the keys of a restarted job apart from those of
    the attempt before, which torchrun's store may still hold.
    """

    def __init__(self, ctx: DistContext, token: str, bar: Any) -> None:
        self.ctx, self.bar = ctx, bar
        self.store = _group_store() if ctx.enabled else None
        self.images, self.finished = f"gce-embed/{token}/images", f"gce-embed/{token}/finished"
        self.shown = 0

    def advance(self, count: int) -> None:
        if self.store is None:
            self.bar.update(count)
            return
        total = self.store.add(self.images, count)
        if self.ctx.is_main:
            self._show(total)

    def _show(self, total: int) -> None:
        if total > self.shown:
            self.bar.update(total - self.shown)
            self.shown = total

    def wait_for_all(self, poll_s: float = 0.2) -> None:
        """Return once every process has finished its share. A process may wait for hours while
        the others embed; it fails only when no image was embedded for ``ctx.timeout_s``."""
        if self.store is None:
            return
        self.store.add(self.finished, 1)
        last, since = -1, time.monotonic()
        while self.store.add(self.finished, 0) < self.ctx.world_size:
            total = self.store.add(self.images, 0)
            if self.ctx.is_main:
                self._show(total)
            if total != last:
                last, since = total, time.monotonic()
            elif time.monotonic() - since > self.ctx.timeout_s:
                raise CollectiveTimeout(
                    f"rank {self.ctx.rank}: the other processes embedded nothing for {self.ctx.timeout_key}="
                    f"{self.ctx.timeout_s:g} s; one of them hung or died (see its output)"
                )
            time.sleep(poll_s)
        if self.ctx.is_main:
            self._show(self.store.add(self.images, 0))

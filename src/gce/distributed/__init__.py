"""Multi-process training and evaluation on ``torch.distributed`` with single-process results.

See docs/scale.md. Parts: process-group set-up (:mod:`.context`), collectives with exact gradients
(:mod:`.collectives`), the sharded triplet loss (:mod:`.loss`), BatchNorm over the global batch
(:mod:`.batchnorm`), sharded embedding extraction (:mod:`.sharding`) and the launcher (:mod:`.launch`).
"""

from gce.distributed.collectives import all_gather_rows, all_gather_with_grad, all_reduce_sum, all_reduce_with_grad
from gce.distributed.context import (
    SINGLE,
    CollectiveTimeout,
    DistContext,
    broadcast_object,
    distributed_errors,
    env_world_size,
    init_distributed,
    shutdown_distributed,
)
from gce.distributed.loss import DistributedGCELoss, ShardedTripletLoss

__all__ = [
    "SINGLE",
    "CollectiveTimeout",
    "DistContext",
    "DistributedGCELoss",
    "ShardedTripletLoss",
    "all_gather_rows",
    "all_gather_with_grad",
    "all_reduce_sum",
    "all_reduce_with_grad",
    "broadcast_object",
    "distributed_errors",
    "env_world_size",
    "init_distributed",
    "shutdown_distributed",
]

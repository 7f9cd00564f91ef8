"""torch.distributed only: process-group setup and expert-parallel dispatch / combine."""

from workers.comm.dispatch import AllToAllDispatcher, combine, dispatch, exchange_counts
from workers.comm.errors import CollectiveError, DispatchError, GroupConfigError
from workers.comm.group import ProcessGroupHandle, create_group, free_port
from workers.comm.local import LocalDispatcher, local_combine, local_dispatch
from workers.comm.plan import DispatchPlan, TokenDispatcher, counts_if_grouped, group_by_local_expert, unpermute
from workers.comm.single_source import dispatch_from_source, dispatch_step, fixed_capacity_rows

__all__ = [
    "AllToAllDispatcher",
    "CollectiveError",
    "DispatchError",
    "DispatchPlan",
    "GroupConfigError",
    "LocalDispatcher",
    "ProcessGroupHandle",
    "TokenDispatcher",
    "combine",
    "counts_if_grouped",
    "create_group",
    "dispatch",
    "dispatch_from_source",
    "dispatch_step",
    "exchange_counts",
    "fixed_capacity_rows",
    "free_port",
    "group_by_local_expert",
    "local_combine",
    "local_dispatch",
    "unpermute",
]

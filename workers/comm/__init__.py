"""torch.distributed only: process-group setup and expert-parallel dispatch / combine."""

from workers.comm.dispatch import combine, dispatch_rows
from workers.comm.errors import CollectiveError, DispatchError, GroupConfigError
from workers.comm.group import ProcessGroupHandle, create_group, free_port
from workers.comm.overlap import PendingRows, send_from_source
from workers.comm.plan import DispatchPlan, counts_if_grouped
from workers.comm.single_source import dispatch_from_source, dispatch_step, fixed_capacity_rows

__all__ = [
    "CollectiveError",
    "DispatchError",
    "DispatchPlan",
    "GroupConfigError",
    "PendingRows",
    "ProcessGroupHandle",
    "combine",
    "counts_if_grouped",
    "create_group",
    "dispatch_from_source",
    "dispatch_rows",
    "dispatch_step",
    "fixed_capacity_rows",
    "free_port",
    "send_from_source",
]

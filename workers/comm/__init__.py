"""torch.distributed only: process-group setup and expert-parallel dispatch / combine.

The attention ranks send rows and get them back with `send_from_source`; the expert ranks receive them
with `dispatch_step` and send them back with `combine`.
"""

from workers.comm.dispatch import combine
from workers.comm.errors import CollectiveError, DispatchError, GroupConfigError
from workers.comm.group import ProcessGroupHandle, create_group, free_port
from workers.comm.overlap import PendingRows, send_from_source
from workers.comm.plan import DispatchPlan, counts_if_grouped
from workers.comm.single_source import dispatch_step, fixed_capacity_rows

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
    "dispatch_step",
    "fixed_capacity_rows",
    "free_port",
    "send_from_source",
]

"""Typed errors of the communication layer.

Bad arguments raise `ValueError` subclasses; a peer that fails, disconnects or misses the group's
timeout surfaces as `CollectiveError`, which the runtime maps to an unavailable worker.
"""

from __future__ import annotations


class DispatchError(ValueError):
    """Dispatch inputs are inconsistent: mismatched lengths, out-of-range destinations, bad dtypes."""


class GroupConfigError(ValueError):
    """Process-group arguments are invalid (unknown backend, bad init_method, rank out of range)."""


class CollectiveError(RuntimeError):
    """A collective or the rendezvous failed or timed out because a peer is gone or stuck."""

from __future__ import annotations

import pytest

from tests.e2e.harness import RunningGateway


@pytest.fixture(scope="module")
def server(ray_cluster, served_model):
    """A live gateway with one expert worker, shared by a module's tests."""
    with RunningGateway(served_model, workers=1) as running:
        yield running


@pytest.fixture
def fresh_server(ray_cluster, served_model):
    """A live gateway of its own, for a test that may take the engine down."""
    with RunningGateway(served_model, workers=1) as running:
        yield running

from __future__ import annotations

from pathlib import Path

import pytest

from tests.tiny_models import TINY_VARIANTS, write_tiny_mixtral, write_variant


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {name: write_variant(root, name) for name in TINY_VARIANTS}


@pytest.fixture(scope="session")
def tiny8(tmp_path_factory) -> Path:
    """An 8-expert top-2 checkpoint used by engine and distributed tests."""
    return write_tiny_mixtral(
        tmp_path_factory.mktemp("tiny8") / "m", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2,
        sliding_window=16,
    )


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster (token auth on, Ray's default; dashboard for the state API) shared by the session."""
    import ray

    ray.init(address="local", num_cpus=8, include_dashboard=True, log_to_driver=False, configure_logging=False)
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture(scope="session")
def served_model(tmp_path_factory) -> Path:
    from tests.tiny_models import write_served_model

    return write_served_model(tmp_path_factory.mktemp("served") / "m")

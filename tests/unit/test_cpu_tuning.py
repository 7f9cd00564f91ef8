"""The per-rank CPU plan: threads, the gateway's reserved core, OpenMP spinning and malloc settings; the
NCCL fault-handling variables and the collectives' interface, which never override the user's."""

from __future__ import annotations

import math
import os
from types import SimpleNamespace

import psutil
import pytest
import ray
import torch

from cluster.allocator import MallocSettings
from cluster.cpu_tuning import CpuPolicy, nccl_fault_env, node_interface_env, plan_rank_cpus
from cluster.settings import DEFAULT_MODEL_DIR, gateway_reserved_cpus
from workers.config import ModelConfig


def test_the_gateway_keeps_a_core_only_for_models_whose_tokens_are_cheap():
    assert gateway_reserved_cpus(ModelConfig.from_model_dir(DEFAULT_MODEL_DIR).active_params_per_token) == 1
    assert gateway_reserved_cpus(230_000_000) == 0  # W2: the reserved core cost 38% of its served tokens/s


def test_plan_splits_a_hosts_cores_among_its_workers_and_reserves_on_the_drivers_host():
    plan = plan_rank_cpus(CpuPolicy(reserved_cpus=1), ["a", "a", "b", "b"], driver_node="a")
    assert [p.ranks_on_host for p in plan] == [1, 1, 2, 2]  # the coordinator takes turns with its workers
    assert [p.reserved_cpus for p in plan] == [1, 1, 0, 0]
    assert [p.torch_threads(8) for p in plan] == [7, 7, 4, 4]
    env = dict(plan[2].env_vars)
    assert env["GOMP_SPINCOUNT"] == "100" and env.items() >= MallocSettings().env_vars().items()
    alone = plan_rank_cpus(CpuPolicy(), ["a", "b"], driver_node="c")
    assert "GOMP_SPINCOUNT" not in dict(alone[1].env_vars), "a rank alone on its host keeps libgomp's spinning"


def test_nccl_ranks_get_fault_defaults_that_keep_a_survivor_alive():
    env = nccl_fault_env(20.0, {})
    assert env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "2", "CleanUpOnly: abort the communicator, keep the process"
    assert env["TORCH_NCCL_BLOCKING_WAIT"] == "0"
    assert env["TORCH_NCCL_DUMP_ON_TIMEOUT"] == "0", "a dump signal ends every rank that sees it"
    assert int(env["TORCH_NCCL_WAIT_TIMEOUT_DUMP_MILSEC"]) * 4 <= 1000, "the watchdog sleeps 4x this before aborting"
    assert env["TORCH_NCCL_ENABLE_MONITORING"] == "1"
    assert env["TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC"] == "60"
    assert nccl_fault_env(100.0, {})["TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC"] == "300", "scales with the collective timeout"
    assert all(name.startswith("TORCH_NCCL_") for name in env)
    for bad in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="collective_timeout_s"):
            nccl_fault_env(bad, {})


def test_nccl_fault_env_never_overrides_what_the_user_set():
    user = {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "3", "NCCL_BLOCKING_WAIT": "1",
            "TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC": "900"}
    env = nccl_fault_env(20.0, user)
    assert env.keys().isdisjoint(user)
    assert "TORCH_NCCL_BLOCKING_WAIT" not in env, "torch reads TORCH_NCCL_BLOCKING_WAIT before the user's alias"
    assert env["TORCH_NCCL_DUMP_ON_TIMEOUT"] == "0", "what the user left unset still gets its default"
    assert (user | env).items() >= user.items()


def test_plan_hands_the_nccl_timeout_to_every_rank_and_apply_keeps_user_values(monkeypatch):
    plan = plan_rank_cpus(CpuPolicy(), ["a", "a", "b"], driver_node="a", nccl_timeout_s=30.0)
    assert [p.nccl_timeout_s for p in plan] == [30.0, 30.0, 30.0]
    assert all(p.nccl_timeout_s is None for p in plan_rank_cpus(CpuPolicy(), ["a", "b"], driver_node="a"))
    environ = {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "1", "NCCL_SOCKET_IFNAME": "ib0"}
    monkeypatch.setattr(os, "environ", environ)
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    monkeypatch.setattr(ray.util, "get_node_ip_address", lambda: "10.0.0.5")
    monkeypatch.setattr(psutil, "net_if_addrs", lambda: {"lo": [SimpleNamespace(address="127.0.0.1")],
                                                         "eth1": [SimpleNamespace(address="10.0.0.5")]})
    plan[2].apply()
    assert environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1" and environ["NCCL_SOCKET_IFNAME"] == "ib0"
    assert environ["TORCH_NCCL_DUMP_ON_TIMEOUT"] == "0" and environ["TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC"] == "90"
    assert environ["GLOO_SOCKET_IFNAME"] == "eth1"


def test_collectives_bind_to_the_interface_of_the_node_address_unless_the_user_chose_one():
    interfaces = {"lo": ["127.0.0.1"], "eth1": ["10.0.0.5", "fe80::1"]}
    both = {"GLOO_SOCKET_IFNAME": "eth1", "NCCL_SOCKET_IFNAME": "eth1"}
    assert node_interface_env("10.0.0.5", interfaces, {}) == both
    assert node_interface_env("10.0.0.5", interfaces, {"NCCL_SOCKET_IFNAME": "ib0"}) == {"GLOO_SOCKET_IFNAME": "eth1"}
    assert node_interface_env("10.0.0.9", interfaces, {}) == {}

"""Three hosts built from network namespaces: a Ray head (gateway + coordinator) and two Ray worker nodes
holding the expert workers. Serve requests, kill one host's Ray node during 32 concurrent streams (greedy and
seeded sampling): every stream completes with the tokens of an uninterrupted run (the gateway replays them
on the engine it rebuilds on the remaining hosts), health says NOT_SERVING meanwhile, and the next 100
requests all succeed. And 2 coordinators with 2 expert workers spread over the three hosts: every host holds
a rank, the gloo collectives cross hosts, and greedy tokens equal the offline engine's."""

from __future__ import annotations

import concurrent.futures as futures
import os
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos import mixserve_pb2 as pb
from protos import mixserve_pb2_grpc as pb_grpc
from tests.e2e.test_gateway import offline
from tests.multihost.netns import BIN, VirtualHosts, ray_env, start_ray_node

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(600)
PORT = 50051
SERVING = health_pb2.HealthCheckResponse.SERVING


@pytest.fixture
def hosts(tmp_path):
    assert os.geteuid() == 0 and shutil.which("ip"), "the multi-host test needs root and iproute2 (ip netns)"
    virtual = VirtualHosts(("a", "b", "c"))
    try:
        yield virtual.setup(), ray_env(tmp_path)
    finally:
        virtual.teardown()


def _request(prompt, n, seed: int | None = None):
    """Greedy, or sampled (temperature 0.8) with `seed`."""
    sampling = (pb.SamplingParams(max_new_tokens=n, temperature=0, ignore_eos=True) if seed is None else
                pb.SamplingParams(max_new_tokens=n, temperature=0.8, seed=seed, ignore_eos=True))
    return pb.GenerateRequest(prompt_token_ids=prompt, sampling=sampling)


def _seed(i: int) -> int | None:
    """Every other long stream samples with its own seed."""
    return 500 + i if i % 2 else None


def _wait(predicate, timeout_s: float, what: str) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        if predicate():
            return time.monotonic() - start
        time.sleep(0.05)
    raise AssertionError(f"{what} within {timeout_s}s")


def _serving(channel) -> bool:
    try:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=3).status == SERVING
    except grpc.RpcError:
        return False


def _serve(hosts, served_model, log, *extra: str) -> subprocess.Popen:
    """Starts Ray on the three hosts and `mixserve serve` (2 expert workers, SPREAD) on the head."""
    (head, b, c), env = hosts
    start_ray_node(head, head, env, is_head=True)
    start_ray_node(b, head, env, is_head=False)
    start_ray_node(c, head, env, is_head=False)
    return head.exec(
        str(BIN / "python"), "-m", "cluster.cli", "serve", "--model", str(served_model), "--workers", "2",
        "--placement", "SPREAD", "--ray-address", f"{head.ip}:6379", "--host", head.ip, "--port", str(PORT),
        "--metrics-host", head.ip, "--collective-timeout", "8", "--threads", "1", *extra,
        env=env | {"PYTHONPATH": str(ROOT)}, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
    )


def _stop(server: subprocess.Popen) -> None:
    server.terminate()
    try:
        server.wait(timeout=60)
    except subprocess.TimeoutExpired:
        server.kill()


def test_gateway_survives_losing_a_host(hosts, served_model, tmp_path):
    (head, b, c), env = hosts
    log = open(tmp_path / "serve.log", "w")  # noqa: SIM115 - closed in finally
    server = _serve(hosts, served_model, log)
    try:
        channel = grpc.insecure_channel(f"{head.ip}:{PORT}")
        _wait(lambda: _serving(channel) or server.poll() is not None, 180, "the gateway did not come up")
        assert server.poll() is None, (tmp_path / "serve.log").read_text()
        stub = pb_grpc.MixServeStub(channel)
        prompts = [[1, 7 + i, 20 + i, 33] for i in range(8)]
        expected = [offline(served_model, p, max_new=12) for p in prompts]
        assert [list(stub.Generate(_request(p, 12), timeout=60).token_ids) for p in prompts] == expected

        nodes = _ray_nodes(head, env)
        assert {b.ip, c.ip} <= nodes, f"worker nodes missing from the cluster: {nodes}"
        long_expected = [offline(served_model, prompts[i % 8], max_new=200,
                                 **({} if _seed(i) is None else {"temperature": 0.8, "seed": _seed(i)}))
                         for i in range(32)]
        progress = [0] * 32
        with futures.ThreadPoolExecutor(32) as pool:
            streams = [pool.submit(_stream, stub, _request(prompts[i % 8], 200, _seed(i)), progress, i)
                       for i in range(32)]
            _wait(lambda: min(progress) >= 5, 60, "the streams did not start decoding")
            c.kill_all()  # host c (one expert worker) goes down
            killed = time.monotonic()
            outcomes = [f.result(timeout=120) for f in streams]  # nothing hangs
        assert outcomes == long_expected
        assert _serving(channel)
        assert time.monotonic() - killed < 90
        metrics = urllib.request.urlopen(f"http://{head.ip}:9400/metrics", timeout=10).read().decode()
        assert "mixserve_request_replays_total 32.0" in metrics, metrics
        with futures.ThreadPoolExecutor(8) as pool:
            after = list(pool.map(lambda i: list(stub.Generate(_request(prompts[i % 8], 12), timeout=60).token_ids),
                                  range(100)))
        assert after == [expected[i % 8] for i in range(100)]
    finally:
        _stop(server)
        log.close()


def test_two_coordinators_spread_over_three_hosts(hosts, served_model, tmp_path):
    (head, b, c), env = hosts
    log = open(tmp_path / "serve.log", "w")  # noqa: SIM115 - closed in finally
    server = _serve(hosts, served_model, log, "--coordinators", "2")
    try:
        channel = grpc.insecure_channel(f"{head.ip}:{PORT}")
        _wait(lambda: _serving(channel) or server.poll() is not None, 180, "the gateway did not come up")
        assert server.poll() is None, (tmp_path / "serve.log").read_text()
        assert _rank_hosts(head, env) == {head.ip, b.ip, c.ip}  # 4 ranks SPREAD over 3 hosts: each holds one
        stub = pb_grpc.MixServeStub(channel)
        prompts = [[1, 7 + i, 20 + i, 33, 40 + 3 * i] for i in range(16)]
        with futures.ThreadPoolExecutor(16) as pool:
            got = list(pool.map(lambda p: list(stub.Generate(_request(p, 10), timeout=120).token_ids), prompts))
        assert got == [offline(served_model, p, max_new=10) for p in prompts]
        metrics = urllib.request.urlopen(f"http://{head.ip}:9400/metrics", timeout=10).read().decode()
        for coordinator in ("0", "1"):
            placed = f'mixserve_coordinator_placed_requests_total{{coordinator="{coordinator}"}} '
            assert placed in metrics and float(metrics.split(placed)[1].split()[0]) > 0, metrics
    finally:
        _stop(server)
        log.close()


def _stream(stub, request: pb.GenerateRequest, progress: list[int], i: int) -> list[int] | grpc.StatusCode:
    tokens = []
    try:
        for chunk in stub.GenerateStream(request, timeout=150):
            tokens.extend(chunk.token_ids)
            progress[i] = len(tokens)
        return tokens
    except grpc.RpcError as exc:
        return exc.code()


def _rank_hosts(head, env) -> set[str]:
    """The node addresses holding the bundles of the cluster's placement groups (the engine's ranks)."""
    script = ("import ray; from ray.util import placement_group_table; ray.init(address='auto'); "
              "ips = {n['NodeID']: n['NodeManagerAddress'] for n in ray.nodes()}; "
              "print(' '.join(ips[node] for pg in placement_group_table().values() if pg['state'] == 'CREATED' "
              "for node in pg['bundles_to_node_id'].values()))")
    done = head.run(str(BIN / "python"), "-c", script, env=env | {"RAY_ADDRESS": f"{head.ip}:6379"})
    return set(done.stdout.split())


def _ray_nodes(head, env) -> set[str]:
    script = ("import ray; ray.init(address='auto'); "
              "print(' '.join(n['NodeManagerAddress'] for n in ray.nodes() if n['Alive']))")
    done = head.run(str(BIN / "python"), "-c", script, env=env | {"RAY_ADDRESS": f"{head.ip}:6379"})
    return set(done.stdout.split())

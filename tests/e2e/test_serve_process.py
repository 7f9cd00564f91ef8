"""`mixserve serve` as a process: its first line of output is its own, the client command streams from it, and
SIGTERM drains an in-flight stream before exiting; Ray's token authentication stays on behind quiet start-up."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos import mixserve_pb2 as pb
from protos import mixserve_pb2_grpc as pb_grpc
from workers.comm import free_port

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(300)


def _start(model: Path, port: int, metrics_port: int, *extra: str) -> subprocess.Popen:
    env = os.environ | {"PYTHONPATH": str(ROOT), "RAY_ADDRESS": "local"}
    if "--http-port" not in extra and "--no-http" not in extra:
        extra = (*extra, "--http-port", "0")  # never the default 8000, which another process may hold
    return subprocess.Popen(
        [sys.executable, "-m", "cluster.cli", "serve", "--model", str(model), "--port", str(port),
         "--metrics-port", str(metrics_port), "--threads", "1", *extra],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )


def _wait_serving(port: int, proc: subprocess.Popen, timeout_s: float = 120) -> grpc.Channel:
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    stub = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read()
        try:
            if stub.Check(health_pb2.HealthCheckRequest(), timeout=2).status == health_pb2.HealthCheckResponse.SERVING:
                return channel
        except grpc.RpcError:
            pass
        time.sleep(0.5)
    raise AssertionError("server did not become SERVING")


def test_client_streams_then_sigterm_drains_in_flight_stream(served_model):
    port, metrics_port = free_port(), free_port()
    proc = _start(served_model, port, metrics_port, "--workers", "1", "--grace", "60")
    try:
        channel = _wait_serving(port, proc)
        env = os.environ | {"PYTHONPATH": str(ROOT)}
        client = subprocess.run(
            [sys.executable, "-m", "cluster.cli", "client", "--target", f"127.0.0.1:{port}", "--prompt", "def f(x):",
             "--max-new-tokens", "8", "--ignore-eos"], capture_output=True, text=True, env=env, timeout=60,
            check=False)
        assert client.returncode == 0, client.stderr
        assert "[length: " in client.stderr and "8 completion tokens" in client.stderr

        stub = pb_grpc.MixServeStub(channel)
        request = pb.GenerateRequest(prompt_token_ids=[1, 2, 3],
                                     sampling=pb.SamplingParams(max_new_tokens=150, temperature=0, ignore_eos=True))
        stream = stub.GenerateStream(request, timeout=120)
        first = next(stream)
        os.kill(proc.pid, signal.SIGTERM)
        rest = list(stream)  # the in-flight stream finishes during the grace period
        assert len(first.token_ids) + sum(len(c.token_ids) for c in rest) == 150
        assert rest[-1].finish_reason == "length"
        assert proc.wait(timeout=60) == 0
        output = proc.stdout.read()
        assert output.startswith("mixserve: starting "), output[:500]  # before anything Ray prints
        assert "Token authentication" not in output, output[:1000]
        access = re.findall(r"INFO mixserve\.access: grpc '[0-9a-f]+' OK finish=length prompt=(\d+) completion=(\d+) "
                            r"ttft=[0-9.]+s total=[0-9.]+s", output)
        assert ("3", "150") in access and any(c == "8" for _, c in access), access  # one line per request
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def test_local_ray_session_keeps_token_authentication_and_says_nothing():
    """ray_session quiets Ray's start-up notices (among them the one saying token authentication is on) without
    turning token authentication off: a fresh local cluster started with RAY_AUTH_MODE unset is in token mode."""
    script = ("from ray._raylet import AuthenticationMode, get_authentication_mode\n"
              "from cluster.ray_session import ray_session\n"
              "with ray_session(None, 1):\n"
              "    print('token mode:', get_authentication_mode() == AuthenticationMode.TOKEN, flush=True)\n")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_ADDRESS")} | {"PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120,
                         check=False)
    assert run.returncode == 0, run.stderr
    assert run.stdout == "token mode: True\n", run.stdout
    assert "Token authentication" not in run.stderr and "Started a local Ray instance" not in run.stderr, run.stderr

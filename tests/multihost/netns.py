"""Hosts on one machine: network namespaces joined by veth pairs to a bridge, each running a Ray node.

Addresses come from 198.18.0.0/24 (the benchmarking range, RFC 2544), reachable only inside this machine.
Everything created here is removed by `teardown()`, processes included.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

BRIDGE = "msbr0"
SUBNET = "198.18.0"
BIN = Path(sys.executable).parent


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, check=check, timeout=60)


@dataclass
class Host:
    name: str
    ip: str

    @property
    def netns(self) -> str:
        return f"ms-{self.name}"

    def exec(self, *args: str, env: dict[str, str] | None = None, **kwargs) -> subprocess.Popen:
        return subprocess.Popen(["ip", "netns", "exec", self.netns, *args], env=env, **kwargs)

    def run(self, *args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(["ip", "netns", "exec", self.netns, *args], env=env, capture_output=True, text=True,
                              timeout=timeout, check=False)

    def pids(self) -> list[int]:
        out = sh("ip", "netns", "pids", self.netns, check=False).stdout.split()
        return [int(p) for p in out]

    def kill_all(self) -> None:
        """Kills every process in this host's network namespace: the host goes down."""
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@dataclass
class VirtualHosts:
    names: tuple[str, ...]
    hosts: list[Host] = field(default_factory=list)

    def setup(self) -> list[Host]:
        self.teardown()
        sh("ip", "link", "add", BRIDGE, "type", "bridge")
        sh("ip", "addr", "add", f"{SUBNET}.1/24", "dev", BRIDGE)
        sh("ip", "link", "set", BRIDGE, "up")
        for i, name in enumerate(self.names):
            host = Host(name, f"{SUBNET}.{11 + i}")
            outer, inner = f"ms-{name}-o", f"ms-{name}-i"
            sh("ip", "netns", "add", host.netns)
            sh("ip", "link", "add", outer, "type", "veth", "peer", "name", inner)
            sh("ip", "link", "set", outer, "master", BRIDGE)
            sh("ip", "link", "set", outer, "up")
            sh("ip", "link", "set", inner, "netns", host.netns)
            for cmd in (["ip", "addr", "add", f"{host.ip}/24", "dev", inner], ["ip", "link", "set", inner, "up"],
                        ["ip", "link", "set", "lo", "up"]):
                sh("ip", "netns", "exec", host.netns, *cmd)
            self.hosts.append(host)
        return self.hosts

    def teardown(self) -> None:
        for name in self.names:
            host = Host(name, "")
            if host.netns in sh("ip", "netns", "list", check=False).stdout:
                host.kill_all()
                time.sleep(0.2)
                sh("ip", "netns", "delete", host.netns, check=False)
            sh("ip", "link", "delete", f"ms-{name}-o", check=False)
        sh("ip", "link", "delete", BRIDGE, check=False)
        self.hosts = []
        _forget_cluster_address()


def _forget_cluster_address() -> None:
    """`ray start --head` records its address for later `ray.init()` calls; drop it once that cluster is gone."""
    record = Path("/tmp/ray/ray_current_cluster")
    if record.exists() and record.read_text().strip().startswith(SUBNET):
        record.unlink()


def ray_env(tmp: Path) -> dict[str, str]:
    """Fast node-death detection for the test cluster; token auth on, with one token for every node."""
    return os.environ | {
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(32),
        "RAY_health_check_period_ms": "1000",
        "RAY_health_check_failure_threshold": "3",
        "RAY_health_check_initial_delay_ms": "1000",
        "RAY_ADDRESS": "",
        "PATH": f"{BIN}:{os.environ.get('PATH', '')}",
    }


def start_ray_node(host: Host, head: Host, env: dict[str, str], *, is_head: bool) -> None:
    common = ["--node-ip-address", host.ip, "--num-cpus", "2", "--disable-usage-stats"]
    if is_head:
        args = ["--head", "--port", "6379", "--include-dashboard", "false", *common]
    else:
        args = ["--address", f"{head.ip}:6379", *common]
    done = host.run(str(BIN / "ray"), "start", *args, env=env, timeout=180)
    if done.returncode != 0:
        raise RuntimeError(f"ray start on {host.name} failed: {done.stdout}\n{done.stderr}")

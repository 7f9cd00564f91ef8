"""A real Prometheus on loopback scrapes a live gateway under load; every dashboard panel query and every
alert expression then runs against it: each parses, and every panel returns data."""

from __future__ import annotations

import concurrent.futures as futures
import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from protos import mixserve_pb2 as pb
from tests.e2e.harness import RunningGateway
from workers.comm import free_port

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(600)


def _panel_queries() -> list[str]:
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "mixserve-dashboard.json").read_text())
    return [t["expr"] for p in dashboard["panels"] for t in p.get("targets", []) if t.get("expr")]


def _alert_queries() -> list[str]:
    rules = yaml.safe_load((ROOT / "deploy" / "prometheus" / "mixserve-rules.yaml").read_text())
    return [r["expr"] for g in rules["groups"] for r in g["rules"]]


def _query(port: int, expr: str) -> dict:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


@pytest.fixture
def prometheus(tmp_path):
    binary = shutil.which("prometheus")
    assert binary, "prometheus is not installed: run scripts/install_tools.sh (make tools)"
    processes = []

    def start(metrics_port: int) -> int:
        port = free_port()
        config = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                  "scrape_configs": [{"job_name": "mixserve", "static_configs": [
                      {"targets": [f"127.0.0.1:{metrics_port}"]}]}]}
        (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
        proc = subprocess.Popen(
            [binary, f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        processes.append(proc)
        return port

    yield start
    for proc in processes:
        proc.terminate()
        proc.wait(timeout=30)


def test_every_panel_returns_data_and_every_alert_parses(ray_cluster, served_model, prometheus):
    panels, alerts = _panel_queries(), _alert_queries()
    assert len(panels) >= 20 and len(alerts) >= 6
    with RunningGateway(served_model, workers=1) as server:
        port = prometheus(server.gateway.metrics_port)

        def one(i: int) -> None:
            request = pb.GenerateRequest(prompt_token_ids=[1, 2 + i % 50, 3],
                                         sampling=pb.SamplingParams(max_new_tokens=8 + i % 9, ignore_eos=True))
            list(server.stub.GenerateStream(request, timeout=60))

        deadline = time.monotonic() + 12  # bounded load: a few seconds of concurrent streams, scraped every 1 s
        with futures.ThreadPoolExecutor(8) as pool:
            while time.monotonic() < deadline:
                list(pool.map(one, range(16)))
        time.sleep(3)
        for expr in panels:
            result = _query(port, expr)
            assert result["status"] == "success", (expr, result)
            assert result["data"]["result"], f"panel query returned no data: {expr}"
        for expr in alerts:
            assert _query(port, expr)["status"] == "success", expr
        up = _query(port, 'up{job="mixserve"}')["data"]["result"]
        assert up and up[0]["value"][1] == "1"

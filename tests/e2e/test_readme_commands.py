"""The README's Quickstart client command and its gRPC section's grpcurl block, run as written (the real
grpcurl from .venv/bin, `\\` continuations joined) against a real gateway serving the embedded default model
with 2 expert workers, as `make serve` does. Only the address changes: the gateway's free port for
127.0.0.1:50051, the client's default `--target`. The README's HTTP snippets run in test_openai_http.py."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from tests.e2e.harness import RunningGateway

pytestmark = pytest.mark.timeout(300)
ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
DEFAULT_MODEL = ROOT / "models" / "mixserve-tiny"
README_TARGET = "127.0.0.1:50051"  # where the README's commands expect `mixserve serve`
FINISH_REASONS = {"stop", "length", "eos"}


@pytest.fixture(scope="module")
def server(ray_cluster):
    with RunningGateway(DEFAULT_MODEL, workers=2) as running:
        yield running


def _section(title: str) -> str:
    return README.read_text().split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def _bash_blocks(section: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", section, re.S)


def _commands(block: str) -> list[str]:
    """One string per command: `\\` continuations joined, blank lines and comments dropped."""
    lines = block.replace("\\\n", " ").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def _run(command: str, server) -> subprocess.CompletedProcess:
    """Runs one README command in bash from the repository root, pointed at `server`, with .venv/bin first on
    PATH (where `make test` puts grpcurl) and this checkout's code."""
    env = os.environ | {"PATH": f"{ROOT / '.venv' / 'bin'}:{os.environ['PATH']}", "PYTHONPATH": str(ROOT)}
    return subprocess.run(["bash", "-c", command.replace(README_TARGET, server.target)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120, check=False)


def _json_objects(text: str) -> list[dict]:
    """grpcurl prints one JSON object per response message (a stream prints several), with the proto's field
    names."""
    decoder, objects, at = json.JSONDecoder(), [], 0
    while at < len(text.rstrip()):
        obj, end = decoder.raw_decode(text, at)
        objects.append(obj)
        at = end
        while at < len(text) and text[at].isspace():
            at += 1
    return objects


def test_readme_grpcurl_block_runs_as_written(server):
    (block,) = [b for b in _bash_blocks(_section("gRPC API")) if "grpcurl" in b]
    commands = _commands(block)
    assert len(commands) == 6 and all(c.startswith("grpcurl -plaintext ") for c in commands), commands
    runs = [_run(c, server) for c in commands]
    for command, run in zip(commands, runs, strict=True):
        assert run.returncode == 0, (command, run.stdout, run.stderr)
    listed, health, generate, stream, info, chat = (run.stdout for run in runs)

    assert {"mixserve.v1.MixServe", "grpc.health.v1.Health"} <= set(listed.split()), listed
    assert json.loads(health) == {"status": "SERVING"}

    (unary,) = _json_objects(generate)  # greedy, 32 tokens at most
    assert unary["finish_reason"] in FINISH_REASONS and 0 < len(unary["token_ids"]) <= 32, unary
    assert unary["usage"]["completion_tokens"] == len(unary["token_ids"]) and unary["text"], unary

    chunks = _json_objects(stream)  # sampled (temperature 1.0, seed 7) from three token ids
    ids = [t for chunk in chunks for t in chunk.get("token_ids", [])]
    assert chunks[-1]["finish_reason"] in FINISH_REASONS and 0 < len(ids) <= 8, chunks
    assert chunks[-1]["usage"] == {"prompt_tokens": 3, "completion_tokens": len(ids), "total_tokens": 3 + len(ids)}

    model = json.loads(info)
    assert model["model"] == "mixserve-tiny" and model["num_expert_workers"] == 2, model
    assert model["has_tokenizer"] and model["has_chat_template"], model
    assert max(ids) < model["vocab_size"]

    (reply,) = _json_objects(chat)  # greedy, the API's default of 16 tokens at most
    assert reply["finish_reason"] in FINISH_REASONS and 0 < len(reply["token_ids"]) <= 16, reply


def test_readme_quickstart_client_command_runs_as_written(server):
    (block,) = [b for b in _bash_blocks(_section("Quickstart")) if "mixserve client" in b]
    (command,) = _commands(block)
    assert command.startswith(".venv/bin/mixserve client ") and "--target" not in command, command
    run = _run(f"{command} --target {README_TARGET}", server)  # the client's default target, made explicit
    assert run.returncode == 0, run.stderr
    summary = re.search(r"\[(stop|length|eos): \d+ prompt \+ (\d+) completion tokens", run.stderr)
    assert summary is not None, run.stderr
    assert 0 < int(summary[2]) <= 64 and run.stdout.strip(), (run.stdout, run.stderr)

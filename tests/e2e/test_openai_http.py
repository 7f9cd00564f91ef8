"""The OpenAI-compatible HTTP API, driven by the official `openai` client against a real gateway (loopback,
local Ray, 2 expert workers): the same tokens as gRPC, usage, finish reasons, stop strings, errors as OpenAI
error objects, API keys, overload, and client disconnects that free the engine's cache."""

from __future__ import annotations

import concurrent.futures as futures
import http.client
import json
import os
import re
import signal
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import openai
import pytest

from cluster.gateway.security import SecurityOptions
from cluster.gateway.server import GatewayOptions
from cluster.scheduler import SchedulerConfig
from protos import mixserve_pb2 as pb
from tests.e2e.harness import RunningGateway
from tests.e2e.test_security import Pki, make_pki
from tests.metrics_page import metric, metrics_text

pytestmark = pytest.mark.timeout(600)
README = Path(__file__).resolve().parents[2] / "README.md"
KEY = "sk-mixserve-test-key"
CHAT = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "def add(a, b):"}]


@pytest.fixture(scope="module")
def server(ray_cluster, served_model):
    with RunningGateway(served_model, workers=2) as running:
        yield running


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.http_base_url, api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def model(served_model) -> str:
    return served_model.name


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def keyed(ray_cluster, served_model, tmp_path_factory, pki):
    """API keys and mTLS on (the gRPC port's files), and a small queue: 401 and 429 over https."""
    keys = tmp_path_factory.mktemp("keys") / "api-keys"
    keys.write_text(f"{KEY}\n")
    security = SecurityOptions(api_keys_file=keys, tls_cert=pki.server_cert, tls_key=pki.server_key,
                               tls_client_ca=pki.ca)
    options = GatewayOptions(port=0, metrics_port=0, http_port=0, grace_s=5, security=security)
    with RunningGateway(served_model, workers=1, options=options,
                        scheduler=SchedulerConfig(max_num_seqs=2, max_waiting=3)) as running:
        yield running


def _tls(pki: Pki, *, client_cert: bool = True) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki.ca))
    if client_cert:
        context.load_cert_chain(pki.client_cert, pki.client_key)
    return context


def _keyed_client(keyed, pki: Pki, key: str = KEY, **options) -> openai.OpenAI:
    return openai.OpenAI(base_url=keyed.http_base_url, api_key=key, max_retries=0,
                         http_client=openai.DefaultHttpxClient(verify=_tls(pki)), **options)


def _grpc(server, max_new: int, **fields) -> pb.GenerateResponse:
    sampling = fields.pop("sampling", {})
    return server.stub.Generate(pb.GenerateRequest(
        sampling=pb.SamplingParams(max_new_tokens=max_new, ignore_eos=True, **sampling), **fields), timeout=60)


def _wait_idle(server, timeout_s: float = 20) -> str:
    deadline = time.monotonic() + timeout_s
    while True:
        text = metrics_text(server)
        idle = metric(text, "mixserve_kv_cache_usage_ratio") == 0 == metric(text, "mixserve_num_requests_running")
        if idle or time.monotonic() > deadline:
            return text
        time.sleep(0.2)


# ---------------------------------------------------------------- the same tokens as gRPC
def test_models_lists_the_served_model(client, model):
    assert [m.id for m in client.models.list()] == [model]
    assert client.models.retrieve(model).owned_by == "mixserve"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")


@pytest.mark.parametrize("prompt", ["def fibonacci(n):", [1, 40, 41, 42, 43, 44]])
def test_completion_greedy_equals_grpc_unary_and_streamed(server, client, model, prompt):
    field = {"prompt": prompt} if isinstance(prompt, str) else {"prompt_token_ids": prompt}
    expected = _grpc(server, 10, sampling={"temperature": 0.0}, **field)
    args = {"model": model, "prompt": prompt, "max_tokens": 10, "temperature": 0, "extra_body": {"ignore_eos": True}}
    unary = client.completions.create(**args)
    assert unary.object == "text_completion" and unary.model == model and len(unary.choices) == 1
    assert unary.choices[0].text == expected.text and expected.text
    assert unary.choices[0].finish_reason == "length"
    assert (unary.usage.prompt_tokens, unary.usage.completion_tokens, unary.usage.total_tokens) == (
        expected.usage.prompt_tokens, 10, expected.usage.prompt_tokens + 10)
    chunks = list(client.completions.create(**args, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert not chunks[-1].choices and chunks[-1].usage.completion_tokens == 10
    assert all(c.usage is None for c in chunks[:-1])


def test_chat_greedy_equals_grpc_unary_and_streamed(server, client, model):
    expected = _grpc(server, 8, sampling={"temperature": 0.0}, messages=[pb.ChatMessage(**m) for m in CHAT])
    args = {"model": model, "messages": CHAT, "max_tokens": 8, "temperature": 0, "extra_body": {"ignore_eos": True}}
    unary = client.chat.completions.create(**args)
    assert unary.object == "chat.completion"
    message = unary.choices[0].message
    assert (message.role, message.content) == ("assistant", expected.text)
    assert unary.choices[0].finish_reason == "length"
    assert (unary.usage.prompt_tokens, unary.usage.completion_tokens) == (expected.usage.prompt_tokens, 8)
    chunks = list(client.chat.completions.create(**args, stream=True))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected.text
    assert [c.choices[0].finish_reason for c in chunks] == [None] * (len(chunks) - 1) + ["length"]
    # max_completion_tokens is the newer name of max_tokens
    newer = client.chat.completions.create(**{**args, "max_tokens": None}, max_completion_tokens=8)
    assert newer.choices[0].message.content == expected.text


def test_seeded_sampling_equals_grpc(server, client, model):
    sampling = {"temperature": 0.9, "top_p": 0.9, "seed": 7}
    expected = _grpc(server, 12, prompt="hello", sampling=sampling)
    got = client.completions.create(model=model, prompt="hello", max_tokens=12, extra_body={"ignore_eos": True},
                                    **sampling)
    assert got.choices[0].text == expected.text


def test_stop_string_ends_generation_and_is_excluded(server, client, model):
    full = _grpc(server, 24, prompt_token_ids=[1, 50, 60, 70], sampling={"temperature": 0.0}).text
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    assert stop and stop in full
    args = {"model": model, "prompt": [1, 50, 60, 70], "max_tokens": 24, "temperature": 0, "stop": [stop],
            "extra_body": {"ignore_eos": True}}
    unary = client.completions.create(**args)
    assert unary.choices[0].finish_reason == "stop"
    assert unary.choices[0].text == full[: full.index(stop)]
    streamed = list(client.completions.create(**args, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == full[: full.index(stop)]
    assert streamed[-1].choices[0].finish_reason == "stop"
    _wait_idle(server)


def test_logprobs_of_the_sampled_tokens(server, client, model):
    expected = _grpc(server, 6, prompt="abc", sampling={"temperature": 0.0, "logprobs": True})
    args = {"model": model, "max_tokens": 6, "temperature": 0, "extra_body": {"ignore_eos": True}}
    completion = client.completions.create(prompt="abc", logprobs=0, **args).choices[0].logprobs
    assert completion.token_logprobs == pytest.approx(list(expected.logprobs), abs=1e-5)
    assert "".join(completion.tokens) == expected.text and completion.text_offset[0] == 0
    chat = client.chat.completions.create(messages=CHAT, logprobs=True, **args).choices[0].logprobs.content
    assert len(chat) == 6 and all(t.logprob <= 0 and t.top_logprobs == [] for t in chat)


# ---------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("kind", "fields", "param"),
    [
        ("completions", {"max_tokens": 0}, "max_tokens"),
        ("completions", {"max_tokens": 100000}, "max_tokens"),
        ("completions", {"temperature": 3}, "temperature"),
        ("completions", {"top_p": 0}, "top_p"),
        ("completions", {"n": 2}, "n"),
        ("completions", {"prompt": [1, 999]}, "prompt"),
        ("completions", {"prompt": [1] * 300}, "prompt"),
        ("completions", {"prompt": ["a", "b"]}, "prompt"),
        ("completions", {"stop": [""]}, "stop"),
        ("completions", {"logprobs": 3}, "logprobs"),
        ("completions", {"seed": -1}, "seed"),
        ("completions", {"presence_penalty": 0.5}, "presence_penalty"),
        ("completions", {"extra_body": {"top_k": -1}}, "top_k"),
        ("chat", {"messages": [{"role": "robot", "content": "x"}]}, "messages"),
        ("chat", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content[0]"),
        ("chat", {"max_completion_tokens": 0}, "max_completion_tokens"),
        ("chat", {"top_logprobs": 2, "logprobs": True}, "top_logprobs"),
    ],
)
def test_invalid_parameters_are_400_naming_the_parameter(client, model, kind, fields, param):
    base = {"prompt": "hi"} if kind == "completions" else {"messages": [{"role": "user", "content": "hi"}]}
    create = client.completions.create if kind == "completions" else client.chat.completions.create
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as err:
            create(model=model, **{**base, **fields}, stream=stream)
        assert err.value.status_code == 400 and err.value.param == param, err.value.body
        assert err.value.type == "invalid_request_error" and err.value.body["message"].startswith(param)
    assert client.completions.create(model=model, prompt="hi", max_tokens=2).usage.completion_tokens >= 1


def test_unknown_model_and_route_are_404_error_objects(server, client):
    with pytest.raises(openai.NotFoundError) as err:
        client.completions.create(model="gpt-4", prompt="hi")
    assert (err.value.param, err.value.code) == ("model", "model_not_found")
    request = urllib.request.Request(server.http_base_url + "/embeddings", data=b"{}", method="POST")
    with pytest.raises(urllib.error.HTTPError) as http_err:
        urllib.request.urlopen(request, timeout=10)
    assert http_err.value.code == 404 and "error" in json.loads(http_err.value.read())


def test_malformed_json_is_400(server):
    request = urllib.request.Request(server.http_base_url + "/completions", data=b"{not json", method="POST",
                                     headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(request, timeout=10)
    body = json.loads(err.value.read())
    assert err.value.code == 400 and "not valid JSON" in body["error"]["message"]


def test_api_keys_are_required_and_compared_over_mtls(keyed, pki, model):
    assert keyed.http_base_url.startswith("https://")
    for key in ("wrong-key", KEY + "x"):
        with pytest.raises(openai.AuthenticationError) as err:
            _keyed_client(keyed, pki, key).models.list()
        assert err.value.status_code == 401 and err.value.code == "invalid_api_key"
        assert key not in err.value.message
    request = urllib.request.Request(keyed.http_base_url + "/models")
    with pytest.raises(urllib.error.HTTPError) as missing:
        urllib.request.urlopen(request, timeout=10, context=_tls(pki))
    assert missing.value.code == 401 and "missing API key" in json.loads(missing.value.read())["error"]["message"]
    right = _keyed_client(keyed, pki)
    assert right.completions.create(model=model, prompt="hi", max_tokens=2).usage.completion_tokens >= 1
    health = urllib.request.urlopen(keyed.http_base_url.removesuffix("/v1") + "/health", timeout=10,
                                    context=_tls(pki))
    assert json.loads(health.read()) == {"status": "SERVING"}
    for context in (_tls(pki, client_cert=False), None):  # no client certificate; plaintext
        url = keyed.http_base_url if context else keyed.http_base_url.replace("https://", "http://")
        with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError, http.client.HTTPException)):
            urllib.request.urlopen(url + "/models", timeout=10, context=context).read()


def test_queue_flood_gets_429_while_admitted_requests_finish(keyed, pki, model):
    client = _keyed_client(keyed, pki, timeout=120)

    def run(i):
        try:
            return client.completions.create(model=model, prompt=[1, 2, 3 + i], max_tokens=20, temperature=0,
                                             extra_body={"ignore_eos": True})
        except openai.RateLimitError as exc:
            return exc

    with futures.ThreadPoolExecutor(24) as pool:
        outcomes = list(pool.map(run, range(24)))
    rejected = [o for o in outcomes if isinstance(o, openai.RateLimitError)]
    done = [o for o in outcomes if not isinstance(o, Exception)]
    assert rejected and done and len(rejected) + len(done) == 24
    assert rejected[0].status_code == 429 and rejected[0].type == "rate_limit_error"
    assert all(r.usage.completion_tokens == 20 for r in done)
    text = metrics_text(keyed)
    assert metric(text, "mixserve_requests_total", '{api="http",code="RESOURCE_EXHAUSTED"}') == len(rejected)


def test_not_serving_is_503(keyed, pki, model):
    client = _keyed_client(keyed, pki)
    keyed.gateway.client.healthy = False  # as after a failed step, until recovery
    try:
        with pytest.raises(openai.InternalServerError) as err:
            client.completions.create(model=model, prompt="hi", max_tokens=2)
        assert err.value.status_code == 503 and err.value.type == "service_unavailable"
    finally:
        keyed.gateway.client.healthy = True
    assert client.completions.create(model=model, prompt="hi", max_tokens=2).usage.completion_tokens >= 1


# ---------------------------------------------------------------- disconnects and metrics
def test_disconnect_mid_stream_aborts_the_request_in_the_engine(server, client, model):
    before = metrics_text(server)
    stream = client.completions.create(model=model, prompt=[1, 2, 3], max_tokens=200, temperature=0, stream=True,
                                       extra_body={"ignore_eos": True})
    assert next(iter(stream)).choices[0].finish_reason is None
    stream.close()  # closes the connection mid-stream
    impatient = openai.OpenAI(base_url=server.http_base_url, api_key="unused", max_retries=0, timeout=0.5)
    with pytest.raises(openai.APITimeoutError):  # a unary request whose client gives up
        impatient.completions.create(model=model, prompt=[1, 2, 4], max_tokens=200, temperature=0,
                                     extra_body={"ignore_eos": True})
    deadline = time.monotonic() + 20
    while True:
        text = _wait_idle(server)
        cancelled = metric(text, "mixserve_requests_total", '{api="http",code="CANCELLED"}') - metric(
            before, "mixserve_requests_total", '{api="http",code="CANCELLED"}')
        if cancelled == 2 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert cancelled == 2
    assert metric(text, "mixserve_kv_cache_usage_ratio") == 0 == metric(text, "mixserve_num_requests_running")
    generated = metric(text, "mixserve_generation_tokens_total") - metric(before, "mixserve_generation_tokens_total")
    assert generated < 2 * 200  # both ended early
    assert client.completions.create(model=model, prompt="hi", max_tokens=2).usage.completion_tokens >= 1


def test_requests_are_counted_per_api(server, client, model):
    before = metrics_text(server)
    client.completions.create(model=model, prompt=[1, 2], max_tokens=3, extra_body={"ignore_eos": True})
    _grpc(server, 3, prompt_token_ids=[1, 2])
    text = metrics_text(server)
    for api in ("http", "grpc"):
        labels = f'{{api="{api}",finish_reason="length",code="OK"}}'
        assert metric(text, "mixserve_requests_total", labels) - metric(before, "mixserve_requests_total", labels) == 1


def _readme_http_examples(server, model) -> list[tuple[str, str]]:
    """The README's HTTP section's code blocks, pointed at this server and model: (language, code)."""
    section = README.read_text().split("## OpenAI-compatible HTTP API", 1)[1].split("\n## ", 1)[0]
    port = server.http_base_url.rsplit(":", 1)[1].split("/")[0]
    return [(lang, code.replace("127.0.0.1:8000", f"127.0.0.1:{port}").replace("mixserve-tiny", model))
            for lang, code in re.findall(r"```(bash|python)\n(.*?)```", section, re.S)]


def test_readme_curl_and_openai_examples_run(server, model):
    examples = _readme_http_examples(server, model)
    (curl,) = [code for lang, code in examples if lang == "bash"]
    commands = curl.replace("\\\n", " ").strip().splitlines()
    outputs = [subprocess.run(["bash", "-c", c], capture_output=True, text=True, timeout=60, check=True).stdout
               for c in commands]
    assert [m["id"] for m in json.loads(outputs[0])["data"]] == [model]
    completion = json.loads(outputs[1])
    assert completion["object"] == "text_completion" and completion["usage"]["prompt_tokens"] > 0
    events = [line.removeprefix("data: ") for line in outputs[2].splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and json.loads(events[0])["choices"][0]["delta"]["role"] == "assistant"
    (python,) = [code for lang, code in examples if lang == "python"]
    run = subprocess.run([sys.executable, "-c", python], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and "CompletionUsage" in run.stdout, run.stderr


def test_openai_client_against_mixserve_serve_process_equals_grpc(served_model, model):
    """Acceptance 1 of issue 20: `mixserve serve` as a process; greedy HTTP output equals gRPC; SIGTERM exits."""
    import grpc

    from protos import mixserve_pb2_grpc as pb_grpc
    from workers.comm import free_port

    port, metrics_port, http_port = free_port(), free_port(), free_port()
    env = os.environ | {"PYTHONPATH": str(README.parent), "RAY_ADDRESS": "local"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "cluster.cli", "serve", "--model", str(served_model), "--workers", "1", "--threads",
         "1", "--port", str(port), "--metrics-port", str(metrics_port), "--http-port", str(http_port)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if urllib.request.urlopen(f"http://127.0.0.1:{http_port}/health", timeout=2).status == 200:
                    break
            except OSError:
                assert time.monotonic() < deadline, "the HTTP API did not become healthy"
                time.sleep(0.5)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{http_port}/v1", api_key="unused", max_retries=0)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.MixServeStub(channel)
            sampling = pb.SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True)
            grpc_text = stub.Generate(pb.GenerateRequest(prompt="def f(x):", sampling=sampling), timeout=60).text
            grpc_chat = stub.Generate(pb.GenerateRequest(messages=[pb.ChatMessage(**m) for m in CHAT],
                                                         sampling=sampling), timeout=60).text
        args = {"model": model, "max_tokens": 12, "temperature": 0, "extra_body": {"ignore_eos": True}}
        assert client.completions.create(prompt="def f(x):", **args).choices[0].text == grpc_text
        streamed = client.completions.create(prompt="def f(x):", stream=True, **args)
        assert "".join(c.choices[0].text for c in streamed) == grpc_text
        assert client.chat.completions.create(messages=CHAT, **args).choices[0].message.content == grpc_chat
        streamed = client.chat.completions.create(messages=CHAT, stream=True, **args)
        assert "".join(c.choices[0].delta.content or "" for c in streamed) == grpc_chat
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)

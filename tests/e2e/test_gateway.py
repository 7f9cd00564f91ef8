"""End to end over a real gRPC server and a local Ray cluster with 2 expert workers."""

from __future__ import annotations

import concurrent.futures as futures
import json
import subprocess
import time
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cluster.engine import LLMEngine
from cluster.requests import GenerationRequest
from cluster.scheduler import SchedulerConfig
from cluster.tokenizer import TextTokenizer
from protos import mixserve_pb2 as pb
from tests.e2e.harness import RunningGateway
from tests.metrics_page import metric as _metric
from tests.metrics_page import metrics_text as _metrics
from workers.config import ModelConfig
from workers.model.sampler import SamplingParams
from workers.runtime.local_build import build_attention_rank

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def server(ray_cluster, served_model):
    with RunningGateway(served_model, workers=2) as running:
        yield running


def offline(model_dir: Path, prompt_ids: list[int], *, max_new: int, temperature=0.0, top_k=0, top_p=1.0,
            seed=None, ignore_eos=True) -> list[int]:
    rank = build_attention_rank(model_dir, dtype=torch.float32, device=torch.device("cpu"), num_blocks=64,
                                block_size=16)
    request = GenerationRequest(
        request_id="offline", prompt_token_ids=tuple(prompt_ids), max_new_tokens=max_new, ignore_eos=ignore_eos,
        sampling=SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed),
    )
    return LLMEngine(rank).generate([request])[0].token_ids


def _request(prompt_ids, max_new=12, **sampling) -> pb.GenerateRequest:
    return pb.GenerateRequest(prompt_token_ids=prompt_ids,
                              sampling=pb.SamplingParams(max_new_tokens=max_new, ignore_eos=True, **sampling))


def test_unary_and_stream_equal_offline_greedy(server, served_model):
    prompt = [1, 40, 41, 42, 43, 44]
    expected = offline(served_model, prompt, max_new=12)
    unary = server.stub.Generate(_request(prompt, temperature=0.0), timeout=60)
    assert list(unary.token_ids) == expected
    assert unary.finish_reason == "length"
    assert (unary.usage.prompt_tokens, unary.usage.completion_tokens) == (6, 12)
    chunks = list(server.stub.GenerateStream(_request(prompt, temperature=0.0), timeout=60))
    assert [t for c in chunks for t in c.token_ids] == expected
    assert chunks[-1].finish_reason == "length" and chunks[-1].usage.completion_tokens == 12
    assert all(not c.finish_reason for c in chunks[:-1])


def test_text_prompt_round_trips_through_the_tokenizer(server, served_model):
    cfg = ModelConfig.from_model_dir(served_model)
    tokenizer = TextTokenizer.from_model_dir(served_model, cfg.bos_token_id)
    prompt = "def fibonacci(n):"
    response = server.stub.Generate(pb.GenerateRequest(
        prompt=prompt, sampling=pb.SamplingParams(max_new_tokens=10, temperature=0.0, ignore_eos=True)), timeout=60)
    expected = offline(served_model, tokenizer.encode(prompt), max_new=10)
    assert list(response.token_ids) == expected
    assert response.text == tokenizer.decode(expected)
    assert response.usage.prompt_tokens == len(tokenizer.encode(prompt))


def test_the_default_max_new_tokens_shrinks_to_the_room_left_in_the_context(server):
    """A 250-token prompt in a context of 256 leaves room for 6 tokens, fewer than the default 16; asked
    for explicitly, 7 would be refused (test_invalid_fields_are_named_and_the_server_keeps_serving)."""
    response = server.stub.Generate(pb.GenerateRequest(
        prompt_token_ids=[1] * 250, sampling=pb.SamplingParams(temperature=0.0, ignore_eos=True)), timeout=60)
    assert (response.usage.completion_tokens, response.finish_reason) == (6, "length")


def test_chat_messages_go_through_the_models_chat_template(server, served_model):
    cfg = ModelConfig.from_model_dir(served_model)
    tokenizer = TextTokenizer.from_model_dir(served_model, cfg.bos_token_id)
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "def add(a, b):"}]
    request = pb.GenerateRequest(messages=[pb.ChatMessage(**m) for m in messages],
                                 sampling=pb.SamplingParams(max_new_tokens=8, temperature=0.0, ignore_eos=True))
    prompt = tokenizer.encode_chat(messages).token_ids
    assert tokenizer.decode(list(prompt)).endswith("[user] def add(a, b):\n[assistant] ")
    expected = offline(served_model, list(prompt), max_new=8)
    assert list(server.stub.Generate(request, timeout=60).token_ids) == expected
    assert [t for c in server.stub.GenerateStream(request, timeout=60) for t in c.token_ids] == expected
    assert server.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=30).has_chat_template


@pytest.mark.parametrize(
    ("messages", "field", "text"),
    [
        ([pb.ChatMessage(role="", content="hi")], "messages[0].role", ""),
        ([pb.ChatMessage(role="user", content="hi"), pb.ChatMessage(role="robot", content="x")], "messages",
         "unknown role robot"),
    ],
)
def test_bad_chat_messages_are_invalid_argument_naming_the_field(server, messages, field, text):
    with pytest.raises(grpc.RpcError) as err:
        server.stub.Generate(pb.GenerateRequest(messages=messages), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith(field) and text in err.value.details(), err.value.details()


def test_32_concurrent_streams_each_match_their_offline_run(server, served_model):
    gen = torch.Generator().manual_seed(5)
    cases = []
    for i in range(32):
        prompt = torch.randint(3, 320, (int(torch.randint(1, 40, (1,), generator=gen)),), generator=gen).tolist()
        sampling = {"temperature": 0.0} if i % 2 == 0 else {"temperature": 0.9, "top_k": 20, "top_p": 0.9, "seed": i}
        cases.append((prompt, 4 + i % 13, sampling))

    def run(case):
        prompt, max_new, sampling = case
        return [t for c in server.stub.GenerateStream(_request(prompt, max_new, **sampling), timeout=120)
                for t in c.token_ids]

    with futures.ThreadPoolExecutor(32) as pool:
        got = list(pool.map(run, cases))
    for (prompt, max_new, sampling), tokens in zip(cases, got, strict=True):
        assert tokens == offline(served_model, prompt, max_new=max_new, **sampling)


def test_stop_string_ends_generation_and_is_excluded(server, served_model):
    cfg = ModelConfig.from_model_dir(served_model)
    tokenizer = TextTokenizer.from_model_dir(served_model, cfg.bos_token_id)
    prompt = [1, 50, 60, 70]
    full = offline(served_model, prompt, max_new=24)
    full_text = tokenizer.decode(full)
    stop = full_text[len(full_text) // 2 : len(full_text) // 2 + 3]
    assert stop and stop in full_text
    response = server.stub.Generate(_request(prompt, 24, temperature=0.0, stop=[stop]), timeout=60)
    assert response.finish_reason == "stop"
    assert response.text == full_text[: full_text.index(stop)]
    assert list(response.token_ids) == full[: len(response.token_ids)]
    _wait_idle(server)


def _wait_idle(server, timeout_s: float = 20) -> str:
    deadline = time.monotonic() + timeout_s
    while True:
        text = _metrics(server)
        idle = _metric(text, "mixserve_kv_cache_usage_ratio") == 0 == _metric(text, "mixserve_num_requests_running")
        if idle or time.monotonic() > deadline:
            return text
        time.sleep(0.3)


def test_cancelled_stream_and_expired_deadline_free_the_cache(server):
    stream = server.stub.GenerateStream(_request([1, 2, 3], 200, temperature=0.0), timeout=60)
    next(stream)
    text = _metrics(server)
    stream.cancel()
    with pytest.raises(grpc.RpcError) as err:
        server.stub.Generate(_request([1, 2, 3, 4], 200, temperature=0.0), timeout=0.5)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    text = _wait_idle(server)
    assert _metric(text, "mixserve_kv_cache_usage_ratio") == 0.0
    assert _metric(text, "mixserve_requests_total", "") > 0
    assert 'code="CANCELLED"' in text and 'code="DEADLINE_EXCEEDED"' in text


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (pb.GenerateRequest(), "prompt"),
        (pb.GenerateRequest(prompt="hi", prompt_token_ids=[1]), "prompt"),
        (pb.GenerateRequest(prompt=""), "prompt: is empty"),
        (pb.GenerateRequest(prompt="hi", messages=[pb.ChatMessage(role="user", content="hi")]), "prompt"),
        (pb.GenerateRequest(prompt_token_ids=[1] * 300), "prompt_token_ids"),
        (pb.GenerateRequest(prompt_token_ids=[1, 999]), "prompt_token_ids"),
        (pb.GenerateRequest(prompt_token_ids=[1, -4]), "prompt_token_ids"),
        (pb.GenerateRequest(prompt_token_ids=[1], sampling=pb.SamplingParams(max_new_tokens=0)),
         "sampling.max_new_tokens"),
        (pb.GenerateRequest(prompt_token_ids=[1], sampling=pb.SamplingParams(max_new_tokens=100000)),
         "sampling.max_new_tokens"),
        (pb.GenerateRequest(prompt_token_ids=[1] * 200, sampling=pb.SamplingParams(max_new_tokens=100)),
         "sampling.max_new_tokens"),  # 300 tokens in a context of 256
        (pb.GenerateRequest(prompt_token_ids=[1], sampling=pb.SamplingParams(temperature=-0.5)),
         "sampling.temperature"),
        (pb.GenerateRequest(prompt_token_ids=[1], sampling=pb.SamplingParams(top_p=0.0)), "sampling.top_p"),
        (pb.GenerateRequest(prompt_token_ids=[1], sampling=pb.SamplingParams(top_p=1.5)), "sampling.top_p"),
        (pb.GenerateRequest(prompt_token_ids=[1], sampling=pb.SamplingParams(top_k=-1)), "sampling.top_k"),
        (pb.GenerateRequest(prompt_token_ids=[1], sampling=pb.SamplingParams(stop=["x"] * 17)), "sampling.stop"),
        (pb.GenerateRequest(prompt_token_ids=[1], sampling=pb.SamplingParams(stop=[""])), "sampling.stop"),
        (pb.GenerateRequest(prompt_token_ids=[1], sampling=pb.SamplingParams(stop_token_ids=[5000])),
         "sampling.stop_token_ids"),
    ],
)
def test_invalid_fields_are_named_and_the_server_keeps_serving(server, request_, field):
    for call in (server.stub.Generate, lambda r, timeout: list(server.stub.GenerateStream(r, timeout=timeout))):
        with pytest.raises(grpc.RpcError) as err:
            call(request_, timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert err.value.details().startswith(field), err.value.details()
    assert server.stub.Generate(_request([1, 2], 2), timeout=30).usage.completion_tokens == 2


def test_metrics_agree_with_the_traffic(ray_cluster, served_model):
    cfg = ModelConfig.from_model_dir(served_model)
    with RunningGateway(served_model, workers=2) as fresh:
        responses = [fresh.stub.Generate(_request(list(range(3, 3 + n)), 3 + n % 5, temperature=0.0), timeout=60)
                     for n in (1, 7, 19, 4)]
        prompt = sum(r.usage.prompt_tokens for r in responses)
        completion = sum(r.usage.completion_tokens for r in responses)
        routed = cfg.num_hidden_layers * (prompt + completion - len(responses)) * cfg.num_experts_per_tok
        text = _wait_idle(fresh)
        deadline = time.monotonic() + 10  # the workers' own counts are read about once a second
        while _metric(text, "mixserve_worker_routed_tokens_total") != routed and time.monotonic() < deadline:
            time.sleep(0.3)
            text = _metrics(fresh)
    assert _metric(text, "mixserve_prompt_tokens_total") == prompt
    assert _metric(text, "mixserve_generation_tokens_total") == completion
    assert _metric(text, "mixserve_requests_total", '{finish_reason="length",code="OK"}') == 4
    # the last sampled token of each request is never fed back: `routed` counts the rest
    assert _metric(text, "mixserve_expert_routed_tokens_total") == routed
    assert _metric(text, "mixserve_worker_routed_tokens_total") == routed
    assert _metric(text, "mixserve_time_to_first_token_seconds_count") == 4
    assert _metric(text, "mixserve_e2e_request_latency_seconds_count") == 4
    assert _metric(text, "mixserve_request_queue_time_seconds_count") == 4
    assert _metric(text, "mixserve_inter_token_latency_seconds_count") == completion - 4
    assert _metric(text, "mixserve_batch_size_count") > 0
    assert _metric(text, 'mixserve_step_phase_seconds_count{phase="dispatch"}') > 0
    assert _metric(text, "mixserve_worker_up") == 2
    assert _metric(text, "mixserve_num_expert_workers") == 2
    for name in ("mixserve_num_requests_running", "mixserve_num_requests_waiting", "mixserve_kv_cache_usage_ratio",
                 "mixserve_worker_failures_total", "mixserve_step_phase_seconds_bucket", "mixserve_preemptions_total"):
        assert name in text


def test_queue_flood_gets_resource_exhausted_while_admitted_requests_finish(ray_cluster, served_model):
    scheduler = SchedulerConfig(max_num_seqs=2, max_waiting=3)
    with RunningGateway(served_model, workers=1, scheduler=scheduler) as small:
        def run(i):
            try:
                return small.stub.Generate(_request([1, 2, 3 + i], 20, temperature=0.0), timeout=120)
            except grpc.RpcError as exc:
                return exc.code()

        with futures.ThreadPoolExecutor(24) as pool:
            outcomes = list(pool.map(run, range(24)))
        rejected = [o for o in outcomes if o == grpc.StatusCode.RESOURCE_EXHAUSTED]
        done = [o for o in outcomes if isinstance(o, pb.GenerateResponse)]
        assert rejected and done and len(rejected) + len(done) == 24
        assert all(r.usage.completion_tokens == 20 for r in done)
        assert small.stub.Generate(_request([1, 2], 2), timeout=30).usage.completion_tokens == 2


def test_grpcurl_lists_services_and_calls_health_and_generate(server):
    grpcurl = Path(__file__).resolve().parents[2] / ".venv" / "bin" / "grpcurl"
    grpcurl = str(grpcurl) if grpcurl.exists() else "grpcurl"
    listed = subprocess.run([grpcurl, "-plaintext", server.target, "list"], capture_output=True, text=True,
                            timeout=30, check=True).stdout.split()
    assert {"mixserve.v1.MixServe", "grpc.health.v1.Health"} <= set(listed)
    health = subprocess.run([grpcurl, "-plaintext", server.target, "grpc.health.v1.Health/Check"],
                            capture_output=True, text=True, timeout=30, check=True).stdout
    assert '"status": "SERVING"' in health
    out = subprocess.run(
        [grpcurl, "-plaintext", "-d",
         '{"prompt_token_ids": [1, 5, 9], "sampling": {"max_new_tokens": 3, "temperature": 0, "ignore_eos": true}}',
         server.target, "mixserve.v1.MixServe/Generate"], capture_output=True, text=True, timeout=30, check=True,
    ).stdout
    response = json.loads(out)
    assert response["finish_reason"] == "length" and response["usage"]["completion_tokens"] == 3
    assert len(response["token_ids"]) == 3


def test_health_is_serving(server):
    stub = health_pb2_grpc.HealthStub(server.channel)
    for service in ("", "mixserve.v1.MixServe"):
        status = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status
        assert status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_v1_and_v1alpha_list_the_services(server):
    from grpc_reflection.v1alpha import reflection_pb2 as refl

    for package in ("grpc.reflection.v1", "grpc.reflection.v1alpha"):
        call = server.channel.stream_stream(
            f"/{package}.ServerReflection/ServerReflectionInfo",
            request_serializer=refl.ServerReflectionRequest.SerializeToString,
            response_deserializer=refl.ServerReflectionResponse.FromString,
        )
        (response,) = list(call(iter([refl.ServerReflectionRequest(list_services="")]), timeout=10))
        names = {s.name for s in response.list_services_response.service}
        assert {"mixserve.v1.MixServe", "grpc.health.v1.Health"} <= names, package

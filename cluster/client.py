"""`mixserve client`: stream a completion from a running server to the terminal."""

from __future__ import annotations

import sys

import grpc

from protos import mixserve_pb2 as pb
from protos import mixserve_pb2_grpc as pb_grpc


def stream_completion(target: str, request: pb.GenerateRequest, *, timeout_s: float, out=sys.stdout) -> int:
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.MixServeStub(channel)
        try:
            for chunk in stub.GenerateStream(request, timeout=timeout_s):
                out.write(chunk.text if chunk.text or not chunk.token_ids else f" {list(chunk.token_ids)}")
                out.flush()
                if chunk.finish_reason:
                    usage = chunk.usage
                    print(f"\n[{chunk.finish_reason}: {usage.prompt_tokens} prompt + "
                          f"{usage.completion_tokens} completion tokens, "
                          f"{chunk.timings.total_seconds:.2f}s]", file=sys.stderr)
        except grpc.RpcError as exc:
            print(f"mixserve: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    return 0

"""Registers the MixServe servicer like the generated `add_MixServeServicer_to_server`, but with request
decoders that never raise: bytes that are not a valid message reach the servicer as `Undecodable`, which
answers INVALID_ARGUMENT (grpc's default would be UNKNOWN with the parser's exception text and a logged
traceback per request)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import grpc
from google.protobuf.message import DecodeError, Message

from protos import mixserve_pb2 as pb

SERVICE = "mixserve.v1.MixServe"


@dataclass(frozen=True)
class Undecodable:
    """A request body that does not parse as the method's message type."""

    message_type: str
    size: int


def _lenient(message: type[Message]) -> Callable[[bytes], Message | Undecodable]:
    def decode(data: bytes) -> Message | Undecodable:
        try:
            return message.FromString(data)
        except (DecodeError, ValueError, RuntimeError):
            return Undecodable(message.DESCRIPTOR.full_name, len(data))

    return decode


def add_mixserve_servicer(servicer, server: grpc.aio.Server) -> None:
    handlers = {
        "Generate": grpc.unary_unary_rpc_method_handler(
            servicer.Generate, request_deserializer=_lenient(pb.GenerateRequest),
            response_serializer=pb.GenerateResponse.SerializeToString,
        ),
        "GenerateStream": grpc.unary_stream_rpc_method_handler(
            servicer.GenerateStream, request_deserializer=_lenient(pb.GenerateRequest),
            response_serializer=pb.GenerateStreamResponse.SerializeToString,
        ),
        "GetModelInfo": grpc.unary_unary_rpc_method_handler(
            servicer.GetModelInfo, request_deserializer=_lenient(pb.GetModelInfoRequest),
            response_serializer=pb.ModelInfo.SerializeToString,
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_registered_method_handlers(SERVICE, handlers)

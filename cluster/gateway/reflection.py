"""Server reflection under both names clients use: grpc.reflection.v1alpha (grpcurl 1.8) and
grpc.reflection.v1 (newer clients). grpcio-reflection ships v1alpha only; the two protocols are the same
messages under another package, so v1 is served by the same servicer with the v1alpha codecs."""

from __future__ import annotations

import grpc
from grpc_reflection.v1alpha import reflection
from grpc_reflection.v1alpha import reflection_pb2 as v1alpha_pb2

V1_SERVICE = "grpc.reflection.v1.ServerReflection"


def enable_reflection(service_names: list[str], server: grpc.aio.Server) -> None:
    names = [*service_names, reflection.SERVICE_NAME, V1_SERVICE]
    reflection.enable_server_reflection(names, server)
    servicer = reflection.ReflectionServicer(names)
    handler = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=v1alpha_pb2.ServerReflectionRequest.FromString,
        response_serializer=v1alpha_pb2.ServerReflectionResponse.SerializeToString,
    )
    v1 = grpc.method_handlers_generic_handler(V1_SERVICE, {"ServerReflectionInfo": handler})
    server.add_generic_rpc_handlers((v1,))

"""Wall-mode transport: the gRPC data plane (``specwan.proto``) between edge and cloud.

The control plane (FastAPI: health, info, stats, shutdown) lives with the cloud server in
:mod:`harness.cloud_server`.
"""

from harness.transport.frames import METHOD_PATH, PROTO_FILE, decode_frame, encode_frame
from harness.transport.grpc_link import (
    CloudStats,
    GrpcCloudLink,
    GrpcEdgeLink,
    GrpcSessionLink,
    LinkClosedError,
)

__all__ = [
    "CloudStats",
    "GrpcCloudLink",
    "GrpcEdgeLink",
    "GrpcSessionLink",
    "LinkClosedError",
    "METHOD_PATH",
    "PROTO_FILE",
    "decode_frame",
    "encode_frame",
]

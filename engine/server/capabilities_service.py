"""Capabilities: advertises exactly what this server does."""

from __future__ import annotations

from engine.proto import re_grpc, re_pb2, semver_pb2
from engine.server import grpc_errors

# Blob bytes per batch request; the gRPC message limit is set above it (server.py) so a
# request at this size plus its framing still arrives and is judged by this rule.
MAX_BATCH_TOTAL_SIZE_BYTES = 4 * 1024 * 1024
DIGEST_FUNCTIONS = [re_pb2.DigestFunction.SHA256, re_pb2.DigestFunction.BLAKE3]


def server_capabilities() -> re_pb2.ServerCapabilities:
    return re_pb2.ServerCapabilities(
        cache_capabilities=re_pb2.CacheCapabilities(
            digest_functions=DIGEST_FUNCTIONS,
            action_cache_update_capabilities=re_pb2.ActionCacheUpdateCapabilities(
                update_enabled=True),
            max_batch_total_size_bytes=MAX_BATCH_TOTAL_SIZE_BYTES,
            symlink_absolute_path_strategy=re_pb2.SymlinkAbsolutePathStrategy.DISALLOWED,
            supported_compressors=[re_pb2.Compressor.ZSTD],
        ),
        execution_capabilities=re_pb2.ExecutionCapabilities(
            digest_function=re_pb2.DigestFunction.SHA256,
            digest_functions=DIGEST_FUNCTIONS,
            exec_enabled=True,
        ),
        low_api_version=semver_pb2.SemVer(major=2, minor=0),
        high_api_version=semver_pb2.SemVer(major=2, minor=3),
    )


class CapabilitiesService(re_grpc.CapabilitiesServicer):
    @grpc_errors.unary
    async def GetCapabilities(self, request, context):
        return server_capabilities()

"""The one import point for every protocol message and gRPC stub Stoker uses.

Our own protos (protos/, generated into engine._proto) and the google.rpc /
google.longrunning ones from googleapis-common-protos, under short names:

    from engine.proto import re_pb2, re_grpc

re_* is REAPI (with BuildBuddy's ExecutionTask, ExecutionProgress and
PublishOperation added to its package), sched_* BuildBuddy's scheduler, rw_*
Buildbarn's remoteworker (bbcas_* its
HistoricalExecuteResponse), bots_*/worker_pb2 the Remote Workers API.
"""

from google.longrunning import operations_pb2
from google.longrunning import operations_pb2_grpc as operations_grpc
from google.rpc import code_pb2, error_details_pb2, status_pb2

from engine._proto.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from engine._proto.build.bazel.remote.execution.v2 import remote_execution_pb2_grpc as re_grpc
from engine._proto.build.bazel.semver import semver_pb2
from engine._proto.buildbarn.cas import cas_pb2 as bbcas_pb2
from engine._proto.buildbarn.remoteworker import remoteworker_pb2 as rw_pb2
from engine._proto.buildbarn.remoteworker import remoteworker_pb2_grpc as rw_grpc
from engine._proto.google.bytestream import bytestream_pb2 as bs_pb2
from engine._proto.google.bytestream import bytestream_pb2_grpc as bs_grpc
from engine._proto.google.devtools.remoteworkers.v1test2 import bots_pb2, worker_pb2
from engine._proto.google.devtools.remoteworkers.v1test2 import bots_pb2_grpc as bots_grpc
from engine._proto.scheduler import scheduler_pb2 as sched_pb2
from engine._proto.scheduler import scheduler_pb2_grpc as sched_grpc

__all__ = [
    "bbcas_pb2",
    "bots_grpc",
    "bots_pb2",
    "bs_grpc",
    "bs_pb2",
    "code_pb2",
    "error_details_pb2",
    "operations_grpc",
    "operations_pb2",
    "re_grpc",
    "re_pb2",
    "rw_grpc",
    "rw_pb2",
    "sched_grpc",
    "sched_pb2",
    "semver_pb2",
    "status_pb2",
    "worker_pb2",
]

from engine._proto.build.bazel.remote.execution.v2 import remote_execution_pb2 as _remote_execution_pb2
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class HistoricalExecuteResponse(_message.Message):
    __slots__ = ("action_digest", "execute_response")
    ACTION_DIGEST_FIELD_NUMBER: _ClassVar[int]
    EXECUTE_RESPONSE_FIELD_NUMBER: _ClassVar[int]
    action_digest: _remote_execution_pb2.Digest
    execute_response: _remote_execution_pb2.ExecuteResponse
    def __init__(self, action_digest: _Optional[_Union[_remote_execution_pb2.Digest, _Mapping]] = ..., execute_response: _Optional[_Union[_remote_execution_pb2.ExecuteResponse, _Mapping]] = ...) -> None: ...

from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.rpc import status_pb2 as _status_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RegisterAndStreamWorkRequest(_message.Message):
    __slots__ = ("register_executor_request", "enqueue_task_reservation_response", "shutting_down_request", "ask_for_more_work_request")
    REGISTER_EXECUTOR_REQUEST_FIELD_NUMBER: _ClassVar[int]
    ENQUEUE_TASK_RESERVATION_RESPONSE_FIELD_NUMBER: _ClassVar[int]
    SHUTTING_DOWN_REQUEST_FIELD_NUMBER: _ClassVar[int]
    ASK_FOR_MORE_WORK_REQUEST_FIELD_NUMBER: _ClassVar[int]
    register_executor_request: RegisterExecutorRequest
    enqueue_task_reservation_response: EnqueueTaskReservationResponse
    shutting_down_request: ShuttingDownRequest
    ask_for_more_work_request: AskForMoreWorkRequest
    def __init__(self, register_executor_request: _Optional[_Union[RegisterExecutorRequest, _Mapping]] = ..., enqueue_task_reservation_response: _Optional[_Union[EnqueueTaskReservationResponse, _Mapping]] = ..., shutting_down_request: _Optional[_Union[ShuttingDownRequest, _Mapping]] = ..., ask_for_more_work_request: _Optional[_Union[AskForMoreWorkRequest, _Mapping]] = ...) -> None: ...

class RegisterAndStreamWorkResponse(_message.Message):
    __slots__ = ("enqueue_task_reservation_request", "ask_for_more_work_response", "cancel_task_reservation_request")
    ENQUEUE_TASK_RESERVATION_REQUEST_FIELD_NUMBER: _ClassVar[int]
    ASK_FOR_MORE_WORK_RESPONSE_FIELD_NUMBER: _ClassVar[int]
    CANCEL_TASK_RESERVATION_REQUEST_FIELD_NUMBER: _ClassVar[int]
    enqueue_task_reservation_request: EnqueueTaskReservationRequest
    ask_for_more_work_response: AskForMoreWorkResponse
    cancel_task_reservation_request: CancelTaskReservationRequest
    def __init__(self, enqueue_task_reservation_request: _Optional[_Union[EnqueueTaskReservationRequest, _Mapping]] = ..., ask_for_more_work_response: _Optional[_Union[AskForMoreWorkResponse, _Mapping]] = ..., cancel_task_reservation_request: _Optional[_Union[CancelTaskReservationRequest, _Mapping]] = ...) -> None: ...

class RegisterExecutorRequest(_message.Message):
    __slots__ = ("node",)
    NODE_FIELD_NUMBER: _ClassVar[int]
    node: ExecutionNode
    def __init__(self, node: _Optional[_Union[ExecutionNode, _Mapping]] = ...) -> None: ...

class ExecutionNode(_message.Message):
    __slots__ = ("host", "port", "assignable_memory_bytes", "assignable_milli_cpu", "os_family", "arch", "pool", "version", "executor_id", "executor_host_id", "supported_isolation_types", "current_queue_length", "active_action_count", "supports_proactive_cancellation", "start_time")
    HOST_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    ASSIGNABLE_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    ASSIGNABLE_MILLI_CPU_FIELD_NUMBER: _ClassVar[int]
    OS_FAMILY_FIELD_NUMBER: _ClassVar[int]
    ARCH_FIELD_NUMBER: _ClassVar[int]
    POOL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    EXECUTOR_ID_FIELD_NUMBER: _ClassVar[int]
    EXECUTOR_HOST_ID_FIELD_NUMBER: _ClassVar[int]
    SUPPORTED_ISOLATION_TYPES_FIELD_NUMBER: _ClassVar[int]
    CURRENT_QUEUE_LENGTH_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_ACTION_COUNT_FIELD_NUMBER: _ClassVar[int]
    SUPPORTS_PROACTIVE_CANCELLATION_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    host: str
    port: int
    assignable_memory_bytes: int
    assignable_milli_cpu: int
    os_family: str
    arch: str
    pool: str
    version: str
    executor_id: str
    executor_host_id: str
    supported_isolation_types: _containers.RepeatedScalarFieldContainer[str]
    current_queue_length: int
    active_action_count: int
    supports_proactive_cancellation: bool
    start_time: _timestamp_pb2.Timestamp
    def __init__(self, host: _Optional[str] = ..., port: _Optional[int] = ..., assignable_memory_bytes: _Optional[int] = ..., assignable_milli_cpu: _Optional[int] = ..., os_family: _Optional[str] = ..., arch: _Optional[str] = ..., pool: _Optional[str] = ..., version: _Optional[str] = ..., executor_id: _Optional[str] = ..., executor_host_id: _Optional[str] = ..., supported_isolation_types: _Optional[_Iterable[str]] = ..., current_queue_length: _Optional[int] = ..., active_action_count: _Optional[int] = ..., supports_proactive_cancellation: bool = ..., start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class EnqueueTaskReservationRequest(_message.Message):
    __slots__ = ("task_id", "task_size", "scheduling_metadata", "executor_id", "delay", "jwt")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_SIZE_FIELD_NUMBER: _ClassVar[int]
    SCHEDULING_METADATA_FIELD_NUMBER: _ClassVar[int]
    EXECUTOR_ID_FIELD_NUMBER: _ClassVar[int]
    DELAY_FIELD_NUMBER: _ClassVar[int]
    JWT_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    task_size: TaskSize
    scheduling_metadata: SchedulingMetadata
    executor_id: str
    delay: _duration_pb2.Duration
    jwt: str
    def __init__(self, task_id: _Optional[str] = ..., task_size: _Optional[_Union[TaskSize, _Mapping]] = ..., scheduling_metadata: _Optional[_Union[SchedulingMetadata, _Mapping]] = ..., executor_id: _Optional[str] = ..., delay: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., jwt: _Optional[str] = ...) -> None: ...

class EnqueueTaskReservationResponse(_message.Message):
    __slots__ = ("task_id",)
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    def __init__(self, task_id: _Optional[str] = ...) -> None: ...

class ShuttingDownRequest(_message.Message):
    __slots__ = ("task_id",)
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    task_id: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, task_id: _Optional[_Iterable[str]] = ...) -> None: ...

class AskForMoreWorkRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class AskForMoreWorkResponse(_message.Message):
    __slots__ = ("delay",)
    DELAY_FIELD_NUMBER: _ClassVar[int]
    delay: _duration_pb2.Duration
    def __init__(self, delay: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class CancelTaskReservationRequest(_message.Message):
    __slots__ = ("task_id",)
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    def __init__(self, task_id: _Optional[str] = ...) -> None: ...

class TaskSize(_message.Message):
    __slots__ = ("estimated_memory_bytes", "estimated_milli_cpu", "estimated_free_disk_bytes")
    ESTIMATED_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    ESTIMATED_MILLI_CPU_FIELD_NUMBER: _ClassVar[int]
    ESTIMATED_FREE_DISK_BYTES_FIELD_NUMBER: _ClassVar[int]
    estimated_memory_bytes: int
    estimated_milli_cpu: int
    estimated_free_disk_bytes: int
    def __init__(self, estimated_memory_bytes: _Optional[int] = ..., estimated_milli_cpu: _Optional[int] = ..., estimated_free_disk_bytes: _Optional[int] = ...) -> None: ...

class SchedulingMetadata(_message.Message):
    __slots__ = ("task_size", "os", "arch", "pool", "executor_group_id", "task_group_id", "measured_task_size", "predicted_task_size", "priority")
    TASK_SIZE_FIELD_NUMBER: _ClassVar[int]
    OS_FIELD_NUMBER: _ClassVar[int]
    ARCH_FIELD_NUMBER: _ClassVar[int]
    POOL_FIELD_NUMBER: _ClassVar[int]
    EXECUTOR_GROUP_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_GROUP_ID_FIELD_NUMBER: _ClassVar[int]
    MEASURED_TASK_SIZE_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_TASK_SIZE_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    task_size: TaskSize
    os: str
    arch: str
    pool: str
    executor_group_id: str
    task_group_id: str
    measured_task_size: TaskSize
    predicted_task_size: TaskSize
    priority: int
    def __init__(self, task_size: _Optional[_Union[TaskSize, _Mapping]] = ..., os: _Optional[str] = ..., arch: _Optional[str] = ..., pool: _Optional[str] = ..., executor_group_id: _Optional[str] = ..., task_group_id: _Optional[str] = ..., measured_task_size: _Optional[_Union[TaskSize, _Mapping]] = ..., predicted_task_size: _Optional[_Union[TaskSize, _Mapping]] = ..., priority: _Optional[int] = ...) -> None: ...

class LeaseTaskRequest(_message.Message):
    __slots__ = ("task_id", "finalize", "executor_id", "re_enqueue", "re_enqueue_reason", "supports_reconnect", "reconnect_token", "executor_hostname")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    FINALIZE_FIELD_NUMBER: _ClassVar[int]
    EXECUTOR_ID_FIELD_NUMBER: _ClassVar[int]
    RE_ENQUEUE_FIELD_NUMBER: _ClassVar[int]
    RE_ENQUEUE_REASON_FIELD_NUMBER: _ClassVar[int]
    SUPPORTS_RECONNECT_FIELD_NUMBER: _ClassVar[int]
    RECONNECT_TOKEN_FIELD_NUMBER: _ClassVar[int]
    EXECUTOR_HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    finalize: bool
    executor_id: str
    re_enqueue: bool
    re_enqueue_reason: _status_pb2.Status
    supports_reconnect: bool
    reconnect_token: str
    executor_hostname: str
    def __init__(self, task_id: _Optional[str] = ..., finalize: bool = ..., executor_id: _Optional[str] = ..., re_enqueue: bool = ..., re_enqueue_reason: _Optional[_Union[_status_pb2.Status, _Mapping]] = ..., supports_reconnect: bool = ..., reconnect_token: _Optional[str] = ..., executor_hostname: _Optional[str] = ...) -> None: ...

class LeaseTaskResponse(_message.Message):
    __slots__ = ("serialized_task", "lease_duration_seconds", "closed_cleanly", "reconnect_token", "lease_id", "supports_reconnect")
    SERIALIZED_TASK_FIELD_NUMBER: _ClassVar[int]
    LEASE_DURATION_SECONDS_FIELD_NUMBER: _ClassVar[int]
    CLOSED_CLEANLY_FIELD_NUMBER: _ClassVar[int]
    RECONNECT_TOKEN_FIELD_NUMBER: _ClassVar[int]
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    SUPPORTS_RECONNECT_FIELD_NUMBER: _ClassVar[int]
    serialized_task: bytes
    lease_duration_seconds: int
    closed_cleanly: bool
    reconnect_token: str
    lease_id: str
    supports_reconnect: bool
    def __init__(self, serialized_task: _Optional[bytes] = ..., lease_duration_seconds: _Optional[int] = ..., closed_cleanly: bool = ..., reconnect_token: _Optional[str] = ..., lease_id: _Optional[str] = ..., supports_reconnect: bool = ...) -> None: ...

class TaskExistsRequest(_message.Message):
    __slots__ = ("task_id",)
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    def __init__(self, task_id: _Optional[str] = ...) -> None: ...

class TaskExistsResponse(_message.Message):
    __slots__ = ("exists",)
    EXISTS_FIELD_NUMBER: _ClassVar[int]
    exists: bool
    def __init__(self, exists: bool = ...) -> None: ...

class ReEnqueueTaskRequest(_message.Message):
    __slots__ = ("task_id", "reason", "lease_id")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    reason: str
    lease_id: str
    def __init__(self, task_id: _Optional[str] = ..., reason: _Optional[str] = ..., lease_id: _Optional[str] = ...) -> None: ...

class ReEnqueueTaskResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

from fedhet.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ClientProfile(_message.Message):
    __slots__ = ("seconds_per_sample", "bandwidth", "bitwidth", "memory_bytes")
    SECONDS_PER_SAMPLE_FIELD_NUMBER: _ClassVar[int]
    BANDWIDTH_FIELD_NUMBER: _ClassVar[int]
    BITWIDTH_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    seconds_per_sample: float
    bandwidth: float
    bitwidth: int
    memory_bytes: int
    def __init__(self, seconds_per_sample: _Optional[float] = ..., bandwidth: _Optional[float] = ..., bitwidth: _Optional[int] = ..., memory_bytes: _Optional[int] = ...) -> None: ...

class RegisterRequest(_message.Message):
    __slots__ = ("client_id", "profile", "num_samples")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    NUM_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    client_id: int
    profile: ClientProfile
    num_samples: int
    def __init__(self, client_id: _Optional[int] = ..., profile: _Optional[_Union[ClientProfile, _Mapping]] = ..., num_samples: _Optional[int] = ...) -> None: ...

class RegisterReply(_message.Message):
    __slots__ = ("client_id", "run_id", "version", "chunk_bytes", "max_upload_bytes", "heartbeat_seconds", "run_over")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_UPLOAD_BYTES_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    RUN_OVER_FIELD_NUMBER: _ClassVar[int]
    client_id: int
    run_id: str
    version: int
    chunk_bytes: int
    max_upload_bytes: int
    heartbeat_seconds: float
    run_over: bool
    def __init__(self, client_id: _Optional[int] = ..., run_id: _Optional[str] = ..., version: _Optional[int] = ..., chunk_bytes: _Optional[int] = ..., max_upload_bytes: _Optional[int] = ..., heartbeat_seconds: _Optional[float] = ..., run_over: _Optional[bool] = ...) -> None: ...

class GetTaskRequest(_message.Message):
    __slots__ = ("client_id",)
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    client_id: int
    def __init__(self, client_id: _Optional[int] = ...) -> None: ...

class TaskHeader(_message.Message):
    __slots__ = ("client_id", "task_id", "version", "local_steps", "local_epochs", "manifest", "train", "proximal_mu", "train_all")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    LOCAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    LOCAL_EPOCHS_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    TRAIN_FIELD_NUMBER: _ClassVar[int]
    PROXIMAL_MU_FIELD_NUMBER: _ClassVar[int]
    TRAIN_ALL_FIELD_NUMBER: _ClassVar[int]
    client_id: int
    task_id: int
    version: int
    local_steps: int
    local_epochs: int
    manifest: _tensor_pb2.Manifest
    train: _containers.RepeatedScalarFieldContainer[str]
    proximal_mu: float
    train_all: bool
    def __init__(self, client_id: _Optional[int] = ..., task_id: _Optional[int] = ..., version: _Optional[int] = ..., local_steps: _Optional[int] = ..., local_epochs: _Optional[int] = ..., manifest: _Optional[_Union[_tensor_pb2.Manifest, _Mapping]] = ..., train: _Optional[_Iterable[str]] = ..., proximal_mu: _Optional[float] = ..., train_all: _Optional[bool] = ...) -> None: ...

class Idle(_message.Message):
    __slots__ = ("retry_after_seconds", "version")
    RETRY_AFTER_SECONDS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    retry_after_seconds: float
    version: int
    def __init__(self, retry_after_seconds: _Optional[float] = ..., version: _Optional[int] = ...) -> None: ...

class RunOver(_message.Message):
    __slots__ = ("version", "reason")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    version: int
    reason: str
    def __init__(self, version: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class TaskMessage(_message.Message):
    __slots__ = ("header", "chunk", "idle", "run_over")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    IDLE_FIELD_NUMBER: _ClassVar[int]
    RUN_OVER_FIELD_NUMBER: _ClassVar[int]
    header: TaskHeader
    chunk: _tensor_pb2.Chunk
    idle: Idle
    run_over: RunOver
    def __init__(self, header: _Optional[_Union[TaskHeader, _Mapping]] = ..., chunk: _Optional[_Union[_tensor_pb2.Chunk, _Mapping]] = ..., idle: _Optional[_Union[Idle, _Mapping]] = ..., run_over: _Optional[_Union[RunOver, _Mapping]] = ...) -> None: ...

class ResultHeader(_message.Message):
    __slots__ = ("client_id", "task_id", "version", "num_samples", "local_steps", "train_seconds", "loss", "manifest", "dp", "personal_accuracy")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    NUM_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    LOCAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    TRAIN_SECONDS_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    DP_FIELD_NUMBER: _ClassVar[int]
    PERSONAL_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    client_id: int
    task_id: int
    version: int
    num_samples: int
    local_steps: int
    train_seconds: float
    loss: float
    manifest: _tensor_pb2.Manifest
    dp: DPReport
    personal_accuracy: float
    def __init__(self, client_id: _Optional[int] = ..., task_id: _Optional[int] = ..., version: _Optional[int] = ..., num_samples: _Optional[int] = ..., local_steps: _Optional[int] = ..., train_seconds: _Optional[float] = ..., loss: _Optional[float] = ..., manifest: _Optional[_Union[_tensor_pb2.Manifest, _Mapping]] = ..., dp: _Optional[_Union[DPReport, _Mapping]] = ..., personal_accuracy: _Optional[float] = ...) -> None: ...

class DPReport(_message.Message):
    __slots__ = ("noise_multiplier", "sample_rate", "steps")
    NOISE_MULTIPLIER_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_RATE_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    noise_multiplier: float
    sample_rate: float
    steps: int
    def __init__(self, noise_multiplier: _Optional[float] = ..., sample_rate: _Optional[float] = ..., steps: _Optional[int] = ...) -> None: ...

class ResultMessage(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: ResultHeader
    chunk: _tensor_pb2.Chunk
    def __init__(self, header: _Optional[_Union[ResultHeader, _Mapping]] = ..., chunk: _Optional[_Union[_tensor_pb2.Chunk, _Mapping]] = ...) -> None: ...

class UploadReply(_message.Message):
    __slots__ = ("task_id", "version", "duplicate", "run_over", "dropped")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    RUN_OVER_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    task_id: int
    version: int
    duplicate: bool
    run_over: bool
    dropped: bool
    def __init__(self, task_id: _Optional[int] = ..., version: _Optional[int] = ..., duplicate: _Optional[bool] = ..., run_over: _Optional[bool] = ..., dropped: _Optional[bool] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("client_id", "task_id", "version")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    client_id: int
    task_id: int
    version: int
    def __init__(self, client_id: _Optional[int] = ..., task_id: _Optional[int] = ..., version: _Optional[int] = ...) -> None: ...

class HeartbeatReply(_message.Message):
    __slots__ = ("version", "run_over", "known")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    RUN_OVER_FIELD_NUMBER: _ClassVar[int]
    KNOWN_FIELD_NUMBER: _ClassVar[int]
    version: int
    run_over: bool
    known: bool
    def __init__(self, version: _Optional[int] = ..., run_over: _Optional[bool] = ..., known: _Optional[bool] = ...) -> None: ...

class LeaveRequest(_message.Message):
    __slots__ = ("client_id",)
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    client_id: int
    def __init__(self, client_id: _Optional[int] = ...) -> None: ...

class LeaveReply(_message.Message):
    __slots__ = ("version",)
    VERSION_FIELD_NUMBER: _ClassVar[int]
    version: int
    def __init__(self, version: _Optional[int] = ...) -> None: ...

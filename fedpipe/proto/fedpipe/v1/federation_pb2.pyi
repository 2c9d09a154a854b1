from fedpipe.proto.fedpipe.v1 import secagg_pb2 as _secagg_pb2
from fedpipe.proto.fedpipe.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TaskKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TASK_KIND_UNSPECIFIED: _ClassVar[TaskKind]
    TASK_KIND_INITIALIZE: _ClassVar[TaskKind]
    TASK_KIND_TRAIN: _ClassVar[TaskKind]
    TASK_KIND_EVALUATE: _ClassVar[TaskKind]
    TASK_KIND_STOP: _ClassVar[TaskKind]
    TASK_KIND_SECAGG_ADVERTISE: _ClassVar[TaskKind]
    TASK_KIND_SECAGG_SHARE: _ClassVar[TaskKind]
    TASK_KIND_TRAIN_MASKED: _ClassVar[TaskKind]
    TASK_KIND_SECAGG_UNMASK: _ClassVar[TaskKind]
TASK_KIND_UNSPECIFIED: TaskKind
TASK_KIND_INITIALIZE: TaskKind
TASK_KIND_TRAIN: TaskKind
TASK_KIND_EVALUATE: TaskKind
TASK_KIND_STOP: TaskKind
TASK_KIND_SECAGG_ADVERTISE: TaskKind
TASK_KIND_SECAGG_SHARE: TaskKind
TASK_KIND_TRAIN_MASKED: TaskKind
TASK_KIND_SECAGG_UNMASK: TaskKind

class ClientMessage(_message.Message):
    __slots__ = ("hello", "reply", "chunk")
    HELLO_FIELD_NUMBER: _ClassVar[int]
    REPLY_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    hello: Hello
    reply: Reply
    chunk: _tensor_pb2.Chunk
    def __init__(self, hello: _Optional[_Union[Hello, _Mapping]] = ..., reply: _Optional[_Union[Reply, _Mapping]] = ..., chunk: _Optional[_Union[_tensor_pb2.Chunk, _Mapping]] = ...) -> None: ...

class ServerMessage(_message.Message):
    __slots__ = ("welcome", "task", "chunk")
    WELCOME_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    welcome: Welcome
    task: Task
    chunk: _tensor_pb2.Chunk
    def __init__(self, welcome: _Optional[_Union[Welcome, _Mapping]] = ..., task: _Optional[_Union[Task, _Mapping]] = ..., chunk: _Optional[_Union[_tensor_pb2.Chunk, _Mapping]] = ...) -> None: ...

class DataSummary(_message.Message):
    __slots__ = ("n_train_samples", "n_eval_samples")
    N_TRAIN_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    N_EVAL_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    n_train_samples: int
    n_eval_samples: int
    def __init__(self, n_train_samples: _Optional[int] = ..., n_eval_samples: _Optional[int] = ...) -> None: ...

class Hello(_message.Message):
    __slots__ = ("protocol_version", "client_name", "token", "data", "session_secret")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    CLIENT_NAME_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    SESSION_SECRET_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    client_name: str
    token: str
    data: DataSummary
    session_secret: str
    def __init__(self, protocol_version: _Optional[int] = ..., client_name: _Optional[str] = ..., token: _Optional[str] = ..., data: _Optional[_Union[DataSummary, _Mapping]] = ..., session_secret: _Optional[str] = ...) -> None: ...

class Welcome(_message.Message):
    __slots__ = ("protocol_version", "run_id", "session_id", "session_secret")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_SECRET_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    run_id: str
    session_id: str
    session_secret: str
    def __init__(self, protocol_version: _Optional[int] = ..., run_id: _Optional[str] = ..., session_id: _Optional[str] = ..., session_secret: _Optional[str] = ...) -> None: ...

class Task(_message.Message):
    __slots__ = ("task_id", "kind", "round", "settings", "payload", "weight_specs", "roster", "forwarded_shares", "unmask_request")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    SETTINGS_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_SPECS_FIELD_NUMBER: _ClassVar[int]
    ROSTER_FIELD_NUMBER: _ClassVar[int]
    FORWARDED_SHARES_FIELD_NUMBER: _ClassVar[int]
    UNMASK_REQUEST_FIELD_NUMBER: _ClassVar[int]
    task_id: int
    kind: TaskKind
    round: int
    settings: _tensor_pb2.Value
    payload: _tensor_pb2.PayloadHeader
    weight_specs: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.TensorSpec]
    roster: _secagg_pb2.SecAggRoster
    forwarded_shares: _secagg_pb2.SecAggForwardedShares
    unmask_request: _secagg_pb2.SecAggUnmaskRequest
    def __init__(self, task_id: _Optional[int] = ..., kind: _Optional[_Union[TaskKind, str]] = ..., round: _Optional[int] = ..., settings: _Optional[_Union[_tensor_pb2.Value, _Mapping]] = ..., payload: _Optional[_Union[_tensor_pb2.PayloadHeader, _Mapping]] = ..., weight_specs: _Optional[_Iterable[_Union[_tensor_pb2.TensorSpec, _Mapping]]] = ..., roster: _Optional[_Union[_secagg_pb2.SecAggRoster, _Mapping]] = ..., forwarded_shares: _Optional[_Union[_secagg_pb2.SecAggForwardedShares, _Mapping]] = ..., unmask_request: _Optional[_Union[_secagg_pb2.SecAggUnmaskRequest, _Mapping]] = ...) -> None: ...

class Reply(_message.Message):
    __slots__ = ("task_id", "error", "info", "payload", "keys", "share_keys", "unmask_shares")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    INFO_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    SHARE_KEYS_FIELD_NUMBER: _ClassVar[int]
    UNMASK_SHARES_FIELD_NUMBER: _ClassVar[int]
    task_id: int
    error: str
    info: _tensor_pb2.Value
    payload: _tensor_pb2.PayloadHeader
    keys: _secagg_pb2.SecAggKeys
    share_keys: _secagg_pb2.SecAggShareKeys
    unmask_shares: _secagg_pb2.SecAggUnmaskShares
    def __init__(self, task_id: _Optional[int] = ..., error: _Optional[str] = ..., info: _Optional[_Union[_tensor_pb2.Value, _Mapping]] = ..., payload: _Optional[_Union[_tensor_pb2.PayloadHeader, _Mapping]] = ..., keys: _Optional[_Union[_secagg_pb2.SecAggKeys, _Mapping]] = ..., share_keys: _Optional[_Union[_secagg_pb2.SecAggShareKeys, _Mapping]] = ..., unmask_shares: _Optional[_Union[_secagg_pb2.SecAggUnmaskShares, _Mapping]] = ...) -> None: ...

from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SecAggKeys(_message.Message):
    __slots__ = ("cipher_key", "mask_key")
    CIPHER_KEY_FIELD_NUMBER: _ClassVar[int]
    MASK_KEY_FIELD_NUMBER: _ClassVar[int]
    cipher_key: bytes
    mask_key: bytes
    def __init__(self, cipher_key: _Optional[bytes] = ..., mask_key: _Optional[bytes] = ...) -> None: ...

class SecAggMember(_message.Message):
    __slots__ = ("name", "cipher_key", "mask_key")
    NAME_FIELD_NUMBER: _ClassVar[int]
    CIPHER_KEY_FIELD_NUMBER: _ClassVar[int]
    MASK_KEY_FIELD_NUMBER: _ClassVar[int]
    name: str
    cipher_key: bytes
    mask_key: bytes
    def __init__(self, name: _Optional[str] = ..., cipher_key: _Optional[bytes] = ..., mask_key: _Optional[bytes] = ...) -> None: ...

class SecAggEncoding(_message.Message):
    __slots__ = ("bits", "clip", "clients", "max_weight")
    BITS_FIELD_NUMBER: _ClassVar[int]
    CLIP_FIELD_NUMBER: _ClassVar[int]
    CLIENTS_FIELD_NUMBER: _ClassVar[int]
    MAX_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    bits: int
    clip: float
    clients: int
    max_weight: int
    def __init__(self, bits: _Optional[int] = ..., clip: _Optional[float] = ..., clients: _Optional[int] = ..., max_weight: _Optional[int] = ...) -> None: ...

class SecAggRoster(_message.Message):
    __slots__ = ("session", "members", "neighbours", "threshold", "encoding")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    NEIGHBOURS_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    session: bytes
    members: _containers.RepeatedCompositeFieldContainer[SecAggMember]
    neighbours: _containers.RepeatedScalarFieldContainer[int]
    threshold: int
    encoding: SecAggEncoding
    def __init__(self, session: _Optional[bytes] = ..., members: _Optional[_Iterable[_Union[SecAggMember, _Mapping]]] = ..., neighbours: _Optional[_Iterable[int]] = ..., threshold: _Optional[int] = ..., encoding: _Optional[_Union[SecAggEncoding, _Mapping]] = ...) -> None: ...

class SecAggShare(_message.Message):
    __slots__ = ("holder", "ciphertext", "self_mask_commitment", "mask_key_commitment")
    HOLDER_FIELD_NUMBER: _ClassVar[int]
    CIPHERTEXT_FIELD_NUMBER: _ClassVar[int]
    SELF_MASK_COMMITMENT_FIELD_NUMBER: _ClassVar[int]
    MASK_KEY_COMMITMENT_FIELD_NUMBER: _ClassVar[int]
    holder: str
    ciphertext: bytes
    self_mask_commitment: bytes
    mask_key_commitment: bytes
    def __init__(self, holder: _Optional[str] = ..., ciphertext: _Optional[bytes] = ..., self_mask_commitment: _Optional[bytes] = ..., mask_key_commitment: _Optional[bytes] = ...) -> None: ...

class SecAggShareKeys(_message.Message):
    __slots__ = ("shares",)
    SHARES_FIELD_NUMBER: _ClassVar[int]
    shares: _containers.RepeatedCompositeFieldContainer[SecAggShare]
    def __init__(self, shares: _Optional[_Iterable[_Union[SecAggShare, _Mapping]]] = ...) -> None: ...

class SecAggCiphertext(_message.Message):
    __slots__ = ("sender", "ciphertext")
    SENDER_FIELD_NUMBER: _ClassVar[int]
    CIPHERTEXT_FIELD_NUMBER: _ClassVar[int]
    sender: str
    ciphertext: bytes
    def __init__(self, sender: _Optional[str] = ..., ciphertext: _Optional[bytes] = ...) -> None: ...

class SecAggForwardedShares(_message.Message):
    __slots__ = ("ciphertexts",)
    CIPHERTEXTS_FIELD_NUMBER: _ClassVar[int]
    ciphertexts: _containers.RepeatedCompositeFieldContainer[SecAggCiphertext]
    def __init__(self, ciphertexts: _Optional[_Iterable[_Union[SecAggCiphertext, _Mapping]]] = ...) -> None: ...

class SecAggUnmaskRequest(_message.Message):
    __slots__ = ("survivors", "dropped")
    SURVIVORS_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    survivors: _containers.RepeatedScalarFieldContainer[str]
    dropped: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, survivors: _Optional[_Iterable[str]] = ..., dropped: _Optional[_Iterable[str]] = ...) -> None: ...

class SecAggRevealed(_message.Message):
    __slots__ = ("owner", "share")
    OWNER_FIELD_NUMBER: _ClassVar[int]
    SHARE_FIELD_NUMBER: _ClassVar[int]
    owner: str
    share: bytes
    def __init__(self, owner: _Optional[str] = ..., share: _Optional[bytes] = ...) -> None: ...

class SecAggUnmaskShares(_message.Message):
    __slots__ = ("self_mask_shares", "mask_key_shares")
    SELF_MASK_SHARES_FIELD_NUMBER: _ClassVar[int]
    MASK_KEY_SHARES_FIELD_NUMBER: _ClassVar[int]
    self_mask_shares: _containers.RepeatedCompositeFieldContainer[SecAggRevealed]
    mask_key_shares: _containers.RepeatedCompositeFieldContainer[SecAggRevealed]
    def __init__(self, self_mask_shares: _Optional[_Iterable[_Union[SecAggRevealed, _Mapping]]] = ..., mask_key_shares: _Optional[_Iterable[_Union[SecAggRevealed, _Mapping]]] = ...) -> None: ...

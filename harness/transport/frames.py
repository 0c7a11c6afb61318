"""The ``specwan.v1.Frame`` of ``specwan.proto``, encoded by hand in protobuf wire format.

A frame has two fields, so a generated module and a protobuf runtime would be all weight and
no use: :func:`encode_frame` writes exactly what protoc-generated code writes for
``Frame(payload=..., t_sent=...)`` (field 1, length-delimited; field 2, fixed64 double), and
:func:`decode_frame` reads any valid encoding of it, skipping unknown fields, so a newer peer
that adds fields stays readable. The names below must match ``specwan.proto``; a test reads
the .proto and checks them.
"""

from __future__ import annotations

import struct
from pathlib import Path

PACKAGE = "specwan.v1"
SERVICE = "SpecLink"
METHOD = "Connect"
FULL_SERVICE = f"{PACKAGE}.{SERVICE}"
METHOD_PATH = f"/{FULL_SERVICE}/{METHOD}"
PROTO_FILE = Path(__file__).with_name("specwan.proto")

# field numbers and wire types of Frame
PAYLOAD_FIELD = 1  # bytes  -> wire type 2 (length-delimited)
T_SENT_FIELD = 2  # double -> wire type 1 (64-bit)
_PAYLOAD_TAG = bytes([PAYLOAD_FIELD << 3 | 2])
_T_SENT_TAG = bytes([T_SENT_FIELD << 3 | 1])
_DOUBLE = struct.Struct("<d")
_ZERO_DOUBLE = bytes(8)

# call metadata keys (gRPC metadata keys are lower case)
MD_PROTOCOL = "specwan-protocol"
MD_VOCAB = "specwan-vocab"
MD_SYSTEM = "specwan-system"
MD_DEVICE = "specwan-device"
MD_MODEL = "specwan-model"


class FrameError(ValueError):
    """Bytes that are not a valid Frame."""


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _read_varint(data: bytes, i: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        if i >= len(data):
            raise FrameError("truncated varint")
        b = data[i]
        i += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, i
        shift += 7
        if shift > 63:
            raise FrameError("varint too long")


def encode_frame(payload: bytes, t_sent: float) -> bytes:
    """The wire bytes of ``Frame(payload=payload, t_sent=t_sent)``.

    Fields holding their proto3 default (empty payload, 0.0) are omitted, as protoc's
    encoders do, so the bytes equal a generated encoder's byte for byte.
    """
    parts = []
    if payload:
        parts += [_PAYLOAD_TAG, _varint(len(payload)), payload]
    packed = _DOUBLE.pack(t_sent)
    if packed != _ZERO_DOUBLE:  # a bitwise test, as protobuf's: -0.0 is written
        parts += [_T_SENT_TAG, packed]
    return b"".join(parts)


def decode_frame(data: bytes) -> tuple[bytes, float]:
    """``(payload, t_sent)`` of a Frame's wire bytes; unknown fields are skipped."""
    data = bytes(data)
    payload, t_sent, i, n = b"", 0.0, 0, len(data)
    while i < n:
        key, i = _read_varint(data, i)
        field, wire = key >> 3, key & 7
        if wire == 2:
            length, i = _read_varint(data, i)
            if i + length > n:
                raise FrameError("truncated length-delimited field")
            value, i = data[i : i + length], i + length
            if field == PAYLOAD_FIELD:
                payload = value
        elif wire == 1:
            if i + 8 > n:
                raise FrameError("truncated 64-bit field")
            if field == T_SENT_FIELD:
                (t_sent,) = _DOUBLE.unpack_from(data, i)
            i += 8
        elif wire == 0:
            _, i = _read_varint(data, i)
        elif wire == 5:
            if i + 4 > n:
                raise FrameError("truncated 32-bit field")
            i += 4
        else:
            raise FrameError(f"unsupported wire type {wire} (field {field})")
    return payload, t_sent

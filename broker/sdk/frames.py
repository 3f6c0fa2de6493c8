"""The frames a replica's agent and the broker's relay exchange over their WebSocket
(broker.services.relay): a 4-byte big-endian header length, a JSON header, bytes."""

from __future__ import annotations

import json
import struct
from typing import Any

_HEAD = struct.Struct(">I")
MAX_HEADER = 64 * 1024
CHUNK = 1024 * 1024  # a large answer goes up in chunks of this many bytes


def pack(header: dict[str, Any], body: bytes | memoryview = b"") -> bytes:
    head = json.dumps(header, separators=(",", ":")).encode()
    return b"".join((_HEAD.pack(len(head)), head, body))


def unpack(frame: bytes) -> tuple[dict[str, Any], memoryview]:
    """A frame's header and body; ValueError for one that is not a frame."""
    if len(frame) < _HEAD.size:
        raise ValueError("a frame shorter than its header length")
    (size,) = _HEAD.unpack_from(frame)
    if size > MAX_HEADER or _HEAD.size + size > len(frame):
        raise ValueError("a frame's header runs past its end")
    header = json.loads(frame[_HEAD.size : _HEAD.size + size])
    if not isinstance(header, dict):
        raise ValueError("a frame's header is not an object")
    return header, memoryview(frame)[_HEAD.size + size :]

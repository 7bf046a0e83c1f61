"""Protobuf bytes written by hand, for tests that send what no generated client would."""

from __future__ import annotations


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def delimited(number: int, payload: bytes) -> bytes:
    """A length-delimited field (string, bytes, message) on the wire."""
    return varint(number << 3 | 2) + varint(len(payload)) + payload

"""A few lines of the PostgreSQL wire protocol (3.0, SCRAM-SHA-256 only): the startup probe.

Not a driver: EmbeddedPostgres.start() must work from sync code, from inside a running event loop,
and before the service has imported anything. It connects, authenticates, runs a simple query or
two (CREATE DATABASE) and hangs up. Also the SCRAM verifier that sets the superuser's password,
computed here so that the plain password never reaches the server.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import socket
import struct
from collections.abc import Sequence
from typing import Any

from inventory_svc.embedded.errors import EmbeddedServerError

_SCRAM_ITERATIONS = 4096  # Postgres' default scram_iterations


class _PgError(Exception):
    """An ErrorResponse from the server."""

    def __init__(self, payload: bytes) -> None:
        fields = {
            item[:1].decode(): item[1:].decode("utf-8", "replace")
            for item in payload.split(b"\0")
            if item
        }
        self.sqlstate = fields.get("C", "")
        super().__init__(f"{fields.get('S', 'ERROR')} {self.sqlstate}: {fields.get('M', '')}")


def _pg_message(reader: Any) -> tuple[bytes, bytes]:
    header = reader.read(5)
    if len(header) < 5:
        raise ConnectionResetError("server closed the connection")
    (length,) = struct.unpack("!i", header[1:])
    return header[:1], reader.read(length - 4)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _hmac256(key: bytes, message: bytes) -> bytes:
    return hmac.new(key, message, hashlib.sha256).digest()


def _scram_salted(password: str, salt: bytes, iterations: int) -> bytes:
    # SASLprep of the password is the identity for the ASCII passwords _PASSWORD_RE admits.
    return hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)


def _scram_verifier(password: str) -> str:
    """A SCRAM-SHA-256 verifier (what Postgres stores in pg_authid) for password.

    Computed here so that the plain password never reaches the server, its logs or its stdin.
    """
    salt = os.urandom(16)
    salted = _scram_salted(password, salt, _SCRAM_ITERATIONS)
    stored_key = hashlib.sha256(_hmac256(salted, b"Client Key")).digest()
    server_key = _hmac256(salted, b"Server Key")
    return (
        f"SCRAM-SHA-256${_SCRAM_ITERATIONS}:{_b64(salt)}${_b64(stored_key)}:{_b64(server_key)}"
    )


def _pg_send(sock: socket.socket, kind: bytes, body: bytes) -> None:
    sock.sendall(kind + struct.pack("!i", len(body) + 4) + body)


def _pg_scram(sock: socket.socket, reader: Any, password: str) -> None:
    """The client side of SCRAM-SHA-256 (RFC 5802/7677, no channel binding), as libpq does it."""
    nonce = _b64(os.urandom(18))
    first_bare = f"n=,r={nonce}"  # Postgres takes the user name from the startup packet
    first = ("n,," + first_bare).encode()
    _pg_send(sock, b"p", b"SCRAM-SHA-256\0" + struct.pack("!i", len(first)) + first)
    kind, payload = _pg_message(reader)
    if kind == b"E":
        raise _PgError(payload)
    if kind != b"R" or struct.unpack("!i", payload[:4])[0] != 11:  # AuthenticationSASLContinue
        raise EmbeddedServerError("postgres broke off the SCRAM exchange")
    server_first = payload[4:].decode()
    attrs = dict(item.split("=", 1) for item in server_first.split(","))
    if not attrs.get("r", "").startswith(nonce):
        raise EmbeddedServerError("postgres answered SCRAM with a foreign nonce")
    salted = _scram_salted(password, base64.b64decode(attrs["s"]), int(attrs["i"]))
    client_key = _hmac256(salted, b"Client Key")
    without_proof = f"c=biws,r={attrs['r']}"
    auth_message = f"{first_bare},{server_first},{without_proof}".encode()
    signature = _hmac256(hashlib.sha256(client_key).digest(), auth_message)
    proof = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
    _pg_send(sock, b"p", f"{without_proof},p={_b64(proof)}".encode())
    kind, payload = _pg_message(reader)
    if kind == b"E":
        raise _PgError(payload)  # 28P01 invalid_password
    if kind != b"R" or struct.unpack("!i", payload[:4])[0] != 12:  # AuthenticationSASLFinal
        raise EmbeddedServerError("postgres broke off the SCRAM exchange")
    expected = "v=" + _b64(_hmac256(_hmac256(salted, b"Server Key"), auth_message))
    if not hmac.compare_digest(payload[4:].decode(), expected):
        raise EmbeddedServerError("postgres failed to prove it knows the password (SCRAM)")


def _pg_authenticate(sock: socket.socket, reader: Any, password: str) -> None:
    while True:
        kind, payload = _pg_message(reader)
        if kind == b"E":
            raise _PgError(payload)
        if kind != b"R":
            continue  # e.g. NegotiateProtocolVersion
        code = struct.unpack("!i", payload[:4])[0]
        if code == 0:  # AuthenticationOk
            return
        if code == 10 and b"SCRAM-SHA-256" in payload[4:].split(b"\0"):  # AuthenticationSASL
            _pg_scram(sock, reader, password)
            continue
        raise EmbeddedServerError(
            f"postgres asked for authentication method {code}; the embedded server uses "
            "scram-sha-256 only"
        )


def _pg_read_until_ready(reader: Any) -> None:
    error: _PgError | None = None
    while True:
        try:
            kind, payload = _pg_message(reader)
        except ConnectionResetError:
            if error is not None:
                raise error from None
            raise
        if kind == b"E":
            error = _PgError(payload)
        elif kind == b"Z":
            if error is not None:
                raise error
            return


def _pg_session(
    port: int,
    user: str,
    password: str,
    database: str,
    statements: Sequence[str],
    timeout: float,
) -> None:
    """Connect over TCP (protocol 3.0, SCRAM), run simple-query statements, disconnect.

    A few lines of protocol instead of a driver: start() must work from sync code, from inside a
    running event loop, and before the service has imported anything.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        body = struct.pack("!i", 196608) + b"".join(
            key + b"\0" + value.encode() + b"\0"
            for key, value in ((b"user", user), (b"database", database))
        )
        body += b"\0"
        sock.sendall(struct.pack("!i", len(body) + 4) + body)
        with sock.makefile("rb") as reader:
            _pg_authenticate(sock, reader, password)
            _pg_read_until_ready(reader)
            for statement in statements:
                _pg_send(sock, b"Q", statement.encode() + b"\0")
                _pg_read_until_ready(reader)
            _pg_send(sock, b"X", b"")


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


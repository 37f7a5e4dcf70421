"""A minimal websocket client (RFC 6455) on the standard library.

ComfyUI reports progress over a websocket; this keeps the queue command free of
dependencies, so it runs with any Python 3.10+ (ComfyUI's, or a bare one on another machine).
Only what a client needs: the handshake, masked text frames out, and text, binary, ping and
close frames in (fragmented messages are reassembled).
"""
from __future__ import annotations

import base64
import hashlib
import os
import socket
import ssl
import struct
import urllib.parse

HANDSHAKE_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
TEXT, BINARY, CLOSE, PING, PONG, CONTINUATION = 0x1, 0x2, 0x8, 0x9, 0xA, 0x0


class ConnectionClosed(ConnectionError):
    """The server closed the websocket, or the connection dropped."""


class WebSocket:
    def __init__(self, sock: socket.socket, pending: bytes = b""):
        self.sock = sock
        self._buffer = bytearray(pending)

    @classmethod
    def connect(cls, url: str, timeout: float = 10.0) -> "WebSocket":
        """Open ``ws://`` or ``wss://host:port/path?query``; raises OSError when the server cannot be reached."""
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("ws", "wss"):
            raise ValueError(f"only ws:// and wss:// URLs are supported, not {url!r}")
        port = parts.port or (443 if parts.scheme == "wss" else 80)
        sock = socket.create_connection((parts.hostname, port), timeout=timeout)
        try:
            if parts.scheme == "wss":
                sock = ssl.create_default_context().wrap_socket(sock, server_hostname=parts.hostname)
            key = base64.b64encode(os.urandom(16)).decode()
            target = parts.path or "/"
            if parts.query:
                target += "?" + parts.query
            request = (f"GET {target} HTTP/1.1\r\nHost: {parts.hostname}:{port}\r\nUpgrade: websocket\r\n"
                       f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n")
            sock.sendall(request.encode())
            response = bytearray()
            while b"\r\n\r\n" not in response:
                chunk = sock.recv(4096)
                if not chunk:
                    raise ConnectionClosed("the server closed the connection during the websocket handshake")
                response += chunk
            head, _, pending = bytes(response).partition(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            if " 101 " not in lines[0] + " ":
                raise ConnectionError(f"websocket handshake refused: {lines[0]}")
            headers = {name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in lines[1:])}
            expected = base64.b64encode(hashlib.sha1((key + HANDSHAKE_GUID).encode()).digest()).decode()
            if headers.get("sec-websocket-accept") != expected:
                raise ConnectionError("websocket handshake answered with a wrong Sec-WebSocket-Accept")
        except BaseException:
            sock.close()
            raise
        return cls(sock, pending)

    def settimeout(self, seconds: float | None) -> None:
        self.sock.settimeout(seconds)

    def send_text(self, text: str) -> None:
        self._send_frame(TEXT, text.encode())

    def receive(self) -> str | bytes:
        """The next whole message: str for text, bytes for binary. Answers pings itself.

        Raises ConnectionClosed when the server closes or the connection drops, and
        socket.timeout (TimeoutError) when nothing arrives within the socket's timeout.
        """
        opcode, message = None, bytearray()
        while True:
            fin, frame_opcode, payload = self._read_frame()
            if frame_opcode == PING:
                self._send_frame(PONG, payload)
            elif frame_opcode == PONG:
                continue
            elif frame_opcode == CLOSE:
                code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None
                self.close()
                raise ConnectionClosed(f"the server closed the websocket (code {code})")
            else:
                if frame_opcode != CONTINUATION:
                    opcode, message = frame_opcode, bytearray()
                message += payload
                if fin:
                    return message.decode() if opcode == TEXT else bytes(message)

    def close(self) -> None:
        try:
            self._send_frame(CLOSE, struct.pack("!H", 1000))
        except OSError:
            pass
        self.sock.close()

    def _send_frame(self, opcode: int, payload: bytes) -> None:
        header = bytearray([0x80 | opcode])
        length = len(payload)
        if length < 126:
            header.append(0x80 | length)
        elif length < 1 << 16:
            header += bytes([0x80 | 126]) + struct.pack("!H", length)
        else:
            header += bytes([0x80 | 127]) + struct.pack("!Q", length)
        mask = os.urandom(4)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.sock.sendall(bytes(header) + mask + masked)

    def _read_frame(self) -> tuple[bool, int, bytes]:
        first, second = self._read_exact(2)
        length = second & 0x7F
        if length == 126:
            length = struct.unpack("!H", self._read_exact(2))[0]
        elif length == 127:
            length = struct.unpack("!Q", self._read_exact(8))[0]
        mask = self._read_exact(4) if second & 0x80 else None
        payload = self._read_exact(length)
        if mask:
            payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        return bool(first & 0x80), first & 0x0F, payload

    def _read_exact(self, count: int) -> bytes:
        while len(self._buffer) < count:
            try:
                chunk = self.sock.recv(max(65536, count - len(self._buffer)))
            except (ConnectionResetError, BrokenPipeError) as error:
                raise ConnectionClosed(f"the connection dropped ({error})") from None
            if not chunk:
                raise ConnectionClosed("the connection dropped (the server went away)")
            self._buffer += chunk
        data = bytes(self._buffer[:count])
        del self._buffer[:count]
        return data

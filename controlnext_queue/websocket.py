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
        # a fragmented message being reassembled: kept across receive() calls that time out
        self._message_opcode: int | None = None
        self._message = bytearray()

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
        socket.timeout (TimeoutError) when nothing arrives within the socket's timeout; a frame or
        message cut by a timeout stays buffered, and the next call goes on from where it was.
        """
        while True:
            frame = self._take_frame()
            if frame is None:
                self._receive_more()
                continue
            fin, opcode, payload = frame
            if opcode == PING:
                self._send_frame(PONG, payload)
            elif opcode == PONG:
                continue
            elif opcode == CLOSE:
                code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None
                self.close()
                raise ConnectionClosed(f"the server closed the websocket (code {code})")
            else:
                if opcode != CONTINUATION:
                    self._message_opcode, self._message = opcode, bytearray()
                self._message += payload
                if fin:
                    message, self._message = self._message, bytearray()
                    return message.decode() if self._message_opcode == TEXT else bytes(message)

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

    def _take_frame(self) -> tuple[bool, int, bytes] | None:
        """(fin, opcode, payload) of the first frame in the buffer, removed from it; None while
        the frame has not fully arrived (then nothing is removed)."""
        buffer = self._buffer
        if len(buffer) < 2:
            return None
        first, second = buffer[0], buffer[1]
        length, start = second & 0x7F, 2
        if length == 126:
            if len(buffer) < 4:
                return None
            length, start = struct.unpack_from("!H", buffer, 2)[0], 4
        elif length == 127:
            if len(buffer) < 10:
                return None
            length, start = struct.unpack_from("!Q", buffer, 2)[0], 10
        mask_length = 4 if second & 0x80 else 0
        end = start + mask_length + length
        if len(buffer) < end:
            return None
        mask = bytes(buffer[start:start + mask_length])
        payload = bytes(buffer[start + mask_length:end])
        del buffer[:end]
        if mask:
            payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        return bool(first & 0x80), first & 0x0F, payload

    def _receive_more(self) -> None:
        try:
            chunk = self.sock.recv(65536)
        except (ConnectionResetError, BrokenPipeError) as error:
            raise ConnectionClosed(f"the connection dropped ({error})") from None
        if not chunk:
            raise ConnectionClosed("the connection dropped (the server went away)")
        self._buffer += chunk

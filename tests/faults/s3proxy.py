"""An unreliable S3: a TCP proxy on loopback (threads and sockets) in front of the real S3 test server.

Each HTTP request it receives is read whole (headers and body, Content-Length or chunked; an
`Expect: 100-continue` is answered by the proxy) and then, drawn by a seeded RNG with probability
`rate`, met with one fault:
    500         an S3 `InternalError` answer; the request never reaches the server
    503         an S3 `SlowDown` answer; the request never reaches the server
    reset       the connection reset (RST) before the request is forwarded
    reset-late  the request forwarded and done by the server, then the connection reset: no answer
    truncated   the server's answer cut after its headers and half its body, then a reset
    stall       the server's answer held back `stall_s` seconds, then delivered whole
Request number `always` (the second, by default) gets a fault whatever the draw, so that every use of the
proxy injects at least one. Otherwise the request goes to the server on a connection of its own and the
answer comes back with `Connection: close`. `injected` counts the faults by kind; `requests` counts every request seen.
"""

from __future__ import annotations

import random
import socket
import struct
import threading
import time
from collections import Counter

KINDS = ("500", "503", "reset", "reset-late", "truncated", "stall")

_ERRORS = {
    "500": (b"500 Internal Server Error", b"InternalError", b"We encountered an internal error. Please try again."),
    "503": (b"503 Slow Down", b"SlowDown", b"Please reduce your request rate."),
}


def _read_until(sock: socket.socket, buf: bytearray, marker: bytes) -> int:
    while (at := buf.find(marker)) < 0:
        data = sock.recv(65536)
        if not data:
            raise ConnectionError("closed")
        buf += data
    return at


def _read_exact(sock: socket.socket, buf: bytearray, n: int) -> None:
    while len(buf) < n:
        data = sock.recv(65536)
        if not data:
            raise ConnectionError("closed")
        buf += data


def read_request(sock: socket.socket, buf: bytearray) -> tuple[bytes, dict[str, str], bytes] | None:
    """One request from `sock` (`buf` holds bytes already read): (head without the final CRLF, headers, body)."""
    try:
        end = _read_until(sock, buf, b"\r\n\r\n")
    except ConnectionError:
        return None
    head = bytes(buf[:end])
    del buf[: end + 4]
    headers = {}
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower().decode()] = value.strip().decode()
    if headers.get("expect", "").lower() == "100-continue":
        sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
    body = bytearray()
    if "content-length" in headers:
        n = int(headers["content-length"])
        _read_exact(sock, buf, n)
        body += buf[:n]
        del buf[:n]
    elif "chunked" in headers.get("transfer-encoding", "").lower():
        while True:
            at = _read_until(sock, buf, b"\r\n")
            size = int(bytes(buf[:at]).split(b";")[0], 16)
            body += buf[: at + 2]
            del buf[: at + 2]
            if size == 0:  # trailers, then an empty line
                while True:
                    at = _read_until(sock, buf, b"\r\n")
                    body += buf[: at + 2]
                    line = bytes(buf[:at])
                    del buf[: at + 2]
                    if not line:
                        break
                break
            _read_exact(sock, buf, size + 2)
            body += buf[: size + 2]
            del buf[: size + 2]
    return head, headers, bytes(body)


def _reset(sock: socket.socket) -> None:
    """Close with a TCP RST (linger 0), as a crashed peer or a middlebox does."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    finally:
        sock.close()


def _with_connection_close(head: bytes) -> bytes:
    lines = [line for line in head.split(b"\r\n") if not line.lower().startswith((b"connection:", b"expect:"))]
    return b"\r\n".join(lines + [b"Connection: close"])


class FlakyS3Proxy:
    def __init__(
        self,
        upstream: str,
        rate: float,
        seed: int,
        kinds=KINDS,
        stall_s: tuple[float, float] = (0.2, 1.0),
        always: int = 2,
    ):
        host, _, port = upstream.removeprefix("http://").rstrip("/").partition(":")
        self.upstream = (host, int(port))
        self.rate, self.kinds, self.stall_s, self.always = rate, tuple(kinds), stall_s, always
        self.rng = random.Random(seed)
        self.injected: Counter[str] = Counter()
        self.requests = 0
        self.faulted_paths: list[str] = []
        self._lock = threading.Lock()
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def __enter__(self) -> FlakyS3Proxy:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._closed = True
        try:
            self._listener.close()
        except OSError:
            pass

    @property
    def total(self) -> int:
        return sum(self.injected.values())

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _draw(self, path: str) -> str | None:
        with self._lock:
            self.requests += 1
            if self.rng.random() >= self.rate and self.requests != self.always:
                return None
            kind = self.rng.choice(self.kinds)
            self.injected[kind] += 1
            self.faulted_paths.append(f"{kind} {path}")
            return kind

    def _serve(self, client: socket.socket) -> None:
        client.settimeout(60)
        buf = bytearray()
        try:
            request = read_request(client, buf)
            if request is None:
                client.close()
                return
            head, headers, body = request
            path = head.split(b" ")[1].decode(errors="replace") if b" " in head else "?"
            kind = self._draw(path)
            if kind in _ERRORS:
                status, code, message = _ERRORS[kind]
                xml = (
                    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>'
                    + code
                    + b"</Code><Message>"
                    + message
                    + b"</Message><RequestId>faults</RequestId></Error>"
                )
                client.sendall(
                    b"HTTP/1.1 "
                    + status
                    + b"\r\nContent-Type: application/xml\r\nContent-Length: "
                    + str(len(xml)).encode()
                    + b"\r\nConnection: close\r\n\r\n"
                    + xml
                )
                client.close()
                return
            if kind == "reset":
                _reset(client)
                return
            answer = self._forward(_with_connection_close(head) + b"\r\n\r\n" + body)
            if kind == "reset-late":
                _reset(client)
                return
            end = answer.find(b"\r\n\r\n")
            answer_head, answer_body = (answer[:end], answer[end + 4 :]) if end >= 0 else (answer, b"")
            answer = _with_connection_close(answer_head) + b"\r\n\r\n" + answer_body
            end = answer.find(b"\r\n\r\n")
            if kind == "truncated":  # half the body; an answer without one is cut inside its headers
                client.sendall(answer[: end + 4 + len(answer_body) // 2] if answer_body else answer[: end // 2])
                _reset(client)
                return
            if kind == "stall":
                time.sleep(self.rng.uniform(*self.stall_s))
            client.sendall(answer)
            client.close()
        except OSError:
            try:
                client.close()
            except OSError:
                pass

    def _forward(self, request: bytes) -> bytes:
        with socket.create_connection(self.upstream, timeout=60) as up:
            up.sendall(request)
            chunks = []
            while data := up.recv(65536):
                chunks.append(data)
        return b"".join(chunks)

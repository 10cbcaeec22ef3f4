"""A TCP proxy on 127.0.0.1 whose faults a test switches on and off: real connection failures between a client
(s3fs, botocore) and a server (moto), with nothing mocked.

    with FaultyProxy(upstream_port, mode="reset") as proxy:
        ...  # connections to proxy.endpoint are reset
        proxy.mode = "forward"
        ...  # now they reach the server

Modes, applied to each new connection:
  forward   bytes pass both ways
  refuse    the connection is closed at once, nothing answered (the client sees it closed before any response)
  reset     the connection is aborted with a TCP reset (SO_LINGER 0): the client gets ECONNRESET
  stall     the connection is accepted and its request read, and nothing is ever answered (held until the
            idle limit or `stop()`): an endpoint that hangs

`fault_if(request_head) -> bool` limits faults to the connections whose first HTTP request head matches (the
proxy then reads that head first); the others are forwarded. Connections already forwarded stay forwarded
(HTTP keep-alive), as they would through a real network fault that only hits new connections.

Everything is bounded: socket timeouts, an idle limit per connection, and `stop()` joins its threads.
"""

from __future__ import annotations

import select
import socket
import socketserver
import struct
import threading
from collections import Counter
from collections.abc import Callable

MODES = ("forward", "refuse", "reset", "stall")
_IDLE_SECONDS = 30.0
_HEAD_LIMIT = 64 * 1024


class FaultyProxy:
    def __init__(self, upstream_port: int, mode: str = "forward", *,
                 fault_if: Callable[[bytes], bool] | None = None, upstream_host: str = "127.0.0.1"):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}")
        self.upstream = (upstream_host, upstream_port)
        self.mode = mode
        self.fault_if = fault_if
        self.seen: Counter[str] = Counter()  # what was done to each connection, by mode
        self._lock = threading.Lock()
        self._stopped = threading.Event()   # releases stalled connections
        proxy = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                proxy._handle(self.request)

        self._server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler, bind_and_activate=True)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1},
                                        daemon=True)

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> FaultyProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopped.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> FaultyProxy:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _handle(self, client: socket.socket) -> None:
        client.settimeout(5)
        head = b""
        mode = self.mode
        if self.fault_if is not None and mode != "forward":
            head = _read_head(client)
            if not self.fault_if(head):
                mode = "forward"
        with self._lock:
            self.seen[mode] += 1
        if mode == "refuse":
            client.close()
        elif mode == "reset":
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            client.close()
        elif mode == "stall":
            with client:
                self._stopped.wait(_IDLE_SECONDS)
        else:
            self._forward(client, head)

    def _forward(self, client: socket.socket, head: bytes) -> None:
        try:
            upstream = socket.create_connection(self.upstream, timeout=5)
        except OSError:
            client.close()
            return
        with client, upstream:
            if head:
                upstream.sendall(head)
            sockets = [client, upstream]
            while True:
                readable, _, _ = select.select(sockets, [], [], _IDLE_SECONDS)
                if not readable:
                    return  # idle too long
                for source in readable:
                    try:
                        data = source.recv(65536)
                    except OSError:
                        return
                    if not data:
                        return
                    (upstream if source is client else client).sendall(data)


def _read_head(client: socket.socket) -> bytes:
    """The first request's head (up to the blank line), or what arrived before the timeout / limit."""
    data = b""
    try:
        while b"\r\n\r\n" not in data and len(data) < _HEAD_LIMIT:
            chunk = client.recv(4096)
            if not chunk:
                break
            data += chunk
    except OSError:
        pass
    return data

"""A slow network hop: a real TCP proxy in front of a broker whose client-to-broker direction
carries at most ``bytes_per_s``, with small socket buffers so that the sender's writes back
up as they would on a slow radio link (with the kernel's default buffers a local sender would
never notice). The broker-to-client direction is a plain copy."""

from __future__ import annotations

import socket
import threading
import time

PACE_BYTES = 256  # read and forward this much at a time, then wait its share of a second
SEGMENT_BYTES = 536  # the TCP segment size the proxy asks its clients to use


class SlowLink:
    def __init__(self, target_host: str, target_port: int, *, bytes_per_s: int,
                 buffer_bytes: int = 4096) -> None:
        self.target = (target_host, target_port)
        self.bytes_per_s = bytes_per_s
        self.buffer_bytes = buffer_bytes
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # Set before listen(): accepted sockets inherit them. The receive buffer bounds the
        # window offered; a small segment size keeps the sender's send buffer small too
        # (Linux sizes it from the congestion window in segments, and loopback's are 64 KiB).
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buffer_bytes)
        self._listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, SEGMENT_BYTES)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(8)
        self.host, self.port = self._listener.getsockname()
        self._sockets: list[socket.socket] = []
        self._closed = threading.Event()

    def start(self) -> SlowLink:
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def close(self) -> None:
        self._closed.set()
        self._listener.close()
        for sock in self._sockets:
            try:
                sock.close()
            except OSError:
                pass

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._sockets += [client, upstream]
            threading.Thread(target=self._pace, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self._copy, args=(upstream, client), daemon=True).start()

    def _pace(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(PACE_BYTES):
                sink.sendall(data)
                time.sleep(len(data) / self.bytes_per_s)
        except OSError:
            pass
        self._shut(source, sink)

    def _copy(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        self._shut(source, sink)

    @staticmethod
    def _shut(*sockets: socket.socket) -> None:
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

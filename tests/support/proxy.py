"""A TCP proxy a test can cut: every connection dies, and new ones are refused, until restored."""

from __future__ import annotations

import contextlib
import socket
import threading

from tests.support.servers import free_port


class Proxy:
    """Forwards ``127.0.0.1:port`` to ``upstream_port`` while up."""

    def __init__(self, upstream_port: int) -> None:
        self.port = free_port()
        self._upstream = upstream_port
        self._up = threading.Event()
        self._up.set()
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._closed = False
        self.refused = 0  # connections turned away while down
        threading.Thread(target=self._accept, daemon=True).start()

    def down(self) -> None:
        """Cut every open connection; refuse new ones until :meth:`up`."""
        with self._lock:
            self._up.clear()
            for s in self._sockets:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()
            self._sockets.clear()

    def up(self) -> None:
        self._up.set()

    def close(self) -> None:
        self._closed = True
        self.down()
        self._listener.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if not self._up.is_set():
                self.refused += 1
                client.close()
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self._upstream), timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                if not self._up.is_set():  # cut while we connected: down() missed these
                    self.refused += 1
                    client.close()
                    upstream.close()
                    continue
                self._sockets |= {client, upstream}
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            with contextlib.suppress(OSError):  # either side closed: the pipe ends
                while data := src.recv(65536):
                    dst.sendall(data)
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

"""The two ways a body is read: straight from the socket (HTTP/1.1 with a Content-Length,
what the range server sends) and through httpx's chunks (anything else, here a real
server that answers with chunked transfer encoding)."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from agent.errors import ChecksumError, FetchError
from agent.fetch.downloader import Downloader, sha256_of
from tests.fetch.payload import served_file, write_payload

MiB = 1 << 20
SERVER_CHUNK = 65536  # the range server writes the body in pieces of this size


def test_stall_in_the_middle_of_a_body_times_out_and_resumes(tmp_path, range_server, fast_fetch):
    payload = write_payload(tmp_path, "model.gguf", 2 * MiB)
    url = served_file(range_server, payload)
    # One piece, then a 2 s pause: longer than the 0.5 s read timeout.
    range_server.faults.rate_bps = SERVER_CHUNK / 2.0
    fast_fetch.retries = 0
    dest = tmp_path / "out.gguf"

    with pytest.raises(FetchError) as caught:
        Downloader(fast_fetch).download([url], dest, size=payload.size, sha256=payload.sha256)

    assert "ReadTimeout" in caught.value.message
    assert (tmp_path / "out.gguf.part").stat().st_size == SERVER_CHUNK

    range_server.faults.rate_bps = None
    Downloader(fast_fetch).download([url], dest, size=payload.size, sha256=payload.sha256)
    assert sha256_of(dest) == payload.sha256
    assert range_server.served.ranges[-1] == f"bytes={SERVER_CHUNK}-"


class ChunkedServer:
    """Serves one file with ``Transfer-Encoding: chunked`` and no Content-Length, plus
    ``extra`` bytes after it, ignoring Range: a body whose length nobody states."""

    def __init__(self, path: Path, extra: bytes = b"") -> None:
        body = path.read_bytes() + extra

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                for start in range(0, len(body), 100_000):
                    piece = body[start : start + 100_000]
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                self.wfile.write(b"0\r\n\r\n")

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/{path.name}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def chunked_server(tmp_path: Path):
    servers: list[ChunkedServer] = []

    def start(path: Path, extra: bytes = b"") -> ChunkedServer:
        servers.append(ChunkedServer(path, extra))
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


def test_chunked_body_without_a_length_is_verified(tmp_path, chunked_server, fast_fetch):
    payload = write_payload(tmp_path, "model.gguf", 3 * MiB + 5)
    server = chunked_server(payload.path)

    path = Downloader(fast_fetch).download([server.url], tmp_path / "out.gguf",
                                           size=payload.size, sha256=payload.sha256)

    assert sha256_of(path) == payload.sha256


def test_chunked_body_longer_than_the_manifest_is_a_mismatch(tmp_path, chunked_server, fast_fetch):
    payload = write_payload(tmp_path, "model.gguf", MiB)
    server = chunked_server(payload.path, extra=b"trailing garbage")

    with pytest.raises(ChecksumError) as caught:
        Downloader(fast_fetch).download([server.url], tmp_path / "out.gguf",
                                        size=payload.size, sha256=payload.sha256)

    assert "sent more than the manifest's" in caught.value.message
    assert not (tmp_path / "out.gguf.part").exists()

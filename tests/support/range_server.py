"""A real threaded HTTP file server with Range/If-Range/ETag, and fault injection.

Faults are set per test on ``server.faults`` and apply to every GET:
``drop_after`` (close the connection after that many body bytes, once per entry of a
list), ``ignore_range`` (answer 200 with the whole file), ``stall_s`` (sleep before the
body), ``corrupt_at`` (flip one byte at that file offset), ``status`` (answer this code),
``send_etag`` (False: only Last-Modified validates If-Range), ``rate_bps`` (pace the
body so a test can act mid-download), ``hold`` (an Event: each body waits until it is set, so
a test knows a client is mid-request for as long as it needs), ``linked`` (send Hugging Face's
``X-Linked-Size`` and ``X-Linked-Etag: "<sha256>"`` of an LFS file), ``resolve_redirect`` (answer
``/resolve/<name>`` with a 302 to ``/<name>`` that alone carries the X-Linked headers, as
Hugging Face's resolve URLs redirect to its CDN), ``redirect_to`` (answer every GET with a 302
to this Location; ``{path}`` in it is the request's own path, which makes a loop). Counters show what was served; ``body_bytes`` counts only bytes the client
took. ``served.responses`` has one entry per body sent, written when its handler is done (wait
with ``wait_for_responses``): the range it started at, the bytes written, and whether the whole
body went out or the client hung up first.
"""

from __future__ import annotations

import email.utils
import hashlib
import os
import re
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


@dataclass
class Faults:
    drop_after: list[int] = field(default_factory=list)
    ignore_range: bool = False
    stall_s: float = 0.0
    corrupt_at: int | None = None
    status: int | None = None
    send_etag: bool = True
    rate_bps: float | None = None  # pace the body, so a test can act mid-download
    hold: threading.Event | None = None  # bodies wait until it is set
    linked: bool = False  # X-Linked-Size / X-Linked-Etag (sha256), as a Hugging Face resolve URL
    resolve_redirect: bool = False  # /resolve/<name>: 302 to /<name>, X-Linked-* on the 302 only
    redirect_to: str | None = None  # every GET: 302 to this ("{path}": the request's path)


@dataclass
class Response:
    name: str
    status: int
    start: int
    sent: int  # body bytes written into the socket; a hung-up client ends it early
    complete: bool


@dataclass
class Served:
    requests: int = 0
    body_bytes: int = 0
    bytes_by_path: dict[str, int] = field(default_factory=dict)
    ranges: list[str] = field(default_factory=list)
    responses: list[Response] = field(default_factory=list)


class RangeServer:
    def __init__(self, root: Path) -> None:
        self.root = Path(os.path.abspath(root))
        self.faults = Faults()
        self.served = Served()
        self._lock = threading.Lock()
        self._responded = threading.Condition(self._lock)
        self._sha256: dict[tuple[Path, int, int], str] = {}
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_HEAD(self) -> None:
                self._serve(head=True)

            def do_GET(self) -> None:
                self._serve(head=False)

            def _serve(self, head: bool) -> None:
                faults = server.faults
                with server._lock:
                    server.served.requests += 1
                    server.served.ranges.append(self.headers.get("Range", ""))
                if faults.redirect_to is not None:
                    self.send_response(302)
                    self.send_header("Location", faults.redirect_to.replace("{path}", self.path))
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if faults.status:
                    self.send_response(faults.status)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                # Contained by name, not by where a link points: link_into exposes files on
                # another filesystem (a tmpfs TMPDIR, the ladder in $HOME) as symlinks.
                name = urllib.parse.unquote(self.path.lstrip("/").split("?")[0])
                redirect = faults.resolve_redirect and name.startswith("resolve/")
                if redirect:
                    name = name.removeprefix("resolve/")
                path = Path(os.path.normpath(server.root / name))
                if server.root not in path.parents or not path.is_file():
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if redirect:
                    self.send_response(302)
                    self.send_header("Location", f"/{name}")
                    self.send_header("X-Linked-Size", str(path.stat().st_size))
                    self.send_header("X-Linked-Etag", f'"{server.sha256_of(path)}"')
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                size = path.stat().st_size
                etag = '"' + hashlib.sha1(f"{path}:{size}:{path.stat().st_mtime_ns}".encode()).hexdigest() + '"'
                last_modified = email.utils.formatdate(path.stat().st_mtime, usegmt=True)
                validators = {last_modified, etag} if faults.send_etag else {last_modified}
                start, end = 0, size - 1
                status = 200
                range_header = self.headers.get("Range")
                if_range = self.headers.get("If-Range")
                match = re.fullmatch(r"bytes=(\d+)-(\d*)", range_header or "")
                if match and not faults.ignore_range and (if_range is None or if_range in validators):
                    start = int(match.group(1))
                    end = min(int(match.group(2)), size - 1) if match.group(2) else size - 1
                    if start >= size:
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{size}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    status = 206
                self.send_response(status)
                self.send_header("Content-Length", str(end - start + 1))
                if faults.send_etag:
                    self.send_header("ETag", etag)
                self.send_header("Last-Modified", last_modified)
                self.send_header("Accept-Ranges", "bytes")
                if faults.linked:
                    self.send_header("X-Linked-Size", str(size))
                    self.send_header("X-Linked-Etag", f'"{server.sha256_of(path)}"')
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
                self.end_headers()
                if head:
                    return
                if faults.stall_s:
                    time.sleep(faults.stall_s)
                if faults.hold is not None:
                    faults.hold.wait(60)
                drop = None
                with server._lock:
                    if faults.drop_after:
                        drop = faults.drop_after.pop(0)
                sent = 0
                complete = False
                with open(path, "rb") as f:
                    f.seek(start)
                    remaining = end - start + 1
                    while remaining > 0:
                        chunk = f.read(min(65536, remaining))
                        if faults.corrupt_at is not None:
                            offset = faults.corrupt_at - (start + sent)
                            if 0 <= offset < len(chunk):
                                chunk = chunk[:offset] + bytes([chunk[offset] ^ 0xFF]) + chunk[offset + 1:]
                        if drop is not None and sent + len(chunk) > drop:
                            chunk = chunk[: max(0, drop - sent)]
                            self._write(chunk)
                            sent += len(chunk)
                            self.close_connection = True
                            self.connection.shutdown(2)
                            break
                        if not self._write(chunk):
                            break  # the client went away: count only what was delivered
                        sent += len(chunk)
                        remaining -= len(chunk)
                        complete = remaining == 0
                        if faults.rate_bps:
                            time.sleep(len(chunk) / faults.rate_bps)
                with server._lock:
                    server.served.body_bytes += sent
                    by_path = server.served.bytes_by_path
                    by_path[path.name] = by_path.get(path.name, 0) + sent
                    server.served.responses.append(Response(path.name, status, start, sent, complete))
                    server._responded.notify_all()

            def _write(self, data: bytes) -> bool:
                try:
                    self.wfile.write(data)
                    return True
                except (BrokenPipeError, ConnectionResetError):
                    return False

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def sha256_of(self, path: Path) -> str:
        stat = path.stat()
        key = (path, stat.st_size, stat.st_mtime_ns)
        with self._lock:
            known = self._sha256.get(key)
        if known is None:
            digest = hashlib.sha256()
            with open(path, "rb") as f:
                while chunk := f.read(1 << 20):
                    digest.update(chunk)
            known = digest.hexdigest()
            with self._lock:
                self._sha256[key] = known
        return known

    def wait_for_responses(self, count: int, timeout: float = 30) -> list[Response]:
        """The first ``count`` responses, once their handlers are done writing."""
        with self._responded:
            if not self._responded.wait_for(lambda: len(self.served.responses) >= count, timeout):
                raise AssertionError(f"{len(self.served.responses)} of {count} responses finished")
            return list(self.served.responses[:count])

    def start(self) -> "RangeServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def link_into(root: Path, source: Path) -> Path:
    """Expose ``source`` in the server root without copying 100 MB model files."""
    target = root / source.name
    if not target.exists():
        os.link(source, target) if source.stat().st_dev == root.stat().st_dev else target.symlink_to(source)
    return target

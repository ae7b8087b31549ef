"""agent.fetch.http through the downloader: redirects, a real forward proxy from the
environment, and a transport passed in by the caller."""

from __future__ import annotations

import shutil
import threading
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from agent.errors import FetchError
from agent.fetch.downloader import Downloader, sha256_of
from agent.fetch.http import Connections, Response, Timeouts
from tests.fetch.payload import served_file, write_payload

MiB = 1 << 20


class ForwardProxy:
    """A real HTTP forward proxy: takes absolute-form GETs, fetches them with urllib (no
    proxy of its own) and streams the answer back with its status and headers."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str | None]] = []  # (target, Proxy-Authorization)
        proxy = self
        direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                proxy.requests.append((self.path, self.headers.get("Proxy-Authorization")))
                forwarded = {k: v for k, v in self.headers.items()
                             if k.lower() not in ("host", "proxy-authorization", "connection")}
                request = urllib.request.Request(self.path, headers=forwarded)
                try:
                    answer = direct.open(request)
                except urllib.error.HTTPError as error:
                    answer = error
                with answer:
                    self.send_response(answer.status)
                    for name, value in answer.headers.items():
                        if name.lower() not in ("connection", "transfer-encoding"):
                            self.send_header(name, value)
                    self.send_header("Connection", "close")
                    self.end_headers()
                    shutil.copyfileobj(answer, self.wfile)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://user:p%40ss@127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def forward_proxy():
    proxy = ForwardProxy()
    yield proxy
    proxy.stop()


def test_redirect_to_the_file_is_followed(tmp_path, range_server, fast_fetch):
    payload = write_payload(tmp_path, "model.gguf", MiB + 3)
    served_file(range_server, payload)
    range_server.faults.resolve_redirect = True  # /resolve/<name> answers 302 to /<name>

    path = Downloader(fast_fetch).download(
        [f"{range_server.url}/resolve/{payload.name}"], tmp_path / "out.gguf",
        size=payload.size, sha256=payload.sha256,
    )

    assert sha256_of(path) == payload.sha256
    assert range_server.served.requests == 2


@pytest.mark.parametrize("location", ["{path}", "file:///etc/passwd"], ids=["loop", "file"])
def test_a_hostile_redirect_rejects_the_mirror_and_the_next_one_serves(
    tmp_path, range_server, second_server, fast_fetch, location
):
    """A mirror that redirects to itself forever, or out of http(s) to a local file: a bounded
    number of requests, the mirror is named with why, and is not retried; the next mirror's
    bytes are what gets installed."""
    payload = write_payload(tmp_path, "model.gguf", MiB)
    good = served_file(second_server, payload)
    range_server.faults.redirect_to = location
    hostile = f"{range_server.url}/{payload.name}"

    events: list[dict] = []
    path = Downloader(fast_fetch).download([hostile, good], tmp_path / "out.gguf",
                                           size=payload.size, sha256=payload.sha256,
                                           on_progress=events.append)

    assert sha256_of(path) == payload.sha256
    assert events[-1]["mirror"] == good
    assert range_server.served.requests == (11 if location == "{path}" else 1)

    with pytest.raises(FetchError) as caught:
        Downloader(fast_fetch).download([hostile], tmp_path / "again.gguf", size=payload.size,
                                        sha256=payload.sha256)
    reason = "TooManyRedirects" if location == "{path}" else "not an http(s) URL"
    assert caught.value.code == "fetch_failed" and reason in caught.value.message
    assert not (tmp_path / "again.gguf").exists()


def test_http_proxy_from_the_environment_carries_the_download(
    tmp_path, range_server, forward_proxy, fast_fetch, monkeypatch
):
    payload = write_payload(tmp_path, "model.gguf", 2 * MiB)
    url = served_file(range_server, payload)
    monkeypatch.setenv("http_proxy", forward_proxy.url)
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)

    path = Downloader(fast_fetch).download([url], tmp_path / "out.gguf",
                                           size=payload.size, sha256=payload.sha256)

    assert sha256_of(path) == payload.sha256
    assert [target for target, _ in forward_proxy.requests] == [url]
    credentials = forward_proxy.requests[0][1]
    assert credentials == "Basic dXNlcjpwQHNz"  # base64 of "user:p@ss", unquoted from the URL


class ToServer:
    """A transport that sends every request to one server, whatever host the URL names:
    mirrors under a name no DNS knows still reach the range server."""

    def __init__(self, server_url: str, timeouts: Timeouts) -> None:
        self.server = urllib.parse.urlsplit(server_url).netloc
        self.connections = Connections(timeouts)
        self.sent: list[str] = []

    def send(self, method: str, url: str, headers: dict[str, str]) -> Response:
        self.sent.append(url)
        rerouted = urllib.parse.urlsplit(url)._replace(netloc=self.server)
        return self.connections.send(method, urllib.parse.urlunsplit(rerouted), headers)


def test_a_transport_passed_in_carries_every_request(tmp_path, range_server, fast_fetch):
    payload = write_payload(tmp_path, "model.gguf", MiB)
    served_file(range_server, payload)
    range_server.faults.drop_after = [MiB // 2]  # the resume goes through it too
    transport = ToServer(range_server.url, Timeouts(connect_s=1.0, read_s=1.0))
    url = f"http://models.invalid/{payload.name}"

    path = Downloader(fast_fetch, transport=transport).download(
        [url], tmp_path / "out.gguf", size=payload.size, sha256=payload.sha256)

    assert sha256_of(path) == payload.sha256
    assert transport.sent == [url, url]
    assert range_server.served.ranges[-1] == f"bytes={MiB // 2}-"

"""The one HTTP client of fetch/: GET with redirects, TLS and proxies from the environment,
and a body read straight into the caller's buffers.

Built on the standard library's ``http.client`` and its public API only. The body is read
with ``HTTPResponse.readinto1``: at most one socket read per call, into the caller's buffer,
so a read timeout loses nothing already received and a caller that reuses 1 MiB buffers
allocates nothing per chunk. http.client decodes chunked transfer encoding and stops at
Content-Length itself.

How a request reaches a server is a ``Transport`` (as in httpx): ``Connections`` is the real
one; a caller can pass another (to count requests, say, or reach a server another way).
Failures are this module's ``HttpError`` subclasses, translated from socket, ssl and
http.client errors here, so callers never see those.

This module must not retry, verify or write files: that is the downloader's job.
"""

from __future__ import annotations

import base64
import functools
import http.client
import os
import ssl
import urllib.parse
import urllib.request
from dataclasses import dataclass
from email.message import Message
from types import TracebackType
from typing import Protocol

import certifi

_REDIRECTS = {301, 302, 303, 307, 308}
_PORTS = {"http": 80, "https": 443}


class HttpError(Exception):
    """A request failed before or while its answer was read."""


class ConnectFailed(HttpError):
    """The server (or the proxy) could not be reached: refused, unresolvable, timed out,
    or its TLS handshake failed."""


class ReadFailed(HttpError):
    """The connection broke, stalled past the read timeout, or spoke broken HTTP."""


class UnsupportedURL(HttpError):
    """Not an http(s) URL, or a redirect loop: asking again cannot help."""


@dataclass(frozen=True)
class Timeouts:
    connect_s: float
    read_s: float  # the longest wait for any one socket read


class Response:
    """One answer: status and headers read, the body still on its own connection."""

    def __init__(self, url: str, connection: http.client.HTTPConnection,
                 answer: http.client.HTTPResponse) -> None:
        self.url = url
        self.status = answer.status
        self.headers: Message = answer.headers
        self._connection = connection
        self._answer = answer

    def readinto(self, buffer: memoryview) -> int:
        """Put the next body bytes at the start of ``buffer``; 0 once the body has ended."""
        try:
            return self._answer.readinto1(buffer)
        except TimeoutError as exc:
            raise ReadFailed("ReadTimeout: no data within the read timeout") from exc
        except (OSError, http.client.HTTPException) as exc:
            raise ReadFailed(_describe(exc)) from exc

    def close(self) -> None:
        self._connection.close()

    def __enter__(self) -> Response:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class Transport(Protocol):
    def send(self, method: str, url: str, headers: dict[str, str]) -> Response:
        """Send one request to ``url`` and return once the answer's headers are read."""


class Connections:
    """The real transport: a new http.client connection per request, closed with its
    response (a download is one long request; keep-alive would save nothing).
    ``http_proxy``/``https_proxy``/``no_proxy`` are honoured as urllib reads them."""

    def __init__(self, timeouts: Timeouts, ssl_context: ssl.SSLContext | None = None) -> None:
        self.timeouts = timeouts
        self.ssl_context = ssl_context or default_ssl_context()

    def send(self, method: str, url: str, headers: dict[str, str]) -> Response:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in _PORTS or not parts.hostname:
            raise UnsupportedURL(f"UnsupportedProtocol: {url!r} is not an http(s) URL")
        host, port = parts.hostname, parts.port or _PORTS[parts.scheme]
        proxy = _proxy_for(parts.scheme, host)
        connection = self._connect(parts.scheme, host, port, proxy)
        target = parts.path or "/"
        if parts.query:
            target += "?" + parts.query
        if proxy is not None and parts.scheme == "http":
            target = urllib.parse.urlunsplit(parts._replace(fragment=""))  # absolute form
            headers = {**headers, **_proxy_authorization(proxy)}
        try:
            connection.request(method, target, headers=headers)
            answer = connection.getresponse()
        except TimeoutError as exc:
            connection.close()
            raise ReadFailed("ReadTimeout: no answer within the read timeout") from exc
        except (OSError, http.client.HTTPException) as exc:
            connection.close()
            raise ReadFailed(_describe(exc)) from exc
        return Response(url, connection, answer)

    def _connect(self, scheme: str, host: str, port: int,
                 proxy: str | None) -> http.client.HTTPConnection:
        timeout = self.timeouts.connect_s
        address = (host, port)
        if proxy is not None:
            proxy_parts = urllib.parse.urlsplit(proxy)
            address = (proxy_parts.hostname, proxy_parts.port or _PORTS.get(proxy_parts.scheme, 80))
        if scheme == "https":
            connection = http.client.HTTPSConnection(*address, timeout=timeout,
                                                     context=self.ssl_context)
            if proxy is not None:
                connection.set_tunnel(host, port, headers=_proxy_authorization(proxy))
        else:
            connection = http.client.HTTPConnection(*address, timeout=timeout)
        try:
            connection.connect()
        except (OSError, http.client.HTTPException) as exc:
            connection.close()
            name = "ConnectTimeout" if isinstance(exc, TimeoutError) else "ConnectError"
            raise ConnectFailed(f"{name}: {exc}") from exc
        # connect() waited connect_s at most; every read from here on waits read_s at most.
        connection.sock.settimeout(self.timeouts.read_s)
        return connection


class HttpClient:
    """GETs that follow redirects, over one transport."""

    def __init__(self, timeouts: Timeouts, *, transport: Transport | None = None,
                 max_redirects: int = 10) -> None:
        self.transport = transport or Connections(timeouts)
        self.max_redirects = max_redirects

    def get(self, url: str, headers: dict[str, str]) -> Response:
        """The answer to GET ``url``, after following up to ``max_redirects`` redirects."""
        for _ in range(self.max_redirects + 1):
            response = self.transport.send("GET", url, headers)
            location = response.headers.get("Location")
            if response.status not in _REDIRECTS or not location:
                return response
            response.close()
            url = urllib.parse.urljoin(url, location)
        raise UnsupportedURL(f"TooManyRedirects: more than {self.max_redirects} from {url}")


@functools.cache
def default_ssl_context() -> ssl.SSLContext:
    """A verifying context on certifi's CA bundle (what httpx and pip use), or on
    ``SSL_CERT_FILE``/``SSL_CERT_DIR`` where set. Built once: loading the bundle costs about
    50 ms, a tenth of a fast local transfer."""
    return ssl.create_default_context(
        cafile=os.environ.get("SSL_CERT_FILE") or (None if "SSL_CERT_DIR" in os.environ
                                                   else certifi.where()),
        capath=os.environ.get("SSL_CERT_DIR"),
    )


def _proxy_for(scheme: str, host: str) -> str | None:
    if urllib.request.proxy_bypass(host):
        return None
    return urllib.request.getproxies().get(scheme)


def _proxy_authorization(proxy: str) -> dict[str, str]:
    parts = urllib.parse.urlsplit(proxy)
    if parts.username is None:
        return {}
    user = urllib.parse.unquote(parts.username)
    password = urllib.parse.unquote(parts.password or "")
    credentials = f"{user}:{password}"
    return {"Proxy-Authorization": "Basic " + base64.b64encode(credentials.encode()).decode()}


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__

"""A thin client of the controller's HTTP API, for ``edge-agent fleet devices|prompt|cmd|…``.

urllib from the standard library (httpx stays in agent/fetch); bearer token auth; the
prompt endpoint's NDJSON is read line by line so a reply streams to the terminal. API
errors come back as EdgeAgentError subclasses keyed by their ``code``, never by message.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, BinaryIO, Iterator
from urllib.parse import quote, urlencode

from agent.errors import ConfigError, FleetAPIError, RequestError

TIMEOUT_S = 30.0
UPLOAD_TIMEOUT_S = 600.0  # a CUDA wheel is hundreds of MB


class FleetClient:
    def __init__(self, url: str | None, token: str | None) -> None:
        if not url:
            raise ConfigError("no controller URL: pass --url or set EDGE_AGENT_FLEET_URL")
        if not token:
            raise ConfigError("no API token: pass --token-file or set EDGE_AGENT_FLEET_TOKEN")
        self.url = url.rstrip("/")
        self.token = token

    def _open(
        self,
        method: str,
        path: str,
        body: Any = None,
        timeout: float = TIMEOUT_S,
        accept: str = "application/json",
        upload: tuple[BinaryIO, int] | None = None,
    ):
        """``body`` goes as JSON; ``upload`` (an open file and its size) as raw bytes."""
        data: Any = json.dumps(body).encode() if body is not None else None
        content_type = "application/json"
        headers = {}
        if upload is not None:
            data, size = upload
            content_type = "application/octet-stream"
            headers["Content-Length"] = str(size)
        request = urllib.request.Request(
            self.url + path,
            data=data,
            method=method,
            headers={
                "Authorization": f"Bearer {self.token}",
                "Content-Type": content_type,
                "Accept": accept,
                **headers,
            },
        )
        try:
            return urllib.request.urlopen(request, timeout=timeout)
        except urllib.error.HTTPError as exc:
            try:
                error = json.loads(exc.read())["error"]
                raise FleetAPIError(error["code"], error["message"], status=exc.code) from None
            except (ValueError, KeyError, TypeError):
                raise FleetAPIError(
                    "http_error", f"HTTP {exc.code} from {self.url}{path}", status=exc.code
                ) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise FleetAPIError(
                "unreachable", f"cannot reach the controller at {self.url}: {reason}"
            ) from None

    def _json(self, method: str, path: str, body: Any = None, timeout: float = TIMEOUT_S) -> Any:
        with self._open(method, path, body, timeout) as response:
            return json.loads(response.read() or b"null")

    def devices(self, state: str | None = None) -> dict[str, Any]:
        """Every device: the API pages the table (at most 1000 rows a page), so this asks for
        each page in turn, in id order."""
        query = {"per_page": "1000", **({"state": state} if state else {})}
        answer = self._json("GET", "/api/devices?" + urlencode(query))
        rows = answer["devices"]
        for page in range(2, answer["pages"] + 1):
            more = self._json("GET", "/api/devices?" + urlencode({**query, "page": page}))
            rows += more["devices"]
        return {**answer, "devices": rows}

    def device(self, device_id: str) -> dict[str, Any]:
        return self._json("GET", f"/api/devices/{quote(device_id, safe='')}")

    def command(
        self, device_id: str, op: str, args: dict[str, Any] | None = None, wait_s: float = 60.0
    ) -> dict[str, Any]:
        return self._json(
            "POST",
            f"/api/devices/{quote(device_id, safe='')}/cmd",
            {"op": op, "args": args or {}, "wait_s": wait_s},
            timeout=wait_s + TIMEOUT_S,
        )

    def prompt(
        self, device_id: str, request: dict[str, Any], timeout_s: float = 330.0
    ) -> Iterator[dict[str, Any]]:
        """Yield the reply's records as they arrive: chunks, then the final record."""
        if "id" in request and not isinstance(request["id"], str):
            raise RequestError("id: must be a string", field="id")
        yield from self._records(f"/api/devices/{quote(device_id, safe='')}/prompt", request,
                                 timeout_s)

    def prompt_target(
        self, target: str, request: dict[str, Any], timeout_s: float = 330.0
    ) -> Iterator[dict[str, Any]]:
        """Like prompt(), to a target as /v1 names it: a model id, ``device/<id>`` or
        ``pool/<name>``; the controller picks the device."""
        yield from self._records("/api/prompt", {**request, "target": target}, timeout_s)

    def _records(self, path: str, body: dict[str, Any], timeout_s: float
                 ) -> Iterator[dict[str, Any]]:
        """A prompt's NDJSON records, as the controller streams them."""
        with self._open("POST", path, body, timeout=timeout_s,
                        accept="application/x-ndjson") as response:
            for line in response:
                if line.strip():
                    yield json.loads(line)

    def manifests(self) -> dict[str, Any]:
        return self._json("GET", "/api/manifests")

    def publish_manifest(self, name: str, manifest: str | dict[str, Any]) -> dict[str, Any]:
        return self._json("POST", "/api/manifests", {"name": name, "manifest": manifest})

    def start_rollout(self, spec: dict[str, Any]) -> dict[str, Any]:
        return self._json("POST", "/api/rollouts", spec)

    def rollouts(self) -> dict[str, Any]:
        return self._json("GET", "/api/rollouts")

    def rollout(self, rollout_id: str) -> dict[str, Any]:
        return self._json("GET", f"/api/rollouts/{quote(rollout_id, safe='')}")

    def rollout_events(self, rollout_id: str) -> dict[str, Any]:
        return self._json("GET", f"/api/rollouts/{quote(rollout_id, safe='')}/events")

    def rollback(self, rollout_id: str) -> dict[str, Any]:
        return self._json("POST", f"/api/rollouts/{quote(rollout_id, safe='')}/rollback", {})

    def wheels(self) -> dict[str, Any]:
        return self._json("GET", "/api/wheels")

    def add_wheel(self, wheel: Path, query: dict[str, str]) -> dict[str, Any]:
        """Upload one wheel (streamed from the file); ``query``: key, cmake_args, python,
        platform for an engine wheel, nothing for an edge-agent one."""
        path = f"/api/wheels/{quote(wheel.name, safe='')}"
        if query:
            path += "?" + urlencode(query)
        with open(wheel, "rb") as body, self._open(
            "PUT", path, timeout=UPLOAD_TIMEOUT_S, upload=(body, wheel.stat().st_size)
        ) as response:
            return json.loads(response.read())

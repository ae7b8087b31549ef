"""The controller's wheelhouse: `edge-agent fleet wheels add` stores a wheel, /files/wheels
serves it with an index signed by the controller's key, and nothing else gets in."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from agent.catalog.wheels import engine_key, parse_index
from tests.fleet.conftest import REPO

CACHE = Path(os.environ.get("EDGE_AGENT_CACHE", Path.home() / ".cache" / "edge-agent"))
CMAKE_ARGS = "-DGGML_NATIVE=OFF -DGGML_AVX2=ON"


def real_engine_wheel() -> Path:
    wheels = sorted((CACHE / "wheels").glob("llama-cpp-python-*/llama_cpp_python-*.whl"))
    if not wheels:
        pytest.fail(f"no llama-cpp-python wheel under {CACHE / 'wheels'}: run scripts/setup")
    return wheels[0]


def make_wheel(path: Path, name: str, version: str, payload: bytes = b"") -> Path:
    """A wheel in the PEP 427 layout (METADATA, WHEEL, RECORD), as `pip wheel` writes one."""
    dist_info = f"{name.replace('-', '_')}-{version}.dist-info"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(f"{name.replace('-', '_')}/__init__.py", payload)
        archive.writestr(f"{dist_info}/METADATA",
                         f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        archive.writestr(f"{dist_info}/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\n"
                         "Tag: py3-none-any\n")
        archive.writestr(f"{dist_info}/RECORD", "")
    return path


def cli(fleet, credentials, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "EDGE_AGENT_FLEET_URL": fleet.url,
           "EDGE_AGENT_FLEET_TOKEN": credentials.token}
    return subprocess.run([sys.executable, "-m", "agent.cli", "fleet", "wheels", *args],
                          env=env, capture_output=True, text=True, timeout=120, cwd=REPO)


def signed_index(api):
    public_key = api.get("/api/signing-key").json()["public_key"]
    data = api.get("/files/wheels/index.json").content
    signature = api.get("/files/wheels/index.json.sig").text
    return parse_index(data, signature, public_key)


def test_added_engine_wheel_is_served_under_a_signed_index(fleet, credentials, api) -> None:
    wheel = real_engine_wheel()
    version = wheel.name.split("-")[1]
    python, platform = sys.implementation.cache_tag, sysconfig.get_platform()
    key = engine_key(version, CMAKE_ARGS, python, platform)
    added = cli(fleet, credentials, "add", str(wheel), "--key", key, f"--cmake-args={CMAKE_ARGS}",
                "--python", python, "--platform", platform)
    assert added.returncode == 0, added.stderr
    entry = signed_index(api).engine_for(key)
    assert entry is not None and entry.cmake_args == CMAKE_ARGS and entry.file == wheel.name
    assert entry.sha256 == hashlib.sha256(wheel.read_bytes()).hexdigest()
    served = api.get(f"/files/wheels/{entry.path}")
    assert served.status_code == 200 and hashlib.sha256(served.content).hexdigest() == entry.sha256
    listed = cli(fleet, credentials, "list")
    assert key in listed.stdout and CMAKE_ARGS in listed.stdout


def test_agent_wheel_is_hosted_and_a_new_upload_replaces_it(fleet, credentials, api,
                                                           tmp_path: Path) -> None:
    first = make_wheel(tmp_path / "edge_agent-0.2.0-py3-none-any.whl", "edge-agent", "0.2.0")
    assert cli(fleet, credentials, "add", str(first)).returncode == 0
    old = signed_index(api).agent_wheel("0.2.0")
    assert old is not None and old.sha256 == hashlib.sha256(first.read_bytes()).hexdigest()
    (tmp_path / "again").mkdir()
    rebuilt = make_wheel(tmp_path / "again" / first.name, "edge-agent", "0.2.0",
                         payload=b"# rebuilt\n")
    assert cli(fleet, credentials, "add", str(rebuilt)).returncode == 0
    new = signed_index(api).agent_wheel("0.2.0")
    assert new.sha256 != old.sha256 and new.path != old.path
    assert api.get(f"/files/wheels/{new.path}").content == rebuilt.read_bytes()
    assert api.get(f"/files/wheels/{old.path}").status_code == 404


def test_what_is_not_a_wheel_of_its_name_or_key_is_refused(fleet, credentials, api,
                                                           tmp_path: Path) -> None:
    garbage = tmp_path / "edge_agent-0.3.0-py3-none-any.whl"
    garbage.write_bytes(b"MZ not a zip")
    liar = make_wheel(tmp_path / "edge_agent-0.4.0-py3-none-any.whl", "edge-agent", "9.9.9")
    other = make_wheel(tmp_path / "requests-2.0-py3-none-any.whl", "requests", "2.0")
    engine = make_wheel(tmp_path / "llama_cpp_python-0.3.36-py3-none-any.whl",
                        "llama-cpp-python", "0.3.36")
    for args in ([str(garbage)], [str(liar)], [str(other)], [str(engine)],
                 [str(engine), "--key", "0" * 16, "--cmake-args=-DX=ON", "--python", "cpython-311",
                  "--platform", "linux-x86_64"]):
        done = cli(fleet, credentials, "add", *args)
        assert done.returncode != 0 and "bad_request" in done.stderr, (args, done.stderr)
    index = signed_index(api)
    assert index.engine == [] and index.agent == []
    assert not [p for p in Path(fleet.config.wheel_dir).rglob("*") if p.is_file()]


def test_uploads_need_a_token_and_paths_stay_inside(fleet, api, tmp_path: Path) -> None:
    import httpx

    wheel = make_wheel(tmp_path / "edge_agent-0.2.0-py3-none-any.whl", "edge-agent", "0.2.0")
    anonymous = httpx.put(f"{fleet.url}/api/wheels/{wheel.name}", content=wheel.read_bytes())
    assert anonymous.status_code == 401
    (Path(fleet.config.wheel_dir).parent / "secret.whl").write_text("no")
    for path in ("../secret.whl", "agent/../../secret.whl", "%2e%2e/secret.whl",
                 "agent/0.2.0/0123456789abcdef/../../../../secret.whl"):
        assert api.get(f"/files/wheels/{path}").status_code == 404, path


def test_a_wheel_whose_metadata_inflates_to_hundreds_of_mib_is_refused(fleet, api,
                                                                       tmp_path: Path) -> None:
    """A zip bomb: a few hundred KiB uploaded, its METADATA member inflating to 200 MiB. The
    controller (in this process) refuses it without inflating it, and takes wheels after."""
    import tracemalloc

    inflated = 200 << 20
    bomb = tmp_path / "edge_agent-0.5.0-py3-none-any.whl"
    metadata = "edge_agent-0.5.0.dist-info/METADATA"
    with (zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as archive,
          archive.open(metadata, "w", force_zip64=True) as out):
        out.write(b"Metadata-Version: 2.1\nName: edge-agent\nVersion: 0.5.0\n\n")
        zeros = bytes(1 << 20)
        for _ in range(inflated // len(zeros)):
            out.write(zeros)
    assert bomb.stat().st_size < inflated // 100
    tracemalloc.start()
    try:
        refused = api.put(f"/api/wheels/{bomb.name}", content=bomb.read_bytes())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < inflated // 10  # nothing near the inflated size was ever held
    assert refused.status_code == 400, refused.text
    assert refused.json()["error"]["code"] == "bad_request"
    assert "METADATA" in refused.json()["error"]["message"]
    assert signed_index(api).agent == []
    wheel = make_wheel(tmp_path / "edge_agent-0.2.0-py3-none-any.whl", "edge-agent", "0.2.0")
    assert api.put(f"/api/wheels/{wheel.name}", content=wheel.read_bytes()).status_code == 201
    assert signed_index(api).agent_wheel("0.2.0") is not None


def test_a_wheel_upload_past_the_limit_is_refused_before_its_body(tmp_path: Path, broker,
                                                                  credentials) -> None:
    """A client that claims 10 GiB and sends nothing more is answered 413 at once, not waited
    for; one that declares nothing is counted and stopped at the limit; the next upload works."""
    import socket

    import httpx

    from agent.fleet.service import FleetService
    from tests.fleet.conftest import make_config

    service = FleetService(make_config(tmp_path, broker, upload_max_bytes=1 << 20)).start()
    try:
        host, port = service.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as claimer:
            claimer.sendall(
                b"PUT /api/wheels/edge_agent-0.3.0-py3-none-any.whl HTTP/1.1\r\n"
                b"Host: fleet\r\nAuthorization: Bearer " + credentials.token.encode() + b"\r\n"
                b"Content-Length: 10737418240\r\n\r\nPK")
            answer = claimer.recv(4096)  # within the timeout: the body is never awaited
        assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
        assert b'"too_large"' in answer
        with httpx.Client(base_url=service.url, timeout=60,
                          headers={"Authorization": f"Bearer {credentials.token}"}) as api:
            undeclared = api.put("/api/wheels/edge_agent-0.3.0-py3-none-any.whl",
                                 content=(bytes(1 << 19) for _ in range(3)))
            assert undeclared.status_code == 413
            assert undeclared.json()["error"]["code"] == "too_large"
            assert signed_index(api).agent == []
            wheel = make_wheel(tmp_path / "edge_agent-0.2.0-py3-none-any.whl", "edge-agent",
                               "0.2.0")
            added = api.put(f"/api/wheels/{wheel.name}", content=wheel.read_bytes())
            assert added.status_code == 201
    finally:
        service.stop()

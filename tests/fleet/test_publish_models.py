"""The controller publishes your models: POST /api/manifests builds a manifest from a folder on
the controller (inside fleet.publish_roots only) or from GGUF files uploaded to it, signs it
with its key, and the Models page shows each variant's quality. Against the real controller
(uvicorn, real HTTP); the attacks are what a client holding a token would send."""

from __future__ import annotations

import json
import os
from pathlib import Path

import httpx
import pytest

from agent.catalog.signing import verify_manifest
from agent.fleet.service import FleetService
from tests.fleet.conftest import make_config

QUANTS = ("Q2_K", "Q3_K_M")


@pytest.fixture
def roots(tmp_path: Path) -> dict[str, Path]:
    allowed = tmp_path / "allowed"
    outside = tmp_path / "outside"
    for folder in (allowed / "smollm", outside):
        folder.mkdir(parents=True)
    return {"allowed": allowed, "outside": outside, "folder": allowed / "smollm"}


@pytest.fixture
def controller(tmp_path: Path, broker, roots):
    config = make_config(tmp_path, broker, publish_roots=[str(roots["allowed"])],
                         upload_max_bytes=100 * 1024 * 1024)
    service = FleetService(config).start()
    yield service
    service.stop()


@pytest.fixture
def api(controller, credentials):
    with httpx.Client(base_url=controller.url, timeout=120,
                      headers={"Authorization": f"Bearer {credentials.token}"}) as client:
        yield client


def ladder_variants(ladder_manifest: dict) -> dict[str, dict]:
    return {v["quant"]: v for v in ladder_manifest["models"][0]["variants"]}


def hosted_files(controller) -> set[str]:
    return set(os.listdir(controller.config.model_dir))


def test_a_folder_on_the_controller_becomes_a_signed_manifest(
        api, controller, roots, ladder_dir, ladder_manifest):
    for quant in QUANTS:
        os.link(ladder_dir / f"smollm2-135m-instruct.{quant}.gguf",
                roots["folder"] / f"smollm2-135m-instruct.{quant}.gguf")
    built = api.post("/api/manifests", json={"name": "smollm.json", "model_dir": str(roots["folder"])})
    assert built.status_code == 201, built.text
    served = api.get("/files/smollm.json")
    manifest = served.json()
    expected = ladder_variants(ladder_manifest)
    variants = manifest["models"][0]["variants"]
    assert sorted(v["quant"] for v in variants) == sorted(QUANTS)
    for variant in variants:  # quant from the header, size and sha256 as make-test-models wrote
        assert (variant["size"], variant["sha256"]) == (
            expected[variant["quant"]]["size"], expected[variant["quant"]]["sha256"])
        assert variant["quality_source"] == "prior" and variant["urls"] == []
        gguf = api.get(f"/files/{variant['file']}")  # next to the manifest, as devices fetch it
        assert len(gguf.content) == variant["size"]
    # Signed with the controller's key, the one devices pin.
    key = api.get("/api/signing-key").json()
    signature = api.get(built.json()["signature_url"]).text.strip()
    assert built.json()["key_id"] == key["key_id"]
    verify_manifest(served.content, signature, key["public_key"])

    # Building again keeps what was measured: the build merges into the manifest of that name.
    manifest["models"][0]["variants"][0].update(quality=0.97, quality_source="measured")
    assert api.post("/api/manifests", json={"name": "smollm.json", "manifest": manifest}).status_code == 201
    again = api.post("/api/manifests", json={"name": "smollm.json", "model_dir": str(roots["folder"])})
    assert again.status_code == 201, again.text
    kept = api.get("/files/smollm.json").json()["models"][0]["variants"][0]
    assert (kept["quality"], kept["quality_source"]) == (0.97, "measured")

    # The listing the Models page renders carries the quality table.
    listed = api.get("/api/manifests").json()["manifests"][0]["models"][0]["variants"]
    assert {v["quant"]: v["quality_source"] for v in listed}[kept["quant"]] == "measured"


@pytest.mark.parametrize("attack", ["outside", "traversal", "symlinked_folder", "symlinked_file",
                                    "relative", "etc"])
def test_a_folder_outside_the_allowed_roots_is_refused(attack, api, controller, roots, ladder_dir):
    """The client names a folder; it must never make the controller read or expose a path
    outside publish_roots, however it is spelled."""
    victim = roots["outside"] / "secret.Q2_K.gguf"
    os.link(ladder_dir / "smollm2-135m-instruct.Q2_K.gguf", victim)
    folder = {
        "outside": str(roots["outside"]),
        "traversal": str(roots["allowed"] / ".." / "outside"),
        "relative": "outside",
        "etc": "/etc",
    }.get(attack)
    if attack == "symlinked_folder":
        (roots["allowed"] / "link").symlink_to(roots["outside"], target_is_directory=True)
        folder = str(roots["allowed"] / "link")
    if attack == "symlinked_file":
        (roots["folder"] / "secret.Q2_K.gguf").symlink_to(victim)
        folder = str(roots["folder"])
    before = hosted_files(controller)
    answer = api.post("/api/manifests", json={"name": "stolen.json", "model_dir": folder})
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["code"] == "bad_request"
    assert hosted_files(controller) == before  # nothing linked, nothing published
    assert api.get("/files/secret.Q2_K.gguf").status_code == 404


def test_uploaded_files_become_a_manifest_and_bad_uploads_leave_nothing(
        api, controller, ladder_dir, ladder_manifest):
    source = ladder_dir / "smollm2-135m-instruct.Q2_K.gguf"

    def chunks(path: Path, limit: int | None = None):
        # A generator body: sent chunked, with no Content-Length the server could trust.
        with open(path, "rb") as handle:
            sent = 0
            while (block := handle.read(1 << 20)) and (limit is None or sent < limit):
                sent += len(block)
                yield block

    put = api.put(f"/files-not-here/{source.name}", content=b"x")
    assert put.status_code == 404
    uploaded = api.put(f"/api/model-files/{source.name}", content=chunks(source))
    assert uploaded.status_code == 201, uploaded.text
    assert uploaded.json()["size"] == source.stat().st_size
    # Never replaced under a device that may be fetching it.
    again = api.put(f"/api/model-files/{source.name}", content=b"GGUF")
    assert again.status_code == 400
    built = api.post("/api/manifests", json={"name": "up.json", "files": [source.name]})
    assert built.status_code == 201, built.text
    (variant,) = api.get("/files/up.json").json()["models"][0]["variants"]
    assert variant["sha256"] == ladder_variants(ladder_manifest)["Q2_K"]["sha256"]

    before = hosted_files(controller)
    not_gguf = api.put("/api/model-files/notes.gguf", content=b"just some text, not a model")
    assert not_gguf.status_code == 400
    bad_name = api.put("/api/model-files/..%2Fescape.gguf", content=b"GGUF")
    assert bad_name.status_code in (400, 404)
    assert api.post("/api/manifests", json={"name": "x.json", "files": ["../etc/passwd"]}).status_code == 400
    assert hosted_files(controller) == before  # no temporary file left behind either


def test_an_upload_past_the_limit_is_refused_while_streaming(
        tmp_path: Path, broker, credentials, ladder_dir):
    config = make_config(tmp_path, broker, upload_max_bytes=4 * 1024 * 1024)
    service = FleetService(config).start()
    try:
        source = ladder_dir / "smollm2-135m-instruct.Q2_K.gguf"

        def first_megabytes(count: int):
            with open(source, "rb") as handle:
                for _ in range(count):
                    yield handle.read(1 << 20)

        with httpx.Client(base_url=service.url, timeout=60,
                          headers={"Authorization": f"Bearer {credentials.token}"}) as client:
            declared = client.put(f"/api/model-files/{source.name}", content=source.read_bytes()[:8 << 20])
            assert declared.status_code == 413
            # No Content-Length; just past the limit, so the client has sent it all when the
            # controller answers (a bigger body could meet a closed connection instead).
            streamed = client.put(f"/api/model-files/{source.name}", content=first_megabytes(5))
            assert streamed.status_code == 413
            assert streamed.json()["error"]["code"] == "too_large"
            assert client.get(f"/files/{source.name}").status_code == 404
        assert os.listdir(config.model_dir) == []
    finally:
        service.stop()


def test_the_models_page_shows_the_quality_table(controller, api, credentials, ladder_manifest):
    manifest = json.loads(json.dumps(ladder_manifest))
    for variant in manifest["models"][0]["variants"]:
        variant["quality_source"] = "measured"
    assert api.post("/api/manifests", json={"name": "ladder.json", "manifest": manifest}).status_code == 201
    with httpx.Client(base_url=controller.url, timeout=30) as browser:
        assert browser.get("/login").status_code == 200
        form = {"secret": credentials.password, "login_token": browser.cookies.get("edge_fleet_login")}
        assert browser.post("/login", data=form).status_code == 303
        page = browser.get("/models").text
    variants = manifest["models"][0]["variants"]
    for variant in variants:
        assert f"<td>{variant['quant']}</td>" in page
        assert f"<td>{variant['quality']:.4f}</td>" in page
    assert page.count("<td>measured</td>") == len(variants)


def test_a_failed_folder_build_leaves_nothing_served(api, controller, roots, ladder_dir):
    """A folder whose last file is no GGUF: the build fails, and the good file before it is
    not left linked at /files without a manifest listing it."""
    good = "smollm2-135m-instruct.Q2_K.gguf"
    os.link(ladder_dir / good, roots["folder"] / good)
    (roots["folder"] / "zz-not-a-model.gguf").write_bytes(b"not a gguf file at all" * 100)
    built = api.post("/api/manifests", json={"name": "bad.json", "model_dir": str(roots["folder"])})
    assert built.status_code == 400, built.text
    assert hosted_files(controller) & {good, "zz-not-a-model.gguf", "bad.json"} == set()
    assert api.get(f"/files/{good}").status_code == 404


def test_a_built_link_whose_target_turns_into_an_escape_is_not_served(
        api, controller, roots, ladder_dir):
    """After a build, the file in the publish root is swapped for a link to a secret outside
    it: /files then refuses the name instead of serving the secret."""
    name = "smollm2-135m-instruct.Q2_K.gguf"
    os.link(ladder_dir / name, roots["folder"] / name)
    built = api.post("/api/manifests", json={"name": "m.json", "model_dir": str(roots["folder"])})
    assert built.status_code == 201, built.text
    assert api.get(f"/files/{name}", headers={"Range": "bytes=0-3"}).content == b"GGUF"
    secret = roots["outside"] / "secret.gguf"
    secret.write_bytes(b"GGUF but a secret")
    (roots["folder"] / name).unlink()
    (roots["folder"] / name).symlink_to(secret)
    assert api.get(f"/files/{name}").status_code == 404

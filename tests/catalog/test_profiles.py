"""Profile loading (typed, unknown keys rejected, errors name file and key path) and matching."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.catalog.profiles import Policy, Profile, load_profiles, match_profile
from agent.errors import ConfigError
from agent.hardware.device import CPUInfo, DeviceInfo, GPUInfo, MemoryInfo
from agent.hardware.probe import probe

FIXTURES = Path(__file__).parents[1] / "hardware" / "fixtures"
GIB = 1024**3
REQUIRED = {
    "default",
    "raspberry-pi-5",
    "raspberry-pi-4",
    "jetson-orin-nano",
    "x86-avx2",
    "apple-silicon",
}


def test_repo_profiles_load_and_include_the_required_ones():
    profiles = load_profiles()
    assert REQUIRED <= {p.name for p in profiles}
    for profile in profiles:
        assert isinstance(profile.policy, Policy)
        assert profile.policy.n_ctx_floor <= profile.policy.n_ctx_target
        assert profile.policy.kv_type in ("f16", "q8_0", "q4_0")


@pytest.mark.parametrize(
    ("fixture", "expected", "reason"),
    [
        ("raspberry-pi-5", "raspberry-pi-5", "flags neon, dotprod"),
        ("raspberry-pi-4", "raspberry-pi-4", "board contains 'Raspberry Pi 4'"),
        ("jetson-orin-nano", "jetson-orin-nano", "gpu vendor jetson"),
        ("apple-m3-max", "apple-silicon", "gpu vendor apple"),
        ("x86-avx2-desktop", "x86-avx2", "flags avx2, fma"),
        ("x86-amx-server", "x86-avx512", "arch x86_64"),
        ("cgroup-v1-docker", "default", "no more specific profile matched"),
    ],
)
def test_match_on_captured_devices(fixture, expected, reason):
    device = probe(str(FIXTURES / fixture), measure_bandwidth=False)
    profile, reasons = match_profile(device, load_profiles())
    assert profile.name == expected
    assert reason in reasons


def _device(**cpu) -> DeviceInfo:
    return DeviceInfo(
        cpu=CPUInfo(**cpu), memory=MemoryInfo(total_bytes=8 * GIB, available_bytes=6 * GIB)
    )


def test_a_failed_rule_rejects_the_profile():
    # A "Raspberry Pi 5" board without dotprod (impossible, but tests the AND of rules).
    device = _device(arch="aarch64", flags=["neon"])
    device.board = "Raspberry Pi 5 Model B Rev 1.0"
    profile, _ = match_profile(device, load_profiles())
    assert profile.name == "default"


def _write(directory: Path, name: str, text: str) -> None:
    (directory / f"{name}.yaml").write_text(text)


DEFAULT = """
name: default
description: d
policy: {memory_headroom_bytes: 1, n_ctx_target: 512, n_ctx_floor: 256, kv_type: f16,
         n_threads: null, min_tokens_per_s: 1, n_batch: 64}
"""


def test_memory_range_and_specificity(tmp_path):
    _write(tmp_path, "default", DEFAULT)
    _write(
        tmp_path,
        "small",
        DEFAULT.replace("name: default", "name: small") + "match: {memory_max_gib: 4}\n",
    )
    _write(
        tmp_path,
        "big",
        DEFAULT.replace("name: default", "name: big")
        + "match: {memory_min_gib: 4, arch: [x86_64]}\n",
    )
    profiles = load_profiles(tmp_path)
    profile, reasons = match_profile(_device(arch="x86_64"), profiles)
    assert profile.name == "big"
    assert reasons == ["arch x86_64", "memory 8.0 GiB within [4, ∞] GiB"]
    forced, why = match_profile(_device(arch="x86_64"), profiles, forced="small")
    assert forced.name == "small" and why == ["forced by configuration (model.profile=small)"]


def test_gpu_vendor_rule():
    device = _device(arch="aarch64")
    device.gpus = [GPUInfo(vendor="apple", name="Apple M3 Max GPU", unified_memory=True)]
    profile, reasons = match_profile(device, load_profiles())
    assert profile.name == "apple-silicon" and "gpu vendor apple" in reasons


def test_profiles_dir_from_env(tmp_path, monkeypatch):
    _write(tmp_path, "default", DEFAULT)
    monkeypatch.setenv("EDGE_AGENT_PROFILES", str(tmp_path))
    assert [p.name for p in load_profiles()] == ["default"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (DEFAULT + "colour: red\n", "colour"),
        (DEFAULT.replace("kv_type: f16", "kv_type: f8"), "policy.kv_type"),
        (DEFAULT + "match: {board: Pi}\n", "match.board"),
        (DEFAULT.replace("n_ctx_floor: 256", "n_ctx_floor: 4096"), "policy.n_ctx_floor"),
        (DEFAULT.replace("name: default", "name: other"), "name"),
        ("policy: [\n", "not valid YAML"),
    ],
)
def test_bad_profile_names_file_and_key(tmp_path, text, message):
    _write(tmp_path, "default", text)
    with pytest.raises(ConfigError) as caught:
        load_profiles(tmp_path)
    assert str(tmp_path / "default.yaml") in caught.value.message
    assert message in caught.value.message
    assert caught.value.code == "config_invalid"


def test_no_default_profile_is_an_error(tmp_path):
    _write(tmp_path, "x", DEFAULT.replace("name: default", "name: x"))
    with pytest.raises(ConfigError, match="default.yaml"):
        load_profiles(tmp_path)


def test_profile_is_a_typed_struct():
    assert set(Profile.__struct_fields__) == {"name", "description", "match", "policy"}

"""The whole probe and `edge-agent probe`: on captured fake roots and on this machine."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from agent.hardware.cpu import NORMALISED_FLAGS, normalise_flags
from agent.hardware.probe import probe
from tests.hardware.conftest import FIXTURES


def edge_agent(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=120,
        check=False,
    )


def test_probe_json_on_the_pi5_fake_root():
    done = edge_agent(
        "probe", "--json", env={"EDGE_AGENT_PROBE_ROOT": str(FIXTURES / "raspberry-pi-5")}
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["cpu"]["arch"] == "aarch64"
    assert {"neon", "dotprod"} <= set(report["cpu"]["flags"])
    assert "Raspberry Pi 5" in report["board"]
    assert report["profile"] == "raspberry-pi-5"
    assert "board contains 'Raspberry Pi 5'" in report["profile_reasons"]
    # A fake root runs no live tools.
    assert report["bandwidth_gbps"] is None and report["llama"] is None and report["gpus"] == []


@pytest.mark.parametrize(
    ("name", "profile", "gpu_vendors"),
    [
        ("raspberry-pi-4", "raspberry-pi-4", []),
        ("jetson-orin-nano", "jetson-orin-nano", ["jetson"]),
        ("apple-m3-max", "apple-silicon", ["apple"]),
        ("x86-avx2-desktop", "x86-avx2", []),
        ("x86-amx-server", "x86-avx512", []),
        ("nvidia-two-gpus", "default", ["nvidia", "nvidia"]),
    ],
)
def test_probe_json_on_other_fake_roots(name, profile, gpu_vendors):
    done = edge_agent("probe", "--json", env={"EDGE_AGENT_PROBE_ROOT": str(FIXTURES / name)})
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["profile"] == profile
    assert [g["vendor"] for g in report["gpus"]] == gpu_vendors


def test_table_on_an_empty_root_says_none_and_exits_0(tmp_path):
    done = edge_agent("probe", env={"EDGE_AGENT_PROBE_ROOT": str(tmp_path)})
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    lines = dict(
        re.split(r"\s{2,}", line.strip(), maxsplit=1)
        for line in done.stdout.splitlines()
        if "  " in line.strip()
    )
    assert lines["GPU"] == "none" and lines["power"] == "none" and lines["temperatures"] == "none"
    assert lines["profile"].startswith("default")


def test_forcing_an_unknown_profile_is_a_config_error():
    done = edge_agent(
        "probe",
        "--json",
        "--profile",
        "nope",
        env={"EDGE_AGENT_PROBE_ROOT": str(FIXTURES / "raspberry-pi-5")},
    )
    assert done.returncode == 2
    assert "config_invalid" in done.stderr and "raspberry-pi-5" in done.stderr


def test_probe_function_honours_the_env_root(monkeypatch):
    monkeypatch.setenv("EDGE_AGENT_PROBE_ROOT", str(FIXTURES / "jetson-orin-nano"))
    device = probe()
    assert device.board == "NVIDIA Orin Nano Developer Kit" and device.bandwidth_gbps is None
    assert device.probe_ms is not None


def gpus_found_independently() -> int:
    """GPUs llama.cpp could offload to, counted without the probe: what ``nvidia-smi -L``
    lists, and AMD cards (PCI vendor 0x1002) with VRAM. A DRM card alone is no such GPU:
    an Intel iGPU, virtio-gpu or a BMC's framebuffer is a /sys/class/drm/card* as well."""
    nvidia = 0
    try:
        listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
        nvidia = len(re.findall(r"^GPU \d+:", listed.stdout, re.M))
    except (OSError, subprocess.TimeoutExpired):
        pass
    amd = 0
    for card in Path("/sys/class/drm").glob("card*"):
        vendor = card / "device" / "vendor"
        if (re.fullmatch(r"card\d+", card.name) and vendor.exists()
                and vendor.read_text().strip().lower() == "0x1002"
                and (card / "device" / "mem_info_vram_total").exists()):
            amd += 1
    return nvidia + amd


@pytest.mark.skipif(not Path("/proc/cpuinfo").exists(), reason="needs Linux /proc")
def test_probe_json_on_this_machine():
    """Checked against what /proc says, not against numbers written into the test."""
    done = edge_agent("probe", "--json", env={"EDGE_AGENT_PROBE_ROOT": ""})
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    cpuinfo = Path("/proc/cpuinfo").read_text()
    assert report["cpu"]["logical_cores"] == len(re.findall(r"^processor\s*:", cpuinfo, re.M))
    raw = re.search(r"^(?:flags|Features)\s*:(.*)$", cpuinfo, re.M).group(1).split()
    assert set(report["cpu"]["flags"]) == set(normalise_flags(raw))
    for flag in ("avx2", "avx512f", "avx512_vnni", "amx_int8", "amx_bf16", "neon"):
        assert flag in NORMALISED_FLAGS
        assert (flag in report["cpu"]["flags"]) == (flag in normalise_flags(raw))
    mem_total_kib = int(
        re.search(r"^MemTotal:\s+(\d+) kB", Path("/proc/meminfo").read_text(), re.M).group(1)
    )
    assert report["memory"]["total_bytes"] == mem_total_kib * 1024
    assert 0 < report["memory"]["budget_bytes"] <= report["memory"]["total_bytes"]
    if Path("/etc/nv_tegra_release").exists():  # a Jetson's GPU is on the SoC, in no list
        assert report["gpus"]
    else:
        assert len(report["gpus"]) == gpus_found_independently(), report["gpus"]
    assert report["bandwidth_gbps"] > 0
    assert report["llama"] is not None and report["probe_ms"] > 0

"""GPU parsing: nvidia-smi CSV, AMD sysfs, Apple sysctl, Jetson tegra release/device tree."""

from __future__ import annotations

from agent.hardware.gpu import (
    parse_amd_sysfs,
    parse_apple_gpu,
    parse_jetson_gpu,
    parse_nvidia_smi,
    parse_tegra_release,
    probe_gpus,
)
from agent.hardware.sysctl import parse_sysctl
from tests.hardware.conftest import FIXTURES

MIB = 1024 * 1024


def test_nvidia_smi_with_header_in_any_column_order():
    gpus = parse_nvidia_smi((FIXTURES / "nvidia-two-gpus/.captured/nvidia-smi.csv").read_text())
    assert [(g.index, g.name, g.compute_capability, g.driver) for g in gpus] == [
        (0, "NVIDIA TITAN V", "7.0", "570.86.15"),
        (1, "NVIDIA RTX 5880 Ada Generation", "8.9", "570.86.15"),
    ]
    assert all(
        g.vendor == "nvidia" and g.vram_total_bytes is None for g in gpus
    )  # not queried there


def test_nvidia_smi_noheader_nounits_uses_the_probe_query_order():
    # Hand-written line in the shape of the probe's own query (see SOURCES.md): index,name,
    # memory.total,memory.free,driver_version,compute_cap with noheader,nounits.
    gpus = parse_nvidia_smi("0, NVIDIA TITAN V, 12288, 12057, 570.86.15, 7.0\n")
    assert gpus[0].vram_total_bytes == 12288 * MIB and gpus[0].vram_free_bytes == 12057 * MIB
    assert gpus[0].compute_capability == "7.0"


def test_nvidia_smi_units_and_not_available():
    text = "index, name, memory.total [MiB], memory.free [MiB]\n0, Orin (nvgpu), [N/A], [N/A]\n"
    gpus = parse_nvidia_smi(text)
    assert [(g.name, g.vram_total_bytes) for g in gpus] == [("Orin (nvgpu)", None)]


def test_nvidia_smi_empty_output():
    assert parse_nvidia_smi("") == [] and parse_nvidia_smi("\n") == []


def test_apple_gpu_is_unified_memory():
    values = parse_sysctl((FIXTURES / "apple-m3-max/.captured/sysctl.txt").read_text())
    [gpu] = parse_apple_gpu(values)
    assert (gpu.vendor, gpu.name, gpu.unified_memory) == ("apple", "Apple M3 Max GPU", True)
    assert gpu.vram_total_bytes == 38654705664


def test_no_apple_gpu_on_intel_mac_or_linux():
    assert parse_apple_gpu({"machdep.cpu.brand_string": "Intel(R) Core(TM) i7-8700B"}) == []
    assert parse_apple_gpu({}) == []


def test_tegra_release():
    text = (FIXTURES / "jetson-orin-nano/etc/nv_tegra_release").read_text()
    assert parse_tegra_release(text) == "L4T R35.3.1"


def test_jetson_gpu_from_release_and_device_tree():
    root = FIXTURES / "jetson-orin-nano"
    [gpu] = parse_jetson_gpu(
        (root / "etc/nv_tegra_release").read_text(),
        (root / "proc/device-tree/compatible").read_text(),
        "NVIDIA Orin Nano Developer Kit",
        8 * 1024**3,
        6 * 1024**3,
    )
    assert (gpu.vendor, gpu.unified_memory, gpu.compute_capability, gpu.driver) == (
        "jetson",
        True,
        "8.7",
        "L4T R35.3.1",
    )
    assert gpu.vram_total_bytes == 8 * 1024**3


def test_jetson_from_device_tree_alone():
    compatible = (FIXTURES / "jetson-orin-nano/proc/device-tree/compatible").read_text()
    [gpu] = parse_jetson_gpu(None, compatible, None, 0, 0)
    assert gpu.name == "NVIDIA Jetson Orin" and gpu.driver is None and gpu.vram_total_bytes is None


def test_not_a_jetson():
    assert parse_jetson_gpu(None, "raspberrypi,5-model-b\0brcm,bcm2712\0", None, 1, 1) == []


def test_amd_sysfs_needs_the_amd_vendor_id():
    cards = {
        "card0": {
            "vendor": "0x1002",
            "mem_info_vram_total": "17163091968",
            "mem_info_vram_used": "163091968",
        },
        "card1": {"vendor": "0x8086"},  # an Intel iGPU: not counted
    }
    [gpu] = parse_amd_sysfs(cards)
    assert (gpu.vendor, gpu.index, gpu.vram_total_bytes, gpu.vram_free_bytes) == (
        "amd",
        0,
        17163091968,
        17000000000,
    )


def test_probe_gpus_on_fake_roots():
    nvidia = probe_gpus(
        str(FIXTURES / "nvidia-two-gpus"), sysctl={}, board=None, memory_total=0, memory_available=0
    )
    assert [g.name for g in nvidia] == ["NVIDIA TITAN V", "NVIDIA RTX 5880 Ada Generation"]
    none = probe_gpus(
        str(FIXTURES / "raspberry-pi-5"), sysctl={}, board=None, memory_total=0, memory_available=0
    )
    assert none == []

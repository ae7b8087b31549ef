"""Board, OS and kernel identification."""

from __future__ import annotations

import pytest

from agent.hardware.board import (
    parse_board,
    parse_cpuinfo_model,
    parse_device_tree_string,
    parse_dmi,
    parse_os_release,
    read_device_tree_model,
    read_kernel,
    read_os_name,
)
from tests.hardware.conftest import FIXTURES


@pytest.mark.parametrize(
    ("name", "model"),
    [
        ("raspberry-pi-5", "Raspberry Pi 5 Model B Rev 1.0"),
        ("raspberry-pi-4", "Raspberry Pi 4 Model B Rev 1.5"),
        ("jetson-orin-nano", "NVIDIA Orin Nano Developer Kit"),
    ],
)
def test_device_tree_model_is_nul_terminated(name, model):
    raw = read_device_tree_model(str(FIXTURES / name))
    assert raw is not None and raw.endswith("\0")
    assert parse_device_tree_string(raw) == model


def test_cpuinfo_model_line_is_the_fallback():
    text = (FIXTURES / "raspberry-pi-5/proc/cpuinfo").read_text()
    assert parse_cpuinfo_model(text) == "Raspberry Pi 5 Model B Rev 1.0"
    assert parse_board(None, {}, text, {}) == "Raspberry Pi 5 Model B Rev 1.0"
    assert parse_cpuinfo_model((FIXTURES / "x86-amx-server/proc/cpuinfo").read_text()) is None


@pytest.mark.parametrize(
    ("fields", "board"),
    [
        ({"sys_vendor": "LENOVO", "product_name": "20XW0026GE"}, "LENOVO 20XW0026GE"),
        ({"sys_vendor": "Dell Inc.", "product_name": "OptiPlex 7080"}, "Dell Inc. OptiPlex 7080"),
        ({"sys_vendor": "System manufacturer", "product_name": "System Product Name"}, None),
        (
            {"sys_vendor": "QEMU", "product_name": "QEMU Standard PC (Q35 + ICH9, 2009)"},
            "QEMU Standard PC (Q35 + ICH9, 2009)",
        ),
        ({}, None),
    ],
)
def test_parse_dmi(fields, board):
    assert parse_dmi(fields) == board


def test_device_tree_wins_over_dmi():
    assert (
        parse_board("Raspberry Pi 5 Model B Rev 1.0\0", {"product_name": "X"}, None, {})
        == "Raspberry Pi 5 Model B Rev 1.0"
    )


def test_os_release_and_kernel_from_a_captured_root():
    root = str(FIXTURES / "epyc-zen4-vm")
    assert read_os_name(root) == parse_os_release(
        (FIXTURES / "epyc-zen4-vm/etc/os-release").read_text()
    )
    assert read_os_name(root).startswith("Debian GNU/Linux")
    assert (
        read_kernel(root)
        == (FIXTURES / "epyc-zen4-vm/proc/sys/kernel/osrelease").read_text().strip()
    )


def test_missing_os_and_kernel_are_none():
    root = str(FIXTURES / "raspberry-pi-5")
    assert read_os_name(root) is None and read_kernel(root) is None

"""What the machine is: board model (device tree or DMI), operating system, kernel.

``read_*`` return raw text or None; ``parse_*`` are pure. The device-tree model is the
most specific name a single-board computer has ("Raspberry Pi 5 Model B Rev 1.0",
"NVIDIA Orin Nano Developer Kit"); PCs and servers name themselves through DMI.
"""

from __future__ import annotations

import platform

from agent.hardware.sysfs import is_live, read_first_line, read_text

# DMI fields vendors leave as placeholders; they name nothing.
_DMI_PLACEHOLDERS = {
    "",
    "to be filled by o.e.m.",
    "default string",
    "system product name",
    "not specified",
    "none",
}


def read_device_tree_model(root: str = "/") -> str | None:
    # /proc/device-tree is a link to /sys/firmware/devicetree/base; either may be missing.
    return read_text(root, "/proc/device-tree/model") or read_text(
        root, "/sys/firmware/devicetree/base/model"
    )


def read_dmi(root: str = "/") -> dict[str, str]:
    found = {}
    for field in ("sys_vendor", "product_name"):
        raw = read_first_line(root, f"/sys/class/dmi/id/{field}")
        if raw is not None:
            found[field] = raw
    return found


def parse_device_tree_string(raw: str) -> str | None:
    """Device-tree strings end in NUL (lists are NUL-separated); the first is the value."""
    value = raw.split("\0", 1)[0].strip()
    return value or None


def parse_dmi(fields: dict[str, str]) -> str | None:
    """ "LENOVO" + "20XW0026GE" → "LENOVO 20XW0026GE"; placeholders are dropped."""
    product = fields.get("product_name", "").strip()
    if product.lower() in _DMI_PLACEHOLDERS:
        return None
    vendor = fields.get("sys_vendor", "").strip()
    if vendor.lower() in _DMI_PLACEHOLDERS or product.lower().startswith(vendor.lower()):
        return product
    return f"{vendor} {product}"


def parse_cpuinfo_model(cpuinfo: str) -> str | None:
    """The "Model" line Raspberry Pi kernels add to /proc/cpuinfo (a fallback board name)."""
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == "Model" and value.strip():
            return value.strip()
    return None


def parse_board(
    device_tree_model: str | None,
    dmi: dict[str, str],
    cpuinfo: str | None,
    sysctl: dict[str, str],
) -> str | None:
    if device_tree_model and (model := parse_device_tree_string(device_tree_model)):
        return model
    if board := parse_dmi(dmi):
        return board
    if cpuinfo and (model := parse_cpuinfo_model(cpuinfo)):
        return model
    return sysctl.get("hw.model") or None


def read_os_release(root: str = "/") -> str | None:
    return read_text(root, "/etc/os-release") or read_text(root, "/usr/lib/os-release")


def parse_os_release(text: str) -> str | None:
    values = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            values[key.strip()] = value.strip().strip("\"'")
    return values.get("PRETTY_NAME") or values.get("NAME") or None


def read_os_name(root: str = "/") -> str | None:
    """os-release's PRETTY_NAME; on macOS (no os-release) "macOS <version>"."""
    text = read_os_release(root)
    if text is not None:
        return parse_os_release(text)
    if is_live(root) and platform.system() == "Darwin":
        version = platform.mac_ver()[0]
        return f"macOS {version}" if version else "macOS"
    return None


def read_kernel(root: str = "/") -> str | None:
    """The kernel release: /proc/sys/kernel/osrelease (so a fake root can carry one)."""
    release = read_first_line(root, "/proc/sys/kernel/osrelease")
    if release is None and is_live(root):
        release = platform.release() or None
    return release

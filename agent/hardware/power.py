"""Battery charge and mains power, from /sys/class/power_supply (psutil on the live
system covers macOS). None when the machine reports no power supply at all.

``read_*`` return raw text; ``parse_*`` are pure.
"""

from __future__ import annotations

from agent.hardware.device import PowerInfo
from agent.hardware.sysfs import is_live, read_first_line, under


def read_power_supplies(root: str = "/") -> dict[str, dict[str, str]]:
    """Per supply (BAT0, AC, ucsi-source-psy-…): its type, online, capacity and status."""
    base = under(root, "/sys/class/power_supply")
    try:
        names = sorted(p.name for p in base.iterdir())
    except OSError:
        return {}
    supplies = {}
    for name in names:
        files = {}
        for field in ("type", "online", "capacity", "status", "scope"):
            raw = read_first_line(root, f"/sys/class/power_supply/{name}/{field}")
            if raw is not None:
                files[field] = raw
        supplies[name] = files
    return supplies


def parse_power_supplies(supplies: dict[str, dict[str, str]]) -> PowerInfo | None:
    # "Device"-scoped batteries are peripherals (a mouse), not what powers this machine.
    batteries = [
        s for s in supplies.values() if s.get("type") == "Battery" and s.get("scope") != "Device"
    ]
    mains = [s for s in supplies.values() if s.get("type") in ("Mains", "USB", "USB_C", "USB_PD")]
    if not batteries and not mains:
        return None
    capacity = next((s["capacity"] for s in batteries if s.get("capacity", "").isdigit()), None)
    on_ac: bool | None = None
    if mains:
        on_ac = any(s.get("online") == "1" for s in mains)
    elif batteries and batteries[0].get("status") in ("Charging", "Full", "Discharging"):
        on_ac = batteries[0]["status"] != "Discharging"
    return PowerInfo(
        battery_percent=float(capacity) if capacity is not None else None, on_ac_power=on_ac
    )


def read_psutil_battery(root: str = "/") -> PowerInfo | None:
    if not is_live(root):
        return None
    try:
        import psutil

        battery = psutil.sensors_battery()
    except (AttributeError, OSError, RuntimeError):
        return None
    if battery is None:
        return None
    return PowerInfo(battery_percent=float(battery.percent), on_ac_power=battery.power_plugged)


def probe_power(root: str = "/") -> PowerInfo | None:
    return parse_power_supplies(read_power_supplies(root)) or read_psutil_battery(root)

"""Temperatures in °C from the kernel's thermal zones, plus psutil's sensors on the live
system. Absent sensors give an empty dict, never an error.

``read_*`` return raw text; ``parse_*`` are pure.
"""

from __future__ import annotations

import re

from agent.hardware.sysfs import is_live, read_first_line, under


def read_thermal_zones(root: str = "/") -> list[tuple[str, str]]:
    """(type, temp) raw pairs for every /sys/class/thermal/thermal_zone*."""
    base = under(root, "/sys/class/thermal")
    try:
        zones = sorted(
            (p.name for p in base.iterdir() if re.fullmatch(r"thermal_zone\d+", p.name)),
            key=lambda name: int(name[12:]),
        )
    except OSError:
        return []
    pairs = []
    for zone in zones:
        temp = read_first_line(root, f"/sys/class/thermal/{zone}/temp")
        if temp is not None:
            pairs.append((read_first_line(root, f"/sys/class/thermal/{zone}/type") or zone, temp))
    return pairs


def parse_thermal_zones(pairs: list[tuple[str, str]]) -> dict[str, float]:
    """Millidegrees → °C, keyed by zone type ("cpu-thermal"); repeats get "-1", "-2"."""
    temps: dict[str, float] = {}
    for zone_type, raw in pairs:
        if not re.fullmatch(r"-?\d+", raw):
            continue
        key = zone_type
        n = 1
        while key in temps:
            key = f"{zone_type}-{n}"
            n += 1
        temps[key] = int(raw) / 1000
    return temps


def read_psutil_temperatures(root: str = "/") -> dict[str, float]:
    """hwmon sensors through psutil (live root, Linux/FreeBSD); empty elsewhere."""
    if not is_live(root):
        return {}
    try:
        import psutil

        sensors = psutil.sensors_temperatures()
    except (AttributeError, OSError, RuntimeError):
        return {}
    temps = {}
    for chip, readings in sensors.items():
        for n, reading in enumerate(readings):
            temps[f"{chip}/{reading.label or n}"] = float(reading.current)
    return temps


def probe_temperatures(root: str = "/") -> dict[str, float]:
    temps = parse_thermal_zones(read_thermal_zones(root))
    for key, value in read_psutil_temperatures(root).items():
        temps.setdefault(key, value)
    return temps

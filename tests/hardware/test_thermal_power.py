"""Thermal zones and power supplies. File formats per the kernel ABI documents
(Documentation/ABI/testing/sysfs-class-thermal and sysfs-class-power): temp in
millidegrees Celsius; type/online/capacity/status/scope as one-word values."""

from __future__ import annotations

from pathlib import Path

from agent.hardware.power import parse_power_supplies, probe_power, read_power_supplies
from agent.hardware.thermal import parse_thermal_zones, probe_temperatures, read_thermal_zones


def _write(root: Path, files: dict[str, str]) -> None:
    for path, text in files.items():
        target = root / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)


def test_thermal_zones_in_celsius_with_unique_names(tmp_path):
    _write(
        tmp_path,
        {
            "sys/class/thermal/thermal_zone0/type": "cpu-thermal\n",
            "sys/class/thermal/thermal_zone0/temp": "53550\n",
            "sys/class/thermal/thermal_zone1/type": "cpu-thermal\n",
            "sys/class/thermal/thermal_zone1/temp": "-2000\n",
            "sys/class/thermal/thermal_zone2/type": "broken\n",
            "sys/class/thermal/thermal_zone2/temp": "N/A\n",
        },
    )
    assert parse_thermal_zones(read_thermal_zones(str(tmp_path))) == {
        "cpu-thermal": 53.55,
        "cpu-thermal-1": -2.0,
    }


def test_no_sensors_is_an_empty_dict(tmp_path):
    assert probe_temperatures(str(tmp_path)) == {}


def test_laptop_battery_and_mains(tmp_path):
    _write(
        tmp_path,
        {
            "sys/class/power_supply/AC/type": "Mains\n",
            "sys/class/power_supply/AC/online": "0\n",
            "sys/class/power_supply/BAT0/type": "Battery\n",
            "sys/class/power_supply/BAT0/capacity": "87\n",
            "sys/class/power_supply/BAT0/status": "Discharging\n",
            "sys/class/power_supply/hid-mouse-battery/type": "Battery\n",
            "sys/class/power_supply/hid-mouse-battery/scope": "Device\n",
            "sys/class/power_supply/hid-mouse-battery/capacity": "5\n",
        },
    )
    power = parse_power_supplies(read_power_supplies(str(tmp_path)))
    assert power is not None and (power.battery_percent, power.on_ac_power) == (87.0, False)


def test_battery_status_says_charging_when_there_is_no_mains_entry():
    power = parse_power_supplies(
        {"BAT0": {"type": "Battery", "capacity": "40", "status": "Charging"}}
    )
    assert power is not None and (power.battery_percent, power.on_ac_power) == (40.0, True)


def test_no_power_supply_is_none(tmp_path):
    assert probe_power(str(tmp_path)) is None
    assert parse_power_supplies({}) is None

"""The RAPL reader on a fake /sys/class/powercap tree: joules (with counter
wrap-around), package totals, and a plain message when RAPL is absent or unreadable."""

from __future__ import annotations

from pathlib import Path

import pytest

from pinfer.tools import energy
from pinfer.tools.energy import EnergyMeter, counter_delta_uj, find_rapl_zones, probe_rapl

MAX_RANGE = 262_143_328_850  # a real package-0 max_energy_range_uj


def make_zone(root: Path, zone_id: str, name: str, energy_uj: int, max_range: int = MAX_RANGE) -> Path:
    path = root / zone_id
    path.mkdir(parents=True)
    (path / "name").write_text(f"{name}\n")
    (path / "max_energy_range_uj").write_text(f"{max_range}\n")
    (path / "energy_uj").write_text(f"{energy_uj}\n")
    return path


def set_energy(path: Path, energy_uj: int) -> None:
    (path / "energy_uj").write_text(f"{energy_uj}\n")


@pytest.fixture
def fake_rapl(tmp_path: Path) -> dict[str, Path]:
    """One package with core and dram subzones, plus the control-type folder that has no counter."""
    (tmp_path / "intel-rapl").mkdir()  # /sys/class/powercap/intel-rapl: the control type, no energy_uj
    return {
        "package": make_zone(tmp_path, "intel-rapl:0", "package-0", 1_000_000),
        "core": make_zone(tmp_path, "intel-rapl:0:0", "core", 500_000),
        "dram": make_zone(tmp_path, "intel-rapl:0:1", "dram", 2_000_000),
    }


def test_zones_found_with_names_and_levels(tmp_path, fake_rapl):
    zones = find_rapl_zones(tmp_path)
    assert [(z.zone_id, z.name, z.is_top_level) for z in zones] == [
        ("intel-rapl:0", "package-0", True), ("intel-rapl:0:0", "core", False), ("intel-rapl:0:1", "dram", False)]
    probe = probe_rapl(tmp_path)
    assert probe.available and "package-0" in probe.message


def test_joules_are_counter_differences_and_the_total_is_the_package(tmp_path, fake_rapl):
    zones = probe_rapl(tmp_path).zones
    with EnergyMeter(zones) as meter:
        set_energy(fake_rapl["package"], 1_000_000 + 12_500_000)  # 12.5 J
        set_energy(fake_rapl["core"], 500_000 + 9_000_000)  # 9 J, part of the package
        set_energy(fake_rapl["dram"], 2_000_000 + 3_000_000)  # 3 J
    assert meter.result.zone_joules == {"intel-rapl:0": 12.5, "intel-rapl:0:0": 9.0, "intel-rapl:0:1": 3.0}
    assert meter.result.joules == 12.5  # subzones are not added on top of their package
    assert meter.result.cpu_seconds >= 0 and meter.result.wall_seconds >= 0


def test_wrap_around_adds_one_counter_range(tmp_path):
    path = make_zone(tmp_path, "intel-rapl:0", "package-0", 9_000_000, max_range=10_000_000)
    zones = find_rapl_zones(tmp_path)
    with EnergyMeter(zones) as meter:
        set_energy(path, 500_000)  # 9.0 J -> wrapped at 10.0 J -> 0.5 J: 1.5 J used
    assert meter.result.joules == pytest.approx(1.5)
    assert counter_delta_uj(9_000_000, 500_000, 10_000_000) == 1_500_000
    assert counter_delta_uj(100, 400, 10_000_000) == 300


def test_two_packages_are_summed(tmp_path):
    a = make_zone(tmp_path, "intel-rapl:0", "package-0", 0)
    b = make_zone(tmp_path, "intel-rapl:1", "package-1", 0)
    with EnergyMeter(find_rapl_zones(tmp_path)) as meter:
        set_energy(a, 2_000_000)
        set_energy(b, 3_000_000)
    assert meter.result.joules == pytest.approx(5.0)


def test_absent_rapl_says_so_and_falls_back_to_cpu_seconds(tmp_path, monkeypatch):
    monkeypatch.setattr(energy, "POWERCAP_ROOT", tmp_path / "powercap")  # does not even exist
    probe = probe_rapl()
    assert not probe.available and probe.zones == ()
    assert "not exposed" in probe.message and "CPU-seconds per generated token" in probe.message
    with EnergyMeter(probe.zones) as meter:
        sum(i * i for i in range(200_000))  # some CPU work
    assert meter.result.joules is None and meter.result.zone_joules == {}
    assert meter.result.cpu_seconds > 0


def test_unreadable_counter_is_reported_as_permission_denied(tmp_path, fake_rapl, monkeypatch):
    real_read_text = Path.read_text

    def read_text(self, *args, **kwargs):
        if self.name == "energy_uj":  # root reads anything, so simulate Linux's 0400 energy_uj
            raise PermissionError(13, "Permission denied", str(self))
        return real_read_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", read_text)
    probe = probe_rapl(tmp_path)
    assert not probe.available and probe.zones == ()
    assert "not readable" in probe.message and "permission denied" in probe.message
    assert "CPU-seconds per generated token" in probe.message

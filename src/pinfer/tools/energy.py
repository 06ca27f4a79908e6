"""Energy and CPU time of a measured run.

Energy comes from RAPL through the Linux powercap interface, which Intel and
AMD (Zen, via the same `intel_rapl` driver) expose as
`/sys/class/powercap/intel-rapl:<package>` zones with `intel-rapl:<package>:<n>`
subzones (core, uncore, dram). Each zone has a cumulative `energy_uj` counter
that wraps at `max_energy_range_uj`. Joules of a run = the counters' difference,
plus one range when a counter wrapped (a single wrap only: the package counter
spans hundreds of kJ, i.e. many minutes even at full power).

The reported total is the CPU package energy (the top-level `package-*` zones;
every zone is kept in the per-zone numbers). RAPL measures the whole package,
including other processes on the machine. Where RAPL is absent (virtual machines)
or unreadable (Linux >= 5.10 makes `energy_uj` root-only), nothing is estimated:
callers report CPU-seconds of this process (`time.process_time()`, all threads)
per generated token instead.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

# The powercap class folder; tests point this at a fake tree.
POWERCAP_ROOT = Path("/sys/class/powercap")


@dataclass(frozen=True)
class RaplZone:
    zone_id: str  # "intel-rapl:0" (package) or "intel-rapl:0:1" (subzone)
    name: str  # "package-0", "core", "uncore", "dram", "psys"
    path: Path
    max_energy_range_uj: int

    @property
    def is_top_level(self) -> bool:
        return self.zone_id.count(":") == 1


@dataclass(frozen=True)
class RaplProbe:
    available: bool
    message: str  # one plain sentence for the user
    zones: tuple[RaplZone, ...] = ()


def find_rapl_zones(root: Path | None = None) -> list[RaplZone]:
    """Every intel-rapl:* zone and subzone under the powercap root (the class folder
    links them all flat); missing files make a zone unusable, so it is skipped."""
    root = POWERCAP_ROOT if root is None else Path(root)
    zones = []
    for path in sorted(root.glob("intel-rapl:*")):
        try:
            name = (path / "name").read_text().strip()
            max_range = int((path / "max_energy_range_uj").read_text())
        except (OSError, ValueError):
            continue
        if (path / "energy_uj").exists():
            zones.append(RaplZone(path.name, name, path, max_range))
    return zones


def probe_rapl(root: Path | None = None) -> RaplProbe:
    """Are RAPL counters present and readable? Says why not, plainly."""
    root = POWERCAP_ROOT if root is None else Path(root)
    zones = find_rapl_zones(root)
    fallback = "reporting CPU-seconds per generated token instead (no joules are estimated)"
    if not zones:
        return RaplProbe(False, f"RAPL energy counters are not exposed on this machine (no {root}/intel-rapl:* "
                                f"zones, as usual in virtual machines): {fallback}")
    for zone in zones:
        try:
            int((zone.path / "energy_uj").read_text())
        except PermissionError:
            return RaplProbe(False, f"RAPL energy counters exist but {zone.path}/energy_uj is not readable "
                                    f"(permission denied; Linux >= 5.10 makes it root-only, run as root or "
                                    f"grant read access): {fallback}")
        except (OSError, ValueError) as exc:
            return RaplProbe(False, f"RAPL energy counter {zone.path}/energy_uj cannot be read ({exc}): {fallback}")
    names = ", ".join(f"{z.zone_id} ({z.name})" for z in zones)
    return RaplProbe(True, f"RAPL energy counters found: {names}; joules are CPU package energy "
                           f"(the whole package, including other processes)", tuple(zones))


def read_energy_uj(zones: tuple[RaplZone, ...] | list[RaplZone]) -> dict[str, int]:
    return {zone.zone_id: int((zone.path / "energy_uj").read_text()) for zone in zones}


def counter_delta_uj(before: int, after: int, max_energy_range_uj: int) -> int:
    """Microjoules between two readings of a counter that wraps at max_energy_range_uj."""
    delta = after - before
    return delta + max_energy_range_uj if delta < 0 else delta


def package_joules(zone_joules: dict[str, float], zones: tuple[RaplZone, ...] | list[RaplZone]) -> float:
    """CPU package energy: the top-level package-* zones (their subzones are parts of them;
    psys, where present, covers more than the CPU). Without package zones: all top-level zones."""
    top = [z for z in zones if z.is_top_level]
    packages = [z for z in top if z.name.startswith("package")] or top
    return sum(zone_joules[z.zone_id] for z in packages)


@dataclass
class Measurement:
    wall_seconds: float = 0.0
    cpu_seconds: float = 0.0  # this process, all threads
    joules: float | None = None  # CPU package energy; None without readable RAPL
    zone_joules: dict[str, float] = field(default_factory=dict)


class EnergyMeter:
    """Context manager around one measured run:

        with EnergyMeter(probe.zones) as meter:
            run()
        meter.result.cpu_seconds, meter.result.joules
    """

    def __init__(self, zones: tuple[RaplZone, ...] | list[RaplZone] = ()):
        self.zones = tuple(zones)
        self.result = Measurement()

    def __enter__(self) -> "EnergyMeter":
        self._energy = read_energy_uj(self.zones) if self.zones else {}
        self._cpu = time.process_time()
        self._wall = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        wall, cpu = time.perf_counter(), time.process_time()
        self.result.wall_seconds = wall - self._wall
        self.result.cpu_seconds = cpu - self._cpu
        if self.zones:
            after = read_energy_uj(self.zones)
            self.result.zone_joules = {
                z.zone_id: counter_delta_uj(self._energy[z.zone_id], after[z.zone_id], z.max_energy_range_uj) / 1e6
                for z in self.zones
            }
            self.result.joules = package_joules(self.result.zone_joules, self.zones)

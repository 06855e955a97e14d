"""The memory guard without a server: hysteresis (Pressure), the guard's callbacks, the cgroup
arithmetic of its limit (fake trees), and its config errors."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from gsrv.accept.guard import Guard, Pressure, Sample
from gsrv.accept.memlimit import Level, discover, read_level
from gsrv.config.parse import GuardConfig, parse
from gsrv.config.units import Amount
from gsrv.errors import ConfigError
from gsrv.logs import Log

MiB = 1024 * 1024
GiB = 1024 * MiB


def _cfg(**keys: object) -> GuardConfig:
    base = {"max_rss": 100 * MiB, "min_available": Amount(size=GiB), "resume_rss": 90 * MiB,
            "resume_available": Amount(size=2 * GiB), "resume_samples": 3}  # fmt: skip
    base.update(keys)
    return GuardConfig(**base)  # type: ignore[arg-type]


def _s(rss_mib: float, available_gib: float = 8.0) -> Sample:
    return Sample(int(rss_mib * MiB), int(available_gib * GiB), 16 * GiB, 0.0)


@pytest.mark.timeout(10)
def test_flapping_around_a_threshold_does_not_flap_accept() -> None:
    p = Pressure(_cfg())
    actions = [p.update(_s(rss)) for rss in (99, 100, 99, 101, 95, 99.9, 100, 89, 89, 95, 89, 89, 89)]
    assert actions.count("pause") == 1 and actions[1] == "pause"
    assert actions.count("resume") == 1 and actions[-1] == "resume"  # three calm samples in a row
    assert p.update(_s(99)) is None and p.update(_s(100)) == "pause"


@pytest.mark.timeout(10)
def test_available_memory_pressure_and_percent_thresholds() -> None:
    p = Pressure(_cfg(min_available=Amount(percent=10), resume_available=Amount(percent=15)))
    assert p.update(_s(10, available_gib=1.61)) is None  # 10% of 16 GiB is 1.6 GiB
    assert p.update(_s(10, available_gib=1.5)) == "pause" and p.reason == "available"
    assert [p.update(_s(10, available_gib=2.0)) for _ in range(3)] == [None, None, None]  # below 15%
    assert [p.update(_s(10, available_gib=2.5)) for _ in range(3)] == [None, None, "resume"]


class FakeSampler:
    def __init__(self, samples: list[Sample]) -> None:
        self.samples = samples

    def sample(self) -> Sample:
        return self.samples.pop(0)


@pytest.mark.timeout(10)
def test_guard_calls_back_once_per_transition_and_counts_pauses(tmp_path: Path) -> None:
    events: list[str] = []
    samples = [_s(50), _s(120), _s(130), _s(50), _s(50), _s(50), _s(50)]
    log_fd = os.open(tmp_path / "log", os.O_WRONLY | os.O_CREAT)
    guard = Guard(_cfg(), FakeSampler(samples), lambda r, s: events.append(f"pause:{r}"),  # type: ignore[arg-type]
                  lambda s: events.append("resume"), Log(log_fd))  # fmt: skip
    for _ in range(7):
        guard.check()
    assert events == ["pause:rss", "resume"]
    assert guard.pauses == 1 and not guard.paused
    os.close(log_fd)


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)


@pytest.mark.timeout(10)
def test_cgroup_v2_limit_on_a_parent_and_page_cache(tmp_path: Path) -> None:
    cg = tmp_path / "cg2"
    _write(cg, {
        "memory.current": "999999", "memory.stat": "anon 1\n",  # the root has no memory.max
        "app/memory.max": str(1 * GiB), "app/memory.current": str(900 * MiB),
        "app/memory.stat": f"anon {300 * MiB}\ninactive_file {700 * MiB}\n",
        "app/web/memory.max": "max", "app/web/memory.current": str(800 * MiB),
        "app/web/memory.stat": f"inactive_file {600 * MiB}\n",
    })  # fmt: skip
    proc = tmp_path / "proc"
    _write(proc, {
        "cgroup": "0::/app/web\n",
        "mountinfo": f"30 20 0:26 / {cg} rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n",
    })  # fmt: skip
    found = discover(str(proc))
    assert found is not None and found.version == 2
    assert found.dirs == (str(cg / "app/web"), str(cg / "app"), str(cg))
    # app: 1 GiB limit, 900 MiB used of which 700 MiB is reclaimable cache: 824 MiB left
    assert found.headroom() == (1 * GiB - 200 * MiB, 1 * GiB)


@pytest.mark.timeout(10)
def test_a_mount_path_with_a_space_is_read_as_the_containment_reads_it(tmp_path: Path) -> None:
    """mountinfo escapes a space as \\040: the guard and containment read mounts with one parser."""
    from gsrv.contain.host import mounts

    mem = tmp_path / "my cgroups" / "memory"
    _write(mem, {"box/memory.limit_in_bytes": str(GiB), "box/memory.usage_in_bytes": str(MiB),
                 "box/memory.stat": "total_inactive_file 0\n"})  # fmt: skip
    escaped = str(mem).replace(" ", "\\040")
    mountinfo = f"40 20 0:30 / {escaped} rw - cgroup cgroup rw,memory\n"
    proc = tmp_path / "proc"
    _write(proc, {"cgroup": "5:memory:/box\n", "mountinfo": mountinfo})
    found = discover(str(proc))
    assert found is not None and found.dirs == (str(mem / "box"), str(mem))
    assert found.headroom() == (GiB - MiB, GiB)
    assert [m.point for m in mounts(mountinfo)] == [str(mem)]


@pytest.mark.timeout(10)
def test_cgroup_v1_no_limit_is_not_a_limit(tmp_path: Path) -> None:
    mem = tmp_path / "memory"
    _write(mem, {
        "memory.limit_in_bytes": "9223372036854771712", "memory.usage_in_bytes": str(5 * GiB),
        "memory.stat": "total_inactive_file 0\n",
        "box/memory.limit_in_bytes": str(2 * GiB), "box/memory.usage_in_bytes": str(GiB + 512 * MiB),
        "box/memory.stat": f"cache {600 * MiB}\ntotal_inactive_file {512 * MiB}\n",
    })  # fmt: skip
    proc = tmp_path / "proc"
    _write(proc, {
        "cgroup": "5:memory:/box\n4:cpu:/\n0::/\n",
        "mountinfo": f"40 20 0:30 / {mem} rw - cgroup cgroup rw,memory\n"
        f"41 20 0:31 / {tmp_path}/unified rw - cgroup2 cgroup2 rw\n",
    })  # fmt: skip
    found = discover(str(proc))
    assert found is not None and found.version == 1
    assert read_level(1, str(mem)) == Level(None, 0)  # LONG_MAX: no limit, usage not needed
    assert found.headroom() == (GiB, 2 * GiB)
    _write(mem, {"box/memory.limit_in_bytes": "9223372036854771712"})
    assert found.headroom() == (None, None)


@pytest.mark.timeout(10)
def test_guard_config_errors() -> None:
    svc = '[services.a]\nlisten = "127.0.0.1:0"\ncommand = ["cat"]\n'
    cases = {
        '[guard]\nresume_rss = "2GiB"\n': '[guard] resume_rss must not be above max_rss 1GiB (got "2GiB", a string)',
        '[guard]\nmin_available = "10%"\nresume_available = "5%"\n':
            '[guard] resume_available must not be below min_available 10% (got "5%", a string)',
        '[guard]\nmin_available = "150%"\n':
            '[guard] min_available must be a percentage between 0 and 100, like "5%" (got "150%", a string)',
        '[guard]\ninterval = "10ms"\n': '[guard] interval must be between 50ms and 60s (got "10ms", a string)',
    }  # fmt: skip
    for text, message in cases.items():
        with pytest.raises(ConfigError) as err:
            parse("g.toml", text + svc)
        assert str(err.value) == f"g.toml: {message}"
    assert parse("g.toml", svc).guard == GuardConfig()


# -- a real gsrv -------------------------------------------------------------------------------

"""Real psutil figures on this machine, checked against /proc and statvfs."""

from __future__ import annotations

import os
from pathlib import Path

from agent.health.sampler import sample_host

MIB = 1 << 20


def _meminfo() -> dict[str, int]:
    out = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        key, value = line.split(":", 1)
        out[key] = int(value.split()[0]) * 1024
    return out


def _whole_disks() -> set[str]:
    return {p.name for p in Path("/sys/block").iterdir()}


def test_host_sample_matches_proc(tmp_path: Path) -> None:
    h = sample_host(tmp_path)
    mem = _meminfo()
    assert h.memory_total_bytes == mem["MemTotal"]
    assert abs(h.memory_available_bytes - mem["MemAvailable"]) < 256 * MIB
    assert h.swap_total_bytes == mem["SwapTotal"]
    load = [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    assert abs(h.load1 - load[0]) < 1.0 and abs(h.load15 - load[2]) < 0.2
    uptime = float(Path("/proc/uptime").read_text().split()[0])
    assert abs(h.uptime_s - uptime) < 2.0
    cores = [line for line in Path("/proc/stat").read_text().splitlines()
             if line.startswith("cpu") and line[3].isdigit()]
    assert len(h.cpu_per_core_pct) == len(cores) == os.cpu_count()
    assert 0.0 <= h.cpu_pct <= 100.0 and all(0.0 <= c <= 100.0 for c in h.cpu_per_core_pct)


def test_io_counters_match_proc(tmp_path: Path) -> None:
    h = sample_host(tmp_path)
    disks = _whole_disks()
    read = written = 0
    for line in Path("/proc/diskstats").read_text().splitlines():
        f = line.split()
        if f[2] in disks:
            read += int(f[5]) * 512
            written += int(f[9]) * 512
    # /proc is read after psutil: counters only grow in between
    assert 0 <= read - h.disk_read_bytes < 64 * MIB
    assert 0 <= written - h.disk_write_bytes < 256 * MIB
    rx = tx = 0
    for line in Path("/proc/net/dev").read_text().splitlines()[2:]:
        nic, data = line.split(":", 1)
        if nic.strip() != "lo":
            f = data.split()
            rx += int(f[0])
            tx += int(f[8])
    assert 0 <= rx - h.net_rx_bytes < 16 * MIB and 0 <= tx - h.net_tx_bytes < 16 * MIB


def test_data_partition_is_the_state_dirs_filesystem(tmp_path: Path) -> None:
    state = tmp_path / "not" / "yet" / "created"  # judged by its nearest existing parent
    h = sample_host(state)
    data = h.disk("data")
    assert data is not None and h.disk("root") is not None
    st = os.statvfs(tmp_path)
    assert data.total_bytes == st.f_blocks * st.f_frsize
    assert abs(data.used_bytes - (st.f_blocks - st.f_bfree) * st.f_frsize) < 64 * MIB
    assert os.path.ismount(data.mountpoint) and str(tmp_path).startswith(data.mountpoint)

"""Progress where work is long: the formatter (terminal and log lines), mmdebstrap/apt output
read as progress, the streaming tool gate, the rootfs stage's and the mirror's totals."""

from __future__ import annotations

import io
import os
import stat
import time
from pathlib import Path

import pytest

from provisioning import tools
from provisioning.errors import ToolError
from provisioning.image.aptlog import AptLog, parse_size
from provisioning.image.mirror import _store_debian
from provisioning.image.profile import load_profile
from provisioning.image.rootfs import build_rootfs_tar
from provisioning.output import Progress, format_progress, human_bytes
from provisioning.tools import run_lines

ROOT = Path(__file__).resolve().parent.parent


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_format_progress_counts_bytes_rates_and_eta() -> None:
    line = format_progress("rootfs", 42, 185, 10.0, unit="packages", phase="installing", bar_width=10)
    assert line == "rootfs: installing [##        ] 42/185 packages 23% 4.2/s ETA 34s"
    assert format_progress("download", 12_300_000, 45_600_000, 3.0, unit="B") == \
        "download 12.3 MB/45.6 MB 27% 4.1 MB/s ETA 8s"
    assert format_progress("files", 7, None, 2.0) == "files 7 3.5/s"
    assert format_progress("x", 0, None, 0.0) == "x 0"
    assert format_progress("x", 5, 5, 1.0, unit="files").endswith("5/5 files 100% 5.0/s")
    assert human_bytes(999) == "999 B" and human_bytes(1_500_000_000) == "1.5 GB"


def test_plain_lines_every_tenth_and_at_phase_changes() -> None:
    out, clock = io.StringIO(), Clock()
    bar = Progress("verify", 200, out, unit="files", clock=clock)
    for _ in range(200):
        clock.now += 0.01
        bar.advance()
    bar.set_phase("done")
    bar.finish()
    lines = out.getvalue().splitlines()
    assert [line.split()[3] for line in lines[:-1]] == [f"{p}%" for p in range(0, 101, 10)]
    assert lines[3].startswith("verify 60/200 files 30% ") and "/s ETA " in lines[3]
    assert lines[-1].startswith("verify: done 200/200 files 100%")
    assert "\r" not in out.getvalue()


def test_plain_lines_every_interval_without_a_total() -> None:
    out, clock = io.StringIO(), Clock()
    bar = Progress("download", None, out, unit="B", clock=clock, interval=10)
    for _ in range(60):  # one second per MB, for a minute
        clock.now += 1
        bar.advance(1_000_000)
    lines = out.getvalue().splitlines()
    assert len(lines) == 6 and lines[0] == "download 10.0 MB 1.0 MB/s"
    bar.set_total(120_000_000)  # apt said "Need to get": now a percent and an ETA
    assert out.getvalue().splitlines()[-1] == "download 60.0 MB/120.0 MB 50% 1.0 MB/s ETA 1m00s"


def test_terminal_bar_redraws_in_place_and_ends_with_a_newline() -> None:
    out, clock = Tty(), Clock()
    bar = Progress("rootfs", 4, out, unit="packages", clock=clock)
    bar.set_phase("extracting archives")
    for _ in range(4):
        clock.now += 1
        bar.advance()
    bar.stage("verify", 2, "files")
    text = out.getvalue()
    assert text.count("\n") == 1 and text.endswith("\x1b[K\n")
    assert "\rrootfs: extracting archives [" + "#" * 30 + "] 4/4 packages 100% 1.0/s\x1b[K" in text
    bar.advance()
    bar.finish()
    assert out.getvalue().endswith("1/2 files 50%\x1b[K\n")


MMDEBSTRAP = """\
I: automatically chosen mode: root
I: downloading packages with apt...
Get:1 http://deb.debian.org/debian trixie/main amd64 base-files amd64 13.8 [73.1 kB]
Get:2 http://deb.debian.org/debian trixie/main amd64 libc6 amd64 2.41-12 [2,851 kB]
Need to get 3,000 kB/3,100 kB of archives.
I: extracting archives...
I: installing essential packages...
Preparing to unpack .../base-files_13.8_amd64.deb ...
Unpacking base-files (13.8) over (13.8) ...
Unpacking libc6:amd64 (2.41-12) ...
Setting up libc6:amd64 (2.41-12) ...
I: installing remaining packages inside the chroot...
Unpacking python3.13 (3.13.5-2) ...
Unpacking base-files (13.8) over (13.8) ...
"""


def test_aptlog_reads_phases_downloads_and_unpacked_packages() -> None:
    state = AptLog()
    phases = []
    for line in MMDEBSTRAP.splitlines():
        state.feed(line)
        phases.append(state.phase)
    assert phases[1] == "downloading packages with apt"
    assert state.phase == "installing remaining packages inside the chroot"
    assert (state.downloaded, state.downloaded_bytes) == (2, 73_100 + 2_851_000)
    assert state.need_bytes == 3_000_000
    assert state.unpacked == {"base-files", "libc6", "python3.13"}  # each package once
    assert parse_size("1.5", "GB") == 1_500_000_000 and parse_size("12", "B") == 12


def test_run_lines_streams_and_fails_like_run() -> None:
    seen: list[str] = []
    done = run_lines(["/bin/sh", "-c", "echo one; echo two >&2"], seen.append)
    assert seen == ["one", "two"] and done.returncode == 0
    with pytest.raises(ToolError) as err:
        run_lines(["/bin/sh", "-c", "echo partial; echo 'E: no such package' >&2; exit 3"], seen.append)
    assert (err.value.tool, err.value.returncode) == ("sh", 3)
    assert "E: no such package" in str(err.value) and "exit code 3" in str(err.value)
    with pytest.raises(ToolError, match="nosuchtool"):
        run_lines(["/nonexistent/nosuchtool"], seen.append)


def test_run_lines_kills_the_child_when_we_fail_or_time_out() -> None:
    def boom(_line: str) -> None:
        raise RuntimeError("display failed")

    began = time.monotonic()
    with pytest.raises(RuntimeError):
        run_lines(["/bin/sh", "-c", "echo go; exec sleep 30"], boom)
    with pytest.raises(ToolError, match=r"timed out after 0\.5 s"):
        run_lines(["/bin/sh", "-c", "exec sleep 30"], lambda _l: None, timeout=0.5)
    assert time.monotonic() - began < 20


def test_rootfs_stage_shows_unpacked_packages_against_the_closure(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    # A stand-in mmdebstrap on PATH that speaks as the real one does with --verbose.
    bindir = tmp_path / "bin"
    bindir.mkdir()
    fake = bindir / "mmdebstrap"
    (tmp_path / "out.txt").write_text(MMDEBSTRAP)
    fake.write_text(f'#!/bin/sh\ncase " $* " in *" --verbose "*) ;; *) exit 9;; esac\n'
                    f'cat {tmp_path / "out.txt"}\nfor a; do last2=$last1; last1=$a; done\n'
                    f'echo tar > "$last2"\n')
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    # first on the gate's clean PATH, ahead of a real mmdebstrap (the system tier installs one)
    monkeypatch.setattr("provisioning.tools.CLEAN_PATH", f"{bindir}{os.pathsep}{tools.CLEAN_PATH}")
    profile = load_profile(ROOT / "images/minimal.toml")
    out = tmp_path / "rootfs.tar"
    build_rootfs_tar(profile, ("base-files",), tmp_path / "mirror", out, 0, closure=3)
    err = capsys.readouterr().err
    assert out.read_text() == "tar\n"
    assert "rootfs: installing essential packages" in err
    assert "rootfs: installing remaining packages inside the chroot 3/3 packages 100%" in err


def test_mirror_store_shows_packages_and_bytes_with_totals(tmp_path: Path) -> None:
    debs, lists, mirror = tmp_path / "debs", tmp_path / "lists", tmp_path / "mirror"
    debs.mkdir()
    lists.mkdir()
    for i, name in enumerate(("a", "b", "c", "d")):
        (debs / f"{name}_1.0_amd64.deb").write_bytes(b"x" * 250_000 * (i + 1))
    out, clock = io.StringIO(), Clock()
    bar = Progress("mirror", None, out, clock=clock)
    steps: list[str] = []
    locked, _ = _store_debian(mirror, debs, lists,
                              steps.append, bar=bar)
    assert len(locked) == 4 == len(steps)
    lines = out.getvalue().splitlines()
    assert lines[0] == "pool: hashing 4 packages 0 B/2.5 MB 0%"
    assert lines[-1].startswith("pool: hashing 4 packages 2.5 MB/2.5 MB 100%")

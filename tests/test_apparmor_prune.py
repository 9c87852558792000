"""AppArmor profiles of programs the image lacks are left out; every other profile stays."""

from __future__ import annotations

from pathlib import Path

from provisioning.image.apparmor import absent_program_profiles, glob_regex, image_paths, prune_profiles

PROFILES = {
    # absent programs: removed
    "gone": "abi <abi/4.0>,\ninclude <tunables/global>\n\n"
            "profile gone /opt/Gone/gone flags=(unconfined) {\n  userns,\n}\n",
    "glob-absent": "profile ga /usr/{bin,sbin}/absent flags=(unconfined) {\n}\n",
    "quoted": 'profile "Some App" "/opt/Some App/app" flags=(unconfined) {\n}\n',
    "old-style-absent": "/usr/bin/nothere {\n  /etc/x r,\n}\n",
    "var-absent": "profile va /usr/lib/@{multiarch}/nothing-here flags=(unconfined) {\n}\n",
    # present programs, names only, or nothing to attach: kept
    "merged": "profile merged /bin/prog flags=(unconfined) {\n}\n",
    "glob-present": "profile gp /{,usr/}{,s}bin/prog flags=(complain) {\n  /etc/shadow r,\n}\n",
    "old-style": "/usr/bin/prog flags=(complain) {\n}\n",
    "var-present": "profile vp /usr/lib/@{multiarch}/qt{5,6}/helper flags=(unconfined) {\n}\n",
    "named-only": "profile lsb_release {\n  /usr/bin/lsb_release r,\n}\n",
    "multi": "profile a /opt/absent/a {\n}\nprofile b /usr/sbin/tool {\n}\n",
    "mixed": "profile a /opt/absent/a {\n}\nprofile b {\n}\n",
    "comments": "# profile c /opt/absent/c {\n#include <tunables/global>\n",
}
GONE = {"gone", "glob-absent", "quoted", "old-style-absent", "var-absent"}


def _root(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    for d in ("usr/bin", "usr/sbin", "usr/lib/x86_64-linux-gnu/qt6", "etc/apparmor.d/abstractions",
              "etc/apparmor.d/local"):
        (root / d).mkdir(parents=True)
    (root / "bin").symlink_to("usr/bin")
    (root / "usr/bin/prog").write_text("#!/bin/sh\n")
    (root / "usr/sbin/tool").write_text("")
    (root / "usr/lib/x86_64-linux-gnu/qt6/helper").write_text("")
    (root / "etc/apparmor.d/abstractions/base").write_text("/opt/absent/z r,\n")
    for name, text in PROFILES.items():
        (root / "etc/apparmor.d" / name).write_text(text)
    (root / "etc/apparmor.d/link").symlink_to("gone")
    return root


def test_only_profiles_of_absent_programs_are_left_out(tmp_path: Path) -> None:
    root = _root(tmp_path)
    assert {p.name for p in absent_program_profiles(root)} == GONE
    assert sorted(prune_profiles(root)) == sorted(GONE)
    left = {p.name for p in (root / "etc/apparmor.d").iterdir()}
    assert left == (set(PROFILES) - GONE) | {"abstractions", "local", "link"}
    assert (root / "etc/apparmor.d/abstractions/base").is_file()
    assert prune_profiles(root) == []  # a second pass finds nothing more


def test_no_profile_directory_is_no_work(tmp_path: Path) -> None:
    assert prune_profiles(tmp_path) == []


def test_image_paths_see_merged_usr_and_do_not_follow_links(tmp_path: Path) -> None:
    root = _root(tmp_path)
    (root / "usr/lib/outside").symlink_to("/usr")  # the build host's /usr: never walked
    paths = image_paths(root)
    assert {"/usr/bin/prog", "/bin/prog", "/usr/lib/outside"} <= paths
    assert not any(p.startswith("/usr/lib/outside/") for p in paths)
    assert not any(p.startswith("/sbin/") for p in paths)  # no /sbin link in this root


def test_glob_regex_speaks_apparmors_globs() -> None:
    cases = {
        "/usr/{bin,sbin}/x": (["/usr/bin/x", "/usr/sbin/x"], ["/usr/lib/x", "/usr/bin/xy"]),
        "/{,usr/}{,s}bin/x": (["/bin/x", "/usr/sbin/x"], ["/usr/lib/x"]),
        "/opt/*/x": (["/opt/a/x"], ["/opt/a/b/x"]),
        "/opt/**/x": (["/opt/a/b/x"], ["/srv/x"]),
        "/opt/x?": (["/opt/x1"], ["/opt/x", "/opt/x/1"]),
        "/opt/[ab]": (["/opt/a"], ["/opt/c"]),
        "/opt/{a,b{c,d}}": (["/opt/a", "/opt/bd"], ["/opt/b"]),
        "/usr/lib/@{multiarch}/q": (["/usr/lib/x86_64-linux-gnu/q"], ["/usr/lib/q"]),
        "/opt/a.b+c": (["/opt/a.b+c"], ["/opt/aXb+c"]),
    }
    for pattern, (yes, no) in cases.items():
        regex = glob_regex(pattern)
        assert all(regex.match(p) for p in yes), (pattern, yes)
        assert not any(regex.match(p) for p in no), (pattern, no)

"""The fuzz harness without atheris: every target's seeds and saved findings, replayed.

``bench/fuzz.py`` fuzzes the targets of ``bench/fuzz_targets.py`` for minutes; this replays
what they start from (real inputs made by the project's tools) and every input a run found
(``bench/fuzz_corpus/TARGET/``) through the same wrappers, so that the harness cannot rot
and a fixed parser cannot regress: each input must end in success or a documented error.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.fuzz_targets import CORPUS_DIR, NAMES, run_one, saved_inputs, target


@pytest.mark.parametrize("name", NAMES)
def test_seeds_and_saved_findings_end_cleanly(name: str, tmp_path: Path) -> None:
    t = target(name)
    fn, seeds = t.prepare(tmp_path)
    assert seeds, f"{name}: no seed inputs"
    accepted = [run_one(t, fn, data) for data in seeds]
    # The seeds are real inputs of the format: at least one must pass the parser, or the
    # fuzzer starts from nothing but refusals.
    assert any(accepted), f"{name}: every seed is refused"
    for file, data in saved_inputs(name):
        try:
            run_one(t, fn, data)
        except Exception as exc:
            pytest.fail(f"{name}: saved input {file} raised {type(exc).__name__}: {exc}")


def test_saved_findings_belong_to_a_target() -> None:
    folders = {p.name for p in CORPUS_DIR.iterdir() if p.is_dir()} if CORPUS_DIR.is_dir() else set()
    assert folders <= set(NAMES), f"bench/fuzz_corpus/ has folders of no target: {folders - set(NAMES)}"


def test_a_finding_is_not_a_refusal(tmp_path: Path) -> None:
    """The wrapper lets anything but the documented errors through (to the fuzzer)."""
    t = target("golden")
    fn, _ = t.prepare(tmp_path)
    assert run_one(t, fn, b"not json") is False

    def broken(data: bytes) -> None:
        raise KeyError(data)

    with pytest.raises(KeyError):
        run_one(t, broken, b"x")

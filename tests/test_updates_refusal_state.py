"""Exactly what a refused update keeps (issue 19, finding 4d): the TUF metadata its refresh
verified, the clock floor taken from it and the event log (``KEPT_AFTER_REFUSAL``); every
other file under the state directory stays byte for byte.  A real TUF registry in a temp
dir, a real model store and ONNX Runtime sessions, the update manager in process."""

from __future__ import annotations

import asyncio
from pathlib import Path

from agent.config import InferenceSection, UpdatesSection
from agent.events import EventLog
from agent.inference.repository import ModelRepository
from agent.updates.manager import KEPT_AFTER_REFUSAL, UpdateManager
from testsupport.inference_support import with_wrong_golden
from testsupport.updates_support import affine_bundle_at, node_state, registry_with, state_hash


def _kept(rel: str) -> bool:
    return any(rel == k.rstrip("/") or rel.startswith(k) for k in KEPT_AFTER_REFUSAL)


def test_a_refused_update_keeps_only_verified_metadata_clock_and_events(tmp_path: Path) -> None:
    reg = registry_with(tmp_path, [affine_bundle_at(tmp_path, "1.0.1")])
    state = node_state(tmp_path / "state", reg, affine_bundle_at(tmp_path, "1.0.1"))
    events = EventLog.open(state)
    repo = ModelRepository.for_state_dir(state, InferenceSection())
    manager = UpdateManager(state, UpdatesSection(sources=(str(reg / "published"),), mount_glob=""),
                            repo, events)
    manager.recover()
    assert asyncio.run(manager.check())[0] == []  # the node holds current metadata and a clock floor
    before = state_hash(state)

    # The registry publishes (new metadata versions) a release whose golden vectors fail here.
    bad = with_wrong_golden(affine_bundle_at(tmp_path, "1.0.2"), tmp_path / "affine-1.0.2.bundle")
    registry_with(tmp_path, [bad], reg)
    (result,) = asyncio.run(manager.apply(["affine@1.0.2"]))
    assert result.outcome == "refused" and "golden" in result.reason, result

    after = state_hash(state)
    changed = {rel for rel in before.keys() | after.keys() if before.get(rel) != after.get(rel)}
    assert changed, "nothing changed: the refresh did not happen"
    assert {rel for rel in changed if not _kept(rel)} == set(), "a refusal changed more than it may"
    assert any(rel.startswith("tuf/metadata/") for rel in changed)  # newer genuine metadata is kept
    assert [e.kind for e in events.recent(kind_prefix="update.")] == ["update.refused"]

"""``appliance demo`` end to end, as a user runs it."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from provisioning.commands import demo
from tests.conftest import run_appliance


def test_demo_json() -> None:
    proc = run_appliance("demo", "--json", "--requests", "3", timeout=180)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["output"] == [[1.0, 3.0, 5.0, 7.0], [9.0, 11.0, 13.0, 15.0]]
    assert doc["provider"] == "CPUExecutionProvider"
    assert doc["statistics"]["requests"] == 3 and doc["statistics"]["inference_count"] == 6
    assert doc["metrics_sample"] == ['nv_inference_count{model="affine",version="1"} 6.0']
    chat = doc["chat"]
    assert chat["model"] == "tiny-llm" and chat["version"] == "1.0.0"
    # a real streamed reply: several chunks that spell the reply, with the usage the agent counted
    assert chat["reply"] and chat["chunks"] > 1
    assert chat["completion_tokens"] > 0 and chat["prompt_tokens"] > 0
    assert "asking tiny-llm for a streamed chat reply with the openai client" in proc.stderr
    assert "agent stopped" in proc.stderr


def test_demo_starts_again_when_a_port_is_taken_before_the_agent_binds_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # another process takes the HTTP port between the demo picking it and the agent binding it
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    picks = iter([demo._free_port(), int(taken.getsockname()[1])])
    monkeypatch.setattr(demo, "_free_port", lambda: next(picks, None) or _any_port())
    try:
        result = demo.run_demo(tmp_path, requests=1)
    finally:
        taken.close()
    assert result["output"] == [[1.0, 3.0, 5.0, 7.0], [9.0, 11.0, 13.0, 15.0]]
    first = (tmp_path / "agent-1.log").read_text()
    assert "address already in use" in first.lower()
    assert "agent: serving on" in (tmp_path / "agent-2.log").read_text()


def _any_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])

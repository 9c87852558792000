"""``appliance demo`` end to end, as a user runs it."""

from __future__ import annotations

import json

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

"""End to end: a real agent process serving installed generative bundles (the tiny LLM and
encoder) answers the ``openai`` client on its HTTPS port and ``tritonclient.grpc``'s streaming
client on its gRPC port, both over mTLS, and both stop cleanly on SIGTERM."""

from __future__ import annotations

import json
import queue
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest
import tritonclient.grpc as tg

from agent.config import InferenceSection
from agent.inference.repository import ModelRepository
from provisioning.demo.llm_models import write_decoder, write_encoder
from provisioning.genbundle import create_generative_bundle
from testsupport.http_support import site_pki, tls_config
from testsupport.inference_support import Agent, free_port


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return site_pki(tmp_path_factory.mktemp("pki") / "site", tmp_path_factory.mktemp("pki") / "other")


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory, pki: Path) -> Iterator[tuple[Agent, int]]:
    tmp = tmp_path_factory.mktemp("llm-agent")
    llm = tmp / "tiny-llm.bundle"
    create_generative_bundle(write_decoder(tmp / "dec"), llm, kind="llm", name="tiny-llm", version="1.0.0",
                             context_length=256, max_tokens=64, kv_budget_tokens=2048)
    embed = tmp / "tiny-embed.bundle"
    create_generative_bundle(write_encoder(tmp / "enc"), embed, kind="embedding", name="tiny-embed",
                             version="1.0.0", context_length=256, max_tokens=1, kv_budget_tokens=256)
    state = tmp / "state"
    repo = ModelRepository.for_state_dir(state, InferenceSection(intra_op_threads=1))
    repo.install(llm)
    repo.install(embed)
    http_port = free_port()
    a = Agent(state, "--config", str(tls_config(tmp, pki)), "--model", "tiny-llm", "--model", "tiny-embed",
              http_port=http_port, metrics_port=free_port())
    yield a, http_port
    assert a.stop() == 0, a.log()


def _files(pki: Path, who: str) -> tuple[str, str]:
    d = pki / "issued" / who
    return str(d / f"{who}.crt"), str(d / f"{who}.key")


def test_openai_client_against_the_agent(agent: tuple[Agent, int], pki: Path) -> None:
    _, port = agent
    ctx = ssl.create_default_context(cafile=str(pki / "ca.crt"))
    ctx.load_cert_chain(*_files(pki, "observer"))
    with openai.OpenAI(base_url=f"https://localhost:{port}/v1", api_key="unused", max_retries=0,
                       http_client=httpx.Client(verify=ctx, timeout=60)) as client:
        assert {m.id for m in client.models.list().data} == {"tiny-llm", "tiny-embed"}
        messages: Any = [{"role": "user", "content": "Hello"}]
        whole = client.chat.completions.create(model="tiny-llm", messages=messages, max_tokens=12,
                                               temperature=0)
        text = whole.choices[0].message.content
        assert text and whole.usage is not None and whole.usage.completion_tokens > 0
        streamed = client.chat.completions.create(model="tiny-llm", messages=messages, max_tokens=12,
                                                  temperature=0, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == text
        vectors = client.embeddings.create(model="tiny-embed", input=["a", "b"]).data
        assert len(vectors) == 2 and abs(float(np.linalg.norm(vectors[0].embedding)) - 1.0) < 1e-5
    with httpx.Client(verify=ctx) as scrape:
        text = scrape.get(f"https://localhost:{agent[0].metrics_port}/metrics").text
    model = 'gen_ai_request_model="tiny-llm"'
    assert f'gen_ai_server_kv_cache_budget_tokens{{{model}}} 2048.0' in text
    assert f'gen_ai_server_kv_cache_tokens{{{model}}} 0.0' in text
    usage = [ln for ln in text.splitlines()
             if ln.startswith("gen_ai_server_token_usage_total{") and model in ln and "output" in ln]
    assert usage and float(usage[0].split()[-1]) >= 2 * whole.usage.completion_tokens


def test_tritonclient_streams_the_llm_from_the_agent(agent: tuple[Agent, int], pki: Path) -> None:
    a, _ = agent
    crt, key = _files(pki, "observer")
    client = tg.InferenceServerClient(f"localhost:{a.port}", ssl=True, root_certificates=str(pki / "ca.crt"),
                                      private_key=key, certificate_chain=crt)
    text = tg.InferInput("text_input", [1], "BYTES")
    text.set_data_from_numpy(np.array([b"Hello"], dtype=object))
    stream = tg.InferInput("stream", [1], "BOOL")
    stream.set_data_from_numpy(np.array([True]))
    params = tg.InferInput("sampling_parameters", [1], "BYTES")
    params.set_data_from_numpy(np.array([b'{"max_tokens": 8, "temperature": 0}'], dtype=object))
    got: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client.start_stream(callback=lambda result, error: got.put((result, error)))
    client.async_stream_infer("tiny-llm", [text, stream, params], enable_empty_final_response=True)
    pieces = []
    while True:
        result, error = got.get(timeout=60)
        assert error is None, error
        response = result.get_response()
        if response.parameters["triton_final_response"].bool_param:
            break
        pieces.append(result.as_numpy("text_output")[0].decode())
    client.stop_stream()
    client.close()
    assert pieces and all(pieces)


def test_fleet_inventory_lists_the_llm_bundles_model(agent: tuple[Agent, int], pki: Path, cli: Any,
                                                      tmp_path: Path) -> None:
    """`appliance fleet inventory` (gRPC GetInventory over mTLS) shows each generative bundle's
    kind, context length, parameter count and quantisation, as its verified manifest states."""
    from provisioning.genbundle import model_size

    a, _ = agent
    params, quant = model_size(write_decoder(tmp_path / "dec") / "model.onnx")
    assert params > 0 and quant
    nodes = tmp_path / "nodes.toml"
    nodes.write_text(f'[[nodes]]\nname = "n0"\naddress = "127.0.0.1"\nport = {a.port}\n'
                     'tls_name = "localhost"\n')
    crt, key = _files(pki, "observer")
    auth = ["--ca", str(pki / "ca.crt"), "--cert", crt, "--key", key]
    result = cli("fleet", "inventory", "-i", nodes, "--json", *auth)
    assert result.code == 0, result.err
    bundles = {b["name"]: b for b in json.loads(result.out)["nodes"][0]["data"]["bundles"]}
    llm = bundles["tiny-llm"]
    # protobuf's JSON form writes a uint64 as a string
    assert (llm["kind"], llm["context_length"], llm["parameters"], llm["quantisation"]) == (
        "llm", 256, str(params), quant)
    assert (bundles["tiny-embed"]["kind"], bundles["tiny-embed"]["context_length"]) == ("embedding", 256)
    text = cli("fleet", "inventory", "-i", nodes, *auth)
    assert text.code == 0, text.err
    block = text.out.split("name: tiny-llm", 1)[1].split("name: tiny-embed", 1)[0]
    for line in ("kind: llm", "context_length: 256", f"parameters: {params}", f"quantisation: {quant}"):
        assert line in block, text.out


def test_inventory_from_the_store_alone_lists_the_same_and_survives_a_bad_manifest(
        agent: tuple[Agent, int], tmp_path: Path) -> None:
    """Without the inference component (the agent not serving), inventory reads the store:
    the same model facts; a manifest that no longer parses drops them and nothing else."""
    import shutil

    from agent.health.inventory import collect_inventory

    a, _ = agent
    state = tmp_path / "state"
    shutil.copytree(a.log_path.parent / "state/models", state / "models")  # the agent's store
    missing = tmp_path / "none"
    kw: dict[str, Any] = {"image_metadata": missing, "os_release": missing, "cmdline": missing,
                          "sys_block": missing, "cpuinfo": missing}
    bundles = {b.name: b for b in collect_inventory(state, **kw).bundles}
    llm = bundles["tiny-llm"]
    assert (llm.kind, llm.context_length, llm.parameters > 0, llm.quantisation != "") == (
        "llm", 256, True, True)
    (state / "models/tiny-llm/1.0.0/manifest.json").write_text("{not json")
    bundles = {b.name: b for b in collect_inventory(state, **kw).bundles}
    llm = bundles["tiny-llm"]
    assert (llm.version, llm.kind, llm.context_length, llm.parameters, llm.quantisation) == (
        "1.0.0", "llm", 0, 0, "")
    assert bundles["tiny-embed"].context_length == 256

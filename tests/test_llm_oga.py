"""agent.llm.oga, onnxruntime-genai's C API through ctypes, against its own Python binding on
the tiny decoder: the same tokens, the same text, errors as exceptions, objects freed in order."""

from __future__ import annotations

import ctypes
import gc
import json
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import onnxruntime_genai as og
import pytest

from agent.llm import oga
from provisioning.demo.llm_models import write_decoder

PROMPTS = ("The appliance keeps its models", "hi")
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def decoder_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_decoder(tmp_path_factory.mktemp("decoder"))


def _cpu(module: object, folder: Path) -> object:
    config = module.Config(str(folder))  # type: ignore[attr-defined]
    config.clear_providers()
    return module.Model(config)  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def both(decoder_dir: Path) -> tuple[oga.Model, object]:
    ours = _cpu(oga, decoder_dir)
    assert isinstance(ours, oga.Model)
    return ours, _cpu(og, decoder_dir)


def _batch(module: object, model: object, tokenizer: object, prompts: tuple[str, ...],
           new: int) -> list[list[int]]:
    """Greedy ids of ``prompts`` decoded as one batch, right-padded with the pad id."""
    rows = [list(tokenizer.encode(p)) for p in prompts]  # type: ignore[attr-defined]
    longest = max(len(r) for r in rows)
    tokens = np.full((len(rows), longest), tokenizer.pad_token_id, dtype=np.int32)  # type: ignore[attr-defined]
    for i, r in enumerate(rows):
        tokens[i, :len(r)] = r
    params = module.GeneratorParams(model)  # type: ignore[attr-defined]
    params.set_search_options(do_sample=False, max_length=longest + new, batch_size=len(rows))
    generator = module.Generator(model, params)  # type: ignore[attr-defined]
    generator.append_tokens(tokens)
    out: list[list[int]] = [[] for _ in rows]
    while not generator.is_done():
        generator.generate_next_token()
        for i, t in enumerate(generator.get_next_tokens()):
            out[i].append(int(t))
    return out


def test_a_batch_decodes_the_same_tokens_and_text_as_the_python_binding(
        both: tuple[oga.Model, object]) -> None:
    ours, theirs = both
    tok, their_tok = oga.Tokenizer(ours), og.Tokenizer(theirs)
    for p in PROMPTS:
        assert list(tok.encode(p)) == [int(t) for t in their_tok.encode(p)]
    assert tok.eos_token_ids == [int(t) for t in their_tok.eos_token_ids]
    assert tok.pad_token_id == int(their_tok.pad_token_id)

    got = _batch(oga, ours, tok, PROMPTS, 24)
    assert got == _batch(og, theirs, their_tok, PROMPTS, 24)
    assert len(got) == 2 and all(len(r) == 24 for r in got)

    ids = got[0]
    assert tok.decode(ids) == their_tok.decode(np.asarray(ids, dtype=np.int32))
    stream, their_stream = tok.create_stream(), their_tok.create_stream()
    assert [stream.decode(t) for t in ids] == [their_stream.decode(t) for t in ids]
    messages = json.dumps([{"role": "user", "content": "hello"}])
    theirs_chat = their_tok.apply_chat_template(messages, add_generation_prompt=True)
    assert tok.apply_chat_template(messages) == theirs_chat


def test_the_library_is_called_so_that_it_lets_go_of_the_gil() -> None:
    """ctypes.CDLL releases the GIL around each foreign call (ctypes.PyDLL would hold it, as
    the Python binding of onnxruntime-genai 0.11.2 does through a whole decode step)."""
    lib = oga.library()
    assert isinstance(lib, ctypes.CDLL) and not isinstance(lib, ctypes.PyDLL)
    assert Path(lib._name).parent == Path(og.__file__).resolve().parent  # the one the binding loaded
    keeps_gil = ctypes._FUNCFLAG_PYTHONAPI  # type: ignore[attr-defined]
    for slow in ("OgaGenerator_GenerateNextToken", "OgaGenerator_AppendTokens", "OgaCreateGenerator",
                 "OgaTokenizerEncode", "OgaCreateModelFromConfig", "OgaDestroyGenerator"):
        assert not getattr(lib, slow)._flags_ & keeps_gil, slow
    for quick in ("OgaGenerator_GetNextTokens", "OgaGenerator_IsDone", "OgaTokenizerStreamDecode"):
        assert getattr(lib, quick)._flags_ & keeps_gil, quick  # microseconds: not worth a GIL round trip


def test_library_errors_are_runtime_errors_with_its_message(tmp_path: Path, decoder_dir: Path,
                                                            both: tuple[oga.Model, object]) -> None:
    with pytest.raises(RuntimeError, match=r"genai_config\.json"):
        oga.Config(str(tmp_path / "nothing here"))
    params = oga.GeneratorParams(both[0])
    with pytest.raises(RuntimeError, match="no_such_option"):
        params.set_search_options(no_such_option=1)
    with pytest.raises(TypeError, match="search option top_k: str"):
        params.set_search_options(top_k="3")  # type: ignore[arg-type]
    no_graph = tmp_path / "config only"
    no_graph.mkdir()
    (no_graph / "genai_config.json").write_bytes((decoder_dir / "genai_config.json").read_bytes())
    config = oga.Config(str(no_graph))
    config.clear_providers()
    with pytest.raises(RuntimeError, match=r"model\.onnx"):
        oga.Model(config)


def test_a_closed_object_refuses_use_and_what_one_uses_outlives_it(decoder_dir: Path) -> None:
    model = _cpu(oga, decoder_dir)
    assert isinstance(model, oga.Model)
    tokenizer = oga.Tokenizer(model)
    params = oga.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=16)
    generator = oga.Generator(model, params)
    prompt = tokenizer.encode(PROMPTS[1])
    del model, params
    gc.collect()  # the generator keeps its model alive
    generator.append_tokens(prompt)
    generator.generate_next_token()
    assert generator.get_next_tokens().shape == (1,)
    generator.close()
    generator.close()  # once only
    with pytest.raises(RuntimeError, match="Generator is closed"):
        generator.generate_next_token()


def test_a_process_that_exits_with_objects_alive_exits_cleanly(decoder_dir: Path) -> None:
    """Left to interpreter teardown, a native object could be destroyed after the library shut
    down; the atexit hook destroys them first, users before what they use."""
    script = f"""
import sys
sys.path.insert(0, {str(ROOT)!r})
from agent.llm import oga
config = oga.Config({str(decoder_dir)!r}); config.clear_providers()
model = oga.Model(config); tokenizer = oga.Tokenizer(model); stream = tokenizer.create_stream()
params = oga.GeneratorParams(model); params.set_search_options(do_sample=False, max_length=32)
generator = oga.Generator(model, params); generator.append_tokens(tokenizer.encode("hi"))
generator.generate_next_token(); stream.decode(int(generator.get_next_tokens()[0]))
print("stepped")
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "stepped"
    assert "leaked" not in proc.stderr and "OGA Error" not in proc.stderr, proc.stderr


def _holding(lock: object) -> tuple[threading.Thread, threading.Event, threading.Event]:
    """A thread that holds ``lock`` (a family's guard) until told to let go."""
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with lock:  # type: ignore[attr-defined]
            held.set()
            release.wait(60)

    thread = threading.Thread(target=hold)
    thread.start()
    assert held.wait(30)
    return thread, held, release


def test_tokenizing_does_not_wait_for_the_models_calls(both: tuple[oga.Model, object]) -> None:
    """A decode step holds its model's lock (as long as the step takes); the tokenizer has its
    own, so a prompt is tokenized on the event loop meanwhile."""
    model = both[0]
    tokenizer = oga.Tokenizer(model)
    thread, _, release = _holding(model.lock)  # as a step in progress would
    try:
        done: list[list[int]] = []
        worker = threading.Thread(target=lambda: done.append([int(t) for t in tokenizer.encode(PROMPTS[0])]))
        worker.start()
        worker.join(30)
        assert done == [[int(t) for t in og.Tokenizer(both[1]).encode(PROMPTS[0])]]
    finally:
        release.set()
        thread.join()


def test_an_object_collected_while_another_thread_holds_its_lock_is_destroyed_by_the_next_holder(
        both: tuple[oga.Model, object]) -> None:
    """No collection waits for a lock (two threads collecting each other's objects would
    deadlock): the native generator is destroyed by the next call on its model."""
    model = both[0]
    params = oga.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=16)
    generator = oga.Generator(model, params)
    thread, _, release = _holding(model.lock)
    try:
        del generator  # collected here, in this thread, while the other holds the model's lock
        gc.collect()
        assert len(model.lock._later) == 1  # not destroyed, not waited for
    finally:
        release.set()
        thread.join()
    oga.GeneratorParams(model).close()  # the next call on the model destroys it first
    assert model.lock._later == []

"""The calls the engine makes into onnxruntime-genai, through its C API with ``ctypes``.

Why not its Python binding: in onnxruntime-genai 0.11.2 ``Generator.generate_next_token`` (and
``append_tokens``, the prefill) hold the GIL for the whole step.  Measured here with one
intra-op thread on two cores: a Python thread spinning beside a decode loop ran at 0.42x its
speed alone, and the step took 11.5 ms instead of 5.9 ms.  In the agent that stopped its event
loop for every token: the HTTPS and gRPC ports, health and other models' requests waited for
each step (or a whole prefill), and the streaming of one token could not overlap the decoding
of the next.  ``ctypes`` lets go of the GIL for every foreign call, so here it does.

The binding is the small part of the C API (``ort_genai_c.h``, in the same
``libonnxruntime-genai.so`` the Python module loads) that :mod:`agent.llm.engine` and
:mod:`agent.llm._batcher` use, with the same names and meanings as the Python binding's, so
``og.Generator(...)`` and ``oga.Generator(...)`` read alike.  Each object destroys its native
one when it is garbage-collected, and keeps the objects it was made from alive as long as it
lives (a generator its model, a tokenizer stream its tokenizer).  Errors from the library are
raised as ``RuntimeError`` with its message, as the Python binding raises them.

Threads: the C API is documented as not thread-safe, and the Python binding never ran two
calls at once (the GIL serialised them).  Letting go of the GIL must not change that, so calls
are serialised here instead, without blocking Python: every call on a model, its generator
parameters and generators holds the model's lock; every call on a tokenizer and its streams
holds the tokenizer's (tokenizing a prompt on the event loop does not wait for a decode step).
Python code runs beside any of them; two decode steps of one model take turns, as before.
"""

from __future__ import annotations

import atexit
import ctypes
import functools
import threading
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime_genai as _og  # loads libonnxruntime-genai.so and the onnxruntime it needs

__all__ = ["Config", "Generator", "GeneratorParams", "Model", "Tokenizer", "TokenizerStream"]

_P = ctypes.c_void_p
_I32P = ctypes.POINTER(ctypes.c_int32)

# (name, argument types, result type); every OgaResult*-returning call is checked
_SIGNATURES: tuple[tuple[str, list[Any], Any], ...] = (
    ("OgaResultGetError", [_P], ctypes.c_char_p),
    ("OgaDestroyResult", [_P], None),
    ("OgaDestroyString", [_P], None),
    ("OgaCreateConfig", [ctypes.c_char_p, ctypes.POINTER(_P)], _P),
    ("OgaDestroyConfig", [_P], None),
    ("OgaConfigClearProviders", [_P], _P),
    ("OgaConfigAppendProvider", [_P, ctypes.c_char_p], _P),
    ("OgaConfigOverlay", [_P, ctypes.c_char_p], _P),
    ("OgaCreateModelFromConfig", [_P, ctypes.POINTER(_P)], _P),
    ("OgaDestroyModel", [_P], None),
    ("OgaCreateTokenizer", [_P, ctypes.POINTER(_P)], _P),
    ("OgaDestroyTokenizer", [_P], None),
    ("OgaTokenizerGetEosTokenIds", [_P, ctypes.POINTER(_I32P), ctypes.POINTER(ctypes.c_size_t)], _P),
    ("OgaTokenizerGetPadTokenId", [_P, _I32P], _P),
    ("OgaTokenizerEncode", [_P, ctypes.c_char_p, _P], _P),
    ("OgaTokenizerDecode", [_P, _I32P, ctypes.c_size_t, ctypes.POINTER(_P)], _P),
    ("OgaTokenizerApplyChatTemplate",
     [_P, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_bool, ctypes.POINTER(_P)], _P),
    ("OgaCreateTokenizerStream", [_P, ctypes.POINTER(_P)], _P),
    ("OgaDestroyTokenizerStream", [_P], None),
    ("OgaTokenizerStreamDecode", [_P, ctypes.c_int32, ctypes.POINTER(ctypes.c_char_p)], _P),
    ("OgaCreateSequences", [ctypes.POINTER(_P)], _P),
    ("OgaDestroySequences", [_P], None),
    ("OgaSequencesCount", [_P], ctypes.c_size_t),
    ("OgaSequencesGetSequenceCount", [_P, ctypes.c_size_t], ctypes.c_size_t),
    ("OgaSequencesGetSequenceData", [_P, ctypes.c_size_t], _I32P),
    ("OgaCreateGeneratorParams", [_P, ctypes.POINTER(_P)], _P),
    ("OgaDestroyGeneratorParams", [_P], None),
    ("OgaGeneratorParamsSetSearchNumber", [_P, ctypes.c_char_p, ctypes.c_double], _P),
    ("OgaGeneratorParamsSetSearchBool", [_P, ctypes.c_char_p, ctypes.c_bool], _P),
    ("OgaCreateGenerator", [_P, _P, ctypes.POINTER(_P)], _P),
    ("OgaDestroyGenerator", [_P], None),
    ("OgaGenerator_IsDone", [_P], ctypes.c_bool),
    ("OgaGenerator_AppendTokens", [_P, _I32P, ctypes.c_size_t], _P),
    ("OgaGenerator_GenerateNextToken", [_P], _P),
    ("OgaGenerator_GetNextTokens", [_P, ctypes.POINTER(_I32P), ctypes.POINTER(ctypes.c_size_t)], _P),
)


# Calls that take microseconds keep the GIL (through ctypes.PyDLL): letting go of it and
# taking it back costs more than they do, and each take-back may wait for the event loop.
_QUICK = frozenset({
    "OgaResultGetError", "OgaDestroyResult", "OgaDestroyString", "OgaConfigClearProviders",
    "OgaConfigAppendProvider", "OgaTokenizerGetEosTokenIds", "OgaTokenizerGetPadTokenId",
    "OgaTokenizerStreamDecode", "OgaCreateSequences", "OgaDestroySequences", "OgaSequencesCount",
    "OgaSequencesGetSequenceCount", "OgaSequencesGetSequenceData", "OgaGeneratorParamsSetSearchNumber",
    "OgaGeneratorParamsSetSearchBool", "OgaGenerator_IsDone", "OgaGenerator_GetNextTokens",
})


@functools.cache
def library() -> ctypes.CDLL:
    """``libonnxruntime-genai.so`` beside the Python module (the one it loaded), with the
    signatures above declared; the :data:`_QUICK` calls keep the GIL, the others let go of it.

    Raises:
        RuntimeError: the library or one of its functions is missing.
    """
    path = Path(_og.__file__).resolve().parent / "libonnxruntime-genai.so"
    try:
        lib = ctypes.CDLL(str(path))  # CDLL: a call lets go of the GIL
        holding = ctypes.PyDLL(str(path))  # the same library, its calls keeping the GIL
        for name, argtypes, restype in _SIGNATURES:
            fn = getattr(holding if name in _QUICK else lib, name)
            fn.argtypes, fn.restype = argtypes, restype
            setattr(lib, name, fn)
    except (OSError, AttributeError) as exc:
        raise RuntimeError(f"onnxruntime-genai's C API is not usable from {path}: {exc}") from None
    return lib


def _check(result: int | None) -> None:
    """Raise the library's error if ``result`` (an ``OgaResult*``) is one."""
    if result:
        lib = library()
        message = lib.OgaResultGetError(result)
        lib.OgaDestroyResult(result)
        raise RuntimeError((message or b"onnxruntime-genai failed").decode("utf-8", "replace"))


def _int32s(data: Any, count: int) -> np.ndarray[Any, np.dtype[np.int32]]:
    """A copy of the library's ``count`` int32s at ``data`` (which it owns)."""
    return np.ctypeslib.as_array(data, shape=(count,)).copy() if count else np.zeros(0, dtype=np.int32)


def _text(data: bytes | None) -> str:
    return (data or b"").decode("utf-8", "replace")


class _Guard:
    """A family's lock (re-entrant), and the native objects of the family collected while
    another thread held it: destroyed by the next holder, so that a garbage collection never
    waits for a lock (two threads collecting each other's objects would deadlock)."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._later: list[tuple[str, int]] = []

    def __enter__(self) -> None:
        self._lock.acquire()
        self._flush()

    def __exit__(self, *exc: object) -> None:
        self._lock.release()

    def _flush(self) -> None:
        while self._later:
            destroy, pointer = self._later.pop()
            getattr(library(), destroy)(pointer)

    def destroy_soon(self, destroy: str, pointer: int) -> None:
        """Destroy now if the lock is free (or this thread's), after any left before (users
        before what they use: a family's model goes last), else at the next holder's turn."""
        if self._lock.acquire(blocking=False):
            try:
                self._flush()
                getattr(library(), destroy)(pointer)
            finally:
                self._lock.release()
        else:
            self._later.append((destroy, pointer))


class _Handle:
    """A native object, destroyed once, when this is collected (or by :meth:`close`); its
    calls hold ``lock`` (its family's, see the module docstring)."""

    _destroy = ""
    _ptr: int | None = None  # also when __init__ failed before it had one

    def __init__(self, pointer: int, *keep: object, guard: _Guard | None = None) -> None:
        self.lock = guard or _Guard()  # its own, or its family's
        self._ptr = pointer
        self._keep = keep  # what must outlive the native object
        _live.add(self)

    @property
    def ptr(self) -> int:
        if not self._ptr:
            raise RuntimeError(f"{type(self).__name__} is closed")
        return self._ptr

    def close(self) -> None:
        pointer, self._ptr = self._ptr, None
        if pointer:
            with self.lock:
                getattr(library(), self._destroy)(pointer)

    def __del__(self) -> None:
        pointer, self._ptr = self._ptr, None
        if pointer:  # set only after the lock
            self.lock.destroy_soon(self._destroy, pointer)


_live: weakref.WeakSet[_Handle] = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    """Destroy what is still alive, users before what they use, before the Python binding's
    module is torn down: its teardown shuts the library down (and reports live objects as
    leaked), after which destroying one would touch freed state."""
    order = ("Generator", "TokenizerStream", "GeneratorParams", "_Sequences", "Tokenizer", "Model", "Config")
    handles = list(_live)
    for name in order:
        for handle in handles:
            if type(handle).__name__ == name:
                handle.close()


def _create(fn: Any, *args: object) -> int:
    out = _P()
    _check(fn(*args, ctypes.byref(out)))
    if not out.value:
        raise RuntimeError(f"onnxruntime-genai: {fn.__name__} returned nothing")
    return int(out.value)


class Config(_Handle):
    _destroy = "OgaDestroyConfig"

    def __init__(self, folder: str) -> None:
        super().__init__(_create(library().OgaCreateConfig, folder.encode()))

    def clear_providers(self) -> None:
        _check(library().OgaConfigClearProviders(self.ptr))

    def append_provider(self, provider: str) -> None:
        _check(library().OgaConfigAppendProvider(self.ptr, provider.encode()))

    def overlay(self, json_text: str) -> None:
        _check(library().OgaConfigOverlay(self.ptr, json_text.encode()))


class Model(_Handle):
    _destroy = "OgaDestroyModel"

    def __init__(self, config: Config) -> None:
        super().__init__(_create(library().OgaCreateModelFromConfig, config.ptr))


class _Sequences(_Handle):
    _destroy = "OgaDestroySequences"

    def __init__(self) -> None:
        super().__init__(_create(library().OgaCreateSequences))

    def first(self) -> np.ndarray[Any, np.dtype[np.int32]]:
        lib = library()
        if lib.OgaSequencesCount(self.ptr) == 0:
            return _int32s(None, 0)
        count = lib.OgaSequencesGetSequenceCount(self.ptr, 0)
        return _int32s(lib.OgaSequencesGetSequenceData(self.ptr, 0), count)


class Tokenizer(_Handle):
    _destroy = "OgaDestroyTokenizer"

    def __init__(self, model: Model) -> None:
        with model.lock:
            pointer = _create(library().OgaCreateTokenizer, model.ptr)
        super().__init__(pointer, model)

    @property
    def eos_token_ids(self) -> list[int]:
        data, count = _I32P(), ctypes.c_size_t()
        with self.lock:
            _check(library().OgaTokenizerGetEosTokenIds(self.ptr, ctypes.byref(data), ctypes.byref(count)))
            return [int(data[i]) for i in range(count.value)]

    @property
    def pad_token_id(self) -> int:
        token = ctypes.c_int32()
        with self.lock:
            _check(library().OgaTokenizerGetPadTokenId(self.ptr, ctypes.byref(token)))
        return int(token.value)

    def encode(self, text: str) -> np.ndarray[Any, np.dtype[np.int32]]:
        sequences = _Sequences()
        try:
            with self.lock:
                _check(library().OgaTokenizerEncode(self.ptr, text.encode("utf-8", "replace"), sequences.ptr))
            return sequences.first()
        finally:
            sequences.close()

    def decode(self, tokens: Sequence[int]) -> str:
        ids = (ctypes.c_int32 * len(tokens))(*tokens)
        return self._owned_string(library().OgaTokenizerDecode, ids, len(tokens))

    def apply_chat_template(self, messages: str, *, template_str: str | None = None,
                            add_generation_prompt: bool = True) -> str:
        template = template_str.encode() if template_str is not None else None
        return self._owned_string(library().OgaTokenizerApplyChatTemplate, template, messages.encode(),
                                  None, add_generation_prompt)

    def _owned_string(self, fn: Any, *args: object) -> str:
        """The string ``fn`` returns, which the caller must destroy."""
        lib, out = library(), _P()
        with self.lock:
            _check(fn(self.ptr, *args, ctypes.byref(out)))
        if not out.value:
            return ""
        try:
            return _text(ctypes.string_at(out.value))
        finally:
            lib.OgaDestroyString(out.value)

    def create_stream(self) -> TokenizerStream:
        return TokenizerStream(self)


class TokenizerStream(_Handle):
    """Text of tokens as they come, a character only once its bytes are all there."""

    _destroy = "OgaDestroyTokenizerStream"

    def __init__(self, tokenizer: Tokenizer) -> None:
        with tokenizer.lock:
            pointer = _create(library().OgaCreateTokenizerStream, tokenizer.ptr)
        super().__init__(pointer, tokenizer, guard=tokenizer.lock)

    def decode(self, token: int) -> str:
        out = ctypes.c_char_p()  # the stream's own, valid until its next decode
        with self.lock:
            _check(library().OgaTokenizerStreamDecode(self.ptr, int(token), ctypes.byref(out)))
            return _text(out.value)


class GeneratorParams(_Handle):
    _destroy = "OgaDestroyGeneratorParams"

    def __init__(self, model: Model) -> None:
        with model.lock:
            pointer = _create(library().OgaCreateGeneratorParams, model.ptr)
        super().__init__(pointer, model, guard=model.lock)

    def set_search_options(self, **options: bool | int | float) -> None:
        """As the Python binding's: a bool goes as a bool option, a number as a number."""
        lib = library()
        for name, value in options.items():
            if not isinstance(value, bool | int | float):
                raise TypeError(f"search option {name}: {type(value).__name__} is not a bool or number")
            with self.lock:
                if isinstance(value, bool):
                    _check(lib.OgaGeneratorParamsSetSearchBool(self.ptr, name.encode(), value))
                else:
                    _check(lib.OgaGeneratorParamsSetSearchNumber(self.ptr, name.encode(), float(value)))


class Generator(_Handle):
    """One batch of sequences; every call lets go of the GIL while the library works."""

    _destroy = "OgaDestroyGenerator"

    def __init__(self, model: Model, params: GeneratorParams) -> None:
        with model.lock:
            pointer = _create(library().OgaCreateGenerator, model.ptr, params.ptr)
        super().__init__(pointer, model, guard=model.lock)

    def append_tokens(self, tokens: np.ndarray[Any, Any]) -> None:
        """Prompt tokens: one row, or one per sequence (``[batch, length]``, padded)."""
        flat = np.ascontiguousarray(tokens, dtype=np.int32).reshape(-1)
        with self.lock:
            _check(library().OgaGenerator_AppendTokens(self.ptr, flat.ctypes.data_as(_I32P), flat.size))

    def generate_next_token(self) -> None:
        with self.lock:
            _check(library().OgaGenerator_GenerateNextToken(self.ptr))

    def get_next_tokens(self) -> np.ndarray[Any, np.dtype[np.int32]]:
        """The token each sequence took in the last step."""
        data, count = _I32P(), ctypes.c_size_t()
        with self.lock:
            _check(library().OgaGenerator_GetNextTokens(self.ptr, ctypes.byref(data), ctypes.byref(count)))
            return _int32s(data, count.value)

    def is_done(self) -> bool:
        with self.lock:
            return bool(library().OgaGenerator_IsDone(self.ptr))

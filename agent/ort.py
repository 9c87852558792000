"""ONNX Runtime sessions with execution providers chosen by what can actually load.

``onnxruntime-gpu`` lists the CUDA and TensorRT providers even on a machine without CUDA,
and creating a session that asks for them there logs a loud error.  We ask only for the
providers whose libraries load here, so a CPU-only node logs nothing alarming.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

import onnxruntime as ort

from agent.errors import BundleError
from agent.lifecycle import physical_cores
from agent.modelrefs import ModelCheck, check_model_files

__all__ = ["CPU", "CUDA", "TENSORRT", "build_cuda_version", "cuda_libraries", "default_intra_op_threads",
           "make_session", "provider_entries", "usable_providers"]

log = logging.getLogger(__name__)

TENSORRT = "TensorrtExecutionProvider"
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"

def cuda_libraries(cuda_version: str) -> tuple[str, ...]:
    """The shared libraries the CUDA provider of a build for ``cuda_version`` needs.

    The sonames follow the CUDA major the wheel was built for (its ``build_and_package_info``):
    cuBLAS and the runtime carry that major, cuFFT is 11 for CUDA 12 and 12 for CUDA 13, cuRAND
    and cuDNN 9 are the same for both.  The driver's ``libcuda.so.1`` comes first: absent means
    no usable GPU.

    Raises:
        ValueError: ``cuda_version`` does not start with a CUDA major this table knows.
    """
    major = cuda_version.split(".", 1)[0]
    if major not in ("12", "13"):
        raise ValueError(f"onnxruntime was built for CUDA {cuda_version!r}; "
                         "this agent knows the libraries of CUDA 12 and 13 builds")
    cufft = "11" if major == "12" else "12"
    return ("libcuda.so.1", f"libcudart.so.{major}", f"libcublas.so.{major}",
            f"libcublasLt.so.{major}", "libcudnn.so.9", f"libcufft.so.{cufft}", "libcurand.so.10")


def build_cuda_version() -> str:
    """The CUDA version this onnxruntime was built for ("" for a CPU build)."""
    try:
        from onnxruntime.capi import build_and_package_info as info
    except ImportError:
        return ""
    return str(getattr(info, "cuda_version", "") or "")


_TRT_LIBS = ("libnvinfer.so.10", "libnvinfer_plugin.so.10", "libnvonnxparser.so.10")


def _loads(names: Sequence[str]) -> str | None:
    """None when every library loads, else the first one that does not."""
    for name in names:
        try:
            ctypes.CDLL(name)
        except OSError:
            return name
    return None


@functools.cache
def usable_providers() -> tuple[str, ...]:
    """Providers this process can really use, best first (TensorRT, CUDA, CPU)."""
    listed = set(ort.get_available_providers())
    usable: list[str] = []
    if CUDA in listed:
        try:
            libraries = cuda_libraries(build_cuda_version())
        except ValueError as e:
            log.warning("CUDA provider not used: %s", e)
            libraries = ()
        preload = getattr(ort, "preload_dlls", None)
        if libraries and preload is not None and _loads(libraries[:1]) is None:
            try:
                preload(directory="")  # libraries of the nvidia-* CUDA wheels, if installed
            except Exception:
                log.debug("onnxruntime.preload_dlls failed", exc_info=True)
        missing = _loads(libraries) if libraries else "a known CUDA build"
        if missing is None:
            if TENSORRT in listed and _loads(_TRT_LIBS) is None:
                usable.append(TENSORRT)
            usable.append(CUDA)
        else:
            log.debug("CUDA provider not usable: %s does not load", missing)
    usable.append(CPU)
    return tuple(usable)


def provider_entries(providers: Sequence[str], *, tf32: bool = False) -> list[Any]:
    """``providers`` as ONNX Runtime takes them, with the options this agent sets.

    CUDA gets ``use_tf32`` explicitly: ONNX Runtime's default lets cuBLAS run FP32 matrix
    products in TF32, which on an H100 moved a 16-layer dense model's outputs by 1e-3 from the
    CPU's, beyond a bundle's default tolerance.  Full FP32 unless the bundle allows TF32.
    """
    return [(p, {"use_tf32": "1" if tf32 else "0"}) if p == CUDA else p for p in providers]


# Where ONNX Runtime resolves a model's relative external-data names when the model is given
# as bytes (otherwise: the process's working directory).
_DATA_DIR_KEY = "session.model_external_initializers_file_folder_path"


def default_intra_op_threads() -> int:
    """ONNX Runtime's own default, one thread per physical core, within the CPUs this process
    may run on.  Given explicitly, because with the default ONNX Runtime pins its threads to
    cores, and pinning needs ``sched_setaffinity``, which the agent's unit forbids
    (``SystemCallFilter=~@resources``): every session then logged an error."""
    return physical_cores()


def _same_check(checked: ModelCheck, model: bytes, members: frozenset[str], origin: str) -> None:
    """Raises BundleError unless ``checked`` is the verdict on ``model`` with ``members``."""
    digest = hashlib.sha256(model).hexdigest()  # hashlib lets go of the GIL on large buffers
    if digest != checked.sha256:
        raise BundleError(f"{origin}: the model's bytes (sha256 {digest}) are not the ones its file "
                          f"check passed (sha256 {checked.sha256}); refused")
    if checked.members != members:
        raise BundleError(f"{origin}: its file check allowed the data files "
                          f"{sorted(checked.members)}, not {sorted(members)}; refused")


def make_session(
    model: bytes,
    *,
    model_dir: Path | None = None,
    data_files: Collection[str] = (),
    origin: str = "model",
    providers: Sequence[str] | None = None,
    intra_op_threads: int = 0,
    inter_op_threads: int = 0,
    tf32: bool = False,
    checked: ModelCheck | None = None,
) -> Any:
    """An ``InferenceSession`` on the best usable providers (or the given subset of them).

    Every session of this product is made here, from bytes that were hash-checked, and only
    after :func:`agent.modelrefs.check_model_files`: a tensor may keep its data outside the
    model only in one of ``data_files`` (hashed members of its bundle), which resolve inside
    ``model_dir`` and nowhere else (without ``model_dir``, nowhere at all).
    ``tf32``: let CUDA run FP32 matrix products in TF32 (see :func:`provider_entries`).
    ``checked``: that check made already (:func:`agent.modelrefs.check_model`, in a worker
    process so that parsing a large model does not hold this interpreter); it stands in for
    the check only when it was made on bytes of this very sha256 with the same data files.

    Raises:
        BundleError: the model refers to a file it may not read (naming ``origin``), or
            ``checked`` was made on other bytes or other data files.
        Whatever ONNX Runtime raises for a model it cannot load; callers translate.
    """
    members = frozenset(data_files if model_dir is not None else ())
    if checked is None:
        check_model_files(model, members, origin)
    else:
        _same_check(checked, model, members, origin)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # errors only: the provider choice above avoids false alarms
    if model_dir is not None:
        opts.add_session_config_entry(_DATA_DIR_KEY, str(model_dir))
    opts.intra_op_num_threads = intra_op_threads or default_intra_op_threads()
    if inter_op_threads:
        opts.inter_op_num_threads = inter_op_threads
    chosen = [p for p in (providers or usable_providers()) if p in usable_providers()] or [CPU]
    return ort.InferenceSession(model, sess_options=opts,
                                providers=provider_entries(chosen, tf32=tf32))

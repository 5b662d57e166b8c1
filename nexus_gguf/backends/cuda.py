"""The CUDA library (native/cuda/nxkv_cuda.cu, built by CMake where nvcc is found) bound with cffi
in ABI mode, as backends/native.py binds the CPU one. It loads only where the library is built and
a CUDA device answers; anything else is a NativeLibraryError that says why, never an import
failure. Every function takes and returns host arrays (the library uploads and downloads itself).

The per-op functions here have the CPU ops' contracts, for NEXUS_GGUF_BACKEND=cuda and the
parity tests; each one is a round trip over the bus, so the GPU's real work is decode_sections
(section_decode.py builds its batch): a whole file's lattice sections in one call."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

from ..errors import NativeLibraryError
from . import ffi_module, native

_PKG = Path(__file__).resolve().parent.parent
_lib = _ffi = None
_device: tuple[str, int, int] | None = None
_ERR = 512


def _library_names() -> list[str]:
    if sys.platform == "darwin":
        return []  # no CUDA on macOS (the Metal kernels are the GPU path there)
    if os.name == "nt":
        return ["nxkv_cuda.dll", "libnxkv_cuda.dll"]
    return ["libnxkv_cuda.so"]


def load():
    """(ffi, lib), loading once. Raises NativeLibraryError with the reason if the library is not
    built, does not load, or finds no CUDA device."""
    global _lib, _ffi, _device
    if _lib is not None:
        return _ffi, _lib

    native_dir = _PKG / "_native"
    names = _library_names()
    if not names and not os.environ.get("NEXUS_GGUF_CUDA_LIB"):
        raise NativeLibraryError("CUDA is not supported on this platform")
    try:
        lib_path = native._find("NEXUS_GGUF_CUDA_LIB", [native_dir / n for n in names])
    except NativeLibraryError:
        raise NativeLibraryError(
            f"nexus-gguf's CUDA library is not built (looked in {native_dir}): it is built by CMake where "
            "nvcc is found (pip install . or cmake -S . -B build && cmake --build build on a machine with the CUDA toolkit)"
        ) from None
    header = native._find("NEXUS_GGUF_CUDA_HEADER", [native_dir / "nxkv_cuda.h", _PKG.parent / "native/include/nxkv_cuda.h"])
    # nxkv.h (beside it) declares nxkv_section; its CPU functions are not looked up here
    cdef = native._cdef(header.parent / "nxkv.h") + native._cdef(header, "NXKV_CUDA_CDEF")
    # as CMake parsed them beside the library (backends/ffi_module.py), else now
    ffi, _ = ffi_module.ffi_for(lib_path.parent / "nxkv_cuda_ffi.py", cdef)
    try:
        lib = ffi.dlopen(str(lib_path))
    except OSError as e:
        raise NativeLibraryError(f"cannot load {lib_path}: {e}") from None
    if lib.nxkv_cuda_abi_version() != lib.NXKV_CUDA_ABI_VERSION:
        raise NativeLibraryError(f"{lib_path} has ABI version {lib.nxkv_cuda_abi_version()}, its header says "
                                 f"{lib.NXKV_CUDA_ABI_VERSION}; rebuild it")
    name = ffi.new("char[]", _ERR)
    major, minor = ffi.new("int *"), ffi.new("int *")
    if lib.nxkv_cuda_device(name, _ERR, major, minor) != lib.NXKV_CUDA_OK:
        raise NativeLibraryError(f"no usable CUDA device: {ffi.string(name).decode(errors='replace')}")
    _device = (ffi.string(name).decode(errors="replace"), major[0], minor[0])
    _ffi, _lib = ffi, lib
    return ffi, lib


def device() -> tuple[str, int, int]:
    """(name, compute capability major, minor) of the device the library uses."""
    load()
    assert _device is not None
    return _device


class CudaError(RuntimeError):
    """A CUDA call failed: the device, not the data."""


def _check(r: int, err, what: str) -> None:
    ffi, lib = load()
    if r == lib.NXKV_CUDA_OK:
        return
    if r == lib.NXKV_CUDA_ERR_DEVICE:
        raise CudaError(f"{what}: {ffi.string(err).decode(errors='replace')}")
    if r == lib.NXKV_CUDA_ERR_CORRUPT:
        raise ValueError(f"{what}: rANS stream is corrupt (a lane ends early or does not decode to its start state)")
    raise ValueError(f"{what}: arguments out of range")


def _in(ffi, kind: str, a: np.ndarray):
    return ffi.from_buffer(kind, a, require_writable=False)


def lattice_dequantize(coset, coord, coord_last, step, mean) -> np.ndarray:
    ffi, lib = load()
    coset, coord, coord_last, step, mean = native.lattice_dequantize_args(coset, coord, coord_last, step, mean)
    m = coset.size
    out = np.empty((m, 8), np.float32)
    err = ffi.new("char[]", _ERR)
    r = lib.nxkv_cuda_lattice_dequantize(_in(ffi, "uint8_t[]", coset), _in(ffi, "int32_t[]", coord),
                                         _in(ffi, "int32_t[]", coord_last), _in(ffi, "double[]", step), m,
                                         _in(ffi, "double[]", mean) if mean.size else ffi.NULL, mean.size // 8,
                                         ffi.from_buffer("float[]", out), err, _ERR)
    _check(r, err, "lattice_dequantize")
    return out


def lattice_quantize(x: np.ndarray, step: np.ndarray):
    ffi, lib = load()
    x, step, coset, coord, last = native.lattice_quantize_args(x, step)
    m = x.shape[0]
    err = ffi.new("char[]", _ERR)
    r = lib.nxkv_cuda_lattice_quantize(_in(ffi, "double[]", x), _in(ffi, "double[]", step), m,
                                       ffi.from_buffer("uint8_t[]", coset), ffi.from_buffer("int32_t[]", coord),
                                       ffi.from_buffer("int32_t[]", last), err, _ERR)
    if r == lib.NXKV_CUDA_ERR_ARG:
        raise ValueError("lattice_quantize: values too large for their steps (points beyond int32)")
    _check(r, err, "lattice_quantize")
    return coset, coord, last


def hadamard_blocks(x: np.ndarray, block: int) -> np.ndarray:
    ffi, lib = load()
    src = np.ascontiguousarray(x, np.float32)
    if src.ndim == 0 or src.shape[-1] % max(block, 1) or block < 1 or block & (block - 1):
        raise ValueError(f"Hadamard size {block} is not a power of two dividing rows of {src.shape[-1] if src.ndim else 0}")
    out = np.empty_like(src)
    err = ffi.new("char[]", _ERR)
    _check(lib.nxkv_cuda_hadamard_blocks(_in(ffi, "float[]", src), ffi.from_buffer("float[]", out), src.size, block, err, _ERR),
           err, "hadamard_blocks")
    return out


def rope_rotate(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, n_rot: int, neox: bool) -> np.ndarray:
    ffi, lib = load()
    x, cos, sin = native.rope_args(x, cos, sin, n_rot)
    n, h, d = x.shape
    out = np.empty_like(x)
    err = ffi.new("char[]", _ERR)
    _check(lib.nxkv_cuda_rope_rotate(_in(ffi, "float[]", x), ffi.from_buffer("float[]", out), n, h, d,
                                     _in(ffi, "double[]", cos), _in(ffi, "double[]", sin), n_rot, int(bool(neox)), err, _ERR),
           err, "rope_rotate")
    return out


def f32_to_f16(x: np.ndarray) -> np.ndarray:
    ffi, lib = load()
    x = np.ascontiguousarray(x, np.float32)
    out = np.empty(x.shape, "<u2")
    err = ffi.new("char[]", _ERR)
    _check(lib.nxkv_cuda_f32_to_f16(_in(ffi, "float[]", x), ffi.from_buffer("uint16_t[]", out), x.size, err, _ERR), err,
           "f32_to_f16")
    return out


def rans_decode_lanes(data: bytes, lengths: np.ndarray, freqs: np.ndarray, n: int, lanes: int, chunk: int) -> np.ndarray:
    from .reference import n_lane_tasks

    ffi, lib = load()
    lengths = np.ascontiguousarray(lengths, np.int64)
    if lengths.size != n_lane_tasks(n, lanes, chunk) or int(lengths.sum()) != len(data):
        raise ValueError("interleaved rANS lane table does not match the stream")
    freqs = np.ascontiguousarray(freqs, np.int64)
    out = np.empty(n, np.int32)
    err = ffi.new("char[]", _ERR)
    r = lib.nxkv_cuda_rans_decode_lanes(data, len(data), _in(ffi, "int64_t[]", lengths), lengths.size,
                                        _in(ffi, "int64_t[]", freqs), freqs.size, ffi.from_buffer("int32_t[]", out), n, lanes,
                                        chunk, err, _ERR)
    if r == lib.NXKV_CUDA_ERR_ARG:
        raise ValueError("interleaved rANS: frequencies do not sum to 2^14 or the lane table is inconsistent")
    _check(r, err, "rans_decode_lanes")
    return out


def rans_encode_lanes(symbols: np.ndarray, freqs: np.ndarray, lanes: int, chunk: int):
    from .reference import lane_tasks

    ffi, lib = load()
    symbols = np.ascontiguousarray(symbols, np.int64)
    freqs = np.ascontiguousarray(freqs, np.int64)
    tasks = lane_tasks(symbols.size, lanes, chunk)
    # a symbol emits at most 2 bytes with 14-bit probabilities; plus the 4-byte state
    slot = 2 * max((count for _, count in tasks), default=0) + 8
    out = np.empty(len(tasks) * slot, np.uint8)
    lengths = np.empty(len(tasks), np.int64)
    err = ffi.new("char[]", _ERR)
    r = lib.nxkv_cuda_rans_encode_lanes(_in(ffi, "int64_t[]", symbols), symbols.size, _in(ffi, "int64_t[]", freqs), freqs.size,
                                        lanes, chunk, ffi.from_buffer("uint8_t[]", out), slot,
                                        ffi.from_buffer("int64_t[]", lengths), len(tasks), err, _ERR)
    if r == lib.NXKV_CUDA_ERR_ARG:
        raise ValueError("rANS: a symbol outside the frequency table or frequencies not summing to 2^14")
    _check(r, err, "rans_encode_lanes")
    slots = out.reshape(len(tasks), slot) if tasks else out.reshape(0, 0)
    return lengths, b"".join(slots[k, slot - int(length):].tobytes() for k, length in enumerate(lengths))


def copy_times(n_bytes: int, repeats: int = 10) -> dict[str, float]:
    """Milliseconds per copy of n_bytes (medians): device to device, pageable and pinned host to
    device: the benchmark's baselines, measured in the same run."""
    ffi, lib = load()
    d2d, h2d, pinned = ffi.new("double *"), ffi.new("double *"), ffi.new("double *")
    err = ffi.new("char[]", _ERR)
    _check(lib.nxkv_cuda_copy_times(n_bytes, repeats, d2d, h2d, pinned, err, _ERR), err, "copy_times")
    return {"d2d_ms": d2d[0], "h2d_ms": h2d[0], "h2d_pinned_ms": pinned[0]}

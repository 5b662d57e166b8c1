"""The native library (native/, built by CMake) bound with cffi in ABI mode. The declarations are
read from nxkv.h between its NXKV_CDEF markers, never copied by hand."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

from ..errors import NativeLibraryError
from . import ffi_module, reference

_PKG = Path(__file__).resolve().parent.parent
_lib = _ffi = None
declarations_from = ""  # once loaded: the prebuilt declarations' module, or the header parsed


def _library_names() -> list[str]:
    if sys.platform == "darwin":
        return ["libnxkv.dylib"]
    if os.name == "nt":
        return ["nxkv.dll", "libnxkv.dll"]
    return ["libnxkv.so"]


def _find(env: str, candidates: list[Path]) -> Path:
    if os.environ.get(env):
        return Path(os.environ[env])
    for c in candidates:
        if c.exists():
            return c
    raise NativeLibraryError(
        f"nexus-gguf's native library is not built (looked in {', '.join(map(str, candidates))}); "
        "reinstall with `pip install .` or build in place with `cmake -S . -B build && cmake --build build`"
    )


def _cdef(header: Path, marker: str = "NXKV_CDEF") -> str:
    """The declarations between the header's /* <marker>_BEGIN */ and /* <marker>_END */."""
    try:
        return ffi_module.declarations(header, marker)
    except ValueError as e:
        raise NativeLibraryError(str(e)) from None


def load():
    """(ffi, lib), loading once. Raises NativeLibraryError with the reason if it cannot."""
    global _lib, _ffi
    if _lib is not None:
        return _ffi, _lib

    native_dir = _PKG / "_native"
    lib_path = _find("NEXUS_GGUF_NATIVE_LIB", [native_dir / n for n in _library_names()])
    header = _find("NEXUS_GGUF_NATIVE_HEADER", [native_dir / "nxkv.h", _PKG.parent / "native/include/nxkv.h"])
    cdef = _cdef(header)
    # the declarations as CMake parsed them beside the library (backends/ffi_module.py), else now
    global declarations_from
    module = lib_path.parent / "nxkv_ffi.py"
    ffi, was_prebuilt = ffi_module.ffi_for(module, cdef)
    declarations_from = str(module if was_prebuilt else header)
    try:
        lib = ffi.dlopen(str(lib_path))
    except OSError as e:
        raise NativeLibraryError(f"cannot load {lib_path}: {e}") from None
    if lib.nxkv_abi_version() != lib.NXKV_ABI_VERSION:  # the library against the header beside it
        raise NativeLibraryError(
            f"{lib_path} has ABI version {lib.nxkv_abi_version()}, its header {header} says {lib.NXKV_ABI_VERSION}; rebuild it"
        )
    _ffi, _lib = ffi, lib
    return ffi, lib


def _byteplane(fn_name: str, src: np.ndarray, element_size: int) -> np.ndarray:
    ffi, lib = load()
    src = np.ascontiguousarray(src, dtype=np.uint8).reshape(-1)
    dst = np.empty_like(src)
    getattr(lib, fn_name)(
        ffi.from_buffer("uint8_t[]", src, require_writable=False),
        ffi.from_buffer("uint8_t[]", dst),
        src.size // element_size,
        element_size,
    )
    return dst


def byteplane_split(src: np.ndarray, element_size: int) -> np.ndarray:
    return _byteplane("nxkv_byteplane_split", src, element_size)


def byteplane_merge(src: np.ndarray, element_size: int) -> np.ndarray:
    return _byteplane("nxkv_byteplane_merge", src, element_size)


def _ptr(ffi, kind: str, array: np.ndarray):
    return ffi.from_buffer(kind, array, require_writable=False)


def e8_nearest(x: np.ndarray) -> np.ndarray:
    ffi, lib = load()
    x = np.ascontiguousarray(x, np.float64).reshape(-1, 8)
    out = np.empty_like(x)
    lib.nxkv_e8_nearest(_ptr(ffi, "double[]", x), ffi.from_buffer("double[]", out), x.shape[0])
    return out


def lattice_quantize_args(x: np.ndarray, step: np.ndarray):
    """(x [m, 8] float64, step [m] float64, coset, coord, coord_last outputs), checked: what the
    C kernels of lattice_quantize take (here and backends/cuda.py)."""
    x = np.ascontiguousarray(x, np.float64).reshape(-1, 8)
    m = x.shape[0]
    step = np.ascontiguousarray(step, np.float64).reshape(-1)
    if step.size != m:
        raise ValueError("lattice_quantize: one step per group of 8")
    return x, step, np.empty(m, np.uint8), np.empty((m, 7), np.int32), np.empty(m, np.int32)


def lattice_quantize(x: np.ndarray, step: np.ndarray):
    ffi, lib = load()
    x, step, coset, coord, last = lattice_quantize_args(x, step)
    m = x.shape[0]
    r = lib.nxkv_lattice_quantize(_ptr(ffi, "double[]", x), _ptr(ffi, "double[]", step), m, ffi.from_buffer("uint8_t[]", coset),
                                  ffi.from_buffer("int32_t[]", coord), ffi.from_buffer("int32_t[]", last))
    if r != lib.NXKV_OK:
        raise ValueError("lattice_quantize: values too large for their steps (points beyond int32)")
    return coset, coord, last


def lattice_quantize_rdo(x: np.ndarray, step: np.ndarray, rows: np.ndarray, costs: np.ndarray, scales: np.ndarray,
                         lam: float):
    ffi, lib = load()
    x, step, coset, coord, last = lattice_quantize_args(x, step)
    rows = np.ascontiguousarray(rows, np.int64).reshape(-1)
    costs = np.ascontiguousarray(costs, np.float64)
    scales = np.ascontiguousarray(scales, np.float64).reshape(-1)
    m = x.shape[0]
    if rows.size != m or costs.ndim != 2:
        raise ValueError("lattice_quantize_rdo: one rate row per group, a 2-D cost table")
    if m and (rows.min() < 0 or rows.max() + 8 > costs.shape[0]):
        raise ValueError("lattice_quantize_rdo: rate rows outside the cost table")
    r = lib.nxkv_lattice_quantize_rdo(_ptr(ffi, "double[]", x), _ptr(ffi, "double[]", step), m, _ptr(ffi, "int64_t[]", rows),
                                      _ptr(ffi, "double[]", costs), costs.shape[0], costs.shape[1],
                                      _ptr(ffi, "double[]", scales), scales.size, float(lam),
                                      ffi.from_buffer("uint8_t[]", coset), ffi.from_buffer("int32_t[]", coord),
                                      ffi.from_buffer("int32_t[]", last))
    if r != lib.NXKV_OK:
        raise ValueError("lattice_quantize_rdo: values too large for their steps (points beyond int32)")
    return coset, coord, last


def lattice_dequantize_args(coset, coord, coord_last, step, mean):
    """The arrays lattice_dequantize's C kernels take (here and backends/cuda.py), checked."""
    coset = np.ascontiguousarray(coset, np.uint8).reshape(-1)
    m = coset.size
    coord = np.ascontiguousarray(coord, np.int32).reshape(-1)
    coord_last = np.ascontiguousarray(coord_last, np.int32).reshape(-1)
    step = np.ascontiguousarray(step, np.float64).reshape(-1)
    mean = np.ascontiguousarray(mean, np.float64).reshape(-1)
    if coord.size != 7 * m or coord_last.size != m or step.size != m or mean.size % 8 or (mean.size and m % (mean.size // 8)):
        raise ValueError("lattice_dequantize: arrays of mismatched sizes")
    return coset, coord, coord_last, step, mean


def lattice_dequantize(coset: np.ndarray, coord: np.ndarray, coord_last: np.ndarray, step: np.ndarray,
                       mean: np.ndarray) -> np.ndarray:
    ffi, lib = load()
    coset, coord, coord_last, step, mean = lattice_dequantize_args(coset, coord, coord_last, step, mean)
    m = coset.size
    out = np.empty((m, 8), np.float32)
    lib.nxkv_lattice_dequantize(_ptr(ffi, "uint8_t[]", coset), _ptr(ffi, "int32_t[]", coord), _ptr(ffi, "int32_t[]", coord_last),
                                _ptr(ffi, "double[]", step), m, _ptr(ffi, "double[]", mean) if mean.size else ffi.NULL,
                                mean.size // 8, ffi.from_buffer("float[]", out))
    return out


def hadamard_blocks(x: np.ndarray, block: int) -> np.ndarray:
    ffi, lib = load()
    src = np.ascontiguousarray(x, np.float32)
    if src.ndim == 0 or src.shape[-1] % max(block, 1):  # blocks must not run across rows
        raise ValueError(f"rows of {src.shape[-1] if src.ndim else 0} values are not whole {block}-value blocks")
    out = np.empty_like(src)
    if lib.nxkv_hadamard_blocks(_ptr(ffi, "float[]", src), ffi.from_buffer("float[]", out), src.size, block) != lib.NXKV_OK:
        raise ValueError(f"Hadamard size {block} is not a power of two dividing rows of {src.shape[-1] if src.ndim else 0}")
    return out


def basis_dequantize(coset, coord, coord_last, step, basis, shift: int, mean, channel_scale=()) -> np.ndarray:
    ffi, lib = load()
    coset, coord, coord_last, step, basis, mean, channel_scale = reference.basis_dequantize_args(
        coset, coord, coord_last, step, basis, mean, channel_scale)
    n, h = step.shape
    d = basis.shape[1]
    out = np.empty((n, h, d), np.float32)
    if lib.nxkv_basis_dequantize(_ptr(ffi, "uint8_t[]", coset), _ptr(ffi, "int32_t[]", coord), _ptr(ffi, "int32_t[]", coord_last),
                                 _ptr(ffi, "double[]", step), _ptr(ffi, "int16_t[]", basis), n * h, h, d, int(shift),
                                 _ptr(ffi, "double[]", mean) if mean.size else ffi.NULL,
                                 _ptr(ffi, "double[]", channel_scale) if channel_scale.size else ffi.NULL,
                                 ffi.from_buffer("float[]", out)) != lib.NXKV_OK:
        raise ValueError(f"basis_dequantize: head size {d}, shift {shift} or a basis entry out of range")
    return out


def f32_to_f16(x: np.ndarray, use_hardware: bool = True) -> np.ndarray:
    ffi, lib = load()
    x = np.ascontiguousarray(x, np.float32)
    out = np.empty(x.shape, "<u2")
    lib.nxkv_f32_to_f16(_ptr(ffi, "float[]", x), ffi.from_buffer("uint16_t[]", out), x.size, int(use_hardware))
    return out


def f64_to_f16(x: np.ndarray) -> np.ndarray:
    ffi, lib = load()
    x = np.ascontiguousarray(x, np.float64)
    out = np.empty(x.shape, "<u2")
    lib.nxkv_f64_to_f16(_ptr(ffi, "double[]", x), ffi.from_buffer("uint16_t[]", out), x.size)
    return out


def quantize_q8_0(x: np.ndarray) -> np.ndarray:
    ffi, lib = load()
    x = np.ascontiguousarray(x, np.float32).reshape(-1)
    if x.size % 32:
        raise ValueError(f"{x.size} values are not a whole number of 32-value q8_0 blocks")
    out = np.empty((x.size // 32, 34), np.uint8)
    lib.nxkv_quantize_q8_0(_ptr(ffi, "float[]", x), ffi.from_buffer("uint8_t[]", out), x.size // 32)
    return out


def rope_args(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, n_rot: int):
    """(x, cos, sin) as rope_rotate's C kernels take them (here and backends/cuda.py), checked."""
    x = np.ascontiguousarray(x, np.float32)
    n, h, d = x.shape
    cos = np.ascontiguousarray(cos, np.float64)
    sin = np.ascontiguousarray(sin, np.float64)
    if n_rot % 2 or n_rot > d or cos.shape != (n, n_rot // 2) or sin.shape != cos.shape:
        raise ValueError("rope_rotate: angles not of shape [n_cells, n_rot / 2] or n_rot odd or above the head size")
    return x, cos, sin


def rope_rotate(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, n_rot: int, neox: bool) -> np.ndarray:
    ffi, lib = load()
    x, cos, sin = rope_args(x, cos, sin, n_rot)
    n, h, d = x.shape
    out = np.empty_like(x)
    lib.nxkv_rope_rotate(_ptr(ffi, "float[]", x), ffi.from_buffer("float[]", out), n, h, d, _ptr(ffi, "double[]", cos),
                         _ptr(ffi, "double[]", sin), n_rot, int(bool(neox)))
    return out


def rans_encode(symbols: np.ndarray, freqs: np.ndarray) -> bytes:
    ffi, lib = load()
    symbols = np.ascontiguousarray(symbols, np.int64)
    return _rans_encode_strided(ffi, lib, symbols, 0, symbols.size, 1, np.ascontiguousarray(freqs, np.int64))


def _rans_encode_strided(ffi, lib, symbols, start: int, count: int, stride: int, freqs) -> bytes:
    capacity = count * 4 + 8  # a symbol emits at most 2 bytes with 14-bit probabilities; plus the state
    out = np.empty(capacity, np.uint8)
    k = lib.nxkv_rans_encode(_ptr(ffi, "int64_t[]", symbols[start:] if count else symbols), count, stride,
                             _ptr(ffi, "int64_t[]", freqs), freqs.size, ffi.from_buffer("uint8_t[]", out), capacity)
    if k < 0:
        raise ValueError("rANS: a symbol outside the frequency table or frequencies not summing to 2^14")
    return out[capacity - k :].tobytes()


def rans_decode(data: bytes, freqs: np.ndarray, n: int) -> np.ndarray:
    ffi, lib = load()
    freqs = np.ascontiguousarray(freqs, np.int64)
    out = np.empty(n, np.int32)
    r = lib.nxkv_rans_decode(data, len(data), _ptr(ffi, "int64_t[]", freqs), freqs.size, ffi.from_buffer("int32_t[]", out), n)
    if r != lib.NXKV_OK:
        raise ValueError("rANS stream is corrupt (ends early or does not decode to its start state)")
    return out


def rans_encode_lanes(symbols: np.ndarray, freqs: np.ndarray, lanes: int, chunk: int):
    """Every (chunk, lane) stream in one call (one call a lane cost a tenth of a save, measured)."""
    from .reference import n_lane_tasks

    ffi, lib = load()
    symbols = np.ascontiguousarray(symbols, np.int64).reshape(-1)
    freqs = np.ascontiguousarray(freqs, np.int64)
    n_tasks = n_lane_tasks(symbols.size, lanes, chunk)
    lengths = np.zeros(n_tasks, np.int64)
    capacity = symbols.size * 2 + 8 * max(n_tasks, 1)  # 2 bytes a symbol at most, and each lane's state
    out = np.empty(capacity, np.uint8)
    k = lib.nxkv_rans_encode_lanes(_ptr(ffi, "int64_t[]", symbols), symbols.size, _ptr(ffi, "int64_t[]", freqs), freqs.size,
                                   lanes, chunk, ffi.from_buffer("uint8_t[]", out), capacity,
                                   ffi.from_buffer("int64_t[]", lengths))
    if k < 0:
        raise ValueError("rANS: a symbol outside the frequency table or frequencies not summing to 2^14")
    return lengths, out[:k].tobytes()


_PARALLEL_SYMBOLS = 1 << 16  # fewer symbols decode faster on one thread


def rans_decode_lanes(data: bytes, lengths: np.ndarray, freqs: np.ndarray, n: int, lanes: int, chunk: int,
                      out: np.ndarray | None = None) -> np.ndarray:
    """Chunks decoded on all cores (cffi releases the GIL around each call), a chunk's lanes in
    lockstep on one; into `out` (int32, n, contiguous) when given."""
    from . import parallel_map, threads
    from .reference import n_lane_tasks

    ffi, lib = load()
    lengths = np.ascontiguousarray(lengths, np.int64)
    n_tasks = n_lane_tasks(n, lanes, chunk)
    if lengths.size != n_tasks or int(lengths.sum()) != len(data):
        raise ValueError("interleaved rANS lane table does not match the stream")
    freqs = np.ascontiguousarray(freqs, np.int64)
    if out is None:
        out = np.empty(n, np.int32)
    elif out.dtype != np.int32 or out.size != n or not out.flags.c_contiguous or not out.flags.writeable:
        raise ValueError("rans_decode_lanes: out must be a writable contiguous int32 array of n values")
    args = (data, len(data), _ptr(ffi, "int64_t[]", lengths), n_tasks, _ptr(ffi, "int64_t[]", freqs), freqs.size,
            ffi.from_buffer("int32_t[]", out), n, lanes, chunk)
    n_chunks = n_tasks // lanes
    workers = min(threads(), n_chunks) if n >= _PARALLEL_SYMBOLS else 1
    if workers <= 1:  # small streams (scales, classes): no pool
        results = [lib.nxkv_rans_decode_lanes(*args, 0, n_chunks)]
    else:
        bounds = np.linspace(0, n_chunks, workers + 1).astype(np.int64)
        results = parallel_map(lambda i: lib.nxkv_rans_decode_lanes(*args, int(bounds[i]), int(bounds[i + 1])), list(range(workers)))
    if any(r != lib.NXKV_OK for r in results):
        raise ValueError("rANS stream is corrupt (a lane ends early or does not decode to its start state)")
    return out


class Capture:
    """The C query-capture callback (nxkv_capture_eval) with its state and output buffer.
    `accessors` maps the nxkv_capture field names to ggml function addresses."""

    def __init__(self, accessors: dict[str, int], n_layer: int, per_layer: int):
        ffi, lib = load()
        self._ffi, self._lib = ffi, lib
        self.out = np.zeros(n_layer * per_layer, np.float32)
        self.filled = np.zeros(n_layer, np.int64)
        c = ffi.new("nxkv_capture *")
        for field, address in accessors.items():
            setattr(c, field, ffi.cast(ffi.typeof(getattr(c, field)), address))
        c.n_layer, c.per_layer = n_layer, per_layer
        c.out = ffi.cast("float *", ffi.from_buffer(self.out))
        c.filled = ffi.cast("int64_t *", ffi.from_buffer(self.filled))
        self.struct = c  # keeps the struct alive as long as this object
        self.callback_address = int(ffi.cast("uintptr_t", lib.nxkv_capture_eval))
        self.user_data = int(ffi.cast("uintptr_t", c))

    @property
    def enabled(self) -> bool:
        return bool(self.struct.enabled)

    @enabled.setter
    def enabled(self, value: bool) -> None:
        self.struct.enabled = int(value)

    @property
    def errors(self) -> int:
        return int(self.struct.errors)

    def reset(self) -> None:
        """Empty the buffers for the next decode."""
        self.filled[:] = 0
        self.struct.errors = 0


_STREAM_FIELDS = 22  # int64 fields of nxkv_stream_info


def parse_streams(data: np.ndarray, max_items: int):
    """nxkv_parse_streams over a section's bytes (uint8, contiguous): (records, values), records
    an int64 array of nxkv_stream_info rows (shape[4] spread over four columns; entropy.py's REC_*
    columns), values the frequencies and lane lengths they index; None where the library refuses the bytes."""
    ffi, lib = load()
    records = np.empty((255, _STREAM_FIELDS), np.int64)
    values = np.empty(max(data.size, 1), np.int64)  # a varint takes a byte at least
    counts = ffi.new("int64_t[2]")
    r = lib.nxkv_parse_streams(ffi.from_buffer("uint8_t[]", data), data.size, max_items,
                               ffi.cast("nxkv_stream_info *", ffi.from_buffer("int64_t[]", records)), 255, counts,
                               ffi.from_buffer("int64_t[]", values), values.size, counts + 1)
    if r != lib.NXKV_OK:
        return None
    return records[: counts[0]].copy(), values[: counts[1]].copy()



def point_layout(records: np.ndarray, roles: np.ndarray, n_cells: int, g: int, classes: np.ndarray | None,
                 buckets: np.ndarray | None):
    """nxkv_point_layout (nxkv.h): (key_rows, n_tables, (slot, rank, width), cell_map or None),
    or None where the library refuses (a point stream missing or not of its shape, or arguments
    out of its range: section_decode's numpy path then says what is wrong)."""
    ffi, lib = load()
    records = np.ascontiguousarray(records, np.int64)
    roles = np.ascontiguousarray(roles, np.int32)
    if records.size != len(records) * _STREAM_FIELDS or roles.size != 3 * len(records):
        raise ValueError("point_layout: records and roles do not match")
    key_rows = np.empty(lib.NXKV_MAX_TABLES * 3 * 8, np.int64)  # tables x 3 point types x 8 component classes
    bucket_ids, tables_m = np.empty(lib.NXKV_MAX_TABLES, np.int64), np.empty(lib.NXKV_MAX_TABLES, np.int64)
    slot, rank, width = (np.empty(max(9 * g, 1), np.int64) for _ in range(3))
    cell_map = np.empty(max(2 * n_cells, 1), np.int64)
    counts = ffi.new("int64_t[2]")
    null = ffi.NULL
    if classes is not None:
        classes = np.ascontiguousarray(classes, np.uint8).reshape(-1)
        if classes.size != 8 * g:
            raise ValueError("point_layout: classes are not 8 g")
    if buckets is not None:
        buckets = np.ascontiguousarray(buckets, np.int64).reshape(-1)
        if buckets.size != n_cells:
            raise ValueError("point_layout: buckets are not one per cell")
    r = lib.nxkv_point_layout(ffi.cast("nxkv_stream_info *", _ptr(ffi, "int64_t[]", records)) if len(records) else null,
                              len(records), _ptr(ffi, "int32_t[]", roles) if len(records) else null, n_cells, g,
                              _ptr(ffi, "uint8_t[]", classes) if classes is not None and classes.size else null,
                              _ptr(ffi, "int64_t[]", buckets) if buckets is not None and buckets.size else null,
                              ffi.from_buffer("int64_t[]", key_rows), key_rows.size, counts,
                              ffi.from_buffer("int64_t[]", bucket_ids), ffi.from_buffer("int64_t[]", tables_m), counts + 1,
                              ffi.from_buffer("int64_t[]", slot), ffi.from_buffer("int64_t[]", rank),
                              ffi.from_buffer("int64_t[]", width), ffi.from_buffer("int64_t[]", cell_map))
    if r != lib.NXKV_OK:
        return None
    n_slots = 9 * g
    return (key_rows[: counts[0]], int(counts[1]), (slot[:n_slots], rank[:n_slots], width[:n_slots]),
            cell_map[: 2 * n_cells] if buckets is not None else None)

"""Kernel ops and the backends that run them: one table, resolved once (bitsandbytes' one op name,
python-zstandard's explicit backend policy).

OPS declares each op once: its numpy reference (backends/reference.py, the readable truth) and
the tolerance every other implementation must meet. Backends, fastest first:

    cuda     the CUDA library built from native/cuda/ where nvcc was found (backends/cuda.py);
             only when asked for: its per-op kernels are round trips over the bus, and its
             real work, decoding a whole file's lattice sections at once, is section_decode.py
    native   the C library built from native/ (backends/native.py binds it with cffi)
    numba    Numba CPU kernels (backends/numba_cpu.py)
    numpy    the references themselves

NEXUS_GGUF_BACKEND = auto (default) | cuda | native | numba | numpy  ("reference" is an alias of numpy)
  auto: native if the library loads, else numba, with a warning that says why (never cuda).
  cuda / native / numba / numpy: that backend, or a clear error if it cannot load (for cuda: no
  library built, no driver, no device).
Each op runs in the chosen backend if it has it, else in the next one down the list (today the
native library and Numba have every op). A missing op is a coverage gap, named by
backend_features(), not a fallback that hides a failure: a backend that fails to load is an
error or a warning, never silent. Every op is exact: the float ops (Hadamard, RoPE, lattice
values, f16) are written so that every backend rounds as the reference does.

    backend_name()      the chosen backend ("native", "numba" or "numpy"); also nexus_gguf.backend
    backend_features()  op -> the backend that runs it
    backend_status()    backend -> "available" or why not
    kernel(op)          the implementation of op that runs
    recording()         a context that collects op -> backend for the ops actually run
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import os
import threading
import warnings
from dataclasses import dataclass
from types import ModuleType
from typing import Callable, Iterator

from ..errors import ConfigError, NativeLibraryError
from . import reference


@dataclass(frozen=True)
class Op:
    name: str
    reference: Callable
    exact: bool  # other backends must give the same bits; else they must be within rtol
    rtol: float = 0.0


OPS: dict[str, Op] = {op.name: op for op in (
    Op("byteplane_split", reference.byteplane_split, exact=True),
    Op("byteplane_merge", reference.byteplane_merge, exact=True),
    Op("e8_nearest", reference.e8_nearest, exact=True),
    Op("lattice_quantize", reference.lattice_quantize, exact=True),
    Op("lattice_quantize_rdo", reference.lattice_quantize_rdo, exact=True),
    Op("lattice_dequantize", reference.lattice_dequantize, exact=True),
    Op("rope_rotate", reference.rope_rotate, exact=True),
    Op("f32_to_f16", reference.f32_to_f16, exact=True),
    Op("f64_to_f16", reference.f64_to_f16, exact=True),
    Op("quantize_q8_0", reference.quantize_q8_0, exact=True),
    Op("rans_encode", reference.rans_encode, exact=True),
    Op("rans_decode", reference.rans_decode, exact=True),
    Op("rans_encode_lanes", reference.rans_encode_lanes, exact=True),
    Op("rans_decode_lanes", reference.rans_decode_lanes, exact=True),
    Op("hadamard_blocks", reference.hadamard_blocks, exact=True),
    Op("basis_dequantize", reference.basis_dequantize, exact=True),
)}

BACKENDS = ("cuda", "native", "numba", "numpy")
CPU_BACKENDS = BACKENDS[1:]  # what auto chooses from
_MODULES = {"cuda": "cuda", "native": "native", "numba": "numba_cpu", "numpy": "reference"}
_ALIASES = {"reference": "numpy"}
_loaded: dict[str, ModuleType | Exception] = {}
_resolved: dict[str, tuple[str, dict[str, tuple[str, Callable]]]] = {}
_recorder: contextvars.ContextVar[dict | None] = contextvars.ContextVar("nexus_gguf_kernel_recorder", default=None)


def _load(name: str) -> ModuleType:
    """The backend's module, loaded once; raises NativeLibraryError / ImportError if it cannot."""
    if name not in _loaded:
        try:
            mod = importlib.import_module(f"{__name__}.{_MODULES[name]}")
            if name in ("native", "cuda"):
                mod.load()
            _loaded[name] = mod
        except (NativeLibraryError, ImportError) as e:
            _loaded[name] = e
    got = _loaded[name]
    if isinstance(got, Exception):
        raise got
    return got


def _policy(name: str | None) -> str:
    p = (name or os.environ.get("NEXUS_GGUF_BACKEND") or "auto").lower()
    return _ALIASES.get(p, p)


def _resolve(policy: str) -> tuple[str, dict[str, tuple[str, Callable]]]:
    """(backend name, op -> (backend that runs it, implementation)) for a policy, once."""
    if policy in _resolved:
        return _resolved[policy]
    if policy == "auto":
        chosen = None
        for name in CPU_BACKENDS:
            try:
                _load(name)
                chosen = name
                break
            except (NativeLibraryError, ImportError) as e:
                warnings.warn(f"nexus-gguf: the {name} backend is unavailable ({e}); trying the next one", RuntimeWarning,
                              stacklevel=4)
    elif policy in BACKENDS:
        _load(policy)  # a backend asked for by name must load
        chosen = policy
    else:
        raise ConfigError(f"NEXUS_GGUF_BACKEND={policy!r}; choose one of auto, {', '.join(BACKENDS)}")
    table = {}
    for op in OPS:
        for name in BACKENDS[BACKENDS.index(chosen):]:
            try:
                impl = getattr(_load(name), op, None)
            except (NativeLibraryError, ImportError):
                continue
            if impl is not None:
                table[op] = (name, impl)
                break
    _resolved[policy] = (chosen, table)
    return _resolved[policy]


def backend_name(name: str | None = None) -> str:
    """The backend chosen by `name` or the NEXUS_GGUF_BACKEND policy."""
    return _resolve(_policy(name))[0]


def backend_features(name: str | None = None) -> dict[str, str]:
    """op -> the backend that runs it under `name` or the policy."""
    return {op: b for op, (b, _) in _resolve(_policy(name))[1].items()}


def backend_status() -> dict[str, str]:
    """backend -> 'available' or 'unavailable: why'."""
    out = {}
    for name in BACKENDS:
        try:
            _load(name)
            out[name] = "available"
        except (NativeLibraryError, ImportError) as e:
            out[name] = f"unavailable: {e}"
    return out


def implementation(op: str, backend: str) -> Callable | None:
    """`op` exactly as `backend` implements it, or None where it has no such kernel."""
    return getattr(_load(_policy(backend)), op, None)


def kernel(op: str, name: str | None = None) -> Callable:
    """The implementation of `op` that runs under `name` or the policy."""
    try:
        b, impl = _resolve(_policy(name))[1][op]
    except KeyError:
        raise ConfigError(f"no kernel op {op!r} (ops: {', '.join(OPS)})") from None
    used = _recorder.get()
    if used is not None:
        used[op] = b
    return impl


def native_parser() -> Callable | None:
    """native.parse_streams (a section's stream records in C: host-side work, no kernel op of
    its own) where the policy chose the native or cuda backend and the library loads, else None:
    the Python readers parse."""
    return native_host("parse_streams")


def native_host(name: str) -> Callable | None:
    """The native module's host-side helper `name` (work in C that is no kernel op of its own:
    parse_streams, point_layout) where the policy chose the native or cuda backend and the
    library loads, else None: the numpy code does that work."""
    if backend_name() not in ("native", "cuda"):
        return None
    try:
        return getattr(_load("native"), name)
    except (NativeLibraryError, ImportError):
        return None


def note_used(op: str, backend: str) -> None:
    """Records that `backend` ran `op` (for work done outside kernel(): section_decode.py)."""
    used = _recorder.get()
    if used is not None:
        used[op] = backend


@contextlib.contextmanager
def recording() -> Iterator[dict[str, str]]:
    """Collects op -> backend for every kernel looked up inside the block."""
    used: dict[str, str] = {}
    token = _recorder.set(used)
    try:
        yield used
    finally:
        _recorder.reset(token)


_executor = None
_executor_size = 0


def threads() -> int:
    """The cores this process may use, at most NEXUS_GGUF_THREADS when that is set."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    limit = os.environ.get("NEXUS_GGUF_THREADS")
    if limit:
        try:
            n = min(n, max(1, int(limit)))
        except ValueError:
            raise ConfigError(f"NEXUS_GGUF_THREADS={limit!r} is not a whole number") from None
    return n


def pool():
    """The package's thread pool of threads() workers (kernels that release the GIL run on it)."""
    global _executor, _executor_size
    n = threads()
    if _executor is None or _executor_size != n:
        from concurrent.futures import ThreadPoolExecutor

        if _executor is not None:
            _executor.shutdown(wait=False)  # NEXUS_GGUF_THREADS changed: its threads finish what they hold
        _executor = ThreadPoolExecutor(max_workers=n, thread_name_prefix="nexus-gguf", initializer=_mark_worker)
        _executor_size = n
    return _executor


_worker = threading.local()


def _mark_worker() -> None:
    _worker.active = True


def in_pool() -> bool:
    """True on one of the pool's own threads: work started there runs on that thread, since
    waiting on the pool from inside it deadlocks once every worker waits (layers decoded in
    parallel, each with interleaved rANS lanes, did)."""
    return getattr(_worker, "active", False)


def prepare_and_run(prepare, run, items: list, window: int = 0, cost=None, budget: int | None = None) -> None:
    """run(prepare(item)) for every item: prepare (Python, holding the GIL) here, one item after
    another, run (a kernel that releases the GIL) on the pool, at most `window` (default: four
    per thread) prepared and not yet run, and, where `cost` (bytes a prepared item holds) and
    `budget` are given, no more once those hold `budget` bytes, unless only as many as the
    threads are. One item's preparation then overlaps the others' runs; with parallel_map every
    worker prepared at once and they waited on the GIL together (a 4096-token load spent a
    quarter of its time so, measured). A place opens when any run ends, not only the oldest,
    and the window is wide enough for the preparation to run ahead: waiting on the oldest of two
    per thread left both cores busy only 75-80% of a 4096-token load (four per thread, any run:
    that load ~11% shorter, measured). The first exception in item order is raised here, once
    the runs already started have finished (they write the caller's buffers); nothing more is
    prepared after one."""
    if threads() < 2 or len(items) < 2 or in_pool():
        for item in items:
            run(prepare(item))
        return
    from concurrent.futures import FIRST_COMPLETED, wait

    executor, window = pool(), window or 4 * threads()
    pending: dict = {}  # future -> (its item's place, the bytes it holds)
    errors: list[tuple[int, BaseException]] = []

    def reap(block: bool) -> None:
        done = wait(pending, return_when=FIRST_COMPLETED)[0] if block else [f for f in pending if f.done()]
        for f in done:
            place, _ = pending.pop(f)
            if f.exception() is not None:
                errors.append((place, f.exception()))

    def full() -> bool:
        if len(pending) >= window:
            return True
        return budget is not None and len(pending) > threads() and sum(b for _, b in pending.values()) >= budget

    try:
        for place, item in enumerate(items):
            while full():
                reap(block=True)
            reap(block=False)
            if errors:
                break
            try:
                prepared = prepare(item)
            except BaseException as e:  # an earlier item's error, if any, comes first
                errors.append((place, e))
                break
            pending[executor.submit(run, prepared)] = (place, cost(prepared) if cost is not None else 0)
    finally:
        wait(pending)
    reap(block=False)
    if errors:
        raise min(errors, key=lambda x: x[0])[1]


def parallel_map(fn, items: list) -> list:
    """[fn(item) for item in items], on the thread pool where there are cores and items to
    share (serially when called from a pool thread); the first exception any call raises is
    raised here."""
    if threads() < 2 or len(items) < 2 or in_pool():
        return [fn(item) for item in items]
    return list(pool().map(fn, items))

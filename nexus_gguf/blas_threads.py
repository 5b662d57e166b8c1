"""numpy's BLAS on one thread while the package's own threads run numpy code in parallel.

The encoder codes layers on all cores, and the PCA transform's matrix products call BLAS, which
starts its own threads on every core too: on 2 cores the busy-waiting threads doubled the time a
4096-token `high` save takes (2.9 s against 1.4 s with OPENBLAS_NUM_THREADS=1, SmolLM2). This sets
the thread count of every OpenBLAS loaded (numpy's among them; as threadpoolctl does, without the
dependency) for the duration of a block, and leaves other BLAS libraries (MKL, Accelerate)
alone: where none is found it does nothing."""

from __future__ import annotations

import ctypes
import importlib
import threading
from contextlib import contextmanager
from typing import Iterator

_lock = threading.Lock()
_depth = 0
_saved: list = []  # (setter, count before) of each library, while a block is active

# (set, get) symbol names of the OpenBLAS builds numpy and scipy wheels ship, and the plain one
_SYMBOLS = [("scipy_openblas_set_num_threads64_", "scipy_openblas_get_num_threads64_"),
            ("scipy_openblas_set_num_threads", "scipy_openblas_get_num_threads"),
            ("openblas_set_num_threads64_", "openblas_get_num_threads64_"),
            ("openblas_set_num_threads", "openblas_get_num_threads")]


def _find() -> list:
    """(set, get) function pairs of the OpenBLAS libraries loaded in this process (Linux: from
    /proc/self/maps; elsewhere none)."""
    importlib.import_module("numpy")  # loads its BLAS

    paths = []
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
            for line in f:
                fields = line.split()
                path = fields[-1] if len(fields) >= 6 else ""  # mappings without a path have 5 fields
                if "openblas" in path.lower() and path not in paths:
                    paths.append(path)
    except OSError:
        return []
    out = []
    for path in paths:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for set_name, get_name in _SYMBOLS:
            if hasattr(lib, set_name) and hasattr(lib, get_name):
                setter, getter = getattr(lib, set_name), getattr(lib, get_name)
                setter.argtypes, setter.restype, getter.restype = [ctypes.c_int], None, ctypes.c_int
                out.append((setter, getter))
                break
    return out


@contextmanager
def single_threaded_blas() -> Iterator[None]:
    """OpenBLAS on one thread inside the block, every OpenBLAS loaded (found when the outermost
    block starts: another package may have loaded one since); nested and concurrent blocks share
    one setting, and each library's count before the outermost one is restored after the last."""
    global _depth, _saved
    with _lock:
        if _depth == 0:
            _saved = [(setter, getter()) for setter, getter in _find()]
            for setter, _ in _saved:
                setter(1)
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                for setter, count in _saved:
                    setter(count)
                _saved = []

"""The native library's cffi declarations, parsed once when the library is built.

cffi parses a header's declarations with pycparser: 50-80 ms for nxkv.h on 2 EPYC cores, paid
by every process on its first load or save (measured). CMake runs this file as a script beside
the library (`python ffi_module.py nxkv_ffi.py nxkv.h`): it writes cffi's out-of-line ABI module
of the same declarations, which imports in ~3 ms, with the SHA-256 of the declarations it was
made from. backends/native.py (and backends/cuda.py, nxkv_cuda_ffi.py) takes it only where that
matches the headers it loads the library against, and parses them otherwise (a build without
Python or cffi, a header changed since).

Run as a script this file imports nothing of the package (CMake's Python has only cffi)."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any, Optional


def declarations(header: Path, marker: str = "NXKV_CDEF") -> str:
    """The declarations between the header's /* <marker>_BEGIN */ and /* <marker>_END */
    (ValueError if it has no such markers)."""
    text = Path(header).read_text()
    try:
        return text.split(f"/* {marker}_BEGIN */", 1)[1].split(f"/* {marker}_END */", 1)[0]
    except IndexError:
        raise ValueError(f"{header} has no {marker} markers") from None


def digest(cdef: str) -> str:
    return hashlib.sha256(cdef.encode()).hexdigest()


def write(out: Path, *headers: tuple[Path, str]) -> None:
    """The out-of-line module of the declarations of each (header, marker), in order, into `out`
    (replaced atomically)."""
    import cffi

    cdef = "".join(declarations(h, marker) for h, marker in headers)
    ffi = cffi.FFI()
    ffi.cdef(cdef)
    ffi.set_source("nxkv_ffi", None)  # None: ABI mode, nothing to compile
    tmp = Path(f"{out}.tmp{os.getpid()}")
    ffi.emit_python_code(str(tmp))
    with open(tmp, "a") as f:
        f.write(f"\n# the declarations this was made from (backends/ffi_module.py)\nCDEF_SHA256 = {digest(cdef)!r}\n")
    os.replace(tmp, out)


def prebuilt(module: Path, cdef: str) -> Optional[Any]:
    """The FFI of the module `write` made, where it exists, loads and was made from `cdef`; else
    None (the caller parses cdef itself)."""
    if not module.is_file():
        return None
    try:
        spec = importlib.util.spec_from_file_location("nexus_gguf_nxkv_ffi", module)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    except Exception:  # another cffi's module format, a damaged file: parse instead
        return None
    return mod.ffi if getattr(mod, "CDEF_SHA256", None) == digest(cdef) else None


def ffi_for(module: Path, cdef: str) -> tuple[Any, bool]:
    """(an FFI of cdef, whether it is the prebuilt one of `module`): the module's where it matches
    (prebuilt), else cdef parsed now."""
    ffi = prebuilt(module, cdef)
    if ffi is not None:
        return ffi, True
    import cffi

    ffi = cffi.FFI()
    ffi.cdef(cdef)
    return ffi, False


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit("usage: ffi_module.py OUT HEADER[:MARKER] ... (marker NXKV_CDEF where none is given)")
    write(Path(sys.argv[1]), *[(Path(a.split(":")[0]), a.split(":")[1] if ":" in a else "NXKV_CDEF") for a in sys.argv[2:]])

"""The native core headers (native/core/*.h) are written once for every target: they must
compile as CUDA device code too. Needs nvcc (skipped without it); runs nothing on a GPU."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

NATIVE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "native")


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="no nvcc")
@pytest.mark.skipif(not os.path.isdir(NATIVE), reason="no native/ sources (an installed package's tests)")
def test_core_headers_compile_as_cuda_device_code(tmp_path):
    r = subprocess.run(["nvcc", "-c", os.path.join(NATIVE, "cuda", "core_compiles.cu"), "-o", str(tmp_path / "core.o")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="no nvcc")
@pytest.mark.skipif(not os.path.isdir(NATIVE), reason="no native/ sources (an installed package's tests)")
def test_cuda_library_compiles(tmp_path):
    # CMake builds it wherever nvcc is found (for several GPU generations); this names the failure
    # on its own, for one generation, with the flags that keep its arithmetic the CPU's
    r = subprocess.run(["nvcc", "-c", "-std=c++17", "-fmad=false", "-arch=sm_90", "-I", os.path.join(NATIVE, "include"),
                        os.path.join(NATIVE, "cuda", "nxkv_cuda.cu"), "-o", str(tmp_path / "nxkv_cuda.o")],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr

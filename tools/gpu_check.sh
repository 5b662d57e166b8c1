#!/usr/bin/env bash
# tools/gpu_check.sh [STATE.nxkv ...]: on a machine with an NVIDIA GPU, builds the native and CUDA
# libraries with CMake, runs the CUDA parity tests (every per-op kernel against its numpy
# reference, bit for bit; the batched section decode against the CPU path, bit for bit, on the
# golden files and option variants; damaged input refused), the golden files through the cuda
# backend, a fuzz of the GPU decode on damaged sections ($GPU_FUZZ_EXAMPLES inputs, default 2000),
# then tools/gpu_bench.py on each state
# file (default: none; any lattice-coded .nxkv; options for it in $GPU_BENCH_ARGS). Logs and JSON go
# to $GPU_CHECK_OUT (default build/gpu-check). Needs nvcc, CMake, numpy, numba, cffi, zstandard, pytest, gguf.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${GPU_CHECK_OUT:-build/gpu-check}
mkdir -p "$out"
status=0

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv 2>&1 | tee "$out/nvidia-smi.txt"
echo "== build (CMake, CUDA architectures ${CUDA_ARCHS:-native})"
if cmake -S . -B build/gpu -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES="${CUDA_ARCHS:-native}" >"$out/cmake.log" 2>&1 &&
   cmake --build build/gpu -j >>"$out/cmake.log" 2>&1; then
  echo "built: $(ls nexus_gguf/_native)"
else
  echo "BUILD FAILED (log: $out/cmake.log); testing the libraries already in nexus_gguf/_native" >&2
  tail -20 "$out/cmake.log" >&2
  status=1
fi
python3 -c "import nexus_gguf.backends as b; print('backends:', b.backend_status())"

echo "== CUDA parity tests"
select=()
if ! python3 -c "import llama_cpp" 2>/dev/null; then
  select=(-m "not llama")  # a GPU machine without llama-cpp-python runs the fast tier (conftest.py)
  echo "(llama-cpp-python is not installed here: tests that load a model are deselected)"
fi
python3 -m pytest -q -p no:cacheprovider -rs "${select[@]}" tests/test_cuda.py tests/test_backends.py 2>&1 | tee "$out/pytest.log" | tail -15
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
if grep -q "cuda backend unavailable" "$out/pytest.log"; then
  echo "the CUDA backend did not load: the GPU tests were skipped" >&2
  status=1
fi

echo "== golden files through the cuda backend (NEXUS_GGUF_BACKEND=cuda)"
NEXUS_GGUF_BACKEND=cuda python3 -m pytest -q -p no:cacheprovider "${select[@]}" tests/test_golden.py 2>&1 | tee "$out/golden.log" | tail -3
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== the GPU decode fuzzed: damaged sections of both formats, the CUDA library against the CPU (${GPU_FUZZ_EXAMPLES:-2000} inputs)"
NEXUS_GGUF_FUZZ_EXAMPLES=${GPU_FUZZ_EXAMPLES:-2000} python3 -m pytest -q -p no:cacheprovider "${select[@]}" tests/test_fuzz.py \
  -k gpu_decode_path 2>&1 | tee "$out/fuzz.log" | tail -3
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

for state in "$@"; do
  echo "== benchmark: $state"
  name=$(basename "$state" .nxkv)
  # shellcheck disable=SC2086 # GPU_BENCH_ARGS is a list of options
  python3 tools/gpu_bench.py "$state" --json "$out/bench-$name.json" ${GPU_BENCH_ARGS:-} || status=1
done
exit $status

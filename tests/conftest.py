"""Shared fixtures: the real SmolLM2-135M GGUF through real llama-cpp-python, a tiny random
Gemma 3 GGUF for iSWA layouts, and helpers to read states and logits.

Two tiers. Tests that need llama-cpp-python (every test using a model fixture, and modules
marked `llama`) are marked `llama`; `pytest -m "not llama"` runs the rest from a source checkout
in an environment without llama-cpp-python. A llama test selected where llama-cpp-python is
missing fails with that reason instead of skipping silently."""

from __future__ import annotations

import ctypes
import importlib
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))

from nexus_gguf.default_model import default_model_path  # noqa: E402
from tiny_models import write_tiny_gemma3  # noqa: E402

# fixtures that load a model through llama-cpp-python: a test using any of them is a llama test
MODEL_FIXTURES = {"smollm2_path", "gemma3_path"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if MODEL_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.llama)


def pytest_runtest_setup(item):
    if item.get_closest_marker("llama") is not None:
        try:
            importlib.import_module("llama_cpp")
        except ImportError as e:
            pytest.fail(f"this test needs llama-cpp-python ({e}); the fast tier is pytest -m 'not llama'", pytrace=False)


DATA = os.path.join(os.path.dirname(__file__), "data")
THREADS = max(1, min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    return default_model_path()


@pytest.fixture(scope="session")
def gemma3_path(tmp_path_factory) -> str:
    return write_tiny_gemma3(tmp_path_factory.mktemp("models") / "tiny-gemma3.gguf")


@pytest.fixture(scope="session")
def prompt_text() -> str:
    with open(os.path.join(DATA, "prose.txt"), encoding="utf-8") as f:
        return f.read()


def open_llama(path: str, n_ctx: int = 512, **kw):
    import llama_cpp

    return llama_cpp.Llama(path, n_ctx=n_ctx, n_threads=THREADS, n_batch=256, verbose=False, **kw)


def prompt_tokens(llm, text: str, n: int) -> list[int]:
    toks = llm.tokenize(text.encode(), add_bos=True)
    assert len(toks) >= n, "test text too short"
    return toks[:n]


def context_blob(llm) -> bytes:
    import llama_cpp

    ctx = llm._ctx.ctx
    size = llama_cpp.llama_state_get_size(ctx)
    buf = (ctypes.c_uint8 * size)()
    n = llama_cpp.llama_state_get_data(ctx, buf, size)
    assert 0 < n <= size
    return ctypes.string_at(buf, n)


def logits_now(llm) -> np.ndarray:
    import llama_cpp

    ptr = llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1)
    return np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),)).copy()


def layer0_keys(llm, tokens):
    """Layer 0's cached K [n_cells, n_head_kv, head_dim] of sequence 0 after evaluating `tokens`
    from position 0, its cells' positions, and whether it is a sliding-window layer. Layer 0
    sees nothing but the token itself: the property RoPE tests rest on."""
    from nexus_gguf import llama_bridge as bridge
    from nexus_gguf.llama_state import parse_state

    llm.reset()
    bridge.clear_seq(llm, 0)
    llm.eval(tokens)
    facts = bridge.model_facts(llm)
    state = parse_state(bridge.get_seq_state(llm, 0), "sequence", facts.state_layout())
    cache, _, layer = next((c, si, L) for c, si, L in state.layers() if L.model_layer == 0)
    stream = next(s for s in cache.streams if s is not None)
    k = layer.values("k").reshape(len(stream.cells), -1, facts.n_embd_head_k)
    return k, np.asarray(stream.cells.pos), bool(layer.sliding_window)


def decode_into(ctx, tokens, seq: int, pos0: int = 0) -> None:
    """Decode `tokens` into sequence `seq` of a raw llama_context at positions pos0, ..."""
    import llama_cpp

    batch = llama_cpp.llama_batch_init(len(tokens), 0, 1)
    try:
        batch.n_tokens = len(tokens)
        for i, tok in enumerate(tokens):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = tok, pos0 + i, 1
            batch.seq_id[i][0], batch.logits[i] = seq, i == len(tokens) - 1
        assert llama_cpp.llama_decode(ctx, batch) == 0
    finally:
        llama_cpp.llama_batch_free(batch)

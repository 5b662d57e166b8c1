"""Baselines: llama.cpp's own quantized caches reproduced from an f16 state, checked against
states that llama.cpp itself writes from Q8_0 / Q4_0 caches."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import open_llama, prompt_tokens

from nexus_gguf import llama_bridge as bridge
from nexus_gguf.backends.reference import hadamard_blocks, hadamard_matrix
from nexus_gguf.llama_rotation import llama_rotation_blocks
from nexus_gguf.baselines import GgmlRowsBaseline, ZstdBaseline, default_baselines
from nexus_gguf.llama_state import parse_state

GGML_Q8_0, GGML_Q4_0 = 8, 2


def test_hadamard_matrix_is_llamas():
    # ggml_gen_hadamard's recursion, written out for n = 4
    np.testing.assert_allclose(hadamard_matrix(4) * 2, [[1, 1, 1, 1], [1, -1, 1, -1], [1, 1, -1, -1], [1, -1, -1, 1]])
    h = hadamard_matrix(128)
    np.testing.assert_allclose(h @ h, np.eye(128), atol=1e-6)
    x = np.random.default_rng(0).standard_normal((5, 256)).astype(np.float32)
    np.testing.assert_allclose(hadamard_blocks(hadamard_blocks(x, 64), 64), x, atol=1e-5)
    with pytest.raises(ValueError):
        hadamard_matrix(80)


@pytest.mark.parametrize("head_dim,k_block,v_block", [(64, 64, 64), (128, 128, 64), (192, 64, 64), (256, 256, 64), (80, 0, 0), (96, 0, 0)])
def test_rotation_blocks_follow_llama(head_dim, k_block, v_block):
    assert llama_rotation_blocks(head_dim, "k") == k_block
    assert llama_rotation_blocks(head_dim, "v") == v_block


def _state(llm, tokens):
    llm.reset()
    llm.eval(tokens)
    blob = bridge.get_seq_state(llm, 0)
    return blob, parse_state(blob, "sequence", bridge.model_facts(llm).state_layout())


@pytest.fixture(scope="module")
def states(smollm2_path, prompt_text):
    """The same 40-token prompt through an f16 cache (V transposed and not) and llama.cpp's
    own Q8_0 and Q4_0 caches."""
    out = {}
    for name, kw in {
        "f16": dict(flash_attn=False),
        "f16_fa": dict(flash_attn=True),
        "q8_0": dict(flash_attn=True, type_k=GGML_Q8_0, type_v=GGML_Q8_0),
        "q4_0": dict(flash_attn=True, type_k=GGML_Q4_0, type_v=GGML_Q4_0),
    }.items():
        llm = open_llama(smollm2_path, **kw)
        out[name] = (llm, *_state(llm, prompt_tokens(llm, prompt_text, 40)))
    return out


@pytest.mark.parametrize("cache_type", ["q8_0", "q4_0"])
@pytest.mark.parametrize("source", ["f16", "f16_fa"])
def test_stored_size_is_what_llama_writes(states, cache_type, source):
    llm, blob, _ = states[source]
    stored = GgmlRowsBaseline(cache_type, False, cache_type, True, 64, 64).encode(blob, bridge.model_facts(llm).state_layout())
    assert len(stored) == len(states[cache_type][1])


def test_llama_rotates_quantized_caches_as_we_do(states):
    # layer 0 sees the same inputs in every context, so its K and V differ only by storage
    _, _, f16 = states["f16_fa"]
    _, _, q8 = states["q8_0"]
    ref = next(f16.layers())[2]
    got = next(q8.layers())[2]
    for kind in ("k", "v"):
        want = ref.values(kind)
        stored = got.values(kind)
        unrotated = hadamard_blocks(stored, llama_rotation_blocks(64, kind))
        scale = np.abs(want).max()
        assert np.abs(unrotated - want).max() < 0.02 * scale
        assert np.abs(stored - want).max() > 0.1 * scale  # the cache really holds rotated rows


@pytest.mark.parametrize("baseline", default_baselines(64, 64), ids=lambda b: b.name)
def test_baselines_restore_into_the_original_context(states, baseline):
    llm, blob, state = states["f16"]
    layout = bridge.model_facts(llm).state_layout()
    restored = baseline.decode(baseline.encode(blob, layout), state, layout)
    back = parse_state(restored, "sequence", layout)
    assert len(restored) == len(blob)
    for (_, _, a), (_, _, b) in zip(state.layers(), back.layers()):
        assert (a.k_type, a.v_type, a.v.shape) == (b.k_type, b.v_type, b.v.shape)
    if baseline.lossless:
        assert restored == blob
    else:
        k0, k1 = (next(s.layers())[2].values("k") for s in (state, back))
        assert 0 < np.abs(k0 - k1).max() < 0.2 * np.abs(k0).max()
    assert bridge.set_seq_state(llm, restored, 0)


def test_zstd_baseline_is_plain_zstd(states):
    import zstandard

    _, blob, _ = states["f16"]
    stored = ZstdBaseline("zstd", True).encode(blob, None)
    assert zstandard.ZstdDecompressor().decompress(stored) == blob and len(stored) < len(blob)

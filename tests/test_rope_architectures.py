"""RoPE removal per architecture, on tiny random-weight models that llama.cpp really runs.

Layer 0's key of a token depends on nothing but the token (K = W_k norm(embedding) + bias,
then RoPE at the token's position), so the same tokens evaluated at two different starting
positions must give the same keys once the Rope stage has taken RoPE off, while the keys llama.cpp
cached (still rotated) differ. Each case also checks what the stage bound to, and that a stage bound
slightly wrong (other pairing, rotated width, scale, YaRN mix, YaRN original context) does not line
the keys up, so the property cannot pass by accident."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import layer0_keys, open_llama
from tiny_models import write_tiny_model

from nexus_gguf import llama_bridge as bridge
from nexus_gguf.stages import ModelBinding, TensorInfo
from nexus_gguf.stages.rope import Rope

pytestmark = pytest.mark.llama

# llama.h enum llama_rope_scaling_type
LLAMA_ROPE_SCALING_TYPE_NONE, LLAMA_ROPE_SCALING_TYPE_YARN = 0, 2

TOKENS = [5, 9, 200, 77, 31, 140]  # at most gemma3's 8-token window, so its sliding layer keeps them all
SHIFT = 300  # filler before the second copy: positions 300..305, past the YaRN model's original 256
FILLER = [int(t) for t in (np.arange(SHIFT) * 7) % 250 + 3]
AGREE = 0.01  # f16 cache: rounding is ~1e-3 of the magnitude
DIFFER = 0.05

# Llama 3-style per-pair frequency divisors (rope_freqs.weight): high frequencies kept, low ones / 8
LLAMA3_FREQ_FACTORS = [1.0] * 6 + [2.0, 4.0] + [8.0] * 8

CASES = [
    pytest.param(
        dict(arch="llama"), {},
        dict(mode="norm", n_rot=32, freq_scale=1.0, ext_factor=0.0, freq_base=10000.0),
        [{"mode": "neox"}],
        id="llama-norm",
    ),
    pytest.param(
        dict(arch="qwen2"), {},
        dict(mode="neox", n_rot=32, freq_scale=1.0, ext_factor=0.0, freq_base=10000.0),
        [{"mode": "norm"}],
        id="qwen2-neox-bias",
    ),
    pytest.param(
        dict(arch="stablelm", n_rot=8), {},
        dict(mode="neox", n_rot=8, freq_scale=1.0, ext_factor=0.0),
        [{"n_rot": 32}, {"n_rot": 16}, {"mode": "norm"}],
        id="stablelm-neox-partial",
    ),
    pytest.param(
        dict(arch="chatglm", n_rot=16), {},
        dict(mode="norm", n_rot=16, freq_scale=1.0, ext_factor=0.0),
        [{"n_rot": 32}, {"mode": "neox"}],
        id="chatglm-norm-partial",
    ),
    pytest.param(
        dict(arch="llama", rope_scaling={"type": "linear", "factor": 4.0}), {},
        dict(mode="norm", n_rot=32, freq_scale=0.25, ext_factor=0.0),
        [{"freq_scale": 1.0}],
        id="llama-linear-x4",
    ),
    pytest.param(
        dict(arch="qwen2", rope_scaling={"type": "yarn", "factor": 4.0, "original_context_length": 256}), {},
        dict(mode="neox", n_rot=32, freq_scale=0.25, ext_factor=1.0, n_ctx_orig=256, beta_fast=32.0, beta_slow=1.0),
        [{"ext_factor": 0.0}, {"freq_scale": 1.0}, {"n_ctx_orig": 1024}],
        id="qwen2-yarn-x4",
    ),
    pytest.param(
        dict(arch="llama", rope_freq_factors=LLAMA3_FREQ_FACTORS), {},
        dict(mode="norm", n_rot=32, freq_scale=1.0, ext_factor=0.0),
        [],
        id="llama-rope-freqs",
        marks=pytest.mark.xfail(
            strict=True, raises=AssertionError,
            reason="Rope does not apply per-pair frequency factors (rope_freqs.weight, Llama 3.x; ggml-cpu ops.cpp "
            "ggml_rope_cache_init divides theta by freq_factors[i0/2]): pairs with a factor != 1 keep a "
            "position-dependent residual rotation",
        ),
    ),
    pytest.param(
        dict(arch="llama", rope_scaling={"type": "none", "factor": 4.0}), {},
        dict(mode="norm", n_rot=32, freq_scale=1.0, ext_factor=0.0),
        [{"freq_scale": 0.25}],
        id="llama-scaling-none-with-factor",
    ),
    pytest.param(
        dict(arch="llama", rope_scaling={"type": "linear", "factor": 4.0}), dict(rope_scaling_type=LLAMA_ROPE_SCALING_TYPE_YARN),
        dict(mode="norm", n_rot=32, freq_scale=0.25, ext_factor=1.0),
        [{"ext_factor": 0.0}],
        id="context-override-yarn",
    ),
    pytest.param(
        dict(arch="llama", rope_scaling={"type": "linear", "factor": 4.0}), dict(rope_scaling_type=LLAMA_ROPE_SCALING_TYPE_NONE),
        dict(mode="norm", n_rot=32, freq_scale=1.0, ext_factor=0.0),
        [{"freq_scale": 0.25}],
        id="context-override-none",
    ),
]


def _strip(rope, k, pos, sliding):
    info = TensorInfo("k", "f16", 2, 0, kind="k", positions=pos, model_layer=0, sliding=sliding,
                      n_cells=k.shape[0], n_heads=k.shape[1], head_dim=k.shape[2])
    return rope.encode(k, info)


def _same_tokens_two_positions(path, **llama_kw):
    """The bound Rope and, for TOKENS evaluated at positions 0.. and SHIFT.., layer 0's raw keys
    and positions of both runs, row i of each being TOKENS[i]."""
    llm = open_llama(path, n_ctx=512, **llama_kw)
    rope = Rope().bind(ModelBinding(bridge.model_facts(llm), bridge.context_facts(llm, rope=True)))
    runs = []
    for prefix in ([], FILLER):
        k, pos, sliding = layer0_keys(llm, prefix + TOKENS)
        cell_at = {int(p): c for c, p in enumerate(pos)}
        want = [len(prefix) + i for i in range(len(TOKENS))]
        assert all(p in cell_at for p in want), "the cache lost the tokens' cells"
        cells = [cell_at[p] for p in want]
        runs.append((k[cells], pos[cells]))
    return rope, runs, sliding


def _mismatch(rope, runs, sliding):
    """max |key at positions 0.. - key at positions SHIFT..| after `rope` removal, and the scale."""
    (ka, pa), (kb, pb) = runs
    fa, fb = _strip(rope, ka, pa, sliding), _strip(rope, kb, pb, sliding)
    return float(np.abs(fa - fb).max()), float(np.abs(fa).max())


def _check(rope, runs, sliding, wrong_variants):
    (ka, pa), (kb, pb) = runs
    assert list(pb - pa) == [SHIFT] * len(TOKENS)
    fa, fb = _strip(rope, ka, pa, sliding), _strip(rope, kb, pb, sliding)
    scale = float(np.abs(fa).max())
    # the raw keys are rotated by different angles: every token's key differs clearly
    raw = np.abs(ka - kb).reshape(len(TOKENS), -1).max(axis=1)
    assert raw.min() > DIFFER * scale, f"raw keys barely differ ({raw.min():.4f} vs scale {scale:.4f}): test too weak"
    worst = np.abs(fa - fb).max(axis=(0, 1))  # per head dimension
    err = float(worst.max())
    assert err < AGREE * scale, (
        f"RoPE-removed keys differ by {err:.5f} (scale {scale:.4f}, {err / scale:.2%}); "
        f"dims off by > {AGREE:.0%}: {np.flatnonzero(worst > AGREE * scale).tolist()}"
    )
    cfg = {n: v for n, v in rope.get_config().items() if n != "id"}
    for change in wrong_variants:  # the property detects a wrong binding
        bad_err, bad_scale = _mismatch(Rope(**{**cfg, **change}), runs, sliding)
        assert bad_err > DIFFER * bad_scale, f"a stage bound with {change} lines the keys up too (err {bad_err:.4f})"


@pytest.mark.parametrize("writer_kw, llama_kw, expected, wrong_variants", CASES)
def test_rope_removal_is_position_free(tmp_path, writer_kw, llama_kw, expected, wrong_variants):
    path = write_tiny_model(tmp_path / f"tiny-{writer_kw['arch']}.gguf", **writer_kw)
    rope, runs, sliding = _same_tokens_two_positions(path, **llama_kw)
    assert not sliding
    _check(rope, runs, sliding, wrong_variants)
    got = {name: getattr(rope, name) for name in expected}
    assert got == pytest.approx(expected), f"bound {got}, expected {expected}"


def test_rope_removal_is_position_free_gemma3_sliding(gemma3_path):
    rope, runs, sliding = _same_tokens_two_positions(gemma3_path)
    assert sliding  # layer 0 is a sliding-window layer, with its own base
    _check(rope, runs, sliding, [{"freq_base_swa": 1e6}, {"mode": "norm"}])
    expected = dict(mode="neox", n_rot=32, freq_scale=1.0, ext_factor=0.0, freq_base=1e6, freq_base_swa=10000.0,
                    freq_scale_swa=1.0)
    got = {name: getattr(rope, name) for name in expected}
    assert got == pytest.approx(expected), f"bound {got}, expected {expected}"

"""llama_state: parse then write is byte-identical on real llama.cpp states, for every layout."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
from conftest import THREADS, context_blob, decode_into, open_llama, prompt_tokens

from nexus_gguf import llama_bridge as bridge
from nexus_gguf.errors import StateLayoutError, UnsupportedModelError
from nexus_gguf.llama_state import check_supported_memory, parse_state, state_buffer, write_state


def _roundtrip(blob: bytes, kind: str, layout=None):
    state = parse_state(blob, kind, layout)
    assert write_state(state) == blob
    return state


def test_f16_cache_v_transposed(smollm2_path, prompt_text):
    llm = open_llama(smollm2_path, flash_attn=False)
    toks = prompt_tokens(llm, prompt_text, 48)
    llm.eval(toks)
    layout = bridge.model_facts(llm).state_layout()
    for kind, blob in (("context", context_blob(llm)), ("sequence", bridge.get_seq_state(llm))):
        st = _roundtrip(blob, kind, layout)
        assert st.n_cells == 48 and st.n_pos == 48
        (cache,) = st.caches
        stream = cache.streams[0]
        assert stream.v_trans
        assert [L.model_layer for L in stream.layers] == list(range(30))
        L0 = stream.layers[0]
        assert L0.k_type.name == "f16" and L0.k.shape == (48, 3 * 64 * 2)
        assert L0.v.shape == (3 * 64, 48 * 2)  # one row per V channel
        assert np.array_equal(stream.cells.pos, np.arange(48))
    assert st.kind == "sequence" and st.seq_id == 0
    assert parse_state(context_blob(llm), "context").arch == "llama"


def test_state_buffer_is_the_blob_once_its_rows_and_the_bytes_between_are_written(smollm2_path, prompt_text):
    """state_buffer: rows as views of one buffer; the bytes between them are left to the call it
    returns (written after the rows, so that the decoders' threads take the buffer's page
    faults); both written, the buffer is llama.cpp's blob byte for byte."""
    llm = open_llama(smollm2_path)
    llm.eval(prompt_tokens(llm, prompt_text, 40))
    layout = bridge.model_facts(llm).state_layout()
    for kind, blob in (("context", context_blob(llm)), ("sequence", bridge.get_seq_state(llm))):
        state = parse_state(blob, kind, layout)
        buf, placed, write_between = state_buffer(state)
        assert buf.size == len(blob)
        buf[:] = 0xA5  # not what any byte of the blob needs to be everywhere
        for src, dst in zip(state.caches[0].streams[0].layers, placed.caches[0].streams[0].layers):
            assert np.shares_memory(dst.k, buf) and np.shares_memory(dst.v, buf)
            dst.k[...], dst.v[...] = src.k, src.v
        assert bytes(buf) != blob  # the bytes between the rows are not written yet
        write_between()
        assert bytes(buf) == blob


@pytest.mark.parametrize("cache_type", ["q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "iq4_nl", "bf16", "f32"])
def test_cache_types_with_flash_attention(smollm2_path, prompt_text, cache_type):
    from nexus_gguf.ggml_types import ggml_type_by_name

    t = ggml_type_by_name(cache_type)
    llm = open_llama(smollm2_path, flash_attn=True, type_k=t.id, type_v=t.id)
    llm.eval(prompt_tokens(llm, prompt_text, 24))
    st = _roundtrip(bridge.get_seq_state(llm), "sequence")
    stream = st.caches[0].streams[0]
    assert not stream.v_trans
    L = stream.layers[7]
    assert L.k_type.name == cache_type and L.v_type.name == cache_type
    assert L.k.shape == (24, t.row_size(192)) and L.v.shape == (24, t.row_size(192))
    _roundtrip(context_blob(llm), "context")


def _multi_seq_context(llm, unified: bool):
    """A raw context with two sequences: seq 0 holds 20 tokens, seq 1 shares its first 8 cells
    (seq_cp) and adds 6 of its own."""
    import llama_cpp

    p = llama_cpp.llama_context_default_params()
    p.n_ctx, p.n_batch, p.n_seq_max, p.kv_unified = 256, 64, 2, unified
    p.n_threads = p.n_threads_batch = THREADS
    ctx = llama_cpp.llama_init_from_model(llm._model.model, p)
    assert ctx

    def decode(tokens, seq, pos0):
        decode_into(ctx, tokens, seq, pos0)

    toks = llm.tokenize(b"The keeper wrote everything down in a ledger that nobody else had ever read before. " * 2)
    assert len(toks) >= 20
    decode(toks[:20], 0, 0)
    mem = llama_cpp.llama_get_memory(ctx)
    if unified:
        llama_cpp.llama_memory_seq_cp(mem, 0, 1, 0, 8)
        decode(toks[:6], 1, 8)
    else:
        decode(toks[:14], 1, 0)
    return ctx


def _ctx_blob(ctx, seq=None) -> bytes:
    import llama_cpp

    if seq is None:
        size = llama_cpp.llama_state_get_size(ctx)
        buf = (ctypes.c_uint8 * size)()
        n = llama_cpp.llama_state_get_data(ctx, buf, size)
    else:
        size = llama_cpp.llama_state_seq_get_size(ctx, seq)
        buf = (ctypes.c_uint8 * size)()
        n = llama_cpp.llama_state_seq_get_data(ctx, buf, size, seq)
    assert n > 0
    return ctypes.string_at(buf, n)


@pytest.mark.parametrize("unified", [True, False])
def test_two_sequences(smollm2_path, unified):
    import llama_cpp

    llm = open_llama(smollm2_path, n_ctx=64)
    ctx = _multi_seq_context(llm, unified)
    try:
        whole = _roundtrip(_ctx_blob(ctx), "context")
        s0 = _roundtrip(_ctx_blob(ctx, 0), "sequence")
        s1 = _roundtrip(_ctx_blob(ctx, 1), "sequence")
        assert s0.n_cells == 20 and s1.n_cells == 14 and s1.seq_id == 1
        streams = whole.caches[0].streams
        if unified:
            (stream,) = streams
            # cells 0..7 belong to both sequences: the variable-length cell records
            counts = [len(s) for s in stream.cells.seq_ids]
            assert counts.count(2) == 8 and len(stream.cells) == 26
        else:
            assert len(streams) == 2 and [len(s.cells) for s in streams] == [20, 14]
    finally:
        llama_cpp.llama_free(ctx)


def test_empty_stream(smollm2_path):
    import llama_cpp

    llm = open_llama(smollm2_path, n_ctx=64)
    p = llama_cpp.llama_context_default_params()
    p.n_ctx, p.n_seq_max, p.kv_unified = 128, 2, False
    ctx = llama_cpp.llama_init_from_model(llm._model.model, p)
    try:
        st = _roundtrip(_ctx_blob(ctx), "context")
        assert st.caches[0].streams == [None, None]
    finally:
        llama_cpp.llama_free(ctx)


@pytest.mark.parametrize("swa_full", [True, False])
def test_iswa_gemma3(gemma3_path, swa_full):
    llm = open_llama(gemma3_path, n_ctx=256, swa_full=swa_full)
    toks = llm.tokenize(b"hello world, a tiny gemma three with sliding windows. " * 2, add_bos=False)
    llm.eval(toks)
    facts = bridge.model_facts(llm)
    assert facts.n_swa == 8 and facts.sliding_layers == [0, 1, 2, 3, 4]
    layout = facts.state_layout()
    seq = _roundtrip(bridge.get_seq_state(llm), "sequence", layout)
    base, swa = seq.caches
    assert (base.name, swa.name) == ("base", "swa")
    assert [L.model_layer for L in base.streams[0].layers] == [5]
    assert [L.model_layer for L in swa.streams[0].layers] == [0, 1, 2, 3, 4]
    assert all(L.sliding_window for L in swa.streams[0].layers)
    assert not base.streams[0].layers[0].sliding_window
    assert len(base.streams[0].cells) == len(toks)
    assert len(swa.streams[0].cells) == 8  # masked cells outside the window are not written
    whole = _roundtrip(context_blob(llm), "context", layout)
    assert whole.arch == "gemma3"


def test_damaged_blobs_raise(smollm2_path, prompt_text):
    llm = open_llama(smollm2_path)
    llm.eval(prompt_tokens(llm, prompt_text, 8))
    blob = bridge.get_seq_state(llm)
    with pytest.raises(StateLayoutError):
        parse_state(blob[:-1], "sequence")
    with pytest.raises(StateLayoutError):
        parse_state(blob + b"\0", "sequence")
    with pytest.raises(StateLayoutError):
        parse_state(blob, "context")  # a sequence blob is not a context blob
    bad_type = bytearray(blob)
    off = 4 + 4 + 4 + 4 + 8 * 12 + 8  # magic, seq, n_stream, cell_count, 8 cells, v_trans + n_layer
    bad_type[off : off + 4] = (77).to_bytes(4, "little")
    with pytest.raises(StateLayoutError, match="ggml type 77"):
        parse_state(bytes(bad_type), "sequence")


def test_recurrent_and_hybrid_memory_are_refused():
    with pytest.raises(UnsupportedModelError, match="recurrent"):
        check_supported_memory(True, False, "mamba")
    with pytest.raises(UnsupportedModelError, match="hybrid"):
        check_supported_memory(False, True, "jamba")
    check_supported_memory(False, False, "llama")


@pytest.mark.parametrize("unified", [True, False])
def test_one_sequence_of_a_whole_context_state(smollm2_path, unified):
    """LlamaState.sequence(s) of a context blob is byte for byte what llama.cpp writes for s."""
    llm = open_llama(smollm2_path, n_ctx=64)
    ctx = _multi_seq_context(llm, unified)
    import llama_cpp

    try:
        whole = parse_state(_ctx_blob(ctx), "context")
        for seq in (0, 1):
            assert write_state(whole.sequence(seq)) == _ctx_blob(ctx, seq)
    finally:
        llama_cpp.llama_free(ctx)
